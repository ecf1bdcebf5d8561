#!/bin/sh
# Make a minimal busybox root filesystem tar from Debian's busybox-static:
#   scripts/busybox-rootfs.sh OUT.tar
# Same layout as the test suite's busybox base (tests/conftest.py): the usual
# top-level directories, /bin/busybox, one symlink per applet, passwd/group;
# owned by 0:0 with a fixed mtime, so the tar (and its cache keys) are stable.
# Runs as any user; needs nothing but /bin/busybox and GNU tar.
set -eu
umask 022
[ $# = 1 ] || { echo "usage: $0 OUT.tar" >&2; exit 2; }
out=$1
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "$0: $busybox is missing: apt-get install busybox-static" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cd "$stage"
mkdir -p bin sbin usr/bin usr/sbin etc root proc sys dev var/tmp home run tmp
chmod 700 root
chmod 1777 tmp
cp "$busybox" bin/busybox
chmod 755 bin/busybox
for applet in $("$busybox" --list-full); do
  applet=${applet#/}
  [ "$applet" = bin/busybox ] && continue
  ln -sf /bin/busybox "$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\n' > etc/group
chmod 644 etc/passwd etc/group
cd - >/dev/null
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@1700000000 \
  --format=pax --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -cf "$out" bin dev etc home proc root run sbin sys tmp usr var
