#!/usr/bin/env bash
# Install this checkout's stacker-kernel into a venv as a built wheel, not an
# editable link to the source tree: a deployed hub then runs the package, and
# whoever can write the checkout cannot put code into every user's kernel.
# The venv keeps its other packages (setup-host.sh installed them); only
# stacker-kernel is replaced. Development keeps `pip install -e`.
# Usage (as the venv's owner, root for the system venv):
#   deploy/install-package.sh [VENV]     (default $STACKER_KERNEL_VENV or /opt/stacker-kernel/venv)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}}
[ -x "$VENV/bin/pip" ] || { echo "install-package.sh: $VENV is not a venv with pip" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Built from a copy: a build writes build/ and *.egg-info beside the sources.
mkdir "$work/src"
tar -C "$repo" --exclude=./.git --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ -cf - . \
  | tar -C "$work/src" -xf -
"$VENV/bin/pip" wheel -q --no-deps -w "$work/dist" "$work/src"
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$work"/dist/stacker_kernel-*.whl
echo "installed $(basename "$work"/dist/stacker_kernel-*.whl) into $VENV"
