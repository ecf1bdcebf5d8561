#!/usr/bin/env python3
"""Install the `stacker` Jupyter kernel spec: `python install_kernel.py [--user|--sys-prefix|--prefix P]`.

A thin wrapper over stacker_kernel.kernel.install (also `stacker-kernel install`).
"""
import sys

from stacker_kernel.kernel.install import main

if __name__ == "__main__":
    sys.exit(main())
