"""Three builds on one storage root at once, with `gc` running beside them.

Builds `a/nb.ipynb` and `b/nb.ipynb` are the same notebook (same layer name,
same cells, so the same cache keys: they race for and share cache entries);
`c/other.ipynb` differs. Each is 30 steps that append to /log with state
carried in a shell variable. Afterwards every build's result is exactly its
own 30 lines (no cross-talk), and the store is consistent: disk and records
agree, every chain reaches a base, and every step snapshot holds as many
lines as steps in its chain (so a cache hit can only be the right content).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat

from stacker_kernel.engine.build import layer_snapshot
from stacker_kernel.storage.driver import TRASH_PREFIX
from stacker_kernel.storage.store import Store
from conftest import in_tree

STEPS = 30
STACKER_KERNEL = str(Path(sys.executable).parent / "stacker-kernel")


def notebook(path: Path, busybox_tar: Path, word: str) -> Path:
    cells = [nbformat.v4.new_code_cell(f"%from tar {busybox_tar}\nN=0\n: > /log", id="c0")]
    for i in range(1, STEPS + 1):
        # the sleep keeps the builds running while several gc runs (a few seconds each) go by
        cells.append(nbformat.v4.new_code_cell(f'N=$((N+1))\necho "{word} $N" >> /log; sleep 0.3',
                                               id=f"c{i}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def start(storage: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([STACKER_KERNEL, "--storage", str(storage), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_builds_and_gc_at_once_keep_results_and_cache_right(storage, busybox_tar, tmp_path):
    books = {"a": notebook(tmp_path / "a" / "nb.ipynb", busybox_tar, "nb"),
             "b": notebook(tmp_path / "b" / "nb.ipynb", busybox_tar, "nb"),
             "c": notebook(tmp_path / "c" / "other.ipynb", busybox_tar, "other")}
    builds = {k: start(storage, "build", "-f", str(p), "--no-oci") for k, p in books.items()}
    gc_runs = 0
    while any(b.poll() is None for b in builds.values()):
        gc = subprocess.run([STACKER_KERNEL, "--storage", str(storage), "gc"], capture_output=True, text=True)
        assert gc.returncode == 0, gc.stderr
        gc_runs += 1
        time.sleep(0.05)
    results = {k: b.communicate() + (b.returncode,) for k, b in builds.items()}
    for k, (out, err, rc) in results.items():
        assert rc == 0, f"build {k}: {err}"
    assert gc_runs >= 2  # gc really ran beside the builds

    with Store.open(storage) as store:
        for k, path in books.items():
            word = "other" if k == "c" else "nb"
            snap = layer_snapshot(store, str(path), None)
            assert in_tree(snap.path, "log").read_text() == "".join(f"{word} {n}\n" for n in range(1, STEPS + 1))
        assert_store_consistent(store)
        # A gc after the builds keeps what the builds' sessions point at.
        store.gc()
        for path in books.values():
            assert in_tree(layer_snapshot(store, str(path), None).path, "log").is_file()


def assert_store_consistent(store: Store) -> None:
    snaps = store.snapshots()
    steps = [s for s in snaps if s.kind == "step"]
    in_sight = [p.name for p in (store.root / "snapshots").iterdir() if not p.name.startswith(TRASH_PREFIX)]
    assert sorted(in_sight) == sorted(s.id for s in steps)
    assert list((store.root / "live").iterdir()) == []
    for snap in steps:
        chain = store.chain(snap.id)
        assert chain[0].kind == "base", f"{snap.id} lost its base"
        lines = in_tree(snap.path, "log").read_text().splitlines()
        # chain = base, the `%from` cell, then one step per line.
        assert len(lines) == len(chain) - 2, f"{snap.id}: {len(lines)} lines, chain of {len(chain)}"
        assert len({ln.split()[0] for ln in lines}) <= 1  # one build's words only


def test_gc_between_base_import_and_first_step_keeps_the_base(storage, busybox_tar, tmp_path):
    from stacker_kernel.engine.session import BuildSession
    from stacker_kernel.recipe.model import ImageSource, Layer

    store = Store.open(storage)
    s = BuildSession.open(store, str(tmp_path / "nb.ipynb"), resume=False)
    try:
        s.begin_layer(Layer(name="nb", from_=ImageSource(type="tar", url=str(busybox_tar))))
        s.prepare_empty_layer()  # the base is imported; no step has run yet
        with Store.open(storage) as other:  # another process's `gc`
            other.gc()
        o = s.run_step("echo x > /f")
        assert o.ok, o.message
        chain = store.chain(o.snapshot_id)
        assert [c.kind for c in chain] == ["base", "step"]
    finally:
        s.close()
        store.close()


def _snapshot_ids(build_output: str) -> list[str]:
    """The snapshot ids `stacker-kernel build` printed, one per step, in order."""
    return re.findall(r"step \d+/\d+ (?:ran|cached) in [\d.]+s \(snapshot ([0-9a-f]{12})\)", build_output)


def test_two_builds_of_one_notebook_at_once_one_refuses_and_the_other_is_kept(storage, busybox_tar, tmp_path):
    nb = notebook(tmp_path / "nb.ipynb", busybox_tar, "nb")
    builds = [start(storage, "build", "-f", str(nb), "--no-oci") for _ in range(2)]
    results = [b.communicate() + (b.returncode,) for b in builds]
    done = [i for i, (_, _, rc) in enumerate(results) if rc == 0]
    assert len(done) == 1, [err for _, err, _ in results]
    winner, loser = builds[done[0]], builds[1 - done[0]]
    out, _, _ = results[done[0]]
    _, err, rc = results[1 - done[0]]
    assert rc == 1
    assert err.strip() == (f"stacker-kernel: {nb} is already building (pid {winner.pid}, a build): "
                           "wait for that build to finish, or stop it, then build again")
    printed = _snapshot_ids(out)
    assert len(printed) == STEPS + 1
    with Store.open(storage) as store:
        ids = {s.id[:12]: s for s in store.snapshots()}
        assert all(p in ids for p in printed)  # nothing the winner reported was deleted
        assert in_tree(layer_snapshot(store, str(nb), None).path, "log").read_text() == \
            "".join(f"nb {n}\n" for n in range(1, STEPS + 1))
        assert_store_consistent(store)
    # Built again: every step is a hit, on exactly the snapshots the winner reported.
    again = start(storage, "build", "-f", str(nb), "--no-oci")
    out, err = again.communicate()
    assert again.returncode == 0, err
    assert _snapshot_ids(out) == printed
    assert out.count(" cached in ") == STEPS + 1


def test_a_killed_build_leaves_no_staged_imports_or_secrets_after_the_next_open(storage, busybox_tar, tmp_path):
    """kill -9 of a build while a step runs with imports staged and a secret mounted: the
    next open of the store deletes both (they are named after the build's process); a
    live process's folder stays."""
    (tmp_path / "payload.txt").write_text("imported\n")
    (tmp_path / "token").write_text("s3cr3t\n")
    (tmp_path / "stacker.yaml").write_text(
        f"img:\n  from:\n    type: tar\n    url: {busybox_tar}\n  imports:\n    - payload.txt\n"
        f"  binds:\n    - {tmp_path} -> /signal\n"
        "  run: |\n    #%mount type=secret,id=token\n    touch /signal/started; sleep 1000\n")
    build = start(storage, "build", "-f", str(tmp_path / "stacker.yaml"), "--no-oci",
                  "--secret", f"id=token,src={tmp_path / 'token'}")
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert build.poll() is None and time.monotonic() < deadline, "the step did not start"
            time.sleep(0.1)
        staged = [p.name for p in (storage / "imports").iterdir()]
        assert [n.startswith(f"{build.pid}-") for n in staged] == [True]
        assert (storage / "imports" / staged[0] / "payload.txt").read_text() == "imported\n"
        assert len(list((storage / "tmp").glob(f"mounts-{build.pid}-*"))) == 1
        build.kill()
        build.communicate()
        # a live process's folder stays
        mine = storage / "imports" / f"{os.getpid()}-{_start_time(os.getpid())}-x"
        mine.mkdir()
        Store.open(storage).close()
        assert [p.name for p in (storage / "imports").iterdir()] == [mine.name]
        assert list((storage / "tmp").iterdir()) == []
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()


def _start_time(pid: int) -> int:
    from stacker_kernel.storage.store import process_start_time

    return process_start_time(pid)
