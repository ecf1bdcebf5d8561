package internal

func Handler() {}
