# Both targets run as root: they install packages and set up btrfs storage.
.PHONY: test demo setup

setup:
	scripts/setup-host.sh

test:
	scripts/test.sh

demo:
	scripts/demo.sh
