package internal

func TestHandler() {}
