"""The snapshot store on either storage driver (real btrfs, or overlay on ext4): records,
cache, chains, crash recovery, concurrency, gc, CLI."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import in_tree, is_frozen, reaped

from stacker_kernel import cli
from stacker_kernel.errors import SessionBusyError, StorageError
from stacker_kernel.storage import driver as drivers
from stacker_kernel.storage.store import Snapshot, Store, reap_trash, start_reaper


@pytest.fixture
def store(storage):
    s = Store.open(storage)
    yield s
    s.close()


def _populate(path: Path) -> None:
    (path / "etc").mkdir()
    (path / "etc" / "os-release").write_text("NAME=test\n")


def _base(store: Store) -> Snapshot:
    return store.add_base("sha256-" + "ab" * 32, _populate, "test base")


def _writes(live: Path) -> Path:
    """Where the host writes into live tree `live` (an overlay tree's upper directory)."""
    return live / "upper" if (live / "upper").is_dir() else live


def _step(store: Store, live: Path, parent: Snapshot, text: str, **kw) -> Snapshot:
    """Write a file in `live` and commit it as a step on `parent`."""
    (_writes(live) / "step.txt").write_text(text)
    return store.commit(live, Snapshot(parent=parent.id, layer=kw.pop("layer", "l"), source=text, **kw))


def _live_from(store: Store, session_id: str, snap: Snapshot) -> Path:
    live = store.live_path(session_id)
    store.driver.writable_copy(snap.path, live)
    return live


def _run_child(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True,
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, **kw)


# --- opening -------------------------------------------------------------------

def test_open_creates_the_layout(storage):
    Store.open(storage).close()
    for name in ("bases", "snapshots", "live", "logs", "stacker-kernel.db"):
        assert (storage / name).exists(), name


def test_open_refuses_the_btrfs_driver_for_storage_not_on_btrfs(tmp_path):
    with pytest.raises(StorageError, match="is not on btrfs: run 'sudo stacker-kernel setup-storage"):
        Store.open(tmp_path, "btrfs")
    assert not (tmp_path / "driver").exists()


def test_open_records_the_driver_and_keeps_it(storage):
    from stacker_kernel.storage import btrfs

    have, other = ("btrfs", "overlay") if btrfs.is_btrfs(storage) else ("overlay", "btrfs")
    with Store.open(storage) as store:
        assert store.driver.name == have
    assert (storage / "driver").read_text().strip() == have
    with pytest.raises(StorageError, match=f"uses the {have} driver, not {other}"):
        Store.open(storage, other)


def test_first_opens_at_once_record_one_driver_and_refuse_the_other(storage):
    """Two builds started at once on a fresh storage both record its driver: one wins,
    the one that wanted another driver gets the usual line, the rest agree (CI once
    saw a traceback here, one writer's temp file moved by the other)."""
    from concurrent.futures import ThreadPoolExecutor

    for round_ in range(20):
        root = storage / f"fresh{round_}"
        root.mkdir()
        wanted = [None, "overlay", None, "overlay"] * 2

        def first_open(w):
            try:
                return drivers.choose(root, w).name
            except StorageError as e:
                return str(e)

        with ThreadPoolExecutor(len(wanted)) as pool:
            got = list(pool.map(first_open, wanted))
        have = (root / "driver").read_text().strip()
        for w, g in zip(wanted, got):
            if w in (None, have):
                assert g == have, (w, got)
            else:
                assert g.startswith(f"storage {root} uses the {have} driver, not {w}"), got
        assert sorted(p.name for p in root.iterdir()) == ["driver"]


def test_open_refuses_missing_storage(storage):
    with pytest.raises(StorageError, match="does not exist: create it"):
        Store.open(storage / "missing")


def test_database_uses_wal(store):
    assert store._query("PRAGMA journal_mode")[0][0] == "wal"


# The schema of stores made before the schema had a version (user_version 0).
_SCHEMA_BEFORE_VERSIONS = """
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, parent TEXT, session TEXT, layer TEXT NOT NULL,
    cell_id TEXT, source TEXT NOT NULL, cache_key TEXT, state TEXT NOT NULL,
    status TEXT NOT NULL, started REAL NOT NULL, duration REAL NOT NULL,
    size_delta INTEGER, created REAL NOT NULL);
CREATE INDEX snapshots_cache_key ON snapshots(cache_key);
CREATE INDEX snapshots_session ON snapshots(session);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, owner_pid INTEGER NOT NULL,
    owner_start INTEGER NOT NULL, head TEXT, layer TEXT NOT NULL, tags TEXT NOT NULL,
    history TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX sessions_name ON sessions(name);
"""


def _user_version(root: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(root / "stacker-kernel.db")
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_a_new_store_records_its_schema_version(storage):
    from stacker_kernel.storage.store import SCHEMA_VERSION

    Store.open(storage).close()
    assert _user_version(storage) == SCHEMA_VERSION >= 2


def _frozen_empty(path: Path) -> None:
    """An empty snapshot at `path` as the storage's driver leaves one (for hand-made stores)."""
    from stacker_kernel.storage import btrfs, driver, overlay

    if driver.of_root(path.parent.parent).name == "btrfs":
        btrfs.create_subvolume(path)
        btrfs.set_readonly(path, True)
    else:
        path.mkdir()
        overlay.write_stack(path, [], writable=False)


def test_a_store_from_before_schema_versions_is_migrated_and_keeps_its_cache(storage):
    import sqlite3

    from stacker_kernel.storage.store import SCHEMA_VERSION

    conn = sqlite3.connect(storage / "stacker-kernel.db")
    conn.executescript(_SCHEMA_BEFORE_VERSIONS)
    (storage / "snapshots").mkdir()
    ids = ["old" + "0" * 29, "new" + "0" * 29]
    for n, sid in enumerate(ids):  # two steps of one key: the older one was committed first
        _frozen_empty(storage / "snapshots" / sid)
        conn.execute("INSERT INTO snapshots VALUES (?, 'step', NULL, NULL, 'l', NULL, 'x', 'k', '{}',"
                     " 'ok', 0, 0, NULL, ?)", (sid, 100.0 + n))
    conn.commit()
    conn.close()
    with Store.open(storage) as store:
        assert store.find_cache("k").id == ids[0]
        assert [s.id for s in store.snapshots()] == ids
    assert _user_version(storage) == SCHEMA_VERSION


def test_a_schema_2_store_keeps_its_session_histories(storage):
    import json
    import sqlite3

    from stacker_kernel.storage.store import SCHEMA_VERSION

    conn = sqlite3.connect(storage / "stacker-kernel.db")
    conn.executescript(_SCHEMA_BEFORE_VERSIONS)
    conn.execute("CREATE TABLE cache (key TEXT PRIMARY KEY, snapshot TEXT NOT NULL)")
    (storage / "snapshots").mkdir()
    ids = [c * 32 for c in "abc"]
    for n, sid in enumerate(ids):
        _frozen_empty(storage / "snapshots" / sid)
        conn.execute("INSERT INTO snapshots VALUES (?, 'step', NULL, NULL, 'l', NULL, 'x', NULL, '{}',"
                     " 'ok', 0, 0, NULL, ?)", (sid, 100.0 + n))
    conn.execute("INSERT INTO sessions VALUES ('s1', 'kernel', '/nb.ipynb', 0, 0, ?, 'l', '{}', ?, 1, 1)",
                 (ids[2], json.dumps([ids[2], ids[0], ids[1]])))
    conn.execute("INSERT INTO sessions VALUES ('s2', 'build', '/x', 0, 0, NULL, 'l', '{}', '[]', 2, 2)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Store.open(storage) as store:
        assert {s.id: s.history for s in store.find_sessions()} == {"s1": [ids[2], ids[0], ids[1]], "s2": []}
        assert store.get_session("s1").history == [ids[2], ids[0], ids[1]]
    assert _user_version(storage) == SCHEMA_VERSION == 3
    conn = sqlite3.connect(storage / "stacker-kernel.db")
    try:  # the history is no longer in the session record
        assert "history" not in [r[1] for r in conn.execute("PRAGMA table_info(sessions)")]
    finally:
        conn.close()


def test_a_store_of_a_newer_schema_is_refused_in_one_line(storage):
    import sqlite3

    Store.open(storage).close()
    conn = sqlite3.connect(storage / "stacker-kernel.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError) as e:
        Store.open(storage)
    assert str(e.value) == (f"storage {storage} was written by a newer stacker-kernel (schema 99): "
                            "upgrade, or use another --storage")
    assert _user_version(storage) == 99  # not touched


# --- bases -------------------------------------------------------------------------

def test_add_base_makes_a_readonly_populated_base(store):
    base = _base(store)
    assert base.kind == "base" and base.path == store.root / "bases" / base.id
    assert is_frozen(base.path)
    assert in_tree(base.path, "etc/os-release").read_text() == "NAME=test\n"


def test_add_base_twice_populates_once(store):
    calls = []
    first = store.add_base("sha256-1", lambda p: calls.append(p), "x")
    second = store.add_base("sha256-1", lambda p: calls.append(p), "x")
    assert len(calls) == 1 and first.id == second.id


def test_add_base_failure_leaves_nothing(store):
    def boom(path: Path) -> None:
        (path / "half").write_text("x")
        raise RuntimeError("download failed")

    with pytest.raises(RuntimeError):
        store.add_base("sha256-2", boom, "x")
    assert store.get("sha256-2") is None
    assert list((store.root / "bases").iterdir()) == []


# --- commits, chains, cache ----------------------------------------------------------

def test_commit_makes_a_readonly_snapshot_and_a_record(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    live = _live_from(store, sess.id, _base(store))
    snap = _step(store, live, store.get("sha256-" + "ab" * 32), "one", session=sess.id, cache_key="k")
    assert is_frozen(snap.path)
    assert in_tree(snap.path, "step.txt").read_text() == "one"
    assert store.get(snap.id) == snap


def test_commit_leaves_the_live_subvolume_writable(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    _step(store, live, base, "one")
    (_writes(live) / "more").write_text("x")
    assert (_writes(live) / "more").exists()


def test_get_of_an_unknown_id_is_none(store):
    assert store.get("nope") is None


def test_chain_lists_the_base_first(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    s1 = _step(store, live, base, "one")
    s2 = _step(store, live, s1, "two")
    assert [s.id for s in store.chain(s2.id)] == [base.id, s1.id, s2.id]


def test_find_cache_returns_the_snapshot_with_that_key(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    _step(store, live, base, "one", cache_key="k1")
    s2 = _step(store, live, base, "two", cache_key="k2")
    assert store.find_cache("k2").id == s2.id
    assert store.find_cache("k3") is None


def test_the_cache_keeps_the_first_snapshot_of_a_key_until_it_is_gone(store):
    a, b = store.new_session("build", "/a.ipynb"), store.new_session("build", "/b.ipynb")
    base = _base(store)
    live = _live_from(store, a.id, base)
    first = _step(store, live, base, "one", session=a.id, cache_key="k")
    second = _step(store, live, base, "one", session=b.id, cache_key="k")  # built beside it
    assert store.find_cache("k").id == first.id
    store.delete_snapshot(first.id)
    assert store.find_cache("k").id == second.id


def test_commit_reusing_the_cache_returns_the_snapshot_committed_first(store):
    a, b = store.new_session("build", "/a.ipynb"), store.new_session("build", "/b.ipynb")
    base = _base(store)
    live = _live_from(store, a.id, base)
    first = _step(store, live, base, "one", session=a.id, cache_key="k")
    (live / "step.txt").write_text("one, again")
    got = store.commit(live, Snapshot(parent=base.id, session=b.id, layer="l", source="one", cache_key="k"),
                       reuse_cached=True)
    assert got.id == first.id
    assert sorted(p.name for p in (store.root / "snapshots").iterdir()) == [first.id]


def test_snapshots_filters_by_session(store):
    a, b = store.new_session("kernel", "/a.ipynb"), store.new_session("kernel", "/b.ipynb")
    base = _base(store)
    live = _live_from(store, a.id, base)
    sa = _step(store, live, base, "a", session=a.id)
    _step(store, live, base, "b", session=b.id)
    assert [s.id for s in store.snapshots(session=a.id)] == [sa.id]


def test_delete_snapshot_reparents_its_children(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    s1 = _step(store, live, base, "one")
    s2 = _step(store, live, s1, "two")
    store.delete_snapshot(s1.id)
    assert not s1.path.exists()
    assert [s.id for s in store.chain(s2.id)] == [base.id, s2.id]


# --- sessions ------------------------------------------------------------------------

def test_find_sessions_is_newest_first_and_filters(store):
    a = store.new_session("kernel", "/nb.ipynb")
    b = store.new_session("build", "/nb.ipynb")
    c = store.new_session("kernel", "/other.ipynb")
    assert [s.id for s in store.find_sessions()] == [c.id, b.id, a.id]
    assert [s.id for s in store.find_sessions(name="/nb.ipynb", kind="kernel")] == [a.id]


def test_update_session_stores_head_tags_and_history(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    sess.head, sess.layer, sess.tags, sess.history = "h", "l2", {"l1": "x"}, ["x", "h"]
    store.update_session(sess)
    again = store.find_sessions()[0]
    assert (again.head, again.layer, again.tags, again.history) == ("h", "l2", {"l1": "x"}, ["x", "h"])


def test_a_history_write_after_a_step_does_not_grow_with_the_history(store, monkeypatch):
    written = []
    write = store._write
    monkeypatch.setattr(store, "_write", lambda stmts: written.append(list(stmts)) or write(stmts))
    sess = store.new_session("kernel", "/nb.ipynb")

    def bytes_of_a_step() -> tuple[int, int]:
        written.clear()
        sess.history.append(f"{len(sess.history):032x}")
        store.update_session(sess)
        stmts = written[0]
        return len(stmts), sum(len(a) for _, args in stmts for a in args if isinstance(a, str))

    short = bytes_of_a_step()
    for _ in range(50):
        bytes_of_a_step()
    assert bytes_of_a_step() == short
    assert store.get_session(sess.id).history == [f"{n:032x}" for n in range(52)]


def test_a_session_history_survives_rollback_edits_and_rewrites(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    for history in (["a", "b", "c"], ["a", "b"], ["a", "b", "d", "e"], ["a", "e"], ["x"], []):
        sess.history = list(history)
        store.update_session(sess)
        assert store.get_session(sess.id).history == history
    # Written by a session record read from the store, not the one that wrote it last.
    other = store.get_session(sess.id)
    other.history = ["y", "z"]
    store.update_session(other)
    assert store.find_sessions()[0].history == ["y", "z"]


def test_new_session_is_alive_while_its_owner_runs(store):
    assert store.session_alive(store.new_session("kernel", "/nb.ipynb"))


def test_session_with_a_reused_pid_is_dead(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    sess.owner_start += 1  # same pid, different start time: the pid was reused
    assert not store.session_alive(sess)


def test_end_session_deletes_the_live_subvolume_and_keeps_records(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    live = _live_from(store, sess.id, _base(store))
    store.end_session(sess.id)
    assert not live.exists()
    assert store.find_sessions()[0].id == sess.id


def test_an_exclusive_session_is_refused_while_the_owner_of_its_name_lives(store):
    first = store.new_session("build", "/nb.ipynb", exclusive=True)
    with pytest.raises(SessionBusyError) as e:
        store.new_session("build", "/nb.ipynb", exclusive=True)
    assert str(e.value).startswith(f"/nb.ipynb is already building (pid {os.getpid()}, a build): ")
    store.new_session("kernel", "/nb.ipynb", exclusive=True)  # another kind: its own session
    store.end_session(first.id)  # the owner is done with it: the name is free
    store.new_session("build", "/nb.ipynb", exclusive=True)


def test_an_exclusive_session_takes_a_name_whose_owner_died(store):
    child = _run_child(f"""
        from stacker_kernel.storage.store import Store
        Store.open({str(store.root)!r}).new_session("build", "/nb.ipynb", exclusive=True)
    """)
    child.communicate()
    assert child.returncode == 0
    store.new_session("build", "/nb.ipynb", exclusive=True)


def test_an_unrecorded_session_is_written_only_by_record_session(store):
    """A build opens its session unrecorded (engine/build.py): nothing is written until
    record_session, which writes everything it holds by then, in one go."""
    base = _base(store)
    live = _live_from(store, "x", base)
    step = _step(store, live, base, "one")
    sess = store.new_session("build", "/nb.ipynb", exclusive=True, record=False)
    sess.history, sess.head, sess.tags = [step.id], step.id, {"l": step.id}
    sess.entry_cells, sess.cell_order = {step.id: "c1"}, ["c1"]
    store.update_session(sess)
    assert store.find_sessions() == [] and not sess.recorded
    # Another build of the name meanwhile (this process owns both): refused at the record
    other = store.new_session("build", "/nb.ipynb", exclusive=True)
    with pytest.raises(SessionBusyError):
        store.record_session(sess, exclusive=True)
    store.end_session(other.id)
    store.record_session(sess, exclusive=True)
    got = store.get_session(sess.id)
    assert sess.recorded and got.same_position(sess) and got.entry_cells == {step.id: "c1"}
    sess.history.append(base.id)  # recorded now: a change is written at once
    store.update_session(sess)
    assert store.get_session(sess.id).history == [step.id, base.id]


def test_recording_a_session_whose_snapshot_was_collected_meanwhile_is_refused(store):
    base = _base(store)
    step = _step(store, _live_from(store, "x", base), base, "one")
    sess = store.new_session("build", "/nb.ipynb", record=False)  # gc does not see it
    sess.history, sess.head = [step.id], step.id
    store.gc()
    with pytest.raises(StorageError, match=f"snapshot {step.id[:12]} was deleted while /nb.ipynb was being built"):
        store.record_session(sess)
    assert store.find_sessions() == []


def test_an_unrecorded_session_does_not_hold_its_name_against_one_that_is(store):
    """Only a recorded session holds its name: two builds that take everything from the
    cache write nothing and need not exclude each other."""
    store.new_session("build", "/nb.ipynb", exclusive=True, record=False)
    store.new_session("build", "/nb.ipynb", exclusive=True)
    with pytest.raises(SessionBusyError):  # but it checks the recorded ones
        store.new_session("build", "/nb.ipynb", exclusive=True, record=False)


# --- write lock ------------------------------------------------------------------------

def test_write_lock_is_reentrant(store):
    with store.write_lock():
        with store.write_lock():
            sess = store.new_session("kernel", "/nb.ipynb")
    assert store.find_sessions()[0].id == sess.id


def test_write_lock_excludes_other_processes(store):
    probe = f"""
        import fcntl, os
        fd = os.open({str(store.root / "lock")!r}, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("got it")
        except BlockingIOError:
            print("busy")
    """
    with store.write_lock():
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(probe)], capture_output=True, text=True)
    assert out.stdout.strip() == "busy"


# --- crash recovery ------------------------------------------------------------------

_CRASHING_COMMIT = """
    import sys, time
    from pathlib import Path
    from stacker_kernel.storage.store import Store
    store = Store.open({root!r})
    with store.write_lock():
        # What commit() does, stopped between the snapshot and the record.
        store.driver.commit(Path({live!r}), store.root / "snapshots" / "orphan", "orphan")
        print("snapshotted", flush=True)
        time.sleep(600)
"""


def _crash_in_commit(store: Store, live: Path) -> None:
    child = _run_child(_CRASHING_COMMIT.format(root=str(store.root), live=str(live)))
    assert child.stdout.readline().strip() == "snapshotted"
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_open_after_a_crash_in_commit_deletes_the_orphan(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    live = _live_from(store, sess.id, _base(store))
    _crash_in_commit(store, live)
    assert (store.root / "snapshots" / "orphan").exists()
    Store.open(store.root).close()
    assert not (store.root / "snapshots" / "orphan").exists()


def test_open_after_a_crash_in_commit_keeps_committed_snapshots(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    s1 = _step(store, live, base, "one")
    _crash_in_commit(store, live)
    again = Store.open(store.root)
    assert again.get(s1.id) == s1 and is_frozen(s1.path)
    assert [s.id for s in again.chain(s1.id)] == [base.id, s1.id]
    again.close()


def test_open_does_not_delete_a_commit_in_progress(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    slow_commit = f"""
        import sys
        from pathlib import Path
        from stacker_kernel.storage.store import Store, Snapshot
        store = Store.open({str(store.root)!r})
        with store.write_lock():
            snap = Snapshot(id="inflight", parent={base.id!r})
            store.driver.commit(Path({str(live)!r}), store.root / "snapshots" / "inflight", "inflight")
            print("snapshotted", flush=True)
            sys.stdin.readline()
            store._insert_snapshot(snap)
    """
    child = _run_child(slow_commit)
    assert child.stdout.readline().strip() == "snapshotted"
    opened = []
    opener = threading.Thread(target=lambda: opened.append(Store.open(store.root)))
    opener.start()
    time.sleep(0.2)  # give the opener a chance to run recovery too early, if the lock let it
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.wait() == 0
    opener.join()
    assert opened[0].get("inflight") is not None
    assert (store.root / "snapshots" / "inflight").is_dir()
    opened[0].close()


def test_open_drops_records_whose_subvolume_vanished_and_moves_heads_back(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    s1 = _step(store, live, base, "one")
    s2 = _step(store, live, s1, "two")
    sess.head, sess.history = s2.id, [s1.id, s2.id]
    store.update_session(sess)
    store.driver.remove(s2.path)  # behind the store's back
    again = Store.open(store.root)
    after = again.find_sessions()[0]
    assert again.get(s2.id) is None
    assert (after.head, after.history) == (s1.id, [s1.id])
    again.close()


def test_open_deletes_live_subvolumes_of_dead_owners(store):
    base = _base(store)
    child = f"""
        from pathlib import Path
        from stacker_kernel.storage.store import Store
        store = Store.open({str(store.root)!r})
        sess = store.new_session("kernel", "/nb.ipynb")
        store.driver.writable_copy(Path({str(base.path)!r}), store.live_path(sess.id))
        print(sess.id)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(child)], capture_output=True, text=True)
    live = store.live_path(out.stdout.strip())
    assert live.is_dir(), out.stderr
    Store.open(store.root).close()
    assert not live.exists()


def test_open_keeps_live_subvolumes_of_living_owners(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    live = _live_from(store, sess.id, _base(store))
    Store.open(store.root).close()
    assert live.is_dir()


def test_open_deletes_live_subvolumes_without_a_session(store):
    live = _live_from(store, "no-such-session", _base(store))
    Store.open(store.root).close()
    assert not live.exists()


def _fake_container(rootfs: Path, engine_pid: int) -> subprocess.Popen:
    """A process that looks like a container's init (its argv is what ps shows)."""
    import json

    from stacker_kernel.container.runtime import INIT_MODULE

    config = json.dumps({"rootfs": str(rootfs), "engine_pid": engine_pid})
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", INIT_MODULE, config])


def test_open_ends_the_container_left_on_a_rootfs_it_deletes_and_looks_for_none_otherwise(store):
    """A container whose engine died is ended when its session's rootfs is found left
    (before the rootfs is deleted); while no rootfs is left, opening the store or a
    session does not look through the host's processes at all."""
    from stacker_kernel.engine.session import BuildSession

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = _live_from(store, "no-such-session", _base(store))
    orphan = _fake_container(live, dead.pid)
    unseen = None
    try:
        time.sleep(0.2)
        Store.open(store.root).close()
        assert orphan.wait(5) == -9
        assert not live.exists()
        unseen = _fake_container(store.live_path("long-gone"), dead.pid)  # its rootfs deleted before
        time.sleep(0.2)
        with Store.open(store.root) as again:
            BuildSession.open(again, "/nb.ipynb", kind="build", resume=False).close()
        assert unseen.poll() is None
    finally:
        for p in (orphan, unseen):
            if p is not None:
                p.kill()
                p.wait()


def test_open_deletes_temporary_bases_of_dead_importers(store):
    store.driver.create(store.root / "bases" / ".tmp-dead")
    Store.open(store.root).close()
    assert not (store.root / "bases" / ".tmp-dead").exists()


# --- concurrency -----------------------------------------------------------------------

_COMMITTER = """
    from pathlib import Path
    from stacker_kernel.storage.store import Store, Snapshot
    store = Store.open({root!r})
    sess = store.new_session("build", "/{tag}")
    live = store.live_path(sess.id)
    store.driver.writable_copy(Path({base!r}), live)
    writes = live / "upper" if store.driver.name == "overlay" else live
    parent = {base_id!r}
    for i in range(50):
        (writes / "n").write_text("{tag}%d" % i)
        snap = store.commit(live, Snapshot(parent=parent, session=sess.id, layer="{tag}",
                                           source="step %d" % i, cache_key="{tag}-%d" % i))
        parent = snap.id
        sess.head = snap.id
        sess.history.append(snap.id)
        store.update_session(sess)
    store.end_session(sess.id)
    print("done")
"""


def test_two_processes_commit_50_snapshots_each_consistently(store):
    base = _base(store)
    children = [_run_child(_COMMITTER.format(root=str(store.root), base=str(base.path),
                                             base_id=base.id, tag=tag)) for tag in ("a", "b")]
    outs = [c.communicate()[0].strip() for c in children]
    assert outs == ["done", "done"]
    steps = [s for s in store.snapshots() if s.kind == "step"]
    assert len(steps) == 100
    for sess in store.find_sessions():
        chain = store.chain(sess.head)
        assert [s.id for s in chain[1:]] == sess.history and len(chain) == 51
        for i, snap in enumerate(chain[1:]):
            assert in_tree(snap.path, "n").read_text() == f"{snap.layer}{i}"
            assert is_frozen(snap.path)
    assert sorted(p.name for p in (store.root / "snapshots").iterdir()) == sorted(s.id for s in steps)


# --- gc ------------------------------------------------------------------------------------

def _ended_session_with_chain(store: Store):
    """A session whose owner is gone, with base -> s1 -> s2 and head at s1 (s2 rolled back)."""
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    s1 = _step(store, live, base, "one", session=sess.id)
    s2 = _step(store, live, s1, "two", session=sess.id)
    sess.head, sess.history, sess.owner_start = s1.id, [s1.id], sess.owner_start + 1
    store.update_session(sess)
    store.end_session(sess.id)
    return sess, base, s1, s2


def _in_sight(root: Path, sub: str = "snapshots") -> list[str]:
    return sorted(n for n in os.listdir(root / sub) if not n.startswith(drivers.TRASH_PREFIX))


def test_gc_removes_unreferenced_snapshots(store):
    _, _, _, s2 = _ended_session_with_chain(store)
    assert store.gc() == [s2.id]
    assert not s2.path.exists() and store.get(s2.id) is None


def test_gc_moves_snapshots_into_the_trash_and_a_background_reaper_destroys_them(store, monkeypatch):
    _, base, s1, s2 = _ended_session_with_chain(store)
    from stacker_kernel.storage import store as store_module

    started = []
    start = store_module.start_reaper
    monkeypatch.setattr(store_module, "start_reaper", lambda root: started.append(root) or start(root))
    assert store.gc() == [s2.id]
    # On return: out of sight, record dropped, the tree still there in the trash (or being destroyed).
    assert not s2.path.exists() and store.get(s2.id) is None
    assert _in_sight(store.root) == [s1.id] and started == [store.root]
    reaped(store.root)
    assert os.listdir(store.root / "snapshots") == [s1.id]
    # What a session references was never touched: still frozen, same content.
    for snap in (base, s1):
        assert is_frozen(snap.path) and store.get(snap.id) is not None
    assert in_tree(s1.path, "step.txt").read_text() == "one"
    assert not (store.root / "logs" / s2.id).exists()


def test_a_trash_a_killed_gc_left_is_destroyed_when_the_store_is_next_opened(store):
    _, base, s1, s2 = _ended_session_with_chain(store)
    # Killed right after its rename: the tree in the trash, its record still there.
    gone = store.driver.trash(s2.path)
    assert gone.name.startswith(drivers.TRASH_PREFIX + s2.id)
    store.close()
    with Store.open(store.root) as again:
        assert again.get(s2.id) is None and again.get(s1.id) is not None  # the record without its tree goes
        reaped(again.root)
        assert os.listdir(again.root / "snapshots") == [s1.id] and is_frozen(s1.path)


def test_a_trash_a_killed_reaper_left_is_destroyed_by_the_next_gc(store):
    _, _, s1, s2 = _ended_session_with_chain(store)
    assert store.gc(reap=False) == [s2.id]  # as if its reaper was killed before it began
    assert len(drivers.trash_entries(store.root)) >= 1
    assert store.gc() == []  # nothing new to delete: it still starts a reaper for the old trash
    reaped(store.root)
    assert os.listdir(store.root / "snapshots") == [s1.id]


def test_a_reaper_starts_without_setsid_too(store, monkeypatch):
    run = subprocess.run

    def no_setsid(cmd, *a, **kw):
        if cmd[0] == "setsid":
            raise FileNotFoundError(2, "No such file or directory", "setsid")
        return run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", no_setsid)
    _, _, s1, s2 = _ended_session_with_chain(store)
    assert store.gc() == [s2.id]
    reaped(store.root)
    assert os.listdir(store.root / "snapshots") == [s1.id]


def test_one_reaper_at_a_time_and_a_waiting_one_finishes_the_trash(store, monkeypatch):
    import fcntl

    _, _, s1, s2 = _ended_session_with_chain(store)
    store.gc(reap=False)
    fd = os.open(store.root / "reaper.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another reaper at work
        reap_trash(store.root)  # returns at once: that one empties the trash
        assert drivers.trash_entries(store.root)
        spawned = []
        run = subprocess.run
        monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **kw: spawned.append(cmd) or run(["true"]))
        start_reaper(store.root)  # none started beside it
        assert spawned == []
        monkeypatch.undo()
    finally:
        os.close(fd)  # ... or is gone: the next one with `wait` does it
    reap_trash(store.root, wait=True)
    assert drivers.trash_entries(store.root) == [] and os.listdir(store.root / "snapshots") == [s1.id]


def test_gc_keeps_the_chain_of_a_session_head(store):
    _, base, s1, _ = _ended_session_with_chain(store)
    store.gc()
    assert store.get(s1.id) is not None and store.get(base.id) is not None
    assert s1.path.is_dir() and base.path.is_dir()


def test_gc_keeps_snapshots_of_a_live_session_not_yet_pointed_at(store):
    sess = store.new_session("kernel", "/nb.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    s1 = _step(store, live, base, "one", session=sess.id)
    store.gc()
    assert store.get(s1.id) is not None


def test_gc_after_forget_session_removes_everything(store):
    sess, base, s1, s2 = _ended_session_with_chain(store)
    store.forget_session(sess.id)
    assert sorted(store.gc()) == sorted([base.id, s1.id, s2.id])
    assert _in_sight(store.root) == [] and _in_sight(store.root, "bases") == []
    reaped(store.root)
    assert list((store.root / "snapshots").iterdir()) == [] and os.listdir(store.root / "bases") == []
    assert not (store.root / "layers").exists() or os.listdir(store.root / "layers") == [".empty"]


def _ended_session_with_steps(store: Store, n: int, keep: int):
    """A session whose owner is gone, base -> n steps, its history the first `keep`."""
    sess = store.new_session("kernel", "/many.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    steps, parent = [], base
    for i in range(n):
        parent = _step(store, live, parent, f"step {i}", session=sess.id)
        steps.append(parent)
    sess.head, sess.history, sess.owner_start = steps[keep - 1].id, [s.id for s in steps[:keep]], sess.owner_start + 1
    store.update_session(sess)
    store.end_session(sess.id)
    return base, steps


def test_gc_of_many_snapshots_removes_exactly_the_unreferenced_and_keeps_the_rest_frozen(store):
    base, steps = _ended_session_with_steps(store, 12, keep=5)
    assert sorted(store.gc()) == sorted(s.id for s in steps[5:])
    assert _in_sight(store.root) == sorted(s.id for s in steps[:5])
    reaped(store.root)
    assert sorted(p.name for p in (store.root / "snapshots").iterdir()) == sorted(s.id for s in steps[:5])
    assert [store.get(s.id) for s in steps[5:]] == [None] * 7
    for snap in [base, *steps[:5]]:
        assert is_frozen(snap.path) and store.get(snap.id) is not None
    assert in_tree(steps[4].path, "step.txt").read_text() == "step 4"


@pytest.mark.btrfs_only  # a subvolume whose own top belongs to a subordinate id (an overlay tree's top is ours)
def test_gc_removes_a_snapshot_whose_top_a_step_gave_to_another_id(store):
    from stacker_kernel.container.userns import run_in_userns
    from stacker_kernel.storage import btrfs

    sess = store.new_session("kernel", "/chowned.ipynb")
    base = _base(store)
    live = _live_from(store, sess.id, base)
    mine = _step(store, live, base, "mine", session=sess.id)
    theirs = Snapshot(parent=mine.id, layer="l", source="chown 1000 /", session=sess.id, root=store.root)
    btrfs.snapshot(live, theirs.path)
    run_in_userns(os.lchown, str(theirs.path), 1000, 1000)  # what the step did to its `/`
    run_in_userns(btrfs.set_readonly, str(theirs.path), True)
    with store.write_lock():
        store._insert_snapshot(theirs)
    assert os.lstat(theirs.path).st_uid != os.geteuid()
    store.forget_session(sess.id)
    assert sorted(store.gc()) == sorted([base.id, mine.id, theirs.id])
    assert _in_sight(store.root) == []
    reaped(store.root)  # the reaper destroys it from inside the user namespace
    assert list((store.root / "snapshots").iterdir()) == []


def test_session_names_are_read_without_any_history(store, monkeypatch):
    _, steps = _ended_session_with_steps(store, 3, keep=3)
    build = store.new_session("build", "/b.yaml")
    kernels = {s.id: s.name for s in store.find_sessions(kind="kernel")}
    reads = []
    query = store._query
    monkeypatch.setattr(store, "_query", lambda sql, args=(): reads.append(sql) or query(sql, args))
    assert store.session_names(kind="kernel") == kernels == {k: "/many.ipynb" for k in kernels}
    assert store.session_names()[build.id] == "/b.yaml"
    assert len(reads) == 2 and not any("history" in sql for sql in reads)


# --- CLI ---------------------------------------------------------------------------------

def test_cli_layers_shows_sessions_layers_and_steps(store, capsys):
    sess, base, s1, _ = _ended_session_with_chain(store)
    assert cli.main(["layers", "--storage", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"session {sess.id[:8]} kernel /nb.ipynb (ended)" in out
    assert "  layer l" in out and f"* {s1.id[:8]}" in out and "base sha256-abab" in out


def test_cli_gc_prints_what_it_removed(store, capsys):
    _, _, s1, s2 = _ended_session_with_chain(store)
    with store.write_lock():
        store._write([("UPDATE snapshots SET size_delta = ? WHERE id = ?", (3 << 20, s2.id))])
    assert cli.main(["--storage", str(store.root), "gc"]) == 0
    out = capsys.readouterr().out
    assert f"removed {s2.id[:12]} " in out
    assert ("removed 1 snapshot(s) holding 3.0 MiB; their space is freed in the background "
            "('gc --wait' waits for it)") in out
    reaped(store.root)
    assert cli.main(["--storage", str(store.root), "layers"]) == 0
    assert "being freed" not in capsys.readouterr().out


def test_cli_gc_wait_destroys_the_snapshots_before_it_returns(store, capsys):
    sess, base, s1, s2 = _ended_session_with_chain(store)
    store.forget_session(sess.id)
    assert cli.main(["--storage", str(store.root), "gc", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "removed 3 snapshot(s), freed " in out and "being freed" not in out
    assert drivers.trash_entries(store.root) == [] and os.listdir(store.root / "snapshots") == []


def test_cli_layers_says_how_many_deleted_snapshots_are_not_freed_yet(store, capsys):
    _, _, s1, s2 = _ended_session_with_chain(store)
    store.gc(reap=False)  # their reaper has not run yet
    assert cli.main(["layers", "--storage", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert s2.id[:8] not in out and s1.id[:8] in out
    assert re.search(r" used, [0-9.]+ \w?i?B free, 1 deleted snapshot\(s\) being freed in the background", out), out


def test_cli_reports_storage_errors_in_one_line(tmp_path, capsys):
    assert cli.main(["layers", "--storage", str(tmp_path), "--storage-driver", "btrfs"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stacker-kernel: storage ") and "btrfs" in err and err.count("\n") == 1
