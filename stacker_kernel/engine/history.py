"""A session's history: the snapshots of its steps, oldest first, and positions in it.

The history is the list of snapshot ids in the session record (what
`%layers` numbers 1..N and `%rollback` goes back to). It is not the build
chain: a deleted cell leaves the history, while the steps built on it keep
it in their chain (see BuildSession.built_steps).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import stacker_kernel
from stacker_kernel.errors import RecipeError, StorageError
from stacker_kernel.recipe.model import first_line
from stacker_kernel.storage.store import Session, Snapshot, Store

if TYPE_CHECKING:  # imported where sizes are measured: a build measures none (History.append)
    from concurrent.futures import Future, ThreadPoolExecutor

def _lowest_priority() -> None:
    """Run this thread (and the helpers it forks) at nice 19: a cell goes first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # per thread on Linux
    except OSError:
        pass


# A step's size change is measured once the session has been quiet this long (no step
# committed meanwhile): the diff walks both snapshots whole (a Debian rootfs: 8,728
# entries each, some 0.3 s), many times a trivial cell's time, so it must not run
# beside cells that follow each other; a step rolled back before then is never measured.
QUIET = 1.0
# Steps measured per helper process: the session's quiet is checked between them.
CHUNK = 4

_MEASURE = ("import json, sys\n"
            "from stacker_kernel.engine.inspect import size_changes\n"
            "print(json.dumps(size_changes(json.load(sys.stdin))))")


def measure_sizes(pairs: list[tuple[str | None, str]]) -> list[int]:
    """engine.inspect.size_changes of (parent path, snapshot path) pairs, in a new process.

    The size thread runs beside the engine thread: a child it forked without exec
    could inherit a lock another thread holds (an import's, a stream's) and wait
    for it forever, so it execs a fresh interpreter (single-threaded) instead.
    """
    import subprocess

    top = os.path.dirname(os.path.dirname(stacker_kernel.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [top, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-P", "-c", _MEASURE], input=json.dumps(pairs), capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise StorageError(f"the size changes of {len(pairs)} step(s) could not be measured: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def held_bytes(store: Store, snaps: list[Snapshot], budget: float = 3.0) -> int:
    """About the bytes of file content that deleting `snaps` frees (gc's estimate, which
    it waits for btrfs to give back).

    A removed step frees what it added to its parent: its recorded size change,
    else measured now (a diff), as long as measuring has taken less than
    `budget` seconds (what is left counts nothing: gc stays quick after many
    builds). A removed base frees all its content, as everything built on it
    is removed with it.
    """
    import time

    from stacker_kernel.engine.inspect import size_changes

    total, pairs = 0, []
    for snap in snaps:
        if snap.kind == "step" and snap.size_delta is not None:
            total += max(snap.size_delta, 0)
            continue
        parent = store.get(snap.parent) if snap.kind == "step" and snap.parent else None
        pairs.append((str(parent.path) if parent else None, str(snap.path)))
    deadline = time.monotonic() + budget
    for start in range(0, len(pairs), 8):  # a helper per 8 diffs: the budget is checked between them
        if time.monotonic() > deadline:
            break
        total += sum(max(n, 0) for n in size_changes(pairs[start:start + 8]))
    return total


@dataclass
class StepView:
    """One row of `%layers` / `stacker-kernel layers`."""
    index: int  # 1-based position in the session history
    snapshot_id: str
    layer: str
    cell_id: str | None
    first_line: str
    status: str
    duration: float
    size_delta: int | None  # None: not measured yet (being measured in the background)
    cached: bool


class History:
    """The history of `session` (its `history` field), read through `store`.

    The caller persists the session record after changing it (the session
    also holds the head, layer and tags that change along with it).

    Step records do not change once committed (but for the size change,
    measured here), and gc keeps every snapshot a history names: they are read
    from the store once, so that a step's work does not grow with the history.

    A step's size change comes from diffing its snapshot against its parent,
    which takes seconds for a big step: it is measured on a background thread
    (after each commit in a kernel, else when the steps are first shown) and
    recorded, so that showing the history never waits for a diff. The thread
    measures only while the session is quiet (QUIET): cells run back to back
    never share the machine with a diff, and it measures the steps still in
    the history then, so a step rolled back meanwhile costs nothing.
    """

    def __init__(self, store: Store, session: Session):
        self.store = store
        self.session = session
        # A cache hit's record names the cell that first built it; in this session
        # the step belongs to the cell that hit it (re-run and %rollback use that).
        self.cell_ids: dict[str, str | None] = {}
        self.hits: set[str] = set()  # steps taken from the cache in this session (not run here)
        self._records: dict[str, Snapshot] = {}
        self._cell_pos: dict[str, int] | None = None  # cell id -> its first position; None: to rebuild
        self._sizer: ThreadPoolExecutor | None = None
        self._sizing: Future | None = None  # the latest background size measurement
        self._size_lock = threading.Lock()
        self._looping = False  # the measuring thread is in _measure_loop (under _size_lock)
        self._wanted = False  # steps were added since the loop last looked (under _size_lock)
        self._last_step = time.monotonic()  # when the latest step was committed
        self._stop = threading.Event()
        self._unmeasurable: set[str] = set()  # whose measurement failed: not retried forever

    @property
    def ids(self) -> list[str]:
        return self.session.history

    def _record(self, sid: str) -> Snapshot | None:
        snap = self._records.get(sid)
        if snap is None:
            snap = self.store.get(sid)
            if snap is None:
                return None
            if sid in self.cell_ids:
                snap = replace(snap, cell_id=self.cell_ids[sid])
            self._records[sid] = snap
        return snap

    def snaps(self) -> list[Snapshot]:
        """The history's snapshot records (those that exist), with this session's cell ids."""
        return [snap for snap in map(self._record, self.session.history) if snap is not None]

    def with_cell_id(self, snap: Snapshot) -> Snapshot:
        """`snap` with the cell id it has in this session."""
        return replace(snap, cell_id=self.cell_ids.get(snap.id, snap.cell_id))

    def append(self, snap: Snapshot, cell_id: str | None = None, *, hit: bool = False) -> None:
        """`snap` is the newest entry; a cache `hit` belongs to `cell_id` here."""
        if hit:
            self.hits.add(snap.id)
            if cell_id != snap.cell_id:
                self.cell_ids[snap.id] = cell_id
            else:
                self.cell_ids.pop(snap.id, None)
            snap = replace(snap, cell_id=cell_id)
        self._records[snap.id] = snap
        self._last_step = time.monotonic()
        if self._cell_pos is not None and snap.cell_id is not None:
            self._cell_pos.setdefault(snap.cell_id, len(self.session.history))
        self.session.history.append(snap.id)
        if snap.size_delta is None and self.session.kind == "kernel":
            # A notebook shows its steps at any time; a build rarely does, and the
            # diff would compete with its next step.
            self.measure_later()

    def keep(self, ids: list[str]) -> None:
        self.session.history = list(ids)
        self._cell_pos = None

    def layer_steps(self, name: str) -> list[Snapshot]:
        return [s for s in self.snaps() if s.layer == name]

    def views(self, measure: bool = True) -> list[StepView]:
        """The steps as `%layers` shows them. It never diffs: a size change not known
        yet is None, and (unless `measure=False`) measured in the background."""
        snaps = self.snaps()
        if measure and any(s.size_delta is None and s.id not in self._unmeasurable for s in snaps):
            self.measure_later()
        return [StepView(i, snap.id, snap.layer, snap.cell_id,
                         first_line(snap.source, skip_shebang=True),
                         snap.status, snap.duration, snap.size_delta,
                         cached=snap.session != self.session.id or snap.id in self.hits)
                for i, snap in enumerate(snaps, 1)]

    def measure_later(self) -> None:
        """Measure the size changes not known yet, on the background thread, once the
        session is quiet (see QUIET)."""
        with self._size_lock:
            self._wanted = True
            if self._looping:
                return  # the running loop looks again before it ends
            if self._sizer is None:
                from concurrent.futures import ThreadPoolExecutor

                self._sizer = ThreadPoolExecutor(1, thread_name_prefix="step-sizes",
                                                 initializer=_lowest_priority)
            self._looping = True
            self._sizing = self._sizer.submit(self._measure_loop)

    def sizes_pending(self) -> bool:
        """True while a background size measurement is queued or running."""
        pending = self._sizing
        return pending is not None and not pending.done()

    def when_measured(self, sid: str, fn) -> None:
        """Call `fn(size change of step sid, or None)` once the measurements queued so far
        have finished (on the measuring thread; at once if none is pending)."""
        def done(_future=None) -> None:
            snap = self._records.get(sid)
            fn(snap.size_delta if snap is not None else None)

        pending = self._sizing
        if pending is None:
            done()
        else:
            pending.add_done_callback(done)

    def wait_for_sizes(self) -> None:
        """Wait until the background size measurements have finished."""
        from concurrent.futures import wait

        while (pending := self._sizing) is not None and not pending.done():
            wait([pending])  # an error was logged by the measurement itself

    def stop_measuring(self) -> None:
        """Drop queued size measurements and wait for a running one (before the store closes)."""
        self._stop.set()  # a loop waiting for quiet ends at once
        with self._size_lock:
            sizer, self._sizer = self._sizer, None
        if sizer is not None:
            sizer.shutdown(wait=True, cancel_futures=True)

    def _quiet(self) -> bool:
        """Wait until no step was committed for QUIET seconds; False if stopped meanwhile."""
        while not self._stop.is_set():
            left = self._last_step + QUIET - time.monotonic()
            if left <= 0:
                return True
            self._stop.wait(min(left, 0.2))  # QUIET may change meanwhile (a test's)
        return False

    def _measure_loop(self) -> None:
        try:
            while True:
                with self._size_lock:
                    if not self._wanted or self._stop.is_set():
                        self._looping = False
                        return
                    self._wanted = False
                while self._quiet():
                    todo = [s for s in self.snaps() if s.size_delta is None and s.id not in self._unmeasurable]
                    if not todo:
                        break
                    self._measure_sizes(todo[:CHUNK])
        except BaseException:
            with self._size_lock:
                self._looping = False
            raise

    def _measure_sizes(self, todo: list[Snapshot]) -> None:
        try:
            parents = [(self._records.get(s.parent) or self.store.get(s.parent)) if s.parent else None
                       for s in todo]
            try:
                deltas = measure_sizes([(str(p.path) if p else None, str(s.path))
                                        for s, p in zip(todo, parents)])
            except Exception:
                self._unmeasurable.update(s.id for s in todo)
                raise
            for snap, delta in zip(todo, deltas):
                snap.size_delta = delta  # the record kept in _records
            self.store.set_size_deltas({snap.id: delta for snap, delta in zip(todo, deltas)})
        except Exception:
            import logging  # here: a build, which measures nothing, does not load it

            logging.getLogger(__name__).exception("measuring the size changes of steps failed")
            raise

    def position_of_cell(self, cell_id: str) -> int | None:
        """How many entries come before the step of `cell_id` (None: the cell has none)."""
        if self._cell_pos is None:
            self._cell_pos = {}
            for i, snap in enumerate(self.snaps()):
                if snap.cell_id is not None:
                    self._cell_pos.setdefault(snap.cell_id, i)
        return self._cell_pos.get(cell_id)

    def rollback_position(self, to: int | str | None, inspecting_failure: bool) -> int:
        """How many entries `%rollback TO` keeps: `to` is a 1-based index, a cell id or
        snapshot id prefix, or None for one step back (or, after a kept failure, back
        to the last snapshot). RecipeError names what is wrong."""
        snaps = self.snaps()
        if not snaps and not inspecting_failure:
            raise RecipeError("nothing to roll back: no step has been committed in this session")
        if to is None:
            return len(snaps) if inspecting_failure else len(snaps) - 1
        if isinstance(to, int) or (isinstance(to, str) and to.isdigit()):
            n = int(to)
            if not 0 <= n <= len(snaps):
                raise RecipeError(f"no step {n}: %layers lists steps 1..{len(snaps)}")
            return n
        idx = [i for i, s in enumerate(snaps) if s.cell_id == to or s.id.startswith(to)]
        if not idx:
            raise RecipeError(f"no step of cell or snapshot {to!r} in this session's history (%layers lists them)")
        return idx[-1] + 1

    def forget_cells(self, ids: set[str]) -> bool:
        """Drop the entries of cells `ids`; True if the history changed."""
        before = self.session.history
        self.keep([s.id for s in self.snaps() if s.cell_id not in ids])
        return self.session.history != before

    def at(self, index: int) -> Snapshot:
        """Entry `index` (1-based), RecipeError if there is none."""
        snaps = self.snaps()
        if not 1 <= index <= len(snaps):
            raise RecipeError(f"no step {index}: %layers lists steps 1..{len(snaps)}")
        return snaps[index - 1]
