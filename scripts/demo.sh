#!/usr/bin/env bash
# The main job (`make demo`, as root): set the machine up, then, as the
# unprivileged test user on its btrfs storage, build notebooks/hello.ipynb
# headless through the kernel protocol (JupyterLab-shaped requests with cell
# ids), print a line per cell with its time, and export stacker.yaml and an
# OCI layout. A second run is JupyterLab's "Restart & Run All": a new kernel
# resumes the notebook's session and every cell comes from the cache.
set -euo pipefail
SK_SCRIPT=scripts/demo.sh
. "$(dirname "$0")/lib.sh"
work=${STACKER_KERNEL_DEMO_DIR:-$home/stacker-demo}
sk_prepare_work
as_user cp "$repo/notebooks/hello.ipynb" "$work/hello.ipynb"
as_user "$repo/scripts/busybox-rootfs.sh" "$work/busybox.tar"
as_user rm -rf "$work/oci"

echo "== build $work/hello.ipynb (as $TEST_USER, storage $storage)"
run_notebook "$work/hello.ipynb" --output "$work/hello.out.ipynb"
echo "== restart & run all: a new kernel, served from the cache; then export"
run_notebook "$work/hello.ipynb" --export "$work/stacker.yaml" --oci-dir "$work/oci"
echo "== $work/stacker.yaml"
cat "$work/stacker.yaml"
echo "== $work/oci"
umoci ls --layout "$work/oci"
