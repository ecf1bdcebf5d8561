"""The overlay storage driver: layers per step, stacks per snapshot, deletion and the union.

Unprivileged, on a folder on ext4 (the `storage` fixture's overlay parameter):
every tree is mounted only inside user namespaces (run_in_userns), never on the host.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import reaped

from stacker_kernel import cli
from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.storage import driver, overlay
from stacker_kernel.storage.driver import TRASH_PREFIX
from stacker_kernel.storage.store import Snapshot, Store


@pytest.fixture
def store(storage):
    with Store.open(storage) as s:
        assert s.driver.name == "overlay"
        yield s


def _write(root: str, files: dict[str, str | None]) -> None:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        if text is None:
            if os.path.isdir(path):
                import shutil
                shutil.rmtree(path)
            else:
                os.unlink(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _read(root: str, rels: list[str]) -> dict[str, str | None]:
    out = {}
    for rel in rels:
        try:
            with open(os.path.join(root, rel)) as f:
                out[rel] = f.read()
        except FileNotFoundError:
            out[rel] = None
    return out


def _base(store: Store, files: dict[str, str]) -> Snapshot:
    return store.add_base("sha256-" + "ab" * 32, lambda p: _write(str(p), files), "test base")


def _step(store: Store, live: Path, parent: Snapshot, files: dict[str, str | None]) -> Snapshot:
    run_in_userns(_write, str(live), files)
    return store.commit(live, Snapshot(parent=parent.id, layer="l", source=str(files)))


def test_each_step_is_its_own_layer_and_a_snapshot_is_their_stack(store):
    base = _base(store, {"etc/os": "base\n", "a/old": "x"})
    live = store.live_path("s1")
    store.driver.writable_copy(base.path, live)
    one = _step(store, live, base, {"one": "1"})
    two = _step(store, live, one, {"two": "2", "a/old": None})
    layers = store.root / "layers"
    # A layer holds only what its step changed (a removal is an overlayfs whiteout).
    assert sorted(os.listdir(layers / one.id)) == ["one"]
    assert sorted(os.listdir(layers / two.id)) == ["a", "two"]
    assert overlay.is_whiteout(str(layers / two.id / "a/old"))
    assert overlay.layer_names(two.path) == [two.id, one.id, base.id]
    # The live tree goes on over the committed step with an empty upper.
    assert os.listdir(live / "upper") == []
    rels = ["etc/os", "one", "two", "a/old"]
    assert run_in_userns(_read, str(one.path), rels) == {"etc/os": "base\n", "one": "1", "two": None, "a/old": "x"}
    assert run_in_userns(_read, str(two.path), rels) == {"etc/os": "base\n", "one": "1", "two": "2", "a/old": None}
    # The union from the host, without a mount: whiteouts hide what is below.
    assert store.driver.lexists(two.path, "etc/os") and store.driver.lexists(two.path, "one")
    assert not store.driver.lexists(two.path, "a/old") and store.driver.lexists(one.path, "a/old")


def test_an_opaque_directory_hides_the_layers_below(store):
    base = _base(store, {"d/x": "x", "d/y": "y"})
    live = store.live_path("s1")
    store.driver.writable_copy(base.path, live)
    snap = _step(store, live, base, {"d": None})
    run_in_userns(_write, str(live), {"d/z": "z"})
    replaced = store.commit(live, Snapshot(parent=snap.id, layer="l", source="d/z"))
    assert run_in_userns(_read, str(replaced.path), ["d/x", "d/z"]) == {"d/x": None, "d/z": "z"}
    assert not store.driver.lexists(replaced.path, "d/x") and store.driver.lexists(replaced.path, "d/z")


def test_rollback_drops_the_upper_and_deleting_a_middle_step_keeps_its_layer_for_children(store):
    base = _base(store, {"f": "0"})
    live = store.live_path("s1")
    store.driver.writable_copy(base.path, live)
    one = _step(store, live, base, {"f": "1"})
    two = _step(store, live, one, {"g": "2"})
    run_in_userns(_write, str(live), {"scribble": "uncommitted"})
    store.driver.writable_copy(one.path, live)  # rollback to step one
    assert run_in_userns(_read, str(live), ["f", "g", "scribble"]) == {"f": "1", "g": None, "scribble": None}
    store.delete_snapshot(one.id)
    # Step two stacks on one's layer: it stays while two does.
    assert (store.root / "layers" / one.id).is_dir()
    assert run_in_userns(_read, str(two.path), ["f", "g"]) == {"f": "1", "g": "2"}
    store.delete_snapshot(two.id)
    store.end_session("s1")
    with store.write_lock():
        store.driver.collect(store.root, store._trees)
    assert sorted(os.listdir(store.root / "layers")) == [".empty", base.id]


def test_gc_deletes_the_layers_of_unreferenced_snapshots(store):
    base = _base(store, {"f": "0"})
    sess = store.new_session("build", "x")
    live = store.live_path(sess.id)
    store.driver.writable_copy(base.path, live)
    one = _step(store, live, base, {"a": "1"})
    store.end_session(sess.id)
    store.forget_session(sess.id)
    assert (store.root / "layers" / one.id).is_dir()
    removed = store.gc()
    assert set(removed) == {one.id, base.id}
    # Out of sight at once (in the trash: not counted as the user's), deleted by the reaper.
    assert [n for n in os.listdir(store.root / "layers") if not n.startswith(TRASH_PREFIX)] == [".empty"]
    assert not one.path.exists() and not live.exists()
    reaped(store.root)
    assert sorted(os.listdir(store.root / "layers")) == [".empty"]


def _chain(store: Store, depth: int) -> tuple[Snapshot, Path]:
    base = _base(store, {"bottom": "b", "gone": "g"})
    live = store.live_path("deep")
    store.driver.writable_copy(base.path, live)
    parent = base
    for i in range(depth):
        parent = _step(store, live, parent, {f"f{i}": str(i)} if i != 1 else {"gone": None})
    return parent, live


def test_flatten_gives_a_deep_snapshot_two_layers_with_the_same_content(store, monkeypatch):
    monkeypatch.setattr(driver, "FLATTEN_DEPTH", 1000)  # no flattening in the background here
    snap, live = _chain(store, 12)
    deep = overlay.layer_names(snap.path)
    rels = ["bottom", "gone", "f0", "f11"]
    before = run_in_userns(_read, str(snap.path), rels)
    assert before == {"bottom": "b", "gone": None, "f0": "0", "f11": "11"}
    assert store.driver.flatten(store.write_lock, snap.path)
    assert overlay.layer_names(snap.path) == [snap.id, f"flat-{deep[1]}"]
    assert overlay.layer_names(live) == [snap.id, f"flat-{deep[1]}"]  # the live tree moved too
    assert run_in_userns(_read, str(snap.path), rels) == before
    assert run_in_userns(_read, str(live), rels) == before
    # The parent's own stack is untouched: its layers stay for it.
    parent = store.get(snap.parent)
    assert overlay.layer_names(parent.path) == deep[1:]
    assert run_in_userns(_read, str(parent.path), ["f10", "f11"]) == {"f10": "10", "f11": None}
    # The next step stacks on the short stack.
    nxt = _step(store, live, snap, {"next": "n"})
    assert overlay.layer_names(nxt.path) == [nxt.id, snap.id, f"flat-{deep[1]}"]


def test_a_commit_past_the_depth_flattens_in_the_background(store, monkeypatch):
    import time

    monkeypatch.setattr(driver, "FLATTEN_DEPTH", 4)
    snap, _ = _chain(store, 6)
    def flattened():  # it, or a snapshot below it that it stacks on
        return any(n.startswith("flat-") for n in overlay.layer_names(snap.path))

    deadline = time.monotonic() + 60
    while not flattened() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert flattened() and len(overlay.layer_names(snap.path)) <= 4
    assert run_in_userns(_read, str(snap.path), ["bottom", "gone", "f5"]) == {"bottom": "b", "gone": None, "f5": "5"}


def test_a_stack_deeper_than_a_page_of_mount_options_mounts(store, monkeypatch):
    monkeypatch.setattr(driver, "FLATTEN_DEPTH", 1000)
    base = _base(store, {"bottom": "b"})
    live = store.live_path("deep")
    store.driver.writable_copy(base.path, live)
    parent = base
    for i in range(80):  # 80 layer paths of ~70 bytes: more than mount(2)'s 4096-byte options
        parent = _step(store, live, parent, {f"f{i}": str(i)})
    assert len(":".join(overlay.read_stack(parent.path).layers)) > 4096
    assert run_in_userns(_read, str(parent.path), ["bottom", "f0", "f79"]) == {"bottom": "b", "f0": "0", "f79": "79"}


def test_layers_names_the_overlay_driver(storage, capsys):
    Store.open(storage).close()
    assert cli.main(["--storage", str(storage), "layers"]) == 0
    assert f"storage {storage} (overlay driver)" in capsys.readouterr().out


def test_a_kernel_too_old_for_unprivileged_overlayfs_is_one_line_with_the_fix():
    from stacker_kernel.errors import StorageError
    from stacker_kernel.storage import location

    with pytest.raises(StorageError) as e:
        location.check_overlay_kernel("5.10.0-28-amd64")
    assert "Linux 5.10.0-28-amd64 cannot mount overlayfs without root (needs 5.11 or later)" in str(e.value)
    assert "setup-storage" in str(e.value) and "\n" not in str(e.value)
    location.check_overlay_kernel("5.11.0")
    location.check_overlay_kernel(os.uname().release)
