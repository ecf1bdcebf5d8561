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
SK_SCRIPT=scripts/deb-build-demo.sh
. "$(dirname "$0")/lib.sh"
work=${STACKER_KERNEL_DEMO_DIR:-$home/stacker-demo}/deb-build
sk_prepare_work
as_user rm -rf "$work/oci" "$work/debs"
as_user cp "$repo/notebooks/deb-build.ipynb" "$work/deb-build.ipynb"
echo "== base: $(as_user "$repo/scripts/debian-rootfs.sh" "$work/debian-bookworm-minbase.tar")"

echo "== build $work/deb-build.ipynb (as $TEST_USER, storage $storage)"
run_notebook "$work/deb-build.ipynb" \
  --timeout 1800 --output "$work/deb-build.out.ipynb"
echo "== restart & run all: a new kernel, served from the cache; then export"
run_notebook "$work/deb-build.ipynb" \
  --export "$work/stacker.yaml" --oci-dir "$work/oci"
echo "== the grabbed package ($work/debs)"
as_user sh -c 'dpkg-deb --info "$1"/hello_*.deb' sh "$work/debs"
echo "== $work/oci"
umoci ls --layout "$work/oci"
