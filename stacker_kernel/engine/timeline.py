"""A session's position in its build, with one owner.

The position is the head (the last committed snapshot of the current layer,
or its base), the shell state after it, the current layer, the history (the
steps %layers numbers), the layers' tags, the recipe's layer definitions and
the cells the session ran. A move (`advance` to a new step or a cache hit,
`rollback_to` an earlier position) changes them together and persists the
session record in the same call, so no caller can move one without the
others or forget to save. It knows nothing of the live rootfs: the session
makes the live rootfs follow the head after a move (engine/session.py).

It reads snapshot records through the store and writes the session record:
no btrfs, so its rules are tested with a store of records alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from stacker_kernel.container.step import ShellState
from stacker_kernel.engine.history import History
from stacker_kernel.recipe.model import ImageSource, Layer, Recipe, Step, layer_record
from stacker_kernel.storage.store import Session, Snapshot, Store


@dataclass
class Rolled:
    """Where `Timeline.rollback_to` left the session."""
    layer: Layer  # the layer it goes on in (its definition, with the steps kept)
    live_on: Snapshot | None  # the snapshot the live rootfs must become (None: prepared at the next step)
    kept: int  # history entries kept


class Timeline:
    """The position of `session` (see the module docstring); `history` reads its steps."""

    def __init__(self, store: Store, session: Session, history: History, base_dir: str):
        self.store, self.session, self.history = store, session, history
        self.base_dir = base_dir
        self.head: Snapshot | None = None
        self.state: ShellState | None = None
        self.recipe = Recipe()
        self.dirs: dict[str, str] = {}  # layer -> the directory its relative paths start from
        self.layer_cells: dict[str, str] = {}  # layer -> the cell whose %layer started it
        self.cell_order: list[str] = session.cell_order  # cell ids in the order they were first run

    def persist(self) -> None:
        """Store the session record: position, history, tags, and the recipe and cells
        (so that a resumed session, or an export from the CLI, knows them)."""
        self.session.recipe = json.dumps([
            {"layer": layer_record(layer), "base_dir": self.dirs.get(name, self.base_dir),
             "cell": self.layer_cells.get(name)} for name, layer in self.recipe.layers.items()])
        self.store.update_session(self.session)

    def advance(self, snap: Snapshot, cell_id: str | None = None, *, hit: bool = False) -> None:
        """`snap` is the next step (a cache `hit` belongs to `cell_id` here)."""
        self.head = snap
        self.state = ShellState.of_snapshot(snap.state)
        self.history.append(snap, cell_id, hit=hit)
        self.session.head = snap.id
        self.session.layer = snap.layer
        self.persist()

    def rollback_to(self, keep: int, layer: str | None, current: str) -> Rolled:
        """Keep the first `keep` history entries. The session goes on in `layer` (default:
        that of the first entry dropped, else `current`); later layers leave the recipe;
        the head becomes that layer's last kept step, else its base (the parent of its
        first step, if known)."""
        snaps = self.history.snaps()
        target = layer or (snaps[keep].layer if keep < len(snaps) else current)
        kept = snaps[:keep]
        self.history.keep([s.id for s in kept])
        names = list(self.recipe.layers)
        if target in names:
            for later in names[names.index(target) + 1:]:
                del self.recipe.layers[later]
                self.session.tags.pop(later, None)
            definition = self.recipe.layers[target]
        else:
            definition = self.recipe.layers[target] = Layer(name=target, from_=ImageSource(type="scratch"))
        same_layer = [s for s in kept if s.layer == target]
        definition.steps = [Step(s.source, s.cell_id) for s in same_layer]
        if same_layer:
            self.head = same_layer[-1]
            self.state = ShellState.of_snapshot(self.head.state)
        else:
            # Back to the layer's base: the parent of the layer's first step (its recipe
            # may be unknown, e.g. after a resume), else prepared again at the next step.
            first = next((s for s in snaps if s.layer == target), None)
            self.head = self.store.get(first.parent) if first is not None and first.parent else None
            self.state = None
        self.session.head = self.head.id if self.head else None
        self.session.layer = target
        self.persist()
        return Rolled(definition, self.head, len(kept))
