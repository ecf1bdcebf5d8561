"""Benchmark: cost of a read-only btrfs snapshot per step, on a busybox and a Debian rootfs.

    python bench/snapshot.py [--storage DIR] [--repeat N] [--no-debian]

For each rootfs it prints the median time of: the raw SNAP_CREATE_V2 ioctl on
an unchanged subvolume, a read-only snapshot right after a small write (what
every step pays), and Store.commit after a small write (snapshot + record).
The Debian minbase rootfs is made once by scripts/debian-rootfs.sh (mmdebstrap)
and cached as a tarball in ~/.cache/stacker-kernel/.
Target: under 10 ms per step, independent of rootfs size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from stacker_kernel.storage import btrfs
from stacker_kernel.storage.location import resolve_storage
from stacker_kernel.storage.store import Snapshot, Store

def busybox_rootfs(dest: Path) -> None:
    """bin/busybox plus one symlink per applet, like a busybox image."""
    (dest / "bin").mkdir()
    (dest / "bin" / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    os.chmod(dest / "bin" / "busybox", 0o755)
    applets = subprocess.run(["/bin/busybox", "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        p = dest / applet
        if p.name == "busybox":
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.symlink_to("/bin/busybox")
    for d in ("etc", "tmp", "root", "proc", "sys", "dev"):
        (dest / d).mkdir(exist_ok=True)


def debian_tarball() -> Path:
    """The cached bookworm minbase tarball of scripts/debian-rootfs.sh (made on first use, ~20 s)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "debian-rootfs.sh"
    out = subprocess.run([str(script)], check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def debian_rootfs(dest: Path) -> None:
    """Extract the Debian tarball (ownership kept as root; device nodes skipped)."""
    cmd = ["tar", "-xf", str(debian_tarball()), "-C", str(dest), "--exclude=./dev/*"]
    if os.geteuid() != 0:
        cmd += ["--no-same-owner", "--no-same-permissions"]
    subprocess.run(cmd, check=True)


def count_files(path: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def median_ms(fn: Callable[[int], float], repeat: int) -> float:
    return statistics.median(fn(i) for i in range(repeat)) * 1000


def measure(store: Store, name: str, populate: Callable[[Path], None], repeat: int) -> list[str]:
    work = store.root / "bench-work"
    btrfs.create_subvolume(work)
    populate(work)
    files = count_files(work)
    out = store.root / "bench-out"
    out.mkdir()

    def raw(i: int) -> float:
        btrfs.sync(work)
        t = time.perf_counter()
        btrfs.snapshot(work, out / f"raw{i}", readonly=True)
        return time.perf_counter() - t

    def after_write(i: int) -> float:
        (work / f"small-{i}").write_bytes(os.urandom(4096))
        t = time.perf_counter()
        btrfs.snapshot(work, out / f"w{i}", readonly=True)
        return time.perf_counter() - t

    def commit(i: int) -> float:
        (work / f"commit-{i}").write_bytes(os.urandom(4096))
        t = time.perf_counter()
        store.commit(work, Snapshot(source=f"bench {i}"))
        return time.perf_counter() - t

    row = [name, str(files), f"{median_ms(raw, repeat):.1f}", f"{median_ms(after_write, repeat):.1f}",
           f"{median_ms(commit, repeat):.1f}"]
    btrfs.remove_tree(out)
    btrfs.remove_tree(work)
    for snap in store.snapshots():
        store.delete_snapshot(snap.id)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", help="storage root (default: resolved like the CLI)")
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--no-debian", action="store_true", help="skip the Debian rootfs (needs mmdebstrap)")
    args = ap.parse_args()
    root = resolve_storage(args.storage) / f"bench-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    rows = [["rootfs", "entries", "raw ioctl, unchanged (ms)", "after 4 KiB write (ms)",
             "Store.commit after write (ms)"]]
    try:
        with Store.open(root) as store:
            rows.append(measure(store, "busybox", busybox_rootfs, args.repeat))
            if not args.no_debian:
                rows.append(measure(store, "debian bookworm minbase", debian_rootfs, args.repeat))
    finally:
        btrfs.remove_tree(root)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    print(f"median of {args.repeat} runs each; target: under 10 ms per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
