"""Which build is a notebook's: found by its cells, not by its file name.

JupyterLab sends each cell's id with every execution and the saved .ipynb
holds them (nbformat 4.5). A kernel session records the ids of the cells it
ran (BuildSession._persist), so a notebook's build is the session whose
cells are the notebook's:

- the same file (a kernel restart): its build goes on;
- its old file is gone or no longer holds those cells (a rename or a move):
  its build goes on under the new name;
- its old file still holds them (a copy of the notebook): a new build (its
  cached steps are instant anyway);
- no session has any of its cells (a new notebook under a used name, e.g.
  Untitled.ipynb): a new build, never another notebook's by its name.

A kernel whose notebook is renamed while it runs (JupyterLab neither restarts
it nor tells it) finds the file again by the cells it ran (`locate_notebook`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from stacker_kernel.storage.store import Session, Store

MAX_NOTEBOOK_BYTES = 32 << 20  # a bigger .ipynb is not read when looking for a notebook
MAX_SCANNED = 400  # notebooks read at most per search (a huge folder stays quick)
SCAN_DEPTH = 2  # subfolder levels below the notebook's folder searched after it


@dataclass(frozen=True)
class Document:
    """A saved notebook's code cells, (id, source) in order, and when it was saved."""
    cells: tuple[tuple[str, str], ...]
    saved_at: float

    @property
    def ids(self) -> list[str]:
        return [cell_id for cell_id, _ in self.cells]


_read: dict[str, tuple[tuple[int, float], Document | None]] = {}  # path -> (size, mtime) and its Document


def read_document(path: os.PathLike | str) -> Document | None:
    """The saved notebook at `path`; None when there is no readable notebook there
    (unsaved, gone, not a notebook, too big). Read again only when the file changed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size > MAX_NOTEBOOK_BYTES:
        return None
    stamp = (st.st_size, st.st_mtime)
    known = _read.get(str(path))
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        with open(path, encoding="utf-8") as f:  # plain JSON: nbformat's validation is slow
            cells = json.load(f).get("cells", [])
        doc = Document(tuple((c["id"], _source(c.get("source", ""))) for c in cells
                             if isinstance(c, dict) and c.get("cell_type") == "code"
                             and isinstance(c.get("id"), str)), st.st_mtime)
    except (OSError, ValueError, AttributeError, TypeError):
        doc = None
    if len(_read) > 4 * MAX_SCANNED:
        _read.clear()
    _read[str(path)] = (stamp, doc)
    return doc


def _source(source) -> str:
    return "".join(source) if isinstance(source, list) else str(source)


def notebook_cells(path: os.PathLike | str) -> list[str] | None:
    """The ids of the code cells of the saved notebook at `path`, in order; None when
    there is no readable notebook there."""
    doc = read_document(path)
    return doc.ids if doc is not None else None


def session_cells(store: Store, sess: Session) -> set[str]:
    """The ids of the cells session `sess` ran (recorded; for a session of an older
    version, those of its history's steps)."""
    ids = set(sess.cell_order) | {c for c in sess.entry_cells.values() if c}
    if not ids:
        for sid in sess.history:
            snap = store.get(sid)
            if snap is not None and snap.cell_id:
                ids.add(snap.cell_id)
    return ids


@dataclass
class Identity:
    """How a kernel's session was found (what the kernel says at its first cell)."""
    how: str  # "restarted" | "renamed" | "copy" | "new-name-reused" | "new"
    other: str = ""  # the other notebook's path (renamed from, copy of, earlier build of)


def holds(path: str, ids: set[str]) -> bool:
    """True when the saved notebook at `path` holds any of cells `ids`."""
    cells = notebook_cells(path)
    return bool(cells and ids.intersection(cells))


def related(old: str, new: str) -> bool:
    """True when notebook path `old` may have become `new` by a rename or a move within
    reach of `locate_notebook`: the same folder, or one folder below the other by at
    most SCAN_DEPTH levels. (A notebook moved farther starts a new build; its cached
    steps make that quick.)"""
    a, b = Path(old).parent, Path(new).parent
    for top, below in ((a, b), (b, a)):
        try:
            if len(below.relative_to(top).parts) <= SCAN_DEPTH:
                return True
        except ValueError:
            pass
    return False


def find_previous(store: Store, path: str, ids: set[str], kind: str = "kernel",
                  exclude: str | None = None) -> tuple[Session | None, Identity]:
    """The ended session of `kind` whose build notebook `path` (with cells `ids`) goes on
    from, or None for a new build; and how it was found."""
    best: tuple[int, int, Session] | None = None
    same_name_other = False
    for sess in store.find_sessions(kind=kind):  # newest first
        if sess.id == exclude or store.session_alive(sess) or not sess.history:
            continue
        if sess.name != path and not related(sess.name, path):
            continue
        overlap = len(ids & session_cells(store, sess)) if ids else 0
        if not overlap:
            same_name_other = same_name_other or sess.name == path
            continue
        rank = (int(sess.name == path), overlap)
        if best is None or rank > best[:2]:
            best = (*rank, sess)
    if best is None:
        return None, Identity("new-name-reused" if same_name_other else "new", path if same_name_other else "")
    sess = best[2]
    if sess.name == path:
        return sess, Identity("restarted")
    if holds(sess.name, session_cells(store, sess)):
        return None, Identity("copy", sess.name)  # the other notebook is still there: its build stays its own
    return sess, Identity("renamed", sess.name)


def busy_with(store: Store, path: str, ids: set[str], kind: str = "kernel") -> Session | None:
    """An alive session of `kind` building notebook `path` already (a second kernel of
    it), or None. A session of the same name is another notebook's when the saved file
    holds none of its cells (its notebook was renamed while its kernel runs)."""
    for sess in store.find_sessions(name=path, kind=kind):
        if not store.session_alive(sess):
            continue
        theirs = session_cells(store, sess)
        saved = notebook_cells(path)
        if saved is None or not theirs or theirs.intersection(saved) or theirs & ids:
            return sess
    return None


def place_cells(saved: list[str] | None, runs: list[str]) -> tuple[list[str], set[str]]:
    """Where cells stand: the saved notebook's code cells (`saved`, None when not saved)
    in order, with each cell it does not hold placed after the cell first run before it
    (`runs`: cell ids in the order they were first run); and the cells placed by that
    order of first runs."""
    if not saved:
        return list(runs), set(runs)
    order = list(saved)
    placed = set(order)
    by_runs = set()
    for i, cell_id in enumerate(runs):
        if cell_id in placed:
            continue
        prev = next((runs[j] for j in range(i - 1, -1, -1) if runs[j] in placed), None)
        order.insert(order.index(prev) + 1 if prev is not None else len(order), cell_id)
        placed.add(cell_id)
        by_runs.add(cell_id)
    return order, by_runs


def slot_position(order: list[str], cell_id: str, steps: list[tuple[str | None, str]],
                  layer_starts: dict[str, str], layers: list[str]) -> tuple[int | None, str | None]:
    """Where cell `cell_id` (which has no step) goes in a history of `steps` ((cell id,
    layer) each, oldest first), cells standing as in `order`: how many steps stand
    before its slot (None: every step does, it simply comes next), and the layer it
    belongs to when known: the one whose %layer cell (`layer_starts`: layer -> cell)
    stands last before it, else the first of `layers` when no %layer cell started
    that one (cells above every %layer cell belong to it). Steps of layers after its
    layer go too."""
    pos = {c: i for i, c in enumerate(order)}
    if cell_id not in pos:
        return None, None
    mine = pos[cell_id]
    keep = next((i for i, (c, _) in enumerate(steps) if c in pos and pos[c] > mine), None)
    if keep is None:
        return None, None
    starts = {c: name for name, c in layer_starts.items() if name in layers}
    layer = layers[0] if layers and layers[0] not in layer_starts else None
    for c in order[:mine]:
        layer = starts.get(c, layer)
    if layer is None:
        return keep, None
    later = set(layers[layers.index(layer) + 1:])
    keep = next((i for i, (_, name) in enumerate(steps[:keep]) if name in later), keep)
    return keep, layer


def _candidates(folder: Path):
    """The .ipynb files of `folder`, then of its subfolders up to SCAN_DEPTH (no hidden
    folders, no checkpoints), at most MAX_SCANNED."""
    level = [folder]
    count = 0
    for _ in range(SCAN_DEPTH + 1):
        deeper = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.name.startswith(".") or e.name == "__pycache__":
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        deeper.append(Path(e.path))
                    elif e.name.endswith(".ipynb") and e.is_file():
                        count += 1
                        if count > MAX_SCANNED:
                            return
                        yield Path(e.path)
                except OSError:
                    continue
        level = deeper


def locate_notebook(current: Path, ids: set[str]) -> Path:
    """The saved notebook holding cells `ids`: `current` when it does (or when no cell
    is known), else the one of `current`'s folder (or its subfolders) holding most of
    them, the newest on a tie; `current` when none does (not saved yet)."""
    if not ids or holds(str(current), ids) or (not current.exists() and not ids):
        return current
    best: tuple[int, float, Path] | None = None
    for path in _candidates(current.parent):
        cells = notebook_cells(path)
        overlap = len(ids.intersection(cells or ()))
        if not overlap:
            continue
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if best is None or (overlap, mtime) > best[:2]:
            best = (overlap, mtime, path)
    return best[2] if best is not None else current
