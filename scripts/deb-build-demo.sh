#!/usr/bin/env bash
# The flagship demo (as root, like scripts/demo.sh): as the unprivileged test
# user, run notebooks/deb-build.ipynb through the kernel protocol -- a `build`
# layer with Debian's toolchain and the build dependencies of GNU hello, a
# `pkg` layer that builds hello's .deb -- then again as JupyterLab's "Restart
# & Run All" (every cell from the cache), export stacker.yaml and an OCI
# layout, and show the grabbed .deb. Prints a line per cell with its time.
# Needs the Debian mirror. The first run on a machine is the uncached one:
# the cache is keyed by content, so later runs replay it.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "scripts/deb-build-demo.sh: run as root: it sets up btrfs storage and a test user" >&2; exit 1; }
repo=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}
TEST_USER=${STACKER_KERNEL_TEST_USER:-sktest}
"$repo/scripts/setup-host.sh" >/dev/null

home=$(getent passwd "$TEST_USER" | cut -d: -f6)
work=${STACKER_KERNEL_DEMO_DIR:-$home/stacker-demo}/deb-build
storage=$(stacker-kernel storage-path --user "$TEST_USER")
as_user() {
  runuser -u "$TEST_USER" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$TEST_USER" \
    LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 STACKER_KERNEL_STORAGE="$storage" \
    JUPYTER_PATH="$work/jupyter" JUPYTER_DATA_DIR="$work/jupyter" "$@"
}

as_user mkdir -p "$work"
as_user cp "$repo/notebooks/deb-build.ipynb" "$work/deb-build.ipynb"
echo "== base: $(as_user "$repo/scripts/debian-rootfs.sh" "$work/debian-bookworm-minbase.tar")"
as_user "$VENV/bin/python" -m stacker_kernel.kernel.install --prefix "$work/jupyter-prefix" >/dev/null
as_user mkdir -p "$work/jupyter/kernels"
as_user rm -rf "$work/jupyter/kernels/stacker" "$work/oci" "$work/debs"
as_user cp -r "$work/jupyter-prefix/share/jupyter/kernels/stacker" "$work/jupyter/kernels/stacker"

echo "== build $work/deb-build.ipynb (as $TEST_USER, storage $storage)"
as_user "$VENV/bin/python" -m stacker_kernel.kernel.runner "$work/deb-build.ipynb" \
  --timeout 1800 --output "$work/deb-build.out.ipynb"
echo "== restart & run all: a new kernel, served from the cache; then export"
as_user "$VENV/bin/python" -m stacker_kernel.kernel.runner "$work/deb-build.ipynb" \
  --export "$work/stacker.yaml" --oci-dir "$work/oci"
echo "== the grabbed package ($work/debs)"
as_user sh -c 'dpkg-deb --info "$1"/hello_*.deb' sh "$work/debs"
echo "== $work/oci"
umoci ls --layout "$work/oci"
