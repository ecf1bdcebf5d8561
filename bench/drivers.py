"""Benchmark: the btrfs and overlay storage drivers side by side, and rootless buildah, in one run.

    STACKER_KERNEL_STORAGE=$(stacker-kernel storage-path) python bench/drivers.py \
        [--btrfs DIR] [--overlay-parent DIR] [--repeat N] [--deep N] [--buildah-deep N] [--no-buildah]
    (as root it runs itself as --as-user, $SUDO_USER or sktest, in that user's storage,
    as bench/versus_buildah.py does: rootless buildah runs as an ordinary user runs it)

For each driver, on a busybox rootfs through BuildSession (cache off), and for
rootless buildah 1.28 (overlay through fuse-overlayfs, isolation chroot, its
own storage: bench/versus_buildah.py's setup) on the same rootfs:

- a step + commit: `echo i > /f` run and committed (median); buildah: `buildah
  run` + `buildah commit` of one working container;
- rollback: one step back (median); buildah has none, its nearest is a fresh
  working container from the previous image: `buildah from PREV` + `buildah rm`
  of the old one;
- export of one step's layer: the diff of a step (1 MiB written) and its tar,
  as the container's root (median); buildah: `buildah push IMG oci:DIR:TAG` of
  the step's image into one layout, where the layers below it are already
  (containers/image's blob-info cache reuses them, so only the step's layer is
  compressed, beside the image's config and manifest);
- disk per step: what the storage grew by per step that writes 1 MiB
  (btrfs: the filesystem's usage, so other writers on it add noise; buildah:
  `du` of its storage, each step's image the next one's base);
- a step at depth N (--deep, default 100) against one at depth 10: the
  per-cell cost of a long session (overlay flattens stacks past 64 layers);
  buildah: run + commit on a container of an image of N layers (made by N
  chained from + commit); --buildah-deep caps its N (default 128: past that
  buildah's overlay driver refuses to mount the container, "max depth exceeded").

Every sample of a row is taken on each side in turn (the order rotating), so
the machine's load hits all alike. The btrfs store goes under --btrfs
(default: resolved like the CLI), the overlay store and buildah's storage in
folders under --overlay-parent (default /var/tmp, ext4 here). The ratio
columns are overlay / btrfs and overlay / buildah.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import busybox_tar, median_ms, ok, open_session, timed  # noqa: E402
from versus_buildah import _buildah_env, rerun_as_user  # noqa: E402

from stacker_kernel.container.userns import run_in_userns  # noqa: E402
from stacker_kernel.oci.diff import diff_snapshots  # noqa: E402
from stacker_kernel.oci.tarwriter import write_layer  # noqa: E402
from stacker_kernel.storage import driver as drivers  # noqa: E402
from stacker_kernel.storage.location import resolve_storage  # noqa: E402
from stacker_kernel.storage.store import Store  # noqa: E402

BATCH = 5  # samples at each depth


def _export_layer(old: str, new: str, out: str) -> int:
    return write_layer(new, diff_snapshots(old, new), out).size


class Ours:
    """A BuildSession on one of our drivers; each method is one sample, in seconds."""

    def __init__(self, root: Path, name: str, tar: Path, stack: contextlib.ExitStack):
        self.store = stack.enter_context(Store.open(root, name))
        self.s = open_session(self.store, tar, "bench")
        stack.callback(self.s.close)
        self.layout = Path(tempfile.mkdtemp(prefix="bench-drivers-layout-"))
        stack.callback(shutil.rmtree, self.layout, ignore_errors=True)
        for _ in range(3):  # warm-up: base import, container start
            ok(self.s.run_step("true"))

    def step(self, i: int) -> float:
        return timed(lambda: ok(self.s.run_step(f"echo {i} > /f")))

    def rollback(self, i: int) -> float:
        ok(self.s.run_step(f"echo {i} > /g"))
        return timed(self.s.rollback)

    def export(self, i: int) -> float:
        ok(self.s.run_step(f"head -c 1048576 /dev/urandom > /blob{i}"))
        head = self.s.head
        parent = self.store.get(head.parent)
        return timed(lambda: run_in_userns(_export_layer, str(parent.path), str(head.path), str(self.layout)))

    def usage(self) -> int:
        self.store.driver.sync(self.store.root)
        return self.store.driver.usage(self.store.root)

    def deepen(self, n: int) -> None:
        while len(self.s.session.history) < n:
            ok(self.s.run_step("true"))

    def deep_step(self) -> float:
        return timed(lambda: ok(self.s.run_step("echo x > /h")))


class Buildah:
    """Rootless buildah in a storage of its own, as bench/versus_buildah.py runs it: a working
    container `ctr` of the image `image`; each method is one sample, in seconds."""

    def __init__(self, parent: Path, tar: Path, stack: contextlib.ExitStack):
        self.work = Path(tempfile.mkdtemp(prefix="bench-drivers-buildah-", dir=parent))
        self.env = _buildah_env(self.work, "overlay")
        stack.callback(self._remove)
        self.n = 0  # images made, for fresh names
        ctr = self.bh("from", "scratch")
        self.bh("add", ctr, str(tar), "/")
        self.image = self.commit(ctr)
        self.bh("rm", ctr)
        self.ctr = self.bh("from", self.image)
        self.layers = 1
        for _ in range(3):  # warm-up: the first run and commit pay one-time setup
            self.run("true")
            self.commit(self.ctr)

    def bh(self, *args: str) -> str:
        proc = subprocess.run(["buildah", *args], capture_output=True, text=True, env=self.env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"buildah {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout.strip()

    def run(self, script: str) -> None:
        self.bh("run", "--isolation", "chroot", self.ctr, "--", "sh", "-c", script)

    def commit(self, ctr: str) -> str:
        self.n += 1
        self.bh("commit", "--quiet", ctr, f"bench-{self.n}")
        return f"bench-{self.n}"

    def move_to(self, image: str) -> None:
        """The working container becomes a fresh one of `image` (one layer deeper than ours)."""
        old, self.ctr = self.ctr, self.bh("from", image)
        self.bh("rm", old)
        self.image = image

    def step(self, i: int) -> float:
        def go() -> None:
            self.run(f"echo {i} > /f")
            self.commit(self.ctr)
        return timed(go)

    def rollback(self, i: int) -> float:
        self.run(f"echo {i} > /g")
        self.commit(self.ctr)
        return timed(lambda: self.move_to(self.image))

    def export(self, i: int) -> float:
        self.run(f"head -c 1048576 /dev/urandom > /blob{i}")
        img = self.commit(self.ctr)
        took = timed(lambda: self.bh("push", "--quiet", img, f"oci:{self.work}/layout:{img}"))
        self.move_to(img)  # the next step on top of this one, as in a session
        self.layers += 1
        return took

    def usage(self) -> int:
        return int(self.bh("unshare", "du", "-s", "--block-size=1", str(self.work / "buildah-root")).split()[0])

    def deepen(self, n: int) -> None:
        """An image of `n` layers under the working container."""
        while self.layers < n:
            self.move_to(self.commit(self.ctr))
            self.layers += 1

    def deep_step(self) -> float:
        return self.step(0)

    def _remove(self) -> None:
        subprocess.run(["buildah", "rm", "--all"], capture_output=True, env=self.env, check=False)
        subprocess.run(["buildah", "unshare", "rm", "-rf", str(self.work)], capture_output=True, env=self.env, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def in_turns(sides: dict, sample, repeat: int) -> dict[str, float]:
    """Median ms of `repeat` samples on each side, taken in turns, the order rotating."""
    names = list(sides)
    got: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeat):
        for n in names[i % len(names):] + names[:i % len(names)]:
            got[n].append(sample(sides[n], i))
    return {n: median_ms(v) for n, v in got.items()}


def measure(sides: dict, repeat: int, deep: int, buildah_deep: int) -> dict[str, dict[str, float]]:
    rows = {"step + commit (ms)": in_turns(sides, lambda s, i: s.step(i), repeat),
            "rollback (ms)": in_turns(sides, lambda s, i: s.rollback(i), repeat)}
    before = {n: s.usage() for n, s in sides.items()}
    rows["export one step's layer (ms)"] = in_turns(sides, lambda s, i: s.export(i), repeat)
    rows["disk per 1 MiB step (KiB)"] = {n: (s.usage() - before[n]) / repeat / 1024 for n, s in sides.items()}
    for s in sides.values():
        s.deepen(10)
    at10 = in_turns(sides, lambda s, i: s.deep_step(), BATCH)
    for n, s in sides.items():
        s.deepen(buildah_deep if n == "buildah" else deep)
    at_deep = in_turns(sides, lambda s, i: s.deep_step(), BATCH)
    reached = sides["buildah"].layers if "buildah" in sides else deep
    depth = f"{deep}" if reached == deep else f"{deep} (buildah {reached})"
    rows[f"step at depth {depth} / at 10"] = {n: at_deep[n] / at10[n] for n in sides}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--btrfs", help="btrfs storage root (default: resolved like the CLI)")
    ap.add_argument("--overlay-parent", default="/var/tmp")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--deep", type=int, default=100)
    ap.add_argument("--buildah-deep", type=int, default=128,
                    help="at most this many layers in buildah's image (its overlay driver's limit)")
    ap.add_argument("--no-buildah", action="store_true", help="only our two drivers")
    ap.add_argument("--as-user", help="run as root: the unprivileged user to run as (default $SUDO_USER, else sktest)")
    args = ap.parse_args()
    if os.geteuid() == 0:
        argv = [a for a in sys.argv[1:] if a != "--as-user" and a != args.as_user]
        rerun_as_user(args.as_user, __file__, argv)
    buildah_deep = min(args.deep, args.buildah_deep)
    work = Path(tempfile.mkdtemp(prefix="bench-drivers-"))
    btrfs_root = resolve_storage(args.btrfs) / f"bench-drivers-{uuid.uuid4().hex[:8]}"
    btrfs_root.mkdir()
    overlay_root = Path(tempfile.mkdtemp(prefix="bench-drivers-overlay-", dir=args.overlay_parent))
    try:
        with contextlib.ExitStack() as stack:
            tar = busybox_tar(work / "busybox.tar")
            sides = {"btrfs": Ours(btrfs_root, "btrfs", tar, stack), "overlay": Ours(overlay_root, "overlay", tar, stack)}
            if not args.no_buildah and shutil.which("buildah"):
                sides["buildah"] = Buildah(Path(args.overlay_parent), tar, stack)
            results = measure(sides, args.repeat, args.deep, buildah_deep)
    finally:
        drivers.BtrfsDriver().remove(btrfs_root)
        drivers.OverlayDriver().remove(overlay_root)
        shutil.rmtree(work, ignore_errors=True)
    names = list(next(iter(results.values())))
    head = ["measure", *names, "overlay / btrfs"] + (["overlay / buildah"] if "buildah" in names else [])
    rows = [head]
    for key, vals in results.items():
        o = vals["overlay"]
        ratios = [f"{o / vals[n]:.2f}x" if vals[n] else "n/a" for n in names if n != "overlay"]
        rows.append([key, *(f"{vals[n]:.2f}" for n in names), *ratios])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print(f"busybox rootfs; {args.repeat} samples per row ({BATCH} at each depth), every side in turn; "
          f"load average {os.getloadavg()[0]:.1f} at the end; medians")
    for n, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
