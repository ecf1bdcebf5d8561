"""The session's position has one owner (engine/timeline.py): each move changes head,
shell state, history, tags and recipe together and saves the session record in the
same call. Tested on records alone: no btrfs, no container."""
from __future__ import annotations

import json

from stacker_kernel.engine.history import History
from stacker_kernel.engine.timeline import Timeline
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Session, Snapshot


class RecordStore:
    """Snapshot records in a dict; the session records it was asked to save."""

    def __init__(self) -> None:
        self.snaps: dict[str, Snapshot] = {}
        self.saved: list[tuple[str | None, str, list[str], dict[str, str]]] = []

    def add(self, **fields) -> Snapshot:
        snap = Snapshot(**fields)
        self.snaps[snap.id] = snap
        return snap

    def get(self, sid):
        return self.snaps.get(sid)

    def update_session(self, sess: Session) -> None:
        self.saved.append((sess.head, sess.layer, list(sess.history), dict(sess.tags)))


def _timeline():
    store = RecordStore()
    sess = Session(id="s", kind="build", name="/nb.ipynb", owner_pid=0, owner_start=0)
    timeline = Timeline(store, sess, History(store, sess), "/")
    for name, base in (("a", "tar"), ("b", "built")):
        timeline.recipe.layers[name] = Layer(name=name, from_=ImageSource(type=base, url="x.tar")
                                             if base == "tar" else ImageSource(type="built", tag="a"))
    base = store.add(id="base", kind="base")
    a1 = store.add(id="a1", parent="base", layer="a", cell_id="c1", source="echo 1", state='{"cwd": "/a1"}')
    a2 = store.add(id="a2", parent="a1", layer="a", cell_id="c2", source="echo 2", state='{"cwd": "/a2"}')
    b1 = store.add(id="b1", parent="a2", layer="b", cell_id="c3", source="echo 3", state='{"cwd": "/b1"}')
    return store, sess, timeline, (base, a1, a2, b1)


def test_advancing_moves_head_state_history_and_saves_them_in_one_call():
    store, sess, timeline, (base, a1, a2, b1) = _timeline()
    timeline.advance(a1)
    assert (timeline.head, timeline.state.cwd) == (a1, "/a1")
    assert store.saved[-1] == ("a1", "a", ["a1"], {})
    recorded = [entry["layer"]["name"] for entry in json.loads(sess.recipe)]
    assert recorded == ["a", "b"]  # the recipe is saved with the position


def test_a_hit_belongs_to_the_cell_that_took_it():
    store, sess, timeline, (base, a1, a2, b1) = _timeline()
    timeline.advance(a1, "other-cell", hit=True)
    assert timeline.history.cell_ids["a1"] == "other-cell"
    assert [v.cell_id for v in timeline.history.views(measure=False)] == ["other-cell"]


def test_rolling_back_into_an_earlier_layer_drops_the_later_layers_and_their_tags():
    store, sess, timeline, (base, a1, a2, b1) = _timeline()
    for snap in (a1, a2, b1):
        timeline.advance(snap)
    sess.tags["b"] = "b1"
    rolled = timeline.rollback_to(1, None, "b")
    assert (rolled.layer.name, rolled.live_on, rolled.kept) == ("a", a1, 1)
    assert list(timeline.recipe.layers) == ["a"] and "b" not in sess.tags
    assert [s.source for s in rolled.layer.steps] == ["echo 1"]
    assert store.saved[-1][:3] == ("a1", "a", ["a1"])


def test_rolling_back_to_a_layers_start_goes_to_its_base():
    store, sess, timeline, (base, a1, a2, b1) = _timeline()
    for snap in (a1, a2, b1):
        timeline.advance(snap)
    rolled = timeline.rollback_to(2, None, "b")  # keep a1, a2: b goes back to its base, a2
    assert (rolled.layer.name, rolled.live_on, timeline.state) == ("b", a2, None)
    rolled = timeline.rollback_to(0, None, "b")
    assert (rolled.layer.name, rolled.live_on, rolled.kept) == ("a", base, 0)
    assert store.saved[-1][:3] == ("base", "a", [])
