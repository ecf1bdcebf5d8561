#!/usr/bin/env bash
# The test suite, as CI runs it: set the machine up (root), run the suite as an
# unprivileged user on real btrfs with real user namespaces, then the rootful
# subset as root. Extra arguments go to pytest (e.g. -k name, tests/test_x.py).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: run as root: it sets up btrfs storage and a test user" >&2; exit 1; }
repo=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}
TEST_USER=${STACKER_KERNEL_TEST_USER:-sktest}
"$repo/scripts/setup-host.sh"

home=$(getent passwd "$TEST_USER" | cut -d: -f6)
if ! runuser -u "$TEST_USER" -- test -r "$repo/pyproject.toml"; then
  # The checkout is private (e.g. under /root): run from a world-readable copy.
  copy=/var/tmp/stacker-kernel-src
  echo "== $repo is not readable by $TEST_USER: testing a copy in $copy"
  rm -rf "$copy" && mkdir -p "$copy"
  tar -C "$repo" --exclude=./.git -cf - . | tar -C "$copy" -xf -
  chmod -R a+rX "$copy"
  exec "$copy/scripts/test.sh" "$@"
fi
cd "$repo"
export PYTHONDONTWRITEBYTECODE=1
status=0
echo "== unprivileged suite (as $TEST_USER)"
runuser -u "$TEST_USER" -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$home" USER="$TEST_USER" \
  LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 CI="${CI:-}" \
  STACKER_KERNEL_CRASH_POINTS="${STACKER_KERNEL_CRASH_POINTS:-}" \
  STACKER_KERNEL_STORAGE="$(stacker-kernel storage-path --user "$TEST_USER")" \
  "$VENV/bin/python" -m pytest -m "not rootful" "$@" || status=$?
echo "== rootful subset (as root)"
STACKER_KERNEL_STORAGE="$(stacker-kernel storage-path --user root)" \
  "$VENV/bin/python" -m pytest -m rootful "$@" || { s=$?; [ "$status" = 0 ] && status=$s; }
exit $status
