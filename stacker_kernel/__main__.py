"""`python -m stacker_kernel`: the kernel when started as `-f CONNECTION_FILE` (the
kernel spec's argv), else the CLI (`python -m stacker_kernel build -f stacker.yaml`)."""
import sys


def main() -> None:
    if sys.argv[1:2] == ["-f"]:
        from stacker_kernel.kernel.kernel import launch

        launch()
    else:
        from stacker_kernel.cli import main as cli_main

        sys.exit(cli_main())


if __name__ == "__main__":
    main()
