"""BuildSession: the step semantics of docs/architecture.md on real btrfs and real namespaces."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from stacker_kernel.engine.session import BuildSession
from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Store
from conftest import in_tree


def busybox_layer(name, tar):
    return Layer(name=name, from_=ImageSource(type="tar", url=str(tar)))


@pytest.fixture
def session(storage, busybox_tar, tmp_path):
    store = Store.open(storage)
    s = BuildSession.open(store, str(tmp_path / "nb.ipynb"), resume=False)
    s.begin_layer(busybox_layer("nb", busybox_tar))
    yield s
    s.close()
    store.close()


def run_ok(session, script, cell_id=None):
    out = []
    outcome = session.run_step(script, cell_id, on_output=out.append)
    assert outcome.ok, outcome.message
    return "".join(out), outcome


def test_state_carries_between_steps_of_a_layer(session):
    run_ok(session, "cd /tmp\nX='a b'\nexport Y=2")
    out, _ = run_ok(session, 'echo "$(pwd)|$X|$Y|$(sh -c \'echo $X$Y\')"')
    assert out.strip() == "/tmp|a b|2|2"


def test_new_layer_starts_fresh(session, busybox_tar):
    run_ok(session, "cd /tmp; export Y=2; touch /from-first")
    session.begin_layer(Layer(name="second", from_=ImageSource(type="built", tag="nb")))
    out, _ = run_ok(session, 'echo "$(pwd)|${Y-unset}"; ls /from-first')
    assert out.splitlines()[0] == "/|unset"
    assert "/from-first" in out


def test_failed_step_leaves_no_trace(session):
    run_ok(session, "X=kept; echo one > /f")
    outcome = session.run_step("echo two > /f; touch /g; X=changed; false; echo never")
    assert not outcome.ok
    assert outcome.status == 1
    assert "false" in outcome.message
    out, _ = run_ok(session, "cat /f; ls /g 2>/dev/null || echo no-g; echo $X")
    assert out.split() == ["one", "no-g", "kept"]


def test_exit_in_a_step_is_a_failure_and_the_engine_goes_on(session):
    outcome = session.run_step("exit 0")
    assert not outcome.ok
    out, _ = run_ok(session, "echo alive")
    assert out.strip() == "alive"


def test_cache_hit_does_not_run(session, tmp_path):
    script = "cat /proc/sys/kernel/random/uuid > /stamp; cat /stamp"
    first, o1 = run_ok(session, script)
    session.rollback(0)
    second, o2 = run_ok(session, script)
    assert o2.cached and not o1.cached
    assert first == second
    out, _ = run_ok(session, "cat /stamp")
    # A re-run would have written a new timestamp.
    assert out.strip() == first.strip()


def test_no_cache_runs_again(session):
    script = "cat /proc/sys/kernel/random/uuid > /stamp; cat /stamp"
    first, _ = run_ok(session, script)
    session.rollback(0)
    session.use_cache = False
    second, o2 = run_ok(session, script)
    assert not o2.cached and first != second


def test_rollback_restores_files_and_state(session):
    run_ok(session, "echo 1 > /v; N=1")
    run_ok(session, "echo 2 > /v; N=2; cd /tmp")
    run_ok(session, "echo 3 > /v; N=3")
    view = session.rollback(1)
    assert view.index == 1
    out, _ = run_ok(session, 'cat /v; echo "$N $(pwd)"')
    assert out.split() == ["1", "1", "/"]
    assert [v.index for v in session.history()] == [1, 2]


def test_rerunning_a_cell_rolls_back_to_its_parent(session):
    run_ok(session, "touch /a", cell_id="c1")
    run_ok(session, "touch /b", cell_id="c2")
    run_ok(session, "touch /c", cell_id="c2")  # c2 edited and run again
    out, _ = run_ok(session, "ls /a /b 2>&1 || true; ls /c")
    assert "/b" in out and "No such file" in out
    assert [v.cell_id for v in session.history()][:2] == ["c1", "c2"]


def test_rollback_to_unknown_step_is_a_clear_error(session):
    run_ok(session, "true")
    with pytest.raises(RecipeError, match="no step 7"):
        session.rollback(7)


def test_interrupt_ends_a_hanging_step(session):
    timer = threading.Timer(0.5, session.interrupt)
    timer.start()
    t0 = time.monotonic()
    outcome = session.run_step("sleep 1000")
    assert not outcome.ok and outcome.interrupted
    assert time.monotonic() - t0 < 30
    out, _ = run_ok(session, "echo after")
    assert out.strip() == "after"


def test_imports_are_read_only_and_not_in_the_layer(storage, busybox_tar, tmp_path):
    (tmp_path / "data.txt").write_text("imported\n")
    store = Store.open(storage)
    s = BuildSession.open(store, str(tmp_path / "nb.ipynb"), resume=False)
    layer = busybox_layer("nb", busybox_tar)
    from stacker_kernel.recipe.model import Import

    layer.imports = [Import(path="data.txt")]
    s.begin_layer(layer, base_dir=str(tmp_path))
    try:
        out, o = run_ok(s, "cat /stacker/imports/data.txt; touch /stacker/imports/x 2>/dev/null || echo ro")
        assert out.split() == ["imported", "ro"]
        snap = store.get(o.snapshot_id)
        assert not in_tree(snap.path, "stacker/imports").exists()
    finally:
        s.close()
        store.close()


def test_a_step_sees_the_image_and_a_step_that_changes_nothing_touches_nothing(session):
    """Without imports nothing of the container's own shows in the rootfs a step sees
    (no /stacker mount point), and `/` keeps its times: a `true` step's layer is empty and
    its snapshot changed no directory."""
    run_ok(session, "echo one > /f")
    out, o = run_ok(session, "ls -a1 /; stat -c '%Z %Y' /")
    *names, ctime, mtime = out.split()
    snap = session.store.get(o.snapshot_id)
    assert sorted(n for n in names if n not in (".", "..")) == session.store.driver.listdir(snap.path, "/")
    out, _ = run_ok(session, "sleep 1.1; stat -c '%Z %Y' /")
    assert out.split() == [ctime, mtime]
    assert session.diff() == []
    assert [p for _, p in session.diff(1)] == ["/f"]


def test_killed_build_loses_no_snapshot_and_leaves_no_process(storage, busybox_tar, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from stacker_kernel.engine.session import BuildSession
        from stacker_kernel.recipe.model import ImageSource, Layer
        from stacker_kernel.storage.store import Store
        store = Store.open({str(storage)!r})
        s = BuildSession.open(store, {str(tmp_path / 'k.ipynb')!r}, resume=False)
        s.begin_layer(Layer(name='k', from_=ImageSource(type='tar', url={str(busybox_tar)!r})))
        o = s.run_step('echo committed > /c')
        print(o.snapshot_id, flush=True)
        s.run_step('echo started; sleep 98765', on_output=lambda t: print('OUT', t, flush=True))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    snap_id = proc.stdout.readline().strip()
    assert proc.stdout.readline().startswith("OUT")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _sleepers():
        time.sleep(0.1)
    assert _sleepers() == []
    store = Store.open(storage)
    try:
        snap = store.get(snap_id)
        assert snap is not None
        assert in_tree(snap.path, "c").read_text() == "committed\n"
        assert list((storage / "live").iterdir()) == []
    finally:
        store.close()


def _sleepers():
    me = os.getuid()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            st = os.stat(f"/proc/{pid}")
        except OSError:
            continue
        if cmd[:2] == [b"sleep", b"98765"] and st.st_uid in (me, os.getuid()):
            found.append(int(pid))
    return found


def test_history_shows_each_steps_size_change(session):
    run_ok(session, "head -c 100000 /dev/zero > /big")
    run_ok(session, "rm /big; mkdir /d")
    session.wait_for_sizes()  # measured in the background after each commit
    sizes = [v.size_delta for v in session.history()]
    assert sizes == [100000, -100000]


def test_showing_the_history_never_diffs_on_the_callers_thread(session, monkeypatch):
    from stacker_kernel.engine import inspect

    diffed_on = []
    diff = inspect.size_changes
    monkeypatch.setattr(inspect, "size_changes",
                        lambda pairs: diffed_on.append(threading.current_thread()) or diff(pairs))
    for n in range(3):
        run_ok(session, f"head -c {n + 1}000 /dev/zero > /f{n}")
        session.history()
    assert threading.current_thread() not in diffed_on
    session.wait_for_sizes()  # measured in the background meanwhile
    assert [v.size_delta for v in session.history()] == [1000, 2000, 3000]


def test_the_history_shows_recorded_sizes_without_diffing(session, monkeypatch):
    from stacker_kernel.engine import history, inspect

    for n in range(3):
        run_ok(session, f"head -c {n + 1}000 /dev/zero > /f{n}")
    session.wait_for_sizes()
    monkeypatch.setattr(history, "measure_sizes", lambda pairs: pytest.fail("the history diffed a step"))
    monkeypatch.setattr(inspect, "size_changes", lambda pairs: pytest.fail("the history diffed a step"))
    assert [v.size_delta for v in session.history()] == [1000, 2000, 3000]
    # Recorded in the store: a session resumed in another process knows them too.
    assert [session.store.get(v.snapshot_id).size_delta for v in session.history()] == [1000, 2000, 3000]


def test_no_size_is_measured_while_steps_follow_each_other(session, monkeypatch):
    from stacker_kernel.engine import history

    measured = []
    measure = history.measure_sizes
    monkeypatch.setattr(history, "measure_sizes", lambda pairs: measured.append(len(pairs)) or measure(pairs))
    monkeypatch.setattr(history, "QUIET", 3600.0)  # the session is never quiet long enough
    for n in range(3):
        run_ok(session, f"head -c {n + 1}000 /dev/zero > /f{n}")
        assert [v.size_delta for v in session.history()] == [None] * (n + 1)
    assert measured == [] and session.sizes_pending()
    monkeypatch.setattr(history, "QUIET", 0.0)  # quiet now: a new look measures them all
    session._history.measure_later()
    session.wait_for_sizes()
    assert [v.size_delta for v in session.history()] == [1000, 2000, 3000]
    assert sum(measured) == 3


def test_a_step_rolled_back_before_the_session_is_quiet_is_never_measured(session, monkeypatch):
    from stacker_kernel.engine import history

    pairs_measured = []
    measure = history.measure_sizes
    monkeypatch.setattr(history, "measure_sizes", lambda pairs: pairs_measured.extend(pairs) or measure(pairs))
    monkeypatch.setattr(history, "QUIET", 3600.0)
    for n in range(3):
        run_ok(session, f"head -c {n + 1}000 /dev/zero > /f{n}")
    kept = session.history(measure=False)[0].snapshot_id
    session.rollback(1)
    monkeypatch.setattr(history, "QUIET", 0.0)
    session.history()
    session.wait_for_sizes()
    assert [v.size_delta for v in session.history()] == [1000]
    assert [new for _, new in pairs_measured] == [str(session.store.get(kept).path)]


def test_an_interrupt_while_the_step_is_being_prepared_still_ends_it(storage, busybox_tar, tmp_path):
    store = Store.open(storage)
    s = BuildSession.open(store, str(tmp_path / "i.ipynb"), resume=False)
    s.begin_layer(busybox_layer("i", busybox_tar))  # the base import and container start come first
    outcomes = []
    worker = threading.Thread(target=lambda: outcomes.append(s.run_step("sleep 1000")))
    worker.start()
    s.interrupt()  # before the container exists
    worker.join(30)
    try:
        assert not worker.is_alive(), "the interrupt was lost"
        assert not outcomes[0].ok and outcomes[0].interrupted
    finally:
        while worker.is_alive():
            s.interrupt()
            worker.join(1)
        s.close()
        store.close()


def test_network_none_takes_effect_in_a_running_layer(session):
    run_ok(session, "true")  # the layer's container is up, with the host's network
    session.network = "none"
    out, _ = run_ok(session, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert out.split() == ["lo"]


def test_a_commit_keeps_the_layers_container_on_both_drivers(session):
    """A step's commit does not start the container again (overlay builds only its root
    again, on the new stack): the next steps see the files and shell state of the last."""
    run_ok(session, "echo one > /f; X=1\nf() { echo fn; }\ncd /tmp")
    container = session._live.container
    run_ok(session, "echo two >> /f; X=$((X+1))")
    session.network = "none"  # starts it again, once: the network is the container's
    run_ok(session, "echo three >> /f")
    started = session._live.container
    out, _ = run_ok(session, "cat /f; echo x=$X; f; pwd; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert out.split() == ["one", "two", "three", "x=2", "fn", "/tmp", "lo"]
    assert container is not None and started is not container
    assert session._live.container is started and started.alive


def test_rerunning_a_cell_whose_step_came_from_the_cache_rolls_back(session):
    script = "echo x >> /log"
    run_ok(session, script, cell_id="c1")
    session.rollback(0)
    _, hit = run_ok(session, script, cell_id="c9")  # another cell, same step: a cache hit
    assert hit.cached
    run_ok(session, script, cell_id="c9")  # c9 run again: back to its parent first
    out, _ = run_ok(session, "cat /log")
    assert out.split() == ["x"]
    assert [v.cell_id for v in session.history()][:1] == ["c9"]


def run_cell(session, text, cell_id):
    """A cell as the kernel runs it: its recipe directives, then its script as a step."""
    from stacker_kernel.recipe.cells import parse_cell

    cell = parse_cell(text)
    session.apply_directives(cell.directives, cell_id, cell.script)
    return run_ok(session, cell.script, cell_id)


def test_rerunning_a_cell_of_an_earlier_layer_applies_its_directives_to_that_layer(session):
    run_cell(session, "%build_env FOO=1\necho $FOO > /foo", "a1")
    run_cell(session, "%layer b\n%from built nb\ntrue", "b1")
    run_cell(session, "%build_env FOO=2\necho $FOO > /foo", "a1")  # a1 edited and run again
    out, _ = run_ok(session, "cat /foo")
    assert out.strip() == "2"
    assert session.layer.name == "nb" and session.layer.build_env == {"FOO": "2"}


def test_deleting_a_built_cell_leaves_the_history_but_not_the_export(session):
    run_ok(session, "echo a > /a", cell_id="c1")
    run_ok(session, "echo b > /b", cell_id="c2")
    run_ok(session, "cat /a /b > /ab", cell_id="c3")
    session.forget_cells(["c2"])
    assert [v.cell_id for v in session.history()] == ["c1", "c3"]
    # The rootfs was built on c2's step: what was built, and so the export, keeps it.
    steps = session.export_recipe().layers["nb"].steps
    assert [s.cell_id for s in steps] == ["c1", "c2", "c3"]
    from stacker_kernel.engine.identity import Document

    session.document = lambda: Document((("c1", "echo a > /a"), ("c3", "cat /a /b > /ab")), time.time())
    assert session.document_differences().lines() == [
        "cell c2 echo b > /b no longer in the notebook is in the image (later steps are built on it)"]


def test_a_second_kernel_of_an_open_notebook_is_refused_and_touches_nothing(storage, busybox_tar, tmp_path):
    from stacker_kernel.errors import SessionBusyError

    name = str(tmp_path / "nb.ipynb")
    store = Store.open(storage)
    first = BuildSession.open(store, name, kind="kernel")
    try:
        first.begin_layer(busybox_layer("nb", busybox_tar))
        run_ok(first, "echo one > /f", cell_id="c1")
        with pytest.raises(SessionBusyError) as e:
            BuildSession.open(store, name, kind="kernel")
        assert str(e.value).startswith(f"{name} is already building (pid {os.getpid()}, a kernel): ")
        # The first session goes on from its own live rootfs.
        out, _ = run_ok(first, "cat /f; echo two >> /f", cell_id="c2")
        assert out.strip() == "one"
    finally:
        first.close()
    again = BuildSession.open(store, name, kind="kernel")  # closed: the next kernel resumes it
    try:
        assert again.resumed is not None and again.resumed.cell_id == "c2"
    finally:
        again.close()
        store.close()


def test_a_step_committed_first_by_another_session_is_the_one_both_go_on_from(storage, busybox_tar, tmp_path):
    store = Store.open(storage)
    sessions = [BuildSession.open(store, str(tmp_path / f"{n}.ipynb"), resume=False) for n in "ab"]
    # Both run the same step at once: each waits (after the cache lookup missed) for a
    # file the test puts in its imports dir, so the two commits come in a known order.
    script = "cat /proc/sys/kernel/random/uuid > /id; echo waiting; while [ ! -e /stacker/imports/go ]; do sleep 0.05; done"
    from stacker_kernel.recipe.model import Import

    (tmp_path / "data.txt").write_text("the layer has imports: they are mounted\n")
    outcomes, waiting, workers = {}, {}, []
    try:
        for s in sessions:
            layer = busybox_layer("same", busybox_tar)
            layer.imports = [Import(path="data.txt")]
            s.begin_layer(layer, base_dir=str(tmp_path))
            waiting[s] = threading.Event()
            workers.append(threading.Thread(target=lambda s=s: outcomes.__setitem__(
                s, s.run_step(script, on_output=lambda t, s=s: waiting[s].set()))))
            workers[-1].start()
        for s in sessions:
            assert waiting[s].wait(60)
        for s, worker in zip(sessions, workers):
            (s._live.imports_dir / "go").write_text("")
            worker.join(60)
        a, b = (outcomes[s] for s in sessions)
        assert a.ok and b.ok and not a.cached
        assert b.snapshot_id == a.snapshot_id  # the first commit of the key, for both
        assert store.find_cache(store.get(a.snapshot_id).cache_key).id == a.snapshot_id
        # Both live rootfs are that snapshot now (read from here: the step threads, and
        # with them the containers they started, are gone).
        want = in_tree(store.get(a.snapshot_id).path, "id").read_text()
        assert [in_tree(s.live, "id").read_text() for s in sessions] == [want, want]
    finally:
        for s in sessions:
            s.close()
        store.close()


def test_a_new_cache_format_makes_earlier_steps_miss(session, monkeypatch):
    from stacker_kernel.engine import cache

    _, first = run_ok(session, "echo x > /x")
    session.rollback(0)
    monkeypatch.setattr(cache, "CACHE_FORMAT", cache.CACHE_FORMAT + 1)
    _, again = run_ok(session, "echo x > /x")
    assert not again.cached and again.snapshot_id != first.snapshot_id


def test_a_cells_session_writes_do_not_grow_with_the_history(session, monkeypatch):
    written = []
    write = session.store._write
    monkeypatch.setattr(session.store, "_write", lambda stmts: written.extend(stmts) or write(stmts))

    def session_bytes_of_a_cell(n: int) -> tuple[int, int]:
        written.clear()
        run_ok(session, f"echo {n:03} > /n", cell_id=f"c{n:03}")
        mine = [args for sql, args in written if "sessions" in sql or "history" in sql]
        return len(mine), sum(len(a) for args in mine for a in args if isinstance(a, str))

    for n in range(2):
        session_bytes_of_a_cell(n)
    short = session_bytes_of_a_cell(2)
    for n in range(3, 13):
        session_bytes_of_a_cell(n)
    assert session_bytes_of_a_cell(13) == short


def test_a_cells_store_reads_do_not_grow_with_the_history(session, monkeypatch):
    reads = []
    query = session.store._query
    monkeypatch.setattr(session.store, "_query", lambda sql, args=(): reads.append(sql) or query(sql, args))

    def reads_of_a_cell(n: int) -> int:
        session.wait_for_sizes()  # not a cell's reads: the size measurement's, in the background
        reads.clear()
        run_ok(session, f"echo {n} > /n", cell_id=f"c{n}")
        return len(reads)

    for n in range(2):
        reads_of_a_cell(n)
    short = reads_of_a_cell(2)
    for n in range(3, 13):
        reads_of_a_cell(n)
    assert reads_of_a_cell(13) == short


def test_a_rw_bind_is_a_fresh_copy_at_every_step_and_goes_with_the_session(session, tmp_path, storage):
    """A cell run again with a writable bind of a context folder sees the folder as it is
    now, not the copy the last run wrote into (the container keeps the copy staged), and
    closing the session deletes the copies; a killed session's go at the store's next open."""
    from stacker_kernel.container.step import MOUNT_MARKER

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a").write_text("1\n")
    cell = f"{MOUNT_MARKER} type=bind,source=conf,target=/src,rw\ncat /src/a; ls /src; echo w > /src/written"
    out, _ = run_ok(session, cell)
    assert out.split() == ["1", "a"]
    (tmp_path / "conf" / "a").write_text("2\n")
    (tmp_path / "conf" / "b").write_text("b\n")
    out, _ = run_ok(session, cell)
    assert out.split() == ["2", "a", "b"]
    assert sorted(os.listdir(tmp_path / "conf")) == ["a", "b"]
    copies = list((storage / "tmp").iterdir())
    assert [p.name.startswith("mounts-") for p in copies] == [True]
    session.close()
    assert list((storage / "tmp").iterdir()) == []
    # a session whose process died: its folder (here a copy owned by another of the user's ids) goes
    dead = storage / "tmp" / "mounts-999999999-1-x"
    from stacker_kernel.container.userns import run_in_userns

    def plant(where: str) -> None:
        os.makedirs(os.path.join(where, "copy-dir"))
        Path(where, "copy-dir", "f").write_text("secret\n")
        os.chown(os.path.join(where, "copy-dir"), 1000, 1000)
    dead.mkdir()
    run_in_userns(plant, str(dead))
    Store.open(storage).close()
    assert not dead.exists()


def test_a_gc_right_after_a_build_imported_its_base_keeps_the_base(storage, busybox_tar, tmp_path, monkeypatch):
    """A build records its session only when it writes (a fully cached one writes nothing);
    importing a base is such a write, so a gc that runs right after the import (three
    builds and gc at once in test_concurrency met it) sees the base referenced."""
    real = BuildSession._import_pinned_base

    def import_then_gc(self, source, warn):
        base = real(self, source, warn)
        with Store.open(storage) as other:
            other.gc(reap=False)
        return base

    monkeypatch.setattr(BuildSession, "_import_pinned_base", import_then_gc)
    with Store.open(storage) as store:
        s = BuildSession.open(store, str(tmp_path / "nb.ipynb"), kind="build", resume=False, record=False)
        try:
            s.begin_layer(busybox_layer("nb", busybox_tar))
            out, _ = run_ok(s, "echo built")
            assert out.strip() == "built"
        finally:
            s.close()
