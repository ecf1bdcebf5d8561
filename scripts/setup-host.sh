#!/usr/bin/env bash
# Prepare this machine for stacker-kernel (as root, idempotent): the Debian
# packages it needs, a virtualenv that every user can run, two unprivileged
# test users with subordinate uid/gid ranges, and btrfs storage for them and root.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "setup-host.sh: run as root (it installs packages and mounts btrfs)" >&2; exit 1; }
repo=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}
TEST_USER=${STACKER_KERNEL_TEST_USER:-sktest}
TEST_USER2=${STACKER_KERNEL_TEST_USER2:-sktest2}
STORAGE_SIZE=${STACKER_KERNEL_STORAGE_SIZE:-40G}

pkgs=(btrfs-progs uidmap util-linux busybox-static umoci skopeo mmdebstrap
      python3 python3-venv python3-dev sqlite3 zstd xz-utils ca-certificates dash bash
      pigz isal docker-registry apache2-utils oci-image-tool buildah chromium
      squashfs-tools squashfs-tools-ng erofs-utils cryptsetup-bin
      rpm  # rpm: reads rpm databases for the SBOM (and makes one for its test)
      bindfs  # bindfs: the FUSE mount a user places over their storage in test_storage_setup
      podman runc)  # podman: runs the single-user image as a pod does (test_pod); runc: crun refuses cgroup v1 hosts
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
# Bytecode for every user: they cannot write __pycache__ in the venv or the checkout, and
# Python compiles what has none on every start (python-btrfs is installed without it; the
# editable checkout too): 0.15 s of CPU more for each command, as much as a cached build
# takes otherwise (issue 25). Only what is missing or stale is compiled.
"$VENV/bin/python" -m compileall -qq "$VENV/lib" "$repo/stacker_kernel" || true
ln -sf "$VENV/bin/stacker-kernel" /usr/local/bin/stacker-kernel
# The README's `jupyter lab` (and `jupyter nbconvert --to stacker`) for every user, from the venv.
for tool in jupyter jupyter-lab; do
  ln -sf "$VENV/bin/$tool" "/usr/local/bin/$tool"
done

# Two unprivileged test users (the second for tests of one user against another),
# each with its own subordinate uid/gid range.
add_test_user() {
  local user=$1 range=$2 uid f
  id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
  uid=$(id -u "$user")
  for f in /etc/subuid /etc/subgid; do
    touch "$f"
    grep -qE "^($user|$uid):" "$f" || usermod --add-subuids "$range" --add-subgids "$range" "$user"
  done
}
# podman --userns=auto (test_pod: a container with 65536 ids of its own, as a
# pod with hostUsers: false) takes its ranges from the user `containers`.
for f in /etc/subuid /etc/subgid; do
  grep -q '^containers:' "$f" 2>/dev/null || echo "containers:2000000:2000000" >> "$f"
done
add_test_user "$TEST_USER" 200000-265535
add_test_user "$TEST_USER2" 300000-365535

# Each user gets their own image (its size bounds their space); a user already
# set up on the old shared image keeps their directory there.
for user in "$TEST_USER" "$TEST_USER2" root; do
  "$VENV/bin/stacker-kernel" setup-storage --user "$user" --size "$STORAGE_SIZE"
done

# The team JupyterHub (deploy/jupyterhub): its proxy and the system-wide kernel spec.
"$repo/deploy/jupyterhub/install.sh"
