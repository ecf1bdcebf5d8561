#!/usr/bin/env bash
# Make (once) a Debian bookworm minbase rootfs tarball with mmdebstrap, and
# print its path. Cached: later calls print the same path at once.
#   scripts/debian-rootfs.sh [OUT.tar]
# Default OUT: ~/.cache/stacker-kernel/debian-bookworm-minbase.tar
# Works unprivileged (--mode=unshare needs a subuid range) and as root.
set -euo pipefail
out=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/stacker-kernel/debian-bookworm-minbase.tar}
if [ -s "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$(dirname "$out")"
mode=unshare; [ "$(id -u)" = 0 ] && mode=root
# The mirror the host's apt uses (the only one this network reaches).
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
mmdebstrap --quiet --mode="$mode" --variant=minbase --format=tar \
  bookworm "$tmp" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" >&2
mv "$tmp" "$out"
trap - EXIT
echo "$out"
