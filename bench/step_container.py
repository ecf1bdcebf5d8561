"""Median time of a trivial step (`true`) in the container, against the floor
(`sh -c true` with no container), for busybox sh (and dash when a Debian
rootfs is given). Prints one table; no pass/fail.

    STACKER_KERNEL_STORAGE=... python bench/step_container.py [-n 200] [--debian TAR]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import _busybox_rootfs_tar  # noqa: E402
from test_container import ENV, make_rootfs, remove_storage_dir, storage_dir  # noqa: E402

from stacker_kernel.container.runtime import Container, ContainerConfig  # noqa: E402


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def bench_container(rootfs: Path, n: int) -> tuple[float, float]:
    with Container.start(ContainerConfig(str(rootfs))) as c:
        first = c.run_step("X=1; cd /tmp", ENV, None)
        fresh = median_ms(lambda: c.run_step("true", ENV, None), n)
        carried = median_ms(lambda: c.run_step("true", ENV, first.state), n)
    return fresh, carried


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--debian", help="a Debian rootfs tar (scripts/debian-rootfs.sh)")
    args = ap.parse_args()
    work = storage_dir()
    try:
        rows = [("sh -c true (no container, floor)",
                 median_ms(lambda: subprocess.run(["sh", "-c", "true"]), args.n), None)]
        tar = _busybox_rootfs_tar(work / "busybox.tar")
        fresh, carried = bench_container(make_rootfs(tar, work, "busybox"), args.n)
        rows.append(("step `true`, busybox sh", fresh, carried))
        if args.debian:
            fresh, carried = bench_container(make_rootfs(Path(args.debian), work, "debian"), args.n)
            rows.append(("step `true`, Debian dash", fresh, carried))
        floor = rows[0][1]
        print(f"{'case':40} {'fresh ms':>9} {'with state':>11} {'x floor':>8}")
        for name, a, b in rows:
            print(f"{name:40} {a:9.2f} {'' if b is None else f'{b:11.2f}':>11} {a / floor:8.1f}")
    finally:
        remove_storage_dir(work)


if __name__ == "__main__":
    main()
