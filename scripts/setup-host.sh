#!/usr/bin/env bash
# Prepare this machine for stacker-kernel (as root, idempotent): the Debian
# packages it needs, a virtualenv that every user can run, an unprivileged
# test user with a subordinate uid/gid range, and btrfs storage for it.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup-host.sh: run as root (it installs packages and mounts btrfs)" >&2; exit 1; }
repo=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}
TEST_USER=${STACKER_KERNEL_TEST_USER:-sktest}
STORAGE_SIZE=${STACKER_KERNEL_STORAGE_SIZE:-40G}

pkgs=(btrfs-progs uidmap util-linux busybox-static umoci skopeo mmdebstrap
      python3 python3-venv python3-dev sqlite3 zstd xz-utils ca-certificates dash bash
      pigz docker-registry oci-image-tool buildah chromium)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# Debian's python, not a per-user one: the test user must be able to run it.
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ] || [ "$(cat "$stamp")" != "$repo" ]; then
  "$VENV/bin/pip" install -q -e "$repo[test]"
  echo "$repo" > "$stamp"
fi
ln -sf "$VENV/bin/stacker-kernel" /usr/local/bin/stacker-kernel

if ! id "$TEST_USER" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash "$TEST_USER"
fi
uid=$(id -u "$TEST_USER")
for f in /etc/subuid /etc/subgid; do
  touch "$f"
  grep -qE "^($TEST_USER|$uid):" "$f" || usermod --add-subuids 200000-265535 --add-subgids 200000-265535 "$TEST_USER"
done

"$VENV/bin/stacker-kernel" setup-storage --user "$TEST_USER" --size "$STORAGE_SIZE"
"$VENV/bin/stacker-kernel" setup-storage --user root --size "$STORAGE_SIZE"

# The team JupyterHub (deploy/jupyterhub): its proxy and the system-wide kernel spec.
"$repo/deploy/jupyterhub/install.sh"
