"""squashfs/erofs layer export beside `mksquashfs` / `mkfs.erofs` alone, measured in one run.

A Debian minbase rootfs (scripts/debian-rootfs.sh) as a read-only btrfs
snapshot. For the whole rootfs as one layer: our export (packed straight
from the read-only snapshot by mksquashfs -comp zstd or mkfs.erofs while
its directories are scanned beside it, dm-verity, the sha256) beside the packer alone on the same snapshot; the same with the
overlay upper dir laid out first (what every step layer costs: reflinks,
owners, modes, xattrs); and our tar+gzip layer for scale. Everything runs
inside the user namespace, as the export does.

    STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/sktest [BENCH_ROUNDS=2] python bench/layer_types.py [ROOTFS.tar]
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
from stacker_kernel.oci.layer_types import LayerType, append_verity, write_fs_layer, write_whole_fs_layer
from stacker_kernel.oci.tarwriter import write_layer
from stacker_kernel.storage import btrfs

REPO = Path(__file__).resolve().parent.parent


def _ours(snap: str, out: str, scratch: str, kind: str, verity: bool, epoch: int | None = None) -> tuple[float, int]:
    """As the export makes it (oci/export.py _layers_in_userns)."""
    t = time.perf_counter()
    if epoch is None:  # packed from the snapshot while its directories are scanned
        blob = write_whole_fs_layer(snap, out, LayerType(kind, verity), scratch_dir=scratch)
    else:
        d = diff_snapshots(None, snap)
        blob = write_fs_layer(snap, d, out, LayerType(kind, verity), scratch_dir=scratch, source_date_epoch=epoch)
    return time.perf_counter() - t, blob.size


def _alone(snap: str, scratch: str, kind: str, verity: bool) -> tuple[float, int]:
    img = os.path.join(scratch, f"alone.{kind}")
    cmd = (["mksquashfs", snap, img, "-comp", "zstd", "-noappend", "-no-progress", "-quiet"]
           if kind == "squashfs" else ["mkfs.erofs", "--quiet", img, snap])
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if verity:
        append_verity(img)
    secs, size = time.perf_counter() - t, os.path.getsize(img)
    os.unlink(img)
    return secs, size


def measure(snap: str, out: str, scratch: str, rounds: int) -> list[tuple[str, float, int]]:
    """(label, best seconds of `rounds`, bytes) per way of packing `snap`, the ways
    taken in turns so a busy machine slows all of them alike (inside the user namespace)."""
    tool = {"squashfs": "mksquashfs", "erofs": "mkfs.erofs"}
    ways = [("diff only (walk of the snapshot)", lambda: (lambda t, d: (time.perf_counter() - t, len(d.changes)))(
        time.perf_counter(), diff_snapshots(None, snap)))]
    for kind in ("squashfs", "erofs"):
        ways += [(f"ours: {kind} + verity", lambda k=kind: _ours(snap, out, scratch, k, True)),
                 (f"{tool[kind]} alone + veritysetup format", lambda k=kind: _alone(snap, scratch, k, True)),
                 (f"ours: {kind}", lambda k=kind: _ours(snap, out, scratch, k, False)),
                 (f"{tool[kind]} alone", lambda k=kind: _alone(snap, scratch, k, False)),
                 # a step layer is laid out as an overlay upper dir first (reflinks); SOURCE_DATE_EPOCH
                 # forces that path for the whole rootfs, to show what the layout costs
                 (f"ours: {kind} + verity, upper dir laid out",
                  lambda k=kind: _ours(snap, out, scratch, k, True, 1700000000))]
    ways.append(("ours: tar+gzip (for scale)", lambda: (lambda t, b: (time.perf_counter() - t, b.size))(
        time.perf_counter(), write_layer(snap, diff_snapshots(None, snap), out))))
    best: dict[str, tuple[float, int]] = {}
    for _ in range(rounds):
        for label, fn in ways:
            secs, size = fn()
            if label not in best or secs < best[label][0]:
                best[label] = (secs, size)
    return [(label, *best[label]) for label, _ in ways]


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
        rows = run_in_userns(measure, snap, str(work / "out"), str(work / "scratch"),
                             int(os.environ.get("BENCH_ROUNDS", "2")))
    finally:
        run_in_userns(shutil.rmtree, str(work / "scratch"), True)
        btrfs.remove_tree(work)
    print(f"rootfs: {rootfs_tar} (whole rootfs as one layer); cores: {os.cpu_count()}; "
          f"best of {os.environ.get('BENCH_ROUNDS', '2')} rounds")
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
