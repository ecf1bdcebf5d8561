#!/usr/bin/env bash
# Make (once) a Debian bookworm minbase rootfs tarball with mmdebstrap, and
# print its path. Cached: later calls print the path at once.
#   scripts/debian-rootfs.sh [OUT.tar]
# The tarball is made in the cache, ~/.cache/stacker-kernel/debian-bookworm-minbase.tar
# (or $STACKER_KERNEL_DEBIAN_TAR), and OUT, when given, is a hard link to it (a
# copy across filesystems): e.g. `scripts/debian-rootfs.sh notebooks/debian-bookworm-minbase.tar`
# puts it beside notebooks/deb-build.ipynb, which reads it with a relative %from tar.
# Works unprivileged (--mode=unshare needs a subuid range) and as root.
set -euo pipefail
cache=${STACKER_KERNEL_DEBIAN_TAR:-${XDG_CACHE_HOME:-$HOME/.cache}/stacker-kernel/debian-bookworm-minbase.tar}
out=${1:-$cache}
if [ -s "$out" ]; then echo "$out"; exit 0; fi

if [ ! -s "$cache" ]; then
  mkdir -p "$(dirname "$cache")"
  mode=unshare; [ "$(id -u)" = 0 ] && mode=root
  # The mirror the host's apt uses (the only one this network reaches).
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  [ -n "$mirror" ] || mirror=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  tmp="$cache.tmp.$$"
  trap 'rm -f "$tmp"' EXIT
  mmdebstrap --quiet --mode="$mode" --variant=minbase --format=tar \
    bookworm "$tmp" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" >&2
  mv "$tmp" "$cache"
  trap - EXIT
fi

if [ "$out" != "$cache" ]; then
  mkdir -p "$(dirname "$out")"
  # A link costs nothing; across filesystems, copy (reflinked where it can be).
  if ! ln -f "$cache" "$out" 2>/dev/null; then
    tmp="$out.tmp.$$"
    trap 'rm -f "$tmp"' EXIT
    cp --reflink=auto "$cache" "$tmp"
    mv "$tmp" "$out"
    trap - EXIT
  fi
fi
echo "$out"
