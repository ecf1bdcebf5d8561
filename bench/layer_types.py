"""squashfs/erofs layer export beside `mksquashfs` / `mkfs.erofs` alone, measured in one run.

A Debian minbase rootfs (scripts/debian-rootfs.sh) as a read-only btrfs
snapshot. For the whole rootfs as one layer: our export (diff, packed
straight from the read-only snapshot by mksquashfs -comp zstd or mkfs.erofs,
dm-verity) beside the packer alone on the same snapshot; the same with the
overlay upper dir laid out first (what every step layer costs: reflinks,
owners, modes, xattrs); and our tar+gzip layer for scale. Everything runs
inside the user namespace, as the export does.

    STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/sktest python bench/layer_types.py [ROOTFS.tar]
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.oci.diff import diff_snapshots
from stacker_kernel.oci.layer_types import LayerType, append_verity, write_fs_layer
from stacker_kernel.oci.tarwriter import write_layer
from stacker_kernel.storage import btrfs

REPO = Path(__file__).resolve().parent.parent


def measure(snap: str, out: str, scratch: str) -> list[tuple[str, float, int]]:
    """(label, seconds, bytes) per way of packing `snap` (inside the user namespace)."""
    res = []
    t = time.perf_counter()
    d = diff_snapshots(None, snap)
    diff_s = time.perf_counter() - t
    res.append(("diff only (walk of the snapshot)", diff_s, len(d.changes)))
    for kind in ("squashfs", "erofs"):
        for verity in (True, False):
            t = time.perf_counter()
            d = diff_snapshots(None, snap)
            blob = write_fs_layer(snap, d, out, LayerType(kind, verity), scratch_dir=scratch)
            res.append((f"ours: {kind}{' + verity' if verity else ''}", time.perf_counter() - t, blob.size))
        # a step layer is laid out as an overlay upper dir first (reflinks); SOURCE_DATE_EPOCH
        # forces that path for the whole rootfs, to show what the layout costs
        t = time.perf_counter()
        d = diff_snapshots(None, snap)
        blob = write_fs_layer(snap, d, out, LayerType(kind, True), scratch_dir=scratch, source_date_epoch=1700000000)
        res.append((f"ours: {kind} + verity, upper dir laid out", time.perf_counter() - t, blob.size))
        img = os.path.join(scratch, f"alone.{kind}")
        cmd = (["mksquashfs", snap, img, "-comp", "zstd", "-noappend", "-no-progress", "-quiet"]
               if kind == "squashfs" else ["mkfs.erofs", "--quiet", img, snap])
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        alone = time.perf_counter() - t
        res.append((f"{cmd[0]} alone", alone, os.path.getsize(img)))
        t = time.perf_counter()
        append_verity(img)
        res.append((f"{cmd[0]} alone + veritysetup format", alone + time.perf_counter() - t, os.path.getsize(img)))
        os.unlink(img)
    t = time.perf_counter()
    d = diff_snapshots(None, snap)
    blob = write_layer(snap, d, out)
    res.append(("ours: tar+gzip (for scale)", time.perf_counter() - t, blob.size))
    return res


def main() -> None:
    rootfs_tar = sys.argv[1] if len(sys.argv) > 1 else subprocess.run(
        [str(REPO / "scripts/debian-rootfs.sh")], check=True, capture_output=True, text=True).stdout.strip()
    storage = Path(os.environ.get("STACKER_KERNEL_STORAGE", "/var/lib/stacker-kernel/btrfs/root"))
    work = Path(tempfile.mkdtemp(prefix="bench-layer-types-", dir=storage))
    try:
        live = work / "live"
        btrfs.create_subvolume(live)
        run_in_userns(lambda: subprocess.run(["tar", "-xpf", rootfs_tar, "--numeric-owner", "--exclude=./dev/*",
                                              "-C", str(live)], check=True))
        snap = str(work / "s0")
        btrfs.snapshot(live, snap, readonly=True)
        (work / "scratch").mkdir()
        rows = run_in_userns(measure, snap, str(work / "out"), str(work / "scratch"))
    finally:
        run_in_userns(shutil.rmtree, str(work / "scratch"), True)
        btrfs.remove_tree(work)
    print(f"rootfs: {rootfs_tar} (whole rootfs as one layer); cores: {os.cpu_count()}")
    base = {r[0]: r[1] for r in rows}
    print(f"{'way':<40} {'seconds':>8} {'MB':>8}")
    for label, secs, size in rows:
        shown = f"{size:>8}" if label.startswith("diff") else f"{size / 1e6:>8.1f}"
        print(f"{label:<40} {secs:>8.2f} {shown}")
    for kind, tool in (("squashfs", "mksquashfs"), ("erofs", "mkfs.erofs")):
        print(f"{kind}: ours + verity / {tool} + veritysetup alone = "
              f"{base[f'ours: {kind} + verity'] / base[f'{tool} alone + veritysetup format']:.2f}x; "
              f"ours / {tool} alone = {base[f'ours: {kind}'] / base[f'{tool} alone']:.2f}x")


if __name__ == "__main__":
    main()
