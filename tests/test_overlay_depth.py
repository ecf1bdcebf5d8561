"""Deep overlay stacks stay cheap (issue 24): a flattening (OverlayDriver.flatten, run in
the background past FLATTEN_DEPTH layers) moves the session's live tree onto the short
stack even when steps were committed over the flattened snapshot meanwhile, so the
next mounts of the container's root stay short in a session of any length."""
from __future__ import annotations

import os

import pytest

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.storage import driver, overlay
from stacker_kernel.storage.store import Snapshot, Store


@pytest.fixture
def store(storage):
    with Store.open(storage) as s:
        yield s


def _write(root: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)


def _read(root: str, rels: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for rel in rels:
        try:
            with open(os.path.join(root, rel)) as f:
                out[rel] = f.read()
        except FileNotFoundError:
            out[rel] = None
    return out


def _step(store: Store, live, parent: Snapshot, files: dict[str, str]) -> Snapshot:
    run_in_userns(_write, str(live), files)
    return store.commit(live, Snapshot(parent=parent.id, layer="l", source=str(files)))


def test_a_live_tree_that_moved_on_while_its_snapshot_was_flattened_gets_the_short_stack(store, monkeypatch):
    monkeypatch.setattr(driver, "FLATTEN_DEPTH", 1000)  # flattened by hand below
    base = store.add_base("sha256-" + "cd" * 32, lambda p: _write(str(p), {"bottom": "b"}), "test base")
    live = store.live_path("deep")
    store.driver.writable_copy(base.path, live)
    snap = base
    for i in range(8):
        snap = _step(store, live, snap, {f"f{i}": str(i)})
    deep = overlay.layer_names(snap.path)
    later = _step(store, live, snap, {"later": "l"})  # committed while the flattening copies
    assert store.driver.flatten(store.write_lock, snap.path)
    flat = f"flat-{deep[1]}"
    assert overlay.layer_names(snap.path) == [snap.id, flat]
    assert overlay.layer_names(live) == [later.id, snap.id, flat]
    assert overlay.layer_names(later.path) == [later.id, *deep]  # a snapshot's record stays as made
    rels = ["bottom", "f0", "f7", "later"]
    want = {"bottom": "b", "f0": "0", "f7": "7", "later": "l"}
    assert run_in_userns(_read, str(live), rels) == want
    nxt = _step(store, live, later, {"next": "n"})
    assert overlay.layer_names(nxt.path) == [nxt.id, later.id, snap.id, flat]
    assert run_in_userns(_read, str(nxt.path), rels + ["next"]) == dict(want, next="n")
