"""kill -9 of `stacker-kernel build` at random points of a 10-step build.

Each step writes random data and its sha256 (so a snapshot can check itself)
and prints the digest; the test records the digests of the steps the build
reported as done. After each kill: no process the build started survives, no
mount of it is left, the store opens, every step the build reported is there
with the digest it printed, every stored snapshot is intact and read-only,
and nothing is orphaned (disk and records agree, no live rootfs, no stray
log). The points cover the four phases: mid-step, around the snapshot (just
after the step printed its digest), between steps, and mid-export.

CI runs STACKER_KERNEL_CRASH_POINTS (default 8) points; the full run of issue 9
is STACKER_KERNEL_CRASH_POINTS=50.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import in_tree, is_frozen

from stacker_kernel.storage import overlay
from stacker_kernel.storage.store import Store

STEPS = 10
POINTS = int(os.environ.get("STACKER_KERNEL_CRASH_POINTS") or "8")
PHASES = ["mid-step", "mid-snapshot", "between-steps", "mid-export"]
STACKER_KERNEL = str(Path(sys.executable).parent / "stacker-kernel")


def ten_layer_yaml(path: Path, busybox_tar: Path) -> Path:
    """l1 from the busybox tar, l2..l10 each `built` on the one before; one step each."""
    parts = []
    for i in range(1, STEPS + 1):
        source = f"type: tar\n        url: {busybox_tar}" if i == 1 else f"type: built\n        tag: l{i - 1}"
        parts.append(f"l{i}:\n"
                     f"    from:\n"
                     f"        {source}\n"
                     f"    run: |\n"
                     f"        head -c 3000000 /dev/urandom > /data{i}\n"
                     f"        sha256sum /data{i} > /sum{i}\n"
                     f"        echo \"DIGEST l{i} $(cut -d' ' -f1 /sum{i})\"\n")
    path.write_text("".join(parts))
    return path


@dataclass
class Attempt:
    """What one killed build reported before it died."""
    digests: dict[int, str] = field(default_factory=dict)  # step -> sha256 printed by the step
    done: set[int] = field(default_factory=set)  # steps the build printed as done (committed)
    killed_alive: bool = True  # False when the build ended before the kill


def _children_of(pids: set[int]) -> set[tuple[int, int]]:
    """(pid, start time) of every descendant of `pids`, read from /proc."""
    parent: dict[int, int] = {}
    start: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        parent[int(entry)], start[int(entry)] = int(fields[1]), int(fields[19])
    found: set[tuple[int, int]] = set()
    todo = list(pids)
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and (child, start[child]) not in found:
                found.add((child, start[child]))
                todo.append(child)
    return found


def _alive(procs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    alive = set()
    for pid, started in procs:
        try:
            data = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        if int(data[data.rindex(b")") + 2:].split()[19]) == started:
            alive.add((pid, started))
    return alive


def crash_build(storage: Path, yaml: Path, oci: Path, phase: str, step: int, delay: float) -> tuple[Attempt, set]:
    """Run the build and SIGKILL it at (`phase`, `step`) after `delay` s. Returns what it
    reported, and the processes it had started (seen just before the kill)."""
    proc = subprocess.Popen([STACKER_KERNEL, "--storage", str(storage), "build", "-f", str(yaml),
                             "--no-cache", "--oci-dir", str(oci)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    got = Attempt()
    trigger = {"mid-step": f"building layer l{step}", "mid-snapshot": f"DIGEST l{step} ",
               "between-steps": f"l{step} step 1/1", "mid-export": f"l{STEPS} step 1/1"}[phase]
    for line in proc.stdout:
        m = re.match(r"DIGEST l(\d+) ([0-9a-f]{64})", line)
        if m:
            got.digests[int(m.group(1))] = m.group(2)
        m = re.match(r"\s*l(\d+) step 1/1 ran", line)
        if m:
            got.done.add(int(m.group(1)))
        if trigger in line:
            break
    time.sleep(delay)
    started = _children_of({proc.pid})
    got.killed_alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    # What it printed before dying still counts: a printed "done" was committed.
    for line in proc.stdout:
        m = re.match(r"DIGEST l(\d+) ([0-9a-f]{64})", line)
        if m:
            got.digests[int(m.group(1))] = m.group(2)
        m = re.match(r"\s*l(\d+) step 1/1 ran", line)
        if m:
            got.done.add(int(m.group(1)))
    proc.wait()
    return got, started


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_left_running(started: set, storage: Path) -> None:
    deadline = time.monotonic() + 15
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive(started) == set(), "processes of the killed build survive"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(storage) not in mounts


def assert_store_consistent(store: Store, attempt: Attempt) -> None:
    snaps = store.snapshots()
    steps = [s for s in snaps if s.kind == "step"]
    # Disk and records agree: nothing orphaned in either direction.
    assert sorted(p.name for p in (store.root / "snapshots").iterdir()) == sorted(s.id for s in steps)
    assert sorted(p.name for p in (store.root / "bases").iterdir()
                  if not p.name.endswith(".lock")) == sorted(s.id for s in snaps if s.kind == "base")
    assert list((store.root / "live").iterdir()) == []
    assert {p.name for p in (store.root / "logs").iterdir()} <= {s.id for s in steps}
    if store.driver.name == "overlay":  # and no layer left that no tree is made of
        used = {name for s in snaps for name in overlay.layer_names(s.path)}
        assert {p.name for p in (store.root / "layers").iterdir()} - {".empty"} == used
    by_digest = {}
    for snap in steps:
        assert is_frozen(snap.path)
        i = int(snap.layer[1:])
        # Every snapshot is intact: each data file of its chain matches the sum its step wrote.
        for k in range(1, i + 1):
            want = in_tree(snap.path, f"sum{k}").read_text().split()[0]
            assert sha256(in_tree(snap.path, f"data{k}")) == want, f"{snap.layer}: data{k} corrupt"
        chain = store.chain(snap.id)
        assert chain[0].kind == "base" and chain[-1].id == snap.id
        by_digest[(i, sha256(in_tree(snap.path, f"data{i}")))] = snap
    # Every step the build reported done is stored, with the digest it printed.
    for i in attempt.done:
        assert (i, attempt.digests[i]) in by_digest, f"committed step l{i} lost"


@pytest.fixture
def crash_setup(storage, busybox_tar, tmp_path):
    return storage, ten_layer_yaml(tmp_path / "stacker.yaml", busybox_tar), tmp_path / "oci"


def crash_points(n: int, seed: int = 20240909) -> list[tuple[str, int, float]]:
    """`n` (phase, step, delay) points, the phases taken in turn, the rest random."""
    rng = random.Random(seed)
    points = []
    for k in range(n):
        phase = PHASES[k % len(PHASES)]
        step = STEPS if phase == "mid-export" else rng.randint(1, STEPS)
        delay = {"mid-step": rng.uniform(0.0, 0.08), "mid-snapshot": rng.uniform(0.0, 0.02),
                 "between-steps": rng.uniform(0.0, 0.1), "mid-export": rng.uniform(0.05, 1.0)}[phase]
        points.append((phase, step, delay))
    return points


def test_kill_9_at_random_points_loses_nothing_committed_and_leaves_nothing(crash_setup):
    storage, yaml, oci = crash_setup
    killed_alive = 0
    for phase, step, delay in crash_points(POINTS):
        attempt, started = crash_build(storage, yaml, oci, phase, step, delay)
        killed_alive += attempt.killed_alive
        assert_nothing_left_running(started, storage)
        with Store.open(storage) as store:
            assert_store_consistent(store, attempt)
    assert killed_alive >= POINTS // 2  # most kills hit a running build
    # Afterwards the same store builds the whole file, export included.
    done = subprocess.run([STACKER_KERNEL, "--storage", str(storage), "build", "-f", str(yaml),
                           "--oci-dir", str(oci)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with Store.open(storage) as store:
        assert_store_consistent(store, Attempt())
