require("./src/app")
