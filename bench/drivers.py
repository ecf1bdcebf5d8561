"""Benchmark: the btrfs and overlay storage drivers side by side, in one run.

    python bench/drivers.py [--btrfs DIR] [--overlay-parent DIR] [--repeat N] [--deep N]

For each driver, on a busybox rootfs through BuildSession (cache off):

- a step + commit: `echo i > /f` run and committed (median);
- rollback: one step back (median);
- export of one step's layer: the diff of a step (1 MiB written) and its tar,
  as the container's root (median);
- disk per step: what the storage grew by per step that writes 1 MiB
  (btrfs: the filesystem's usage, so other writers on it add noise);
- a step at depth N (--deep, default 100) against one at depth 10: the
  per-cell cost of a long session (overlay flattens stacks past 64 layers).

The btrfs store goes under --btrfs (default: resolved like the CLI), the
overlay store in a folder under --overlay-parent (default /var/tmp, ext4 here).
The last column is overlay / btrfs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import busybox_tar, median_ms, ok, open_session, timed  # noqa: E402

from stacker_kernel.container.userns import run_in_userns  # noqa: E402
from stacker_kernel.oci.diff import diff_snapshots  # noqa: E402
from stacker_kernel.oci.tarwriter import write_layer  # noqa: E402
from stacker_kernel.storage import driver as drivers  # noqa: E402
from stacker_kernel.storage.location import resolve_storage  # noqa: E402
from stacker_kernel.storage.store import Store  # noqa: E402


def _export_layer(old: str, new: str, out: str) -> int:
    return write_layer(new, diff_snapshots(old, new), out).size


def measure(root: Path, name: str, tar: Path, repeat: int, deep: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with Store.open(root, name) as store:
        s = open_session(store, tar, "bench")
        try:
            for _ in range(3):  # warm-up: base import, container start
                ok(s.run_step("true"))
            out["step + commit (ms)"] = median_ms([timed(lambda i=i: ok(s.run_step(f"echo {i} > /f")))
                                                   for i in range(repeat)])
            samples = []
            for i in range(repeat):
                ok(s.run_step(f"echo {i} > /g"))
                samples.append(timed(s.rollback))
            out["rollback (ms)"] = median_ms(samples)
            layout = Path(tempfile.mkdtemp(prefix="bench-drivers-layout-"))
            samples = []
            before = store.driver.usage(store.root)
            for i in range(repeat):
                ok(s.run_step(f"head -c 1048576 /dev/urandom > /blob{i}"))
                head = s.head
                parent = store.get(head.parent)
                t = time.perf_counter()
                run_in_userns(_export_layer, str(parent.path), str(head.path), str(layout))
                samples.append(time.perf_counter() - t)
            out["export one step's layer (ms)"] = median_ms(samples)
            store.driver.sync(store.root)
            out["disk per 1 MiB step (KiB)"] = (store.driver.usage(store.root) - before) / repeat / 1024
            shutil.rmtree(layout, ignore_errors=True)
            while len(s.session.history) < 10:
                ok(s.run_step("true"))
            at10 = median_ms([timed(lambda: ok(s.run_step("echo x > /h"))) for _ in range(5)])
            while len(s.session.history) < deep:
                ok(s.run_step("true"))
            at_deep = median_ms([timed(lambda: ok(s.run_step("echo x > /h"))) for _ in range(5)])
            out[f"step at depth {deep} / at 10"] = at_deep / at10
        finally:
            s.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--btrfs", help="btrfs storage root (default: resolved like the CLI)")
    ap.add_argument("--overlay-parent", default="/var/tmp")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--deep", type=int, default=100)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-drivers-"))
    btrfs_root = resolve_storage(args.btrfs) / f"bench-drivers-{uuid.uuid4().hex[:8]}"
    btrfs_root.mkdir()
    overlay_root = Path(tempfile.mkdtemp(prefix="bench-drivers-overlay-", dir=args.overlay_parent))
    try:
        tar = busybox_tar(work / "busybox.tar")
        results = {"btrfs": measure(btrfs_root, "btrfs", tar, args.repeat, args.deep),
                   "overlay": measure(overlay_root, "overlay", tar, args.repeat, args.deep)}
    finally:
        drivers.BtrfsDriver().remove(btrfs_root)
        drivers.OverlayDriver().remove(overlay_root)
        shutil.rmtree(work, ignore_errors=True)
    rows = [["measure", "btrfs", "overlay", "overlay / btrfs"]]
    for key in results["btrfs"]:
        b, o = results["btrfs"][key], results["overlay"][key]
        rows.append([key, f"{b:.2f}", f"{o:.2f}", f"{o / b:.2f}x" if b else "n/a"])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for n, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
