"""Install the `stacker` kernel spec (`stacker-kernel install`, `python install_kernel.py`).

The spec runs this very Python (absolute `sys.executable`) so the kernel
finds the package it was installed with, with `-P`: the kernel starts in the
notebook's folder, which others may be able to write, and a `json.py` planted
there must not be imported in place of the library's. Its language is `stacker`, never
`bash`: front-ends fall back to any kernel of the notebook's language when the
named one is missing, and a bash fallback would run build steps on the host
(jupyter_client falls back on a kernel spec of the notebook's language).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


KERNEL_NAME = "stacker"
DISPLAY_NAME = "Stacker (container build)"
LANGUAGE = "stacker"
RESOURCES = Path(__file__).with_name("resources")


def kernel_json(python: str | None = None) -> dict:
    """The kernel.json content: argv with an absolute python, message interrupts, no debugger."""
    return {
        "argv": [python or sys.executable, "-P", "-m", "stacker_kernel", "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": LANGUAGE,
        "interrupt_mode": "message",
        "env": {},
        "metadata": {"debugger": False},
    }


def write_spec(directory: Path, python: str | None = None) -> Path:
    """Write kernel.json and the logos into `directory` (created if needed); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kernel.json").write_text(json.dumps(kernel_json(python), indent=1) + "\n")
    for logo in RESOURCES.glob("logo-*.png"):
        shutil.copyfile(logo, directory / logo.name)
    return directory


def install(user: bool = False, prefix: str | None = None) -> str:
    """Install the spec for the user, under `prefix`, or system-wide; returns the spec directory.

    With neither `user` nor `prefix` it goes to the system location, which
    needs root (as `jupyter kernelspec install` does).
    """
    # Every user must read a spec installed system-wide: the temporary directory
    # is 0700 and is copied with its mode, and root's umask may be 077.
    old_umask = os.umask(0o022)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_spec(Path(tmp))
            os.chmod(tmp, 0o755)
            for f in Path(tmp).iterdir():
                os.chmod(f, 0o644)
            from jupyter_client.kernelspec import KernelSpecManager  # only here: every CLI command builds these options

            return KernelSpecManager().install_kernel_spec(
                tmp, KERNEL_NAME, user=user, prefix=prefix)
    finally:
        os.umask(old_umask)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The install options, shared by `stacker-kernel install` and install_kernel.py."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true",
                       help="install for the current user (~/.local/share/jupyter)")
    where.add_argument("--sys-prefix", action="store_true",
                       help="install into sys.prefix (the current virtualenv)")
    where.add_argument("--prefix", metavar="P", help="install under prefix P")


def run(args: argparse.Namespace) -> int:
    """Install as the parsed options say and print where; returns the exit status."""
    prefix = sys.prefix if args.sys_prefix else args.prefix
    # Like bash_kernel: without an option, only root installs system-wide.
    user = args.user or (prefix is None and os.geteuid() != 0)
    path = install(user=user, prefix=prefix)
    print(f"installed kernel spec '{KERNEL_NAME}' in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m stacker_kernel.kernel.install [--user|--sys-prefix|--prefix P]`."""
    parser = argparse.ArgumentParser(description="Install the stacker Jupyter kernel spec.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
