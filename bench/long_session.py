"""Speed that does not decay (issues 14, 25): a long session's cells, `%layers`, live
`%layers` outputs, a big store, disk per step and gc.

Ratios, each measured beside its comparison in the same run, through the
Jupyter protocol (a stacker-kernel on busybox, or with --base debian on the
Debian bookworm minbase of scripts/debian-rootfs.sh, cache off so every cell
is a real step with its snapshot; the background size measurement runs as
in any session):

- a `true` cell at step 1000 beside the same cell at step 10 (goal <= 1.1x);
  the two kernels take turns, cell by cell, as do the two of the last case;
- the first `%layers` at 1000 steps (goal < 0.5 s), beside a `true` cell;
- a `true` cell with five live `%layers` widget outputs over 200 steps,
  beside a kernel with the same 200 steps and no `%layers` output (goal <= 1.1x);
- with --store-snapshots N: a `true` cell in a store that holds N snapshots
  (a finished session's steps, made through the engine without a kernel)
  beside one in a fresh store (goal <= 1.1x), then the disk a committed
  `true` step costs (the filesystem's usage over 200 steps back to back,
  synced; goal <= 64 KiB; a raw read-only snapshot's beside it) and
  `stacker-kernel gc` of those N snapshots (goal <= 5 ms each, the time the
  command takes), and the time until btrfs gave their space back (gc's
  background reaper destroys them; --gc-only: this row alone, also of a store
  of the overlay driver with --storage-driver overlay, in a folder on /var/tmp);
- with --before CHECKOUT: `true` cells in a kernel of that checkout's code
  (e.g. `git worktree add /tmp/before COMMIT`) beside a kernel of this one,
  taken in turns at steps 10, 100 and 200.

A cell's time is the wall time from its execute_request to its `idle`
status (so work the kernel does after the reply, such as refreshing
widgets, is counted), the median over a batch of cells.

    STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/$USER python bench/long_session.py \
        [STEPS] [--base busybox|debian] [--store-snapshots N [--gc-only [--storage-driver overlay]]] [--before CHECKOUT] [--no-widgets]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from stacker_kernel.kernel.install import write_spec
from stacker_kernel.kernel.runner import NotebookKernel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
BATCH = 20


class Kernel:
    """A stacker-kernel on the base tar `base` with the cache off, counting its steps."""

    def __init__(self, nbdir: Path, kernels: Path, name: str, base: str = "base.tar", storage: Path | None = None,
                 code: Path | None = None):
        env = dict(os.environ)
        if storage is not None:
            env["STACKER_KERNEL_STORAGE"] = str(storage)
        if code is not None:  # the kernel runs the stacker_kernel package of this checkout
            env["PYTHONPATH"] = str(code)
        self.k = NotebookKernel(nbdir / f"{name}-{uuid.uuid4().hex[:6]}.ipynb", kernels_dir=kernels, env=env)
        self.steps = 0
        for line in (f"%from tar {base}", "%cache off"):
            self.run(line)

    def run(self, code: str) -> float:
        t = time.monotonic()
        run = self.k.execute(code, f"c{uuid.uuid4().hex[:12]}", timeout=120)
        if run.status != "ok":
            raise SystemExit(f"{code!r} failed: {run.error}")
        return time.monotonic() - t

    def steps_to(self, n: int) -> None:
        while self.steps < n:
            self.run("true")
            self.steps += 1

    def cell_ms(self) -> float:
        """Median ms of BATCH `true` cells (each one more step)."""
        times = [self.run("true") * 1000 for _ in range(BATCH)]
        self.steps += BATCH
        return statistics.median(times)

    def widget_front_end(self) -> None:
        """What JupyterLab's widget manager does when it connects (then %layers shows a widget)."""
        from ipywidgets._version import __control_protocol_version__

        kc = self.k.kc
        kc.shell_channel.send(kc.session.msg(
            "comm_open", {"comm_id": uuid.uuid4().hex, "target_name": "jupyter.widget.control",
                          "data": {}}, metadata={"version": __control_protocol_version__}))
        time.sleep(0.5)

    def close(self) -> None:
        self.k.close()


def alternate(a: Kernel, b: Kernel) -> tuple[float, float]:
    """Median ms of BATCH `true` cells in each of `a` and `b`, taken in turns (a machine
    busy with other work slows both alike); who goes first alternates, as the cell right
    after another kernel's meets what that one's commit left the filesystem to do."""
    ta, tb = [], []
    for i in range(BATCH):
        if i % 2:
            tb.append(b.run("true") * 1000)
            ta.append(a.run("true") * 1000)
        else:
            ta.append(a.run("true") * 1000)
            tb.append(b.run("true") * 1000)
    a.steps += BATCH
    b.steps += BATCH
    return statistics.median(ta), statistics.median(tb)


def fill_store(root: Path, tar: Path, n: int) -> None:
    """A store at `root` holding `n` step snapshots on `tar` (a finished session's history),
    made through the engine without a kernel: one step, then its live rootfs committed n times."""
    from stacker_kernel.engine.session import BuildSession
    from stacker_kernel.recipe.model import ImageSource, Layer
    from stacker_kernel.storage.store import Snapshot, Store

    with Store.open(root) as store:
        s = BuildSession.open(store, str(root / "fill.ipynb"), resume=False)
        s.use_cache = False
        s.begin_layer(Layer(name="fill", from_=ImageSource(type="tar", url=str(tar))))
        head = store.get(s.run_step("true").snapshot_id)
        for i in range(n - 1):
            head = store.commit(s.live, Snapshot(parent=head.id, session=s.session.id, layer="fill",
                                                 source=f"true  # {i}", size_delta=0))
            s.session.history.append(head.id)
            if i % 500 == 0:
                store.update_session(s.session)
        s.session.head = head.id
        store.update_session(s.session)
        s.close()


def disk_per_step(storage: Path, nbdir: Path, kernels: Path, base: str, n: int = 200) -> tuple[float, float]:
    """Bytes the filesystem's usage grows by per committed `true` step (over `n`, synced),
    and per raw read-only snapshot of the same live rootfs (btrfs's own floor, taken
    right after in the same way: a filesystem other users write to inflates both)."""
    from stacker_kernel.storage import btrfs

    k = Kernel(nbdir, kernels, "disk", base, storage)
    try:
        k.steps_to(BATCH)
        sizes_known(k)
        btrfs.sync(storage)
        before = btrfs.fs_usage(storage)
        k.steps_to(BATCH + n)
        # Synced at once: the storage's filesystem may be shared (other users' steps
        # would count), so the window is the steps' alone. Their sizes, measured in
        # the pause after them, are not in it: an UPDATE of rows already written.
        btrfs.sync(storage)
        ours = (btrfs.fs_usage(storage) - before) / n
        live = next((storage / "live").iterdir())
        raw = storage / "raw-snapshots"
        raw.mkdir()
        before = btrfs.fs_usage(storage)
        for i in range(n):
            btrfs.snapshot(live, raw / str(i), readonly=True)
        btrfs.sync(storage)
        return ours, (btrfs.fs_usage(storage) - before) / n
    finally:
        k.close()


def buildah_disk_per_commit(tar: Path, n: int = 20) -> float | None:
    """Bytes buildah's storage grows by per `buildah run CTR true` + `buildah commit` on a
    container of `tar` (rootless, overlay through fuse-overlayfs, as bench/versus_buildah.py
    runs it; `du` of its storage before and after `n` of them); None without buildah."""
    import shutil

    if shutil.which("buildah") is None:
        return None
    from versus_buildah import _buildah_env  # bench/versus_buildah.py

    work = Path(tempfile.mkdtemp(prefix="bench-long-buildah-", dir="/var/tmp"))
    env = _buildah_env(work, "overlay")

    def bh(*args: str) -> str:
        return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True, env=env).stdout.strip()

    def used() -> int:
        out = bh("unshare", "du", "-s", "--block-size=1", str(work / "buildah-root"))
        return int(out.split()[0])

    try:
        ctr = bh("from", "scratch")
        bh("add", ctr, str(tar), "/")
        bh("commit", "--quiet", ctr, "bench-base")
        bh("rm", ctr)
        ctr = bh("from", "bench-base")
        bh("run", "--isolation", "chroot", ctr, "--", "true")
        bh("commit", "--quiet", ctr, "bench-0")  # the first commit pays one-time setup
        before = used()
        for i in range(1, n + 1):
            bh("run", "--isolation", "chroot", ctr, "--", "true")
            bh("commit", "--quiet", ctr, f"bench-{i}")
        return (used() - before) / n
    except subprocess.CalledProcessError as e:
        print(f"buildah failed: {e.stderr.strip()[:300]}", file=sys.stderr)
        return None
    finally:
        subprocess.run(["buildah", "rm", "--all"], capture_output=True, env=env)
        subprocess.run(["buildah", "unshare", "rm", "-rf", str(work)], capture_output=True, env=env)
        shutil.rmtree(work, ignore_errors=True)


def sizes_known(k: Kernel, timeout: float = 600) -> None:
    """Wait (as a pause in a session) until %layers shows every step's size."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = k.k.execute("%layers", f"c{uuid.uuid4().hex[:12]}", timeout=120)
        text = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in run.outputs)
        if "…" not in text:
            return
        time.sleep(2)
    raise SystemExit("the steps' sizes were not measured in time")


def _trash_left(storage: Path) -> bool:
    """Whether what gc moved into the trash (storage/driver.py TRASH_PREFIX) is still there."""
    return any(e.name.startswith(".trash-") for sub in ("snapshots", "bases", "layers")
               if (storage / sub).is_dir() for e in os.scandir(storage / sub))


def _forget_sessions(storage: Path) -> None:
    from stacker_kernel.storage.store import Store

    with Store.open(storage) as store:
        for sess in store.find_sessions():
            store.forget_session(sess.id)


def gc_ms_per_snapshot(storage: Path, n: int) -> tuple[float, float]:
    """`stacker-kernel gc` of a store whose n snapshots no session uses any more: ms each
    as the command takes, and seconds from its start until their space is free again
    (no deleted snapshot left in the store, btrfs's cleaner done)."""
    from stacker_kernel.storage import driver

    _forget_sessions(storage)
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "stacker_kernel", "--storage", str(storage), "gc"], check=True,
                   stdout=subprocess.DEVNULL)
    done = time.monotonic()
    while _trash_left(storage):
        time.sleep(0.05)
    driver.of_root(storage).wait_reclaimed(storage)
    return (done - t) * 1000 / n, time.monotonic() - t


def cells_beside_gc(k: Kernel, storage: Path) -> tuple[float, int, float]:
    """`true` cells of kernel `k` (another store on the same filesystem) while a gc of
    `storage` deletes (the command running, or its reaper): their median ms and count,
    and the median of BATCH cells right after, the deleting done."""
    _forget_sessions(storage)
    gc = subprocess.Popen([sys.executable, "-m", "stacker_kernel", "--storage", str(storage), "gc"],
                          stdout=subprocess.DEVNULL)
    beside = []
    while gc.poll() is None or _trash_left(storage):
        beside.append(k.run("true") * 1000)
    k.steps += len(beside)
    if gc.wait() != 0:
        raise SystemExit("gc failed")
    return statistics.median(beside), len(beside), k.cell_ms()


def store_size(nbdir: Path, kernels: Path, tar: Path, base: str, n: int, gc_only: bool = False,
               overlay: bool = False) -> None:
    from stacker_kernel.storage import btrfs, driver
    from stacker_kernel.storage.location import resolve_storage

    top = Path("/var/tmp") if overlay else resolve_storage(None)
    fresh, big = top / f"bench-fresh-{uuid.uuid4().hex[:6]}", top / f"bench-big-{uuid.uuid4().hex[:6]}"
    fresh.mkdir()
    big.mkdir()
    if overlay:
        driver.choose(big, "overlay")
    try:
        t = time.monotonic()
        fill_store(big, tar, n)
        print(f"\n(a store of {n} snapshots made in {time.monotonic() - t:.0f} s)", flush=True)
        if not gc_only:
            cells_and_disk(nbdir, kernels, tar, base, n, fresh, big)
        gc_ms, freed_s = gc_ms_per_snapshot(big, n)
        print(f"stacker-kernel gc of {n} unused snapshots: {gc_ms:.1f} ms per snapshot (goal <= 5 ms); "
              f"their space free {freed_s:.1f} s after gc started", flush=True)
        if gc_only:  # the same again, a kernel of another store taking cells meanwhile
            fill_store(big, tar, n)
            k = Kernel(nbdir, kernels, "beside", base, fresh)
            try:
                k.steps_to(10)
                k.cell_ms()
                during, count, after = cells_beside_gc(k, big)
            finally:
                k.close()
            print(f"a `true` cell in another store while gc of {n} deletes (the command or its reaper): "
                  f"median {during:.1f} ms of {count}; right after: {after:.1f} ms", flush=True)
    finally:
        remove = driver.OverlayDriver().remove if overlay else btrfs.remove_tree
        remove(fresh)
        remove(big)


def cells_and_disk(nbdir: Path, kernels: Path, tar: Path, base: str, n: int, fresh: Path, big: Path) -> None:
    """The big-store, disk and buildah rows of store_size."""
    a, b = Kernel(nbdir, kernels, "fresh", base, fresh), Kernel(nbdir, kernels, "big", base, big)
    try:
        a.steps_to(10)
        b.steps_to(10)
        # Three batches: the first cells right after the store was filled also meet
        # btrfs's own aftermath of making its snapshots (the metadata of the blocks
        # they share is cold); the later batches are the store as a user meets it.
        batches = [alternate(a, b) for _ in range(3)]
    finally:
        a.close()
        b.close()
    print(f"a `true` cell from step 10 on: medians of {BATCH}, taken in turns in two kernels, "
          "right after the store was filled")
    print(f"{'':<44} {'cells 11-30':>12} {'31-50':>8} {'51-70':>8}")
    print(f"{'in a fresh store (ms)':<44} " + " ".join(f"{x:>{w}.1f}" for (x, _), w in zip(batches, (12, 8, 8))))
    print(f"{f'in a store of {n} snapshots (ms)':<44} "
          + " ".join(f"{y:>{w}.1f}" for (_, y), w in zip(batches, (12, 8, 8))))
    print(f"{n} snapshots / fresh: " + ", ".join(f"{y / x:.2f}x" for x, y in batches)
          + " (goal <= 1.1x)", flush=True)
    per_step, floor = disk_per_step(fresh, nbdir, kernels, base)
    print(f"disk per committed `true` step (usage over 200 steps, synced): {per_step / 1024:.1f} KiB "
          f"(goal <= 64 KiB); a raw read-only snapshot of its live rootfs: {floor / 1024:.1f} KiB",
          flush=True)
    theirs = buildah_disk_per_commit(tar)
    if theirs is not None:
        print(f"disk per `buildah run true` + `buildah commit` (du of its storage over 20): "
              f"{theirs / 1024:.1f} KiB; ours / buildah's: {per_step / theirs:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("steps", nargs="?", type=int, default=1000)
    ap.add_argument("--base", choices=("busybox", "debian"), default="busybox")
    ap.add_argument("--store-snapshots", type=int, default=0, help="also the big-store, disk and gc rows")
    ap.add_argument("--gc-only", action="store_true", help="with --store-snapshots: the gc row alone")
    ap.add_argument("--storage-driver", choices=("btrfs", "overlay"), default="btrfs",
                    help="with --gc-only: the driver of the store gc works on")
    ap.add_argument("--before", type=Path, help="a checkout whose kernel runs beside this one's")
    ap.add_argument("--no-widgets", action="store_true", help="skip the live %%layers outputs case")
    args = ap.parse_args()
    if args.storage_driver == "overlay" and not args.gc_only:
        ap.error("--storage-driver overlay goes with --gc-only (the other rows measure btrfs)")
    steps = args.steps
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp:
        root = Path(tmp)
        kernels = root / "kernels"
        write_spec(kernels / "stacker")
        nbdir = root / "nb"
        nbdir.mkdir()
        script = "busybox-rootfs.sh" if args.base == "busybox" else "debian-rootfs.sh"
        subprocess.run([str(REPO / "scripts" / script), str(nbdir / "base.tar")], check=True,
                       stdout=subprocess.DEVNULL)

        if args.store_snapshots:
            store_size(nbdir, kernels, nbdir / "base.tar", "base.tar", args.store_snapshots, args.gc_only,
                       args.storage_driver == "overlay")
        if args.before:
            before, after = Kernel(nbdir, kernels, "before", code=args.before.resolve()), Kernel(nbdir, kernels, "after")
            try:
                print(f"\n`true` cells ({args.base}), median of {BATCH}, taken in turns: a kernel of "
                      f"{args.before} beside one of this checkout")
                for n in (10, 100, 200):
                    before.steps_to(n)
                    after.steps_to(n)
                    old, new = alternate(before, after)
                    print(f"cells {n + 1}-{n + BATCH}: before {old:.1f} ms, after {new:.1f} ms, "
                          f"after / before {new / old:.2f}x", flush=True)
            finally:
                before.close()
                after.close()
        if not steps:
            return
        short, long = Kernel(nbdir, kernels, "short"), Kernel(nbdir, kernels, "long")
        try:
            short.steps_to(10)
            long.steps_to(steps)
            at_10, at_n = alternate(short, long)
            plain = short.run("true")
            layers = long.run("%layers")
        finally:
            short.close()
            long.close()
        print(f"\na long session ({args.base}, cache off): median of {BATCH} `true` cells, request -> idle,")
        print("taken in turns in two kernels")
        print(f"{'':<44} {'ms':>9}")
        print(f"{'cell at step 10':<44} {at_10:>9.1f}")
        print(f"{f'cell at step {steps}':<44} {at_n:>9.1f}")
        print(f"{f'first %layers at {steps + BATCH} steps':<44} {layers * 1000:>9.1f}")
        print(f"{'a `true` cell just before it':<44} {plain * 1000:>9.1f}")
        print(f"step {steps} / step 10: {at_n / at_10:.2f}x (goal <= 1.1x); "
              f"first %layers: {layers:.3f} s (goal < 0.5 s)", flush=True)
        if args.no_widgets:
            return

        widget_steps = 200
        none, five = Kernel(nbdir, kernels, "none"), Kernel(nbdir, kernels, "five")
        try:
            for k in (none, five):
                k.widget_front_end()
                k.steps_to(widget_steps - BATCH)
            for _ in range(5):
                five.run("%layers")
            alternate(none, five)  # the outputs' first refreshes
            without, with_five = alternate(none, five)
        finally:
            none.close()
            five.close()
        print(f"\n{widget_steps} steps, a widget front-end connected: median of {BATCH} `true` cells,")
        print("taken in turns in two kernels")
        print(f"{'':<44} {'ms':>9}")
        print(f"{'no %layers output':<44} {without:>9.1f}")
        print(f"{'five live %layers outputs':<44} {with_five:>9.1f}")
        print(f"five outputs / none: {with_five / without:.2f}x (goal <= 1.1x)", flush=True)


if __name__ == "__main__":
    main()
