"""`python -m stacker_kernel`: the kernel when given `-f CONNECTION_FILE`, else the CLI."""
import sys


def main() -> None:
    if "-f" in sys.argv[1:]:
        from stacker_kernel.kernel.kernel import launch

        launch()
    else:
        from stacker_kernel.cli import main as cli_main

        sys.exit(cli_main())


if __name__ == "__main__":
    main()
