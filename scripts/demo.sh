#!/usr/bin/env bash
# The main job (`make demo`, as root): set the machine up, then, as the
# unprivileged test user on its btrfs storage, build notebooks/hello.ipynb
# headless through the kernel protocol (JupyterLab-shaped requests with cell
# ids), print a line per cell with its time, and export stacker.yaml and an
# OCI layout. A second run is JupyterLab's "Restart & Run All": a new kernel
# resumes the notebook's session and every cell comes from the cache.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "scripts/demo.sh: run as root: it sets up btrfs storage and a test user" >&2; exit 1; }
repo=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}
TEST_USER=${STACKER_KERNEL_TEST_USER:-sktest}
"$repo/scripts/setup-host.sh" >/dev/null

home=$(getent passwd "$TEST_USER" | cut -d: -f6)
work=${STACKER_KERNEL_DEMO_DIR:-$home/stacker-demo}
storage=$(stacker-kernel storage-path --user "$TEST_USER")
as_user() {
  runuser -u "$TEST_USER" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$TEST_USER" \
    LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 STACKER_KERNEL_STORAGE="$storage" \
    JUPYTER_PATH="$work/jupyter" JUPYTER_DATA_DIR="$work/jupyter" "$@"
}

as_user mkdir -p "$work"
as_user cp "$repo/notebooks/hello.ipynb" "$work/hello.ipynb"
as_user "$repo/scripts/busybox-rootfs.sh" "$work/busybox.tar"
as_user "$VENV/bin/python" -m stacker_kernel.kernel.install --prefix "$work/jupyter-prefix" >/dev/null
as_user mkdir -p "$work/jupyter/kernels"
as_user rm -rf "$work/jupyter/kernels/stacker"
as_user cp -r "$work/jupyter-prefix/share/jupyter/kernels/stacker" "$work/jupyter/kernels/stacker"

oci=()
if "$VENV/bin/python" -c "import stacker_kernel.engine.export" 2>/dev/null; then
  as_user rm -rf "$work/oci"
  oci=(--oci-dir "$work/oci")
fi

echo "== build $work/hello.ipynb (as $TEST_USER, storage $storage)"
as_user "$VENV/bin/python" -m stacker_kernel.kernel.runner "$work/hello.ipynb" \
  --output "$work/hello.out.ipynb"
echo "== restart & run all: a new kernel, served from the cache; then export"
as_user "$VENV/bin/python" -m stacker_kernel.kernel.runner "$work/hello.ipynb" \
  --export "$work/stacker.yaml" "${oci[@]}"
echo "== $work/stacker.yaml"
cat "$work/stacker.yaml"
if [ ${#oci[@]} -gt 0 ]; then
  echo "== $work/oci"
  umoci ls --layout "$work/oci" || true
fi
