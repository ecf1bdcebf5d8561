# Sourced by the demo scripts (as root): set the machine up, then run things
# as the unprivileged test user on its btrfs storage.
#   SK_SCRIPT=name; . scripts/lib.sh; work=DIR; sk_prepare_work
[ "$(id -u)" = 0 ] || { echo "${SK_SCRIPT:-$0}: run as root: it sets up btrfs storage and a test user" >&2; exit 1; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}
TEST_USER=${STACKER_KERNEL_TEST_USER:-sktest}
"$repo/scripts/setup-host.sh" >/dev/null
home=$(getent passwd "$TEST_USER" | cut -d: -f6)
if ! runuser -u "$TEST_USER" -- test -r "$repo/pyproject.toml"; then
  echo "${SK_SCRIPT:-$0}: $repo is not readable by $TEST_USER: clone it under a world-readable path" >&2
  exit 1
fi
storage=$(stacker-kernel storage-path --user "$TEST_USER")

# Run a command as the test user, with the kernel spec of $work.
as_user() {
  runuser -u "$TEST_USER" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$TEST_USER" \
    LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 STACKER_KERNEL_STORAGE="$storage" \
    JUPYTER_PATH="$work/jupyter" JUPYTER_DATA_DIR="$work/jupyter" "$@"
}

# Make $work (owned by the test user) with the "stacker" kernel spec in it.
sk_prepare_work() {
  as_user mkdir -p "$work/jupyter/kernels"
  as_user "$VENV/bin/python" -P -m stacker_kernel.kernel.install --prefix "$work/jupyter-prefix" >/dev/null
  as_user rm -rf "$work/jupyter/kernels/stacker"
  as_user cp -r "$work/jupyter-prefix/share/jupyter/kernels/stacker" "$work/jupyter/kernels/stacker"
}

# Run a notebook headless through the kernel protocol (JupyterLab-shaped requests).
run_notebook() {
  as_user "$VENV/bin/python" -P -m stacker_kernel.kernel.runner "$@"
}
