"""Benchmark: a trivial build step and a rollback, beside their floors, in one run.

    python bench/step.py [--storage DIR] [--repeat N] [--no-debian] [--no-buildah]

Prints one table with the median time of:

- a trivial step (`true`) through BuildSession.run_step, cache off, including
  its read-only snapshot and record, in a busybox container;
- the same command as `sh -c true` with no container (the floor);
- `buildah run --isolation chroot CTR true` + `buildah commit` (Debian's
  buildah; as root only, since rootless buildah needs its own setup), the
  nearest per-step equivalent of another build tool;
- rollback (one step back) on a busybox and on a Debian minbase rootfs
  (scripts/debian-rootfs.sh, mmdebstrap, cached).

Targets (issue 3): trivial step under 20 ms; rollback under 50 ms on both.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stacker_kernel.engine.session import BuildSession
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage import btrfs
from stacker_kernel.storage.location import resolve_storage
from stacker_kernel.storage.store import Store

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One line of the table: what was measured, its median, and its comparison."""
    what: str
    ours_ms: float
    floor: str
    floor_ms: float | None

    def ratio(self) -> str:
        return f"{self.ours_ms / self.floor_ms:.2f}x" if self.floor_ms else "n/a"


def busybox_tar(dest: Path) -> Path:
    """A busybox rootfs tarball (bin/busybox and one symlink per applet), owned by 0:0."""
    tree = dest.with_suffix(".d")
    (tree / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", tree / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list-full"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        p = tree / applet
        if p.name != "busybox" and not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to("/bin/busybox")
    for d in ("etc", "tmp", "root", "proc", "sys", "dev"):
        (tree / d).mkdir(exist_ok=True)
    subprocess.run(["tar", "-C", str(tree), "--owner=0", "--group=0", "-cf", str(dest), "."], check=True)
    shutil.rmtree(tree)
    return dest


def debian_tar() -> Path:
    """The cached bookworm minbase tarball (made on first use by mmdebstrap, ~20 s)."""
    out = subprocess.run([str(REPO / "scripts" / "debian-rootfs.sh")], check=True,
                         capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def open_session(store: Store, tar: Path, name: str) -> BuildSession:
    s = BuildSession.open(store, f"/bench/{name}-{uuid.uuid4().hex[:6]}.ipynb", resume=False)
    s.use_cache = False  # every step runs: the point is what a step costs
    s.begin_layer(Layer(name=name, from_=ImageSource(type="tar", url=str(tar))))
    return s


def ok(outcome) -> None:
    if not outcome.ok:
        raise RuntimeError(f"bench step failed: {outcome.message}")


def trivial_step_ms(store: Store, tar: Path, repeat: int) -> float:
    s = open_session(store, tar, "trivial")
    try:
        for _ in range(3):  # warm-up: base import, container start
            ok(s.run_step("true"))
        return median_ms([timed(lambda: ok(s.run_step("true"))) for _ in range(repeat)])
    finally:
        s.close()


def sh_true_ms(repeat: int) -> float:
    return median_ms([timed(lambda: subprocess.run(["sh", "-c", "true"], check=True))
                      for _ in range(repeat)])


def rollback_ms(store: Store, tar: Path, name: str, repeat: int) -> float:
    """Median time of rolling back one step (a small write) on a rootfs from `tar`."""
    s = open_session(store, tar, name)
    try:
        ok(s.run_step("echo base > /bench-base"))
        samples = []
        for i in range(repeat):
            ok(s.run_step(f"echo {i} > /bench-step"))
            samples.append(timed(lambda: s.rollback()))
        return median_ms(samples)
    finally:
        s.close()


def buildah_step_ms(tar: Path, repeat: int) -> float | None:
    """Median of `buildah run --isolation chroot CTR true` + `buildah commit` on a rootfs
    from `tar`, in a throwaway buildah storage; None when buildah cannot run here."""
    if os.geteuid() != 0 or shutil.which("buildah") is None:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="bench-buildah-", dir="/var/tmp"))
    base = ["buildah", "--root", str(tmp / "root"), "--runroot", str(tmp / "run"),
            "--storage-driver", "overlay"]

    def bh(*args: str) -> str:
        return subprocess.run([*base, *args], check=True, capture_output=True, text=True).stdout.strip()

    try:
        ctr = bh("from", "scratch")
        bh("add", ctr, str(tar), "/")
        bh("commit", "--quiet", ctr, "bench-base")
        bh("rm", ctr)
        ctr = bh("from", "bench-base")
        samples = []
        for i in range(repeat + 1):
            t = time.perf_counter()
            bh("run", "--isolation", "chroot", ctr, "--", "true")
            bh("commit", "--quiet", ctr, f"bench-{i}")
            if i:  # the first commit pays one-time setup
                samples.append(time.perf_counter() - t)
        return median_ms(samples)
    except subprocess.CalledProcessError as e:
        print(f"buildah failed: {e.stderr.strip()[:300]}", file=sys.stderr)
        return None
    finally:
        subprocess.run([*base, "rm", "--all"], capture_output=True)
        subprocess.run([*base, "rmi", "--all", "--force"], capture_output=True)
        subprocess.run(["umount", "-R", str(tmp / "root" / "overlay")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def render(rows: list[Row]) -> str:
    table = [["measure", "stacker-kernel (ms)", "comparison", "comparison (ms)", "ratio"]]
    for r in rows:
        table.append([r.what, f"{r.ours_ms:.1f}", r.floor,
                      f"{r.floor_ms:.1f}" if r.floor_ms is not None else "n/a", r.ratio()])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", help="storage root (default: resolved like the CLI)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--no-debian", action="store_true", help="skip the Debian minbase rootfs")
    ap.add_argument("--no-buildah", action="store_true", help="skip the buildah comparison")
    args = ap.parse_args()
    root = resolve_storage(args.storage) / f"bench-step-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    work = Path(tempfile.mkdtemp(prefix="bench-step-"))
    rows: list[Row] = []
    try:
        bb = busybox_tar(work / "busybox.tar")
        few = max(3, args.repeat // 6)
        with Store.open(root) as store:
            step = trivial_step_ms(store, bb, args.repeat)
            rows.append(Row("trivial step `true` + snapshot (busybox)", step, "sh -c true, no container",
                            sh_true_ms(args.repeat)))
            if not args.no_buildah:
                rows.append(Row("trivial step `true` + snapshot (busybox)", step,
                                "buildah run (chroot) + commit", buildah_step_ms(bb, few)))
            rows.append(Row("rollback one step (busybox)", rollback_ms(store, bb, "rb-busybox", args.repeat // 2),
                            "target", 50.0))
            if not args.no_debian:
                deb = debian_tar()
                if not args.no_buildah:
                    deb_step = trivial_step_ms(store, deb, args.repeat // 2)
                    rows.append(Row("trivial step `true` + snapshot (Debian)", deb_step,
                                    "buildah run (chroot) + commit", buildah_step_ms(deb, few)))
                rows.append(Row("rollback one step (Debian minbase)",
                                rollback_ms(store, deb, "rb-debian", args.repeat // 2), "target", 50.0))
    finally:
        btrfs.remove_tree(root)
        shutil.rmtree(work, ignore_errors=True)
    print(render(rows))
    print(f"medians; trivial step x{args.repeat}, buildah x{max(3, args.repeat // 6)}, "
          f"rollback x{args.repeat // 2}. Targets: trivial step < 20 ms, rollback < 50 ms.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
