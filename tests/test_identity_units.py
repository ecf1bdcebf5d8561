"""The rules of notebook identity, cell places and document differences, without btrfs:
a fake store of session records, notebooks as JSON files in a temp dir (issue 22)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stacker_kernel.engine.identity import (
    Document, busy_with, find_previous, locate_notebook, place_cells, read_document, related,
)
from stacker_kernel.engine.session import Differences
from stacker_kernel.storage.store import Session, Snapshot


class FakeStore:
    """The store's session queries over records in memory (no btrfs, no SQLite)."""

    def __init__(self, sessions: list[Session], alive: set[str] = frozenset()) -> None:
        self.sessions, self.alive = sessions, alive

    def find_sessions(self, name=None, kind=None):
        return [s for s in reversed(self.sessions)
                if (name is None or s.name == name) and (kind is None or s.kind == kind)]

    def session_alive(self, sess):
        return sess.id in self.alive

    def get(self, sid):
        return None


def _session(sid: str, name: str, cells: list[str]) -> Session:
    return Session(id=sid, kind="kernel", name=name, owner_pid=0, owner_start=0,
                   history=[f"snap-{sid}"], cell_order=list(cells))


def _notebook(path: Path, ids: list[str]) -> str:
    path.write_text(json.dumps({"cells": [{"id": i, "cell_type": "code", "source": f"echo {i}"} for i in ids],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return str(path)


def test_the_same_notebook_goes_on_with_its_build(tmp_path):
    nb = _notebook(tmp_path / "a.ipynb", ["c1", "c2"])
    store = FakeStore([_session("s1", nb, ["c1", "c2"])])
    previous, how = find_previous(store, nb, {"c1", "c2"})
    assert previous.id == "s1" and how.how == "restarted"


def test_a_renamed_notebook_goes_on_with_its_build_and_says_its_old_name(tmp_path):
    old = str(tmp_path / "Untitled.ipynb")  # gone: renamed
    new = _notebook(tmp_path / "debbuild.ipynb", ["c1", "c2"])
    previous, how = find_previous(FakeStore([_session("s1", old, ["c1", "c2"])]), new, {"c1", "c2"})
    assert previous.id == "s1" and (how.how, how.other) == ("renamed", old)


def test_a_new_notebook_under_a_used_name_starts_empty(tmp_path):
    old_cells = ["c1", "c2"]
    nb = _notebook(tmp_path / "Untitled.ipynb", ["n1"])  # the new notebook took the name
    previous, how = find_previous(FakeStore([_session("s1", nb, old_cells)]), nb, {"n1"})
    assert previous is None and how.how == "new-name-reused"
    # ... and the renamed one still finds its build under the old name
    renamed = _notebook(tmp_path / "debbuild.ipynb", old_cells)
    previous, how = find_previous(FakeStore([_session("s1", nb, old_cells)]), renamed, set(old_cells))
    assert previous.id == "s1" and how.how == "renamed"


def test_a_copy_starts_its_own_build(tmp_path):
    orig = _notebook(tmp_path / "a.ipynb", ["c1", "c2"])
    copy = _notebook(tmp_path / "a-Copy1.ipynb", ["c1", "c2"])
    previous, how = find_previous(FakeStore([_session("s1", orig, ["c1", "c2"])]), copy, {"c1", "c2"})
    assert previous is None and (how.how, how.other) == ("copy", orig)


def test_a_build_of_a_notebook_far_away_or_of_a_live_kernel_is_not_taken(tmp_path):
    far = tmp_path / "x" / "y" / "z" / "w"
    far.mkdir(parents=True)
    new = _notebook(tmp_path / "b.ipynb", ["c1"])
    store = FakeStore([_session("s1", str(far / "gone.ipynb"), ["c1"])])
    assert find_previous(store, new, {"c1"})[0] is None
    assert not related(str(far / "gone.ipynb"), new) and related(str(tmp_path / "sub" / "a.ipynb"), new)
    live = FakeStore([_session("s1", str(tmp_path / "gone.ipynb"), ["c1"])], alive={"s1"})
    assert find_previous(live, new, {"c1"})[0] is None


def test_a_second_kernel_of_a_notebook_is_busy_but_a_new_notebook_of_its_name_is_not(tmp_path):
    nb = _notebook(tmp_path / "Untitled.ipynb", ["c1"])
    store = FakeStore([_session("s1", nb, ["c1"])], alive={"s1"})
    assert busy_with(store, nb, {"c9"}).id == "s1"  # the file holds the running kernel's cells
    _notebook(tmp_path / "Untitled.ipynb", ["n1"])  # its notebook was renamed; a new one took the name
    os.utime(nb, (time.time() + 5, time.time() + 5))
    assert busy_with(store, nb, {"n1"}) is None


def test_a_kernel_finds_its_renamed_notebook_in_its_folder_or_below(tmp_path):
    (tmp_path / "sub").mkdir()
    moved = _notebook(tmp_path / "sub" / "moved.ipynb", ["c1", "c2"])
    _notebook(tmp_path / "other.ipynb", ["x"])
    assert locate_notebook(tmp_path / "Untitled.ipynb", {"c1"}) == Path(moved)
    assert locate_notebook(tmp_path / "Untitled.ipynb", {"nowhere"}) == tmp_path / "Untitled.ipynb"


def test_cells_stand_where_the_saved_notebook_has_them_else_where_they_first_ran():
    assert place_cells(None, ["a", "c", "b"]) == (["a", "c", "b"], {"a", "c", "b"})
    # b is not saved yet: it stands after the cell run before it (a)
    assert place_cells(["a", "c"], ["a", "b", "c"]) == (["a", "b", "c"], {"b"})


def test_differences_name_the_cells_edited_missing_out_of_order_and_gone(tmp_path):
    doc = Document((("a", "echo a2"), ("b", "echo b"), ("c", "echo c"), ("d", "%export"), ("e", "echo e")),
                   saved_at=100.0)
    built = [Snapshot(cell_id=c, source=src) for c, src in
             (("a", "echo a"), ("x", "echo x"), ("c", "echo c"))]
    diffs = Differences.of(doc, built, {}, lambda cell_id: f"[{cell_id}]")
    assert diffs.lines() == [
        "cell [a] echo a2 changed since it ran (the image has what ran: run it again)",
        "cell [b] echo b above the last step is not in the image (never run, failed or undone: run it)",
        "cell [x] echo x no longer in the notebook is in the image (later steps are built on it)"]
    assert diffs.below == ["[e] echo e"]  # the %export cell runs no step
    # a cell run after the notebook was saved is not "changed": the file is behind
    assert Differences.of(doc, built, {"a": 200.0}, str).edited == []
    out_of_order = Differences.of(doc, [Snapshot(cell_id="c", source="echo c"),
                                        Snapshot(cell_id="b", source="echo b")], {}, str)
    assert out_of_order.out_of_order == ["b echo b"]
    assert read_document(tmp_path / "missing.ipynb") is None


def test_a_cell_goes_back_to_its_slot_in_its_own_layer():
    from stacker_kernel.engine.identity import slot_position

    order = ["base", "A", "B", "ylayer", "C"]
    steps = [("A", "x"), ("C", "y")]
    # B (layer x, the notebook's first layer: no %layer cell) goes after A; layer y goes too
    assert slot_position(order, "B", steps, {"y": "ylayer"}, ["x", "y"]) == (1, "x")
    # a cell after every step comes next: nothing goes
    assert slot_position(order + ["D"], "D", steps, {"y": "ylayer"}, ["x", "y"]) == (None, None)
    # a cell below the %layer cell belongs to layer y: back to y's start, x stays
    order = ["base", "A", "ylayer", "B", "C"]
    assert slot_position(order, "B", steps, {"y": "ylayer"}, ["x", "y"]) == (1, "y")
    # x started by its own %layer cell: a cell above every %layer cell has no known layer
    assert slot_position(["B", "xl", "A"], "B", [("A", "x")], {"x": "xl"}, ["x"]) == (0, None)
