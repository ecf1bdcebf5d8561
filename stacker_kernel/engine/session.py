"""BuildSession: steps in a persistent container, a read-only snapshot after each.

The contract is docs/architecture.md §1-§5:

- a step runs in the layer's container; shell state (cwd, variables) carries
  to the next step of the same layer; a new layer starts fresh;
- after a successful step the rootfs is frozen as a read-only snapshot with
  its record; a failed, interrupted or dead step leaves no trace (the rootfs
  and the shell state go back to the last snapshot), unless `keep_failed`;
- a step whose cache key (parent snapshot, state before, script, imports,
  build environment) was built before does not run: the live rootfs becomes a
  writable snapshot of the cached one and the stored output is replayed;
- rollback to any earlier snapshot is a snapshot of it, whatever its size.

The session ties its parts together, each in its own module: the live
rootfs and its container (engine/live.py), the position (head, shell state,
history, tags, recipe, cells: engine/timeline.py, over engine/history.py),
the step cache (engine/cache.py; every hit, local or from a shared cache, is
taken as the next step by one path) and which build is a notebook's
(engine/identity.py). The session record keeps the recipe, so a resumed
session exports what was built. The faces (kernel, CLI) call this class; it
knows nothing about Jupyter.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from stacker_kernel.container.step import ShellState
from stacker_kernel.engine.cache import StepCache, StepInputs, replay_output
from stacker_kernel.engine.cache import cache_key as key_of
from stacker_kernel.engine.history import History, StepView
from stacker_kernel.engine.timeline import Timeline
from stacker_kernel.engine.live import BUILD_PATH, LiveRootfs, absolute_source, build_environment
from stacker_kernel.errors import RecipeError, StackerKernelError, StepError, StorageError
from stacker_kernel.recipe.script import split_script
from stacker_kernel.recipe.model import (ImageSource, Layer, Recipe, Step, first_line, layer_from_record,
                                         layer_record)
from stacker_kernel.storage.store import Session, Snapshot, Store, make_tmp_dir, remove_any_owner

if TYPE_CHECKING:  # loaded where a container starts (engine/live.py)
    from stacker_kernel.container.runtime import Container, Mount

__all__ = ["BUILD_PATH", "BuildSession", "StepOutcome", "StepView", "build_environment"]

OutputFn = Callable[[str], None]
IMPORT_NOTICE_AFTER = 0.5  # seconds: a base import that takes longer says when it starts and ends


@dataclass
class StepOutcome:
    ok: bool
    cached: bool
    snapshot_id: str | None
    message: str  # one line when not ok: the status and the failing command
    status: int
    interrupted: bool
    log_path: str | None
    duration: float = 0.0
    # Where the step is, for the status line: its 1-based position in the history
    # (for a step that committed nothing, the position it would have had) and layer.
    index: int = 0
    layer: str = ""
    size_delta: int | None = None  # None: not measured yet
    # The container holds this step's uncommitted failed state (keep_failed), or the
    # step ran in such a state and committed nothing either.
    kept_failed: bool = False


@dataclass(frozen=True)
class Options:
    """How a session builds, as a face sets it between steps (%keep_failed, %cache, %network)."""
    keep_failed: bool = False  # a failed step's state stays in the container to inspect
    use_cache: bool = True  # steps built before are taken from the cache
    network: str = "host"  # the build container's network: host | none
    # A cache hit replays the step's stored output (the kernel shows it under the
    # cell); a headless build prints one line per cached step instead.
    replay_cached: bool = True


def _option(name: str) -> property:
    return property(lambda self: getattr(self.options, name),
                    lambda self, value: self.set_option(name, value), doc=f"options.{name}")


def _part(name: str) -> property:
    return property(lambda self: getattr(self.timeline, name),
                    lambda self, value: setattr(self.timeline, name, value), doc=f"timeline.{name}")


@dataclass
class KeptFailure:
    """The uncommitted state a failed step left under keep_failed (what %layers shows)."""
    index: int  # the position the step would have had in the history
    layer: str
    cell_id: str | None
    first_line: str
    duration: float
    message: str


@dataclass
class _LayerRun:
    """The engine's view of the layer being built."""
    layer: Layer
    base_dir: str | None = None   # directory that relative imports are resolved against


def step_script(source: str) -> str | None:
    """The step a notebook cell's `source` runs (its script, as the kernel runs it);
    "" for a cell that runs none (magics only, generate_labels), None if it cannot
    be parsed."""
    from stacker_kernel.recipe.cells import parse_cell
    from stacker_kernel.recipe.stacker_yaml import substitute

    try:
        cell = parse_cell(substitute(source, {}, in_kernel=True))
    except StackerKernelError:
        return None
    if any(d.name == "generate_labels" for d in cell.directives):
        return ""
    return cell.script if cell.script.strip() else ""


@dataclass
class Differences:
    """Where the saved notebook and the image differ, as lines naming the cells."""
    edited: list[str] = field(default_factory=list)  # saved source is not what the step ran
    missing: list[str] = field(default_factory=list)  # step cells above built ones, not in the image
    out_of_order: list[str] = field(default_factory=list)  # built in another order than they stand
    gone: list[str] = field(default_factory=list)  # built steps of cells the notebook no longer holds
    below: list[str] = field(default_factory=list)  # step cells below the last built one, not run

    @classmethod
    def of(cls, doc, built: list[Snapshot], ran_at: dict[str, float],
           cell_name: Callable[[str | None], str]) -> "Differences":
        pos = {cell_id: i for i, cell_id in enumerate(doc.ids)}
        scripts = {cell_id: step_script(source) for cell_id, source in doc.cells}
        built_ids = [s.cell_id for s in built]
        have = set(built_ids)

        def named(cell_id: str, script: str) -> str:
            return f"{cell_name(cell_id)} {first_line(script, skip_shebang=True, width=40)}".strip()

        out = cls()
        for s in built:
            if s.cell_id not in pos:
                if ran_at.get(s.cell_id, 0.0) <= doc.saved_at:  # (run since: not saved yet)
                    out.gone.append(named(s.cell_id, s.source))
            elif (scripts.get(s.cell_id) is not None and scripts[s.cell_id].strip() != s.source.strip()
                  and ran_at.get(s.cell_id, 0.0) <= doc.saved_at):  # (run since: the file is behind)
                out.edited.append(named(s.cell_id, scripts[s.cell_id]))
        placed = [c for c in built_ids if c in pos]
        last = max((pos[c] for c in placed), default=-1)
        for cell_id in doc.ids:
            if scripts.get(cell_id) and cell_id not in have:
                (out.missing if pos[cell_id] < last else out.below).append(named(cell_id, scripts[cell_id]))
        highest = -1
        for c in placed:
            if pos[c] < highest:
                out.out_of_order.append(named(c, scripts.get(c) or ""))
            highest = max(highest, pos[c])
        return out

    def lines(self) -> list[str]:
        """What differs, a phrase each (the export's cells below the last step are not
        a difference: they are simply not run yet)."""
        def cells(names: list[str]) -> str:
            return f"cell{'s' if len(names) > 1 else ''} {'; '.join(names)}"
        out = []
        if self.edited:
            out.append(f"{cells(self.edited)} changed since {'they' if len(self.edited) > 1 else 'it'} ran"
                       " (the image has what ran: run it again)")
        if self.missing:
            out.append(f"{cells(self.missing)} above the last step {'are' if len(self.missing) > 1 else 'is'}"
                       " not in the image (never run, failed or undone: run it)")
        if self.out_of_order:
            out.append(f"{cells(self.out_of_order)} ran before cells that stand above "
                       f"{'them' if len(self.out_of_order) > 1 else 'it'} (the image follows the order they ran in)")
        if self.gone:
            out.append(f"{cells(self.gone)} no longer in the notebook {'are' if len(self.gone) > 1 else 'is'}"
                       " in the image (later steps are built on it)")
        return out


@dataclass
class RecordedRecipe:
    """What a session record says about its recipe and cells (see BuildSession._persist)."""
    recipe: Recipe
    dirs: dict[str, str]
    cells: dict[str, str]  # layer -> the cell that started it
    order: list[str]  # cell ids in the order they were first run
    hits: dict[str, str | None]  # history entry -> its cell here, where not the snapshot's

    @classmethod
    def of(cls, store: Store, sess: Session, history: list[str] | None = None) -> "RecordedRecipe":
        """The recipe of session `sess` with the steps of its history (or of `history`):
        its recorded layer definitions, else (a store of an older version) those its
        steps recorded, else empty scratch layers named after them."""
        try:
            layers = json.loads(sess.recipe or "[]")
        except ValueError:
            layers = []
        out = cls(Recipe(), {}, {}, list(sess.cell_order), dict(sess.entry_cells))
        for entry in layers:
            layer = layer_from_record(entry["layer"])
            out.recipe.layers[layer.name] = layer
            out.dirs[layer.name] = entry.get("base_dir") or os.path.dirname(sess.name)
            if entry.get("cell"):
                out.cells[layer.name] = entry["cell"]
        for sid in sess.history if history is None else history:
            snap = store.get(sid)
            if snap is None:
                continue
            layer = out.recipe.layers.get(snap.layer)
            if layer is None:
                layer = Layer(name=snap.layer, from_=ImageSource(type="scratch"))
                if snap.layer_def:
                    try:
                        entry = json.loads(snap.layer_def)
                        layer = layer_from_record(entry["layer"])
                        out.dirs[layer.name] = entry.get("base_dir") or os.path.dirname(sess.name)
                    except (ValueError, KeyError, TypeError):
                        pass
                out.recipe.layers[snap.layer] = layer
            layer.steps.append(Step(snap.source, out.hits.get(sid, snap.cell_id)))
        return out


def _glob_in_root(root: str, pattern: str) -> list[tuple[str, bool]]:
    """The container paths of rootfs `root` that `pattern` matches, sorted, each with
    whether it is a directory; each part as Go's filepath.Match (`*` stays within a
    part), symlinks resolved inside root. Run in the user namespace (run_in_userns),
    where the tree of either storage driver shows its files."""
    import fnmatch

    from stacker_kernel.engine.inspect import GrabError, resolve_in_root

    found = ["/"]
    for part in [p for p in pattern.split("/") if p]:
        nxt = []
        for base in found:
            if not any(c in part for c in "*?["):
                nxt.append(os.path.join(base, part))
                continue
            try:
                host = resolve_in_root(root, base)
                names = sorted(os.listdir(host)) if os.path.isdir(host) else []
            except (GrabError, OSError):
                names = []
            nxt += [os.path.join(base, n) for n in names if fnmatch.fnmatchcase(n, part)]
        found = nxt
    out = []
    for p in found:
        try:
            out.append((p, os.path.isdir(resolve_in_root(root, p))))
        except (GrabError, OSError):
            pass
    return out


class BuildSession:
    """A notebook's (or a build's) sequence of layers and steps over one store."""

    def __init__(self, store: Store, session: Session, *, default_layer: str, base_dir: str,
                 resolve_built: Callable[[str], Snapshot] | None = None):
        self.store = store
        self.session = session
        self.default_layer = default_layer
        self.base_dir = base_dir
        self.external_built = resolve_built
        self.options = Options()
        self.remote_cache = None  # engine/remote_cache.RemoteCache: --cache-from/--cache-to, %cache
        self.secrets: dict[str, tuple[str, str]] = {}  # id -> ("src", FILE) | ("env", VAR): --secret
        self._scratch: Path | None = None  # the step mounts' folder (_mount_scratch)
        self.resumed: StepView | None = None
        self.identity = None  # engine.identity.Identity: how open() found the session
        # How the face names a cell in messages (a kernel: its prompt, [3]), and the saved
        # notebook's code cell ids in order (None: not saved), where a cell's slot is.
        self.cell_name: Callable[[str | None], str] = lambda cell_id: (cell_id or "")[:8]
        self.document: Callable[[], Any] | None = None  # -> engine.identity.Document | None
        self._ran_at: dict[str, float] = {}  # cell id -> when this process last ran it
        self._history = History(store, session)
        self._history.cell_ids = session.entry_cells  # recorded with the history rows
        # The position (head, shell state, history, tags, recipe, cells): moved and saved
        # by the timeline only.
        self.timeline = Timeline(store, session, self._history, base_dir)
        self._run = _LayerRun(Layer(name=default_layer, from_=ImageSource(type="scratch")), base_dir=base_dir)
        self.recipe.layers[default_layer] = self._run.layer
        self.inspecting_failure = False
        self._kept_failure: KeptFailure | None = None
        self._on_hit: Callable[[StepOutcome], None] | None = None  # see run_step
        self._interrupt_requested = False
        self._live = LiveRootfs(store, session.id)
        self._live.before_making = self.keep  # a rootfs of its own: the session must be in the store
        self._cache = StepCache(store)
        self._lock = threading.RLock()  # session state; widgets read it from other threads
        self._step_lock = threading.Lock()  # one step at a time

    # The position is the timeline's (engine/timeline.py); these read and set it.
    head = _part("head")  # last committed snapshot of the current layer (or its base)
    state = _part("state")  # the shell state after the head
    recipe = _part("recipe")
    _layer_dirs = _part("dirs")
    _layer_cells = _part("layer_cells")
    _cell_order = _part("cell_order")

    keep_failed = _option("keep_failed")
    use_cache = _option("use_cache")
    network = _option("network")
    replay_cached = _option("replay_cached")

    def set_option(self, name: str, value: Any) -> None:
        """Change one of the session's Options (between steps: a step reads them once)."""
        with self._lock:
            self.options = replace(self.options, **{name: value})

    # --- opening and closing -------------------------------------------------

    @classmethod
    def open(cls, store: Store, name: str, *, kind: str = "kernel", resume: bool = True,
             default_layer: str | None = None, base_dir: str | None = None,
             resolve_built: Callable[[str], Snapshot] | None = None,
             cells: set[str] | None = None, record: bool = True) -> "BuildSession":
        """A new session for `name` (a notebook or stacker.yaml path). With `resume`,
        a previous session whose owner is gone is taken over at its last snapshot
        (`self.resumed` says which, `self.identity` how it was found): with `cells`
        (the ids of the notebook's cells: the one being run and the saved
        notebook's), the session that ran any of them (engine/identity.py), never
        one of another notebook by its name alone; without, the one of the same name.

        One session of a `kind` per notebook at a time: while another one's owner is
        alive (a second build of a file, a second kernel of a notebook), this
        raises SessionBusyError naming it, and nothing of it is touched.

        With `record=False` (a build, without `resume`), the session is written to the
        store only once it does more than take steps from the cache (`keep`): a build
        that changes nothing need write nothing (engine/build.py).
        """
        from stacker_kernel.engine import identity
        from stacker_kernel.errors import SessionBusyError
        from stacker_kernel.storage.store import _busy_message

        default_layer = default_layer or Path(name).stem or "layer"
        base_dir = base_dir or str(Path(name).parent if os.path.isabs(name) else os.getcwd())
        found = identity.Identity("new")
        # Under the write lock: two opening at once cannot both see the name free.
        with store.write_lock():
            if cells is None:
                sess = store.new_session(kind, name, exclusive=True, record=record or resume)
            else:
                busy = identity.busy_with(store, name, cells, kind)
                if busy is not None:
                    raise SessionBusyError(_busy_message(busy))
                sess = store.new_session(kind, name)
            previous = None
            if resume and cells is None:
                for old in store.find_sessions(name=name, kind=kind):
                    if old.id != sess.id and not store.session_alive(old) and old.history:
                        previous = old
                        found = identity.Identity("restarted")
                        break
            elif resume:
                previous, found = identity.find_previous(store, name, cells, kind, exclude=sess.id)
        self = cls(store, sess, default_layer=default_layer, base_dir=base_dir, resolve_built=resolve_built)
        self.identity = found
        if previous is not None:
            self._take_over(previous)
        return self

    def rename(self, name: str) -> None:
        """The notebook was renamed or moved (while its kernel runs): the session takes
        its new path (exports and logs are named after it)."""
        with self._lock:
            if name != self.session.name:
                self.session.name = name
                self._persist()

    def _take_over(self, old: Session) -> None:
        history = [sid for sid in old.history if self.store.get(sid) is not None]
        if not history:
            return
        recorded = RecordedRecipe.of(self.store, old, history)
        self._history.cell_ids.update(recorded.hits)
        self._history.keep(history)
        self.session.tags = dict(old.tags)
        head = self.store.get(history[-1])
        self.recipe = recorded.recipe
        # A moved notebook's relative paths start from its new folder.
        moved_from = os.path.dirname(old.name)
        self._layer_dirs = {name: self.base_dir if d == moved_from else d for name, d in recorded.dirs.items()}
        self._layer_cells = recorded.cells
        self._cell_order[:] = recorded.order
        self.store.forget_session(old.id)
        current = old.layer if old.layer in self.recipe.layers else head.layer
        self._run = _LayerRun(self.recipe.layers[current], base_dir=self._layer_dirs.get(current, self.base_dir))
        if current == head.layer:
            self.head = head
            self.state = ShellState.of_snapshot(head.state)
        # else: a layer started after the last step: its base is prepared at its first step
        self.session.head = self.head.id if self.head else None
        self.session.layer = current
        self._persist()
        self.resumed = self._history.views(measure=False)[-1]

    # --- the record of the recipe -------------------------------------------------

    def _persist(self) -> None:
        """Store the session record (Timeline.persist)."""
        self.timeline.persist()

    def layer_definition(self) -> str:
        """The current layer's definition as a step records it (Snapshot.layer_def)."""
        return json.dumps({"layer": layer_record(self.layer), "base_dir": self._run.base_dir or self.base_dir})

    def note_cell(self, cell_id: str | None) -> None:
        """Cell `cell_id` runs: the first time, it takes its place in the order of first runs
        (where it stands when the notebook is not saved)."""
        if cell_id:
            self._ran_at[cell_id] = time.time()
            if cell_id not in self._cell_order:
                self._cell_order.append(cell_id)

    @property
    def cell_order(self) -> list[str]:
        return list(self._cell_order)

    def keep(self) -> None:
        """Write the session to the store now if it was opened with record=False (it
        holds more than cache hits from here on, or its snapshots are read): gc keeps
        what it points at, and another build of its file is refused while it runs.
        Raises SessionBusyError when such a build started meanwhile."""
        if self.session.recorded:  # a kernel's always is: no lock taken (widgets read the rootfs)
            return
        with self._lock:
            if not self.session.recorded:
                self.store.record_session(self.session, exclusive=True)

    def close(self) -> None:
        """Stop the container, drop the live rootfs and give up the name (another
        session may open or resume it); snapshots and records stay."""
        with self._lock:
            self._stop_container()
            self._history.stop_measuring()
            if self._scratch is not None:  # secrets, copies of binds: files of the container's ids
                try:
                    remove_any_owner(self._scratch)
                except (OSError, StackerKernelError):
                    pass  # named after this process: the store's next open after it deletes it
                self._scratch = None
            self._live.drop_imports()
            if self.session.recorded:  # else there is no record and no rootfs
                try:
                    self.store.end_session(self.session.id)
                except StackerKernelError:
                    pass
            self.session.owner_pid = self.session.owner_start = 0

    # --- layers and directives -------------------------------------------------

    @property
    def layer(self) -> Layer:
        return self._run.layer

    def layer_steps(self, name: str | None = None) -> list[Snapshot]:
        return self._history.layer_steps(name or self.layer.name)

    def begin_layer(self, layer: Layer, base_dir: str | None = None) -> None:
        """Start building `layer` (a whole recipe layer: the headless build path)."""
        with self._lock:
            self._finish_layer()
            self.recipe.layers[layer.name] = layer
            self._layer_dirs[layer.name] = base_dir or self.base_dir
            self._run = _LayerRun(layer, base_dir=base_dir or self.base_dir)
            self._reset_live()
            self._persist()

    def apply_directives(self, directives, cell_id: str | None = None, script: str = "") -> list[str]:
        """Apply the recipe directives of one cell to the session; returns lines to show.

        `%layer` starts a layer (or, naming an existing one, goes back to its
        start: the cell that starts it is being run again); `%from`, `%binds`
        and `%import` change what the container starts from, so they must come
        before the layer's first step.
        """
        from stacker_kernel.recipe.cells import apply_directive

        info: list[str] = []
        with self._lock:
            self.note_cell(cell_id)
            if (cell_id is not None and not self.inspecting_failure
                    and not any(d.name == "layer" for d in directives)):
                # A cell run again goes back to its step's parent first, so its
                # directives change the layer that step belongs to (not the current
                # one); a `%layer` cell goes back to the layer's start by itself.
                # (A `%from` cell without a step goes back to its layer's start below.)
                info.extend(self._rollback_for_rerun(cell_id, slot=not any(d.name == "from" for d in directives)))
            for d in directives:
                if d.interactive:
                    continue
                if d.name == "layer":
                    info.extend(self._directive_layer(d.args, cell_id))
                    continue
                if d.name == "from" and self.layer_steps():
                    # A new base invalidates every step of the layer: this is the cell that
                    # starts the layer being run again (e.g. Run All after a restart).
                    dropped = self._later_layers_note(self.layer.name)
                    self._rollback_to_layer_start(self.layer.name)
                    info.append(f"layer {self.layer.name} starts again from its base: its cells run "
                                f"again, or come from the cache where nothing changed{dropped}")
                elif d.name in ("binds", "import") and self.layer_steps():
                    raise RecipeError(
                        f"%{d.name} must come before the first step of layer {self.layer.name}: "
                        "start a new layer with %layer NAME, or re-run the cell that starts this layer")
                self._set_layer(apply_directive(self.layer, d, script))
                if d.name in ("from", "binds", "import"):
                    self._reset_live()
            self._persist()
        return info

    def _set_layer(self, layer: Layer) -> None:
        self._run.layer = layer
        self.recipe.layers[layer.name] = layer

    def _directive_layer(self, name: str, cell_id: str | None = None) -> list[str]:
        if not name or ":" in name:
            raise RecipeError(f"invalid layer name {name!r}: a layer name must be non-empty and must not contain ':'")
        if name == self.layer.name and not self.layer_steps():
            return []
        if name in self.recipe.layers:
            # Re-running the cell that starts an existing layer: back to its start.
            dropped = self._later_layers_note(name)
            self._rollback_to_layer_start(name)
            return [f"layer {name} starts again from its base: its cells run again, or come "
                    f"from the cache where nothing changed{dropped}"]
        if self._implicit_layer_unused():
            # The notebook-named layer nobody gave a base or a step (e.g. its first cell
            # failed without %from) is no layer of the image: drop it, do not tag it.
            self._stop_container()
            del self.recipe.layers[self.layer.name]
            self.session.tags.pop(self.layer.name, None)
        else:
            self._finish_layer()
        layer = Layer(name=name, from_=ImageSource(type="scratch"))
        self.recipe.layers[name] = layer
        if cell_id:
            self._layer_cells[name] = cell_id
        self._run = _LayerRun(layer, base_dir=self.base_dir)
        self._reset_live()
        self.session.layer = name
        self._persist()
        return []

    def _implicit_layer_unused(self) -> bool:
        layer = self.layer
        return (layer.name == self.default_layer and not self.layer_steps()
                and layer == Layer(name=layer.name, from_=ImageSource(type="scratch")))

    def _finish_layer(self) -> None:
        if self.head is not None:
            self.session.tags[self.layer.name] = self.head.id
            self._persist()
        self._stop_container()

    def finish(self) -> None:
        """End the current layer: its last snapshot becomes its tag (for `built` bases)."""
        with self._lock:
            self._finish_layer()

    def generated_labels(self, name: str) -> dict[str, str]:
        """stacker's generate_labels for layer `name`: its script runs in a throwaway
        copy of the layer's last snapshot; each file it writes to
        /stacker/oci-labels/NAME becomes label NAME. {} when the layer has none."""

        layer = self.recipe.layers.get(name)
        tip = self.layer_tips().get(name) or (self.head if name == self.layer.name else None)
        if layer is None or not layer.generate_labels or tip is None:
            return {}
        from stacker_kernel.container.runtime import Container, ContainerConfig, Mount

        throwaway = self.store.new_session("chroot", self.session.name + "#generate_labels")
        live = self.store.live_path(throwaway.id)
        labels_dir = make_tmp_dir(self.store.root, "oci-labels-")  # collected if this process dies
        container = None
        try:
            self.store.driver.writable_copy(tip.path, live)
            container = Container.start(ContainerConfig(rootfs=str(live), mounts=[
                Mount(str(labels_dir), "/stacker/oci-labels", readonly=False)], network=self.network))
            result = container.run_step(layer.generate_labels, build_environment(layer), None)
            if not result.ok:
                raise StepError(f"generate_labels of layer {name} failed: {result.message}")
            return {entry.name: entry.read_text(errors="replace").strip()
                    for entry in sorted(labels_dir.iterdir()) if entry.is_file()}
        finally:
            if container is not None:
                container.stop()
            self.store.forget_session(throwaway.id)
            shutil.rmtree(labels_dir, ignore_errors=True)

    def prepare_empty_layer(self) -> None:
        """A layer without steps: its base is its content."""
        with self._lock:
            self._ensure_live()

    def _rollback_to_layer_start(self, name: str) -> None:
        keep = []
        for sid in self.session.history:
            snap = self.store.get(sid)
            if snap is None or snap.layer == name:
                break
            keep.append(sid)
        names = list(self.recipe.layers)
        for later in names[names.index(name):]:
            if later != name:
                del self.recipe.layers[later]
            self.session.tags.pop(later, None)
        fresh = Layer(name=name, from_=ImageSource(type="scratch"))
        self.recipe.layers[name] = fresh
        self._run = _LayerRun(fresh, base_dir=self._layer_dirs.get(name, self.base_dir))
        self._history.keep(keep)
        self.session.head = None
        self.session.layer = name
        self._persist()
        self._reset_live()

    # --- the live rootfs -------------------------------------------------------

    def _reset_live(self) -> None:
        """Forget the live rootfs: the next step prepares it from the layer's base."""
        self._stop_container()
        self.head = None
        self.state = None
        self._live.ready = False
        self.inspecting_failure = False

    @property
    def live(self) -> Path:
        return self._live.path

    @property
    def container(self) -> Container | None:
        return self._live.container

    def _resolve_built(self, name: str) -> Snapshot:
        tip = self.session.tags.get(name)
        if tip is None and name in self.recipe.layers and name != self.layer.name:
            steps = self.layer_steps(name)
            tip = steps[-1].id if steps else None
        if tip is not None:
            snap = self.store.get(tip)
            if snap is not None:
                return snap
        if self.external_built is not None:
            return self.external_built(name)
        raise RecipeError(f"layer {name} is not built yet: build it before a layer that says 'from: built {name}'")

    def _ensure_live(self, on_output: OutputFn | None = None, on_progress: OutputFn | None = None) -> None:
        """The live rootfs is a writable snapshot of the head (importing the base first;
        its warnings, e.g. device nodes made empty files, go to `on_output`)."""
        if self._live.ready:
            return
        if self.head is None:
            source = absolute_source(self.layer.from_, self._run.base_dir)
            warn = (lambda msg: on_output(f"warning: {msg}\n")) if on_output else None
            base = self._import_with_progress(source, warn, on_progress)
            self.head = base
            self.state = None
        self._set_live(self.head)

    def _base_to_import(self) -> ImageSource | None:
        """The base the next step needs imported first (its layer's, absolute), if any."""
        if self._live.ready or self.head is not None:
            return None
        return absolute_source(self.layer.from_, self._run.base_dir)

    def _set_live(self, snap: Snapshot) -> None:
        """The live rootfs becomes a writable snapshot of `snap`, with the layer's imports."""
        self._live.replace(snap)
        self._stage_imports()
        self._live.ready = True

    def _import_with_progress(self, source: ImageSource, warn, on_output: OutputFn | None) -> Snapshot:
        """_import_pinned_base; an import that takes a while says so when it starts
        (an already imported base says nothing) and when it ends."""
        if on_output is None:
            return self._import_pinned_base(source, warn)
        what = f"{source.type} {source.url}".strip()
        shown = threading.Event()

        def starting() -> None:
            on_output(f"importing base {what} ...\n")
            shown.set()
        timer = threading.Timer(IMPORT_NOTICE_AFTER, starting)
        timer.daemon = True
        start = time.monotonic()
        timer.start()
        try:
            base = self._import_pinned_base(source, warn)
        finally:
            timer.cancel()
        if shown.is_set():
            on_output(f"imported base {what} in {time.monotonic() - start:.1f}s\n")
        return base

    def _import_pinned_base(self, source: ImageSource, warn) -> Snapshot:
        """Import the layer's base and make the session point at it, checked under the
        store's write lock: a concurrent `gc` (which holds that lock) either ran first,
        and the base is imported again, or sees it referenced and keeps it."""
        from stacker_kernel.oci.bases import import_base

        for _ in range(3):
            started = time.time()
            base = import_base(self.store, source, resolve_built=self._resolve_built, warn=warn)
            if base.created >= started:
                # Just imported: nothing points at it until a recorded session does (a build
                # records itself only when it writes, and importing a base is a write).
                self.keep()
            with self.store.write_lock():
                if self.store.get(base.id) is not None and base.path.is_dir():
                    self.session.head = base.id
                    self._persist()
                    return base
        raise StorageError(f"the base of layer {self.layer.name} was deleted while it was being "
                           "imported (a gc running beside the build?): run the step again")

    def _replace_live(self, snap: Snapshot) -> None:
        self._live.replace(snap)

    def _stage_imports(self) -> None:
        """Stage the layer's imports for the container, and land `dest` imports in the
        rootfs before the layer's first step. A notebook made from a Dockerfile keeps its
        imports inside the Dockerfile's build context (engine/imports.notebook_context)."""
        from stacker_kernel.engine.imports import confine, saved_notebook_context

        context = saved_notebook_context(self.session.name) if self.session.name.endswith(".ipynb") else None
        if context is not None:
            confine([self.layer], context)
        self._live.stage_imports(self.layer, self._run.base_dir, self._fetch_layer_path)
        if not self.layer_steps():
            self._land_dest_imports()

    def _fetch_layer_path(self, layer: str, path: str, dest: str) -> str:
        """Copy `path` of a built layer to `dest`. A path with wildcards (`*`, `?`, `[`,
        as Docker's COPY --from takes them) copies what matches: one file as itself,
        else the matches into the directory `dest`, a directory's contents merged."""
        from stacker_kernel.container.userns import run_in_userns
        from stacker_kernel.engine.inspect import grab

        self.keep()  # the layer's snapshot is read: gc must keep it
        root = str(self._resolve_built(layer).path)
        if not any(c in path for c in "*?["):
            return grab(root, path, dest)
        matches = run_in_userns(_glob_in_root, root, path)
        if not matches:
            raise RecipeError(f"import stacker://{layer}{path}: no path of layer {layer} matches it")
        # a trailing / asks for the matches in a directory (a COPY into a directory)
        if len(matches) == 1 and not path.endswith("/") and not matches[0][1]:
            return grab(root, matches[0][0], dest, into=False)
        os.makedirs(dest, exist_ok=True)
        for m, is_dir in matches:
            grab(root, m, dest if is_dir else os.path.join(dest, os.path.basename(m)), into=False)
        return dest

    def _land_dest_imports(self) -> None:
        """Imports with `dest` land in the image, as stacker does: as their own
        snapshot (an OCI layer of their own), before the layer's first step."""
        dests = [i for i in self.layer.imports if i.dest]
        if not dests:
            return
        # mode/uid/gid change what lands; v2: stacker's placement rules (imports.land_in_rootfs)
        source = "\n".join(f"# stacker import {i.path} -> {i.dest} mode={i.mode} uid={i.uid} gid={i.gid}"
                           for i in dests)
        key = self.cache_key(source, {"dest-imports": "v2"})
        with self.store.write_lock():  # see run_step: gc must not take the hit meanwhile
            hit = self._cache.lookup(key) if self.use_cache else None
            if hit is not None:
                self._adopt(hit)
        if hit is not None:
            return
        started = time.time()
        self._live.land_dest_imports(self.layer)
        snap = Snapshot(parent=self.head.id if self.head else None, session=self.session.id,
                        layer=self.layer.name, source=source, cache_key=key,
                        state=self.state.to_json() if self.state else "null", started=started,
                        duration=time.time() - started, layer_def=self.layer_definition())
        self._live.before_commit()
        stored = self._cache.commit(self.live, snap, None, reuse_cached=self.use_cache)
        if stored.id != snap.id:  # landed by another session meanwhile: see _run_step
            self._replace_live(stored)
        self._live.after_commit()
        self._advance(stored)

    def _ensure_container(self, step_mounts: list[Mount] = ()) -> Container:
        return self._live.ensure_container(self.layer, self._run.base_dir, self.network, step_mounts)

    def _mount_scratch(self) -> Path:
        """This session's folder for its steps' secrets and bind copies: named after the
        process, so that a killed kernel's secrets go at the store's next open."""
        if self._scratch is None:
            self._scratch = make_tmp_dir(self.store.root / "tmp", "mounts-")
        return self._scratch

    def _mount_plan(self, script: str):
        """The step's own mounts (engine/run_mounts.py); an empty plan for most steps."""
        from stacker_kernel.container.step import step_directives
        from stacker_kernel.engine.run_mounts import MountPlan, plan

        specs = step_directives(script)[1]
        if not specs:
            return MountPlan()

        def built_path(name: str) -> str:
            return str(self._resolve_built(name).path)
        return plan(specs, storage=self.store.root, scratch=self._mount_scratch(),
                    base_dir=self._run.base_dir, secrets=self.secrets, built_path=built_path)

    def _stop_container(self) -> None:
        self._live.stop_container()

    # --- steps ---------------------------------------------------------------

    def cache_key(self, script: str, env: dict[str, str], mounts_digest: str | None = None) -> str:
        """The cache key of `script` run next, with `env`, in this session (and what the
        step's bind mounts show: `mounts_digest`, computed when not given)."""
        if mounts_digest is None:
            mounts_digest = self._mount_plan(script).digest
        imports = self._live.imports_digest + (f"+mounts:{mounts_digest}" if mounts_digest else "")
        return key_of(StepInputs(parent=self.head.id if self.head else "",
                                  state=self.state.to_json() if self.state else None,
                                  script=script, imports=imports,
                                  env=env, network=self.network))

    def run_step(self, script: str, cell_id: str | None = None,
                 on_output: OutputFn | None = None, on_progress: OutputFn | None = None,
                 on_hit: Callable[[StepOutcome], None] | None = None) -> StepOutcome:
        """Run one step (a cell, or a layer's `run`) and commit it; blocking. Lines about
        work before the step (a base import that takes a while) go to `on_progress`.

        On a cache hit, `on_hit` gets the outcome before the stored output is
        replayed to `on_output` (so a face can say "cached" above it)."""
        with self._step_lock:
            self._on_hit = on_hit
            try:
                outcome = self._run_step(script, cell_id, on_output, on_progress)
                if self.remote_cache is not None and outcome.ok and outcome.snapshot_id:  # remote cache: push
                    self.remote_cache.push(self, outcome.snapshot_id, on_output)
                    if self.session.kind == "kernel":
                        # A kernel can be shut down at any moment (its manager kills it within
                        # seconds): its cell ends once the step is pushed. A build flushes at its end.
                        self.remote_cache.finish(on_output)
                return outcome
            finally:
                self._on_hit = None
                self._interrupt_requested = False  # an interrupt ends at most the step it came during

    def _run_step(self, script: str, cell_id: str | None, on_output: OutputFn | None,
                  on_progress: OutputFn | None = None) -> StepOutcome:
        with self._lock:
            self.note_cell(cell_id)
            if cell_id is not None and not self.inspecting_failure:
                for line in self._rollback_for_rerun(cell_id):
                    if on_output is not None:
                        on_output(line + "\n")
            source = self._base_to_import()
        if source is not None:
            # The base import (for %from docker, a download) runs outside the session lock:
            # a widget reading the session meanwhile does not wait for it. (One step at a
            # time: the step lock is held, nothing else moves the session.)
            warn = (lambda msg: on_output(f"warning: {msg}\n")) if on_output else None
            base = self._import_with_progress(source, warn, on_progress)
        with self._lock:
            if source is not None and self.head is None and not self._live.ready:
                self.head, self.state = base, None
            self._ensure_live(on_output, on_progress)
            self._check_shell()
            env = build_environment(self.layer)
            mount_plan = self._mount_plan(script)
            key = self.cache_key(script, env, mount_plan.digest)
            if self.use_cache and not self.layer.binds and not self.inspecting_failure:
                # Under the write lock, so a concurrent gc cannot delete the hit
                # between finding it and the session pointing at it.
                with self.store.write_lock():
                    t0 = time.monotonic()
                    hit = self._cache.lookup(key)
                    before = [] if hit is not None else self._cached_cells(script, env)
                    if before:
                        hit = before.pop()
                    if hit is not None:
                        self._adopt(hit, cell_id)
                if hit is not None:
                    return self._replay(hit, cell_id, on_output, t0, before)
                if self.remote_cache is not None:  # remote cache: a hit from --cache-from
                    remote = self.remote_cache.lookup(self, key, script, cell_id, on_output)
                    if remote is not None:
                        return remote
            container = self._ensure_container(mount_plan.mounts)
            state = self.state
        log_tmp = self.store.root / "logs" / f"running-{self.session.id}"
        log_tmp.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        try:
            result = container.run_step(script, env, state, on_output=on_output, log_path=str(log_tmp),
                                    mounts=mount_plan.requests,
                                    interrupted=lambda: self._interrupt_requested,
                                    script_name=f"layer {self.layer.name} "
                                                + (f"cell {cell_id[:8]}" if cell_id else "run"))
        except OSError as e:  # the step's log is on the storage: a full disk shows here
            with self._lock:
                self.back_to_head()
            raise StorageError(f"the step's output could not be stored ({e.strerror}): free space "
                               f"on {self.store.root} (e.g. stacker-kernel gc --wait) and run the step again") from None
        with self._lock:
            if not result.ok:
                return self._failed(result, str(log_tmp), script, cell_id)
            if self.inspecting_failure:
                return StepOutcome(True, False, None, "", 0, False, str(log_tmp), result.duration,
                                   index=len(self.session.history) + 1, layer=self.layer.name,
                                   kept_failed=True)
            snap = Snapshot(parent=self.head.id if self.head else None, session=self.session.id,
                            layer=self.layer.name, cell_id=cell_id, source=script, cache_key=key,
                            state=result.state.to_json(), status="ok", started=started,
                            duration=result.duration, layer_def=self.layer_definition())
            try:
                self._live.before_commit()
                # A step with binds is never taken from the cache (what they hold is not
                # in its key), so it is not swapped for another's either.
                stored = self._cache.commit(self.live, snap, log_tmp,
                                            reuse_cached=self.use_cache and not self.layer.binds)
            except (OSError, StorageError):  # e.g. a full disk: the step leaves no trace
                self.back_to_head()
                raise
            if stored.id != snap.id:
                # Another session committed this step first: go on from its snapshot, so
                # that both sessions (and the cache) agree on what the step made.
                self._adopt(stored, cell_id)
            else:
                self._live.after_commit()  # overlay: the container's root on the new stack, meanwhile
                self._advance(stored)
            self.layer.steps.append(Step(script, cell_id))
            return StepOutcome(True, False, stored.id, "", 0, False, str(self.store.log_path(stored.id)),
                               result.duration, index=len(self.session.history), layer=self.layer.name,
                               size_delta=stored.size_delta)

    def back_to_head(self) -> None:
        """Drop what a step did after an error outside it (a full disk); if even that
        fails, the next step prepares the live rootfs from the head again."""
        self._live.ready = False
        try:
            self._set_live(self.head)
        except (OSError, StackerKernelError):
            pass

    def fresh_live(self) -> None:
        """The live rootfs becomes a plain writable snapshot of the head (for a shared
        cache's layer to be applied onto: see adopt_fetched)."""
        self._replace_live(self.head)

    def _adopt(self, snap: Snapshot, cell_id: str | None = None) -> None:
        """Take cached step `snap` as the next step: the live rootfs becomes a writable
        snapshot of it and the session goes on from it (the one path of every hit)."""
        self._replace_live(snap)
        self._advance(snap, cell_id, hit=True)

    def adopt_fetched(self, snap: Snapshot, log: str, cell_id: str | None, on_output: OutputFn | None,
                      t0: float) -> StepOutcome:
        """A step fetched from a shared cache, whose result the live rootfs holds (made by
        applying its layer after fresh_live): committed through the step cache with its
        output `log`, then taken as the next step and replayed like a local hit."""
        tmp = self.store.root / "logs" / f"running-{self.session.id}"
        try:
            tmp.write_text(log, errors="replace")
            stored = self._cache.commit(self.live, snap, tmp, reuse_cached=False)
        except (OSError, StackerKernelError):
            tmp.unlink(missing_ok=True)
            self.back_to_head()
            raise
        self._advance(stored, cell_id, hit=True)
        return self._replay(stored, cell_id, on_output, t0)

    def _advance(self, snap: Snapshot, cell_id: str | None = None, *, hit: bool = False) -> None:
        self.timeline.advance(snap, cell_id, hit=hit)

    def _cached_cells(self, script: str, env: dict[str, str]) -> list[Snapshot]:
        """The snapshots of steps that together are `script` (a `run` that joins
        cells built before, e.g. in the kernel, then exported), each a cache hit on
        the one before; [] unless every cell of it hits. So a stacker.yaml exported
        from a notebook builds from the notebook's snapshots."""
        cells = split_script(script)
        if len(cells) < 2:
            return []
        chain: list[Snapshot] = []
        parent, state = self.head, self.state
        for cell in cells:
            snap = self._cache.lookup(key_of(StepInputs(
                parent=parent.id if parent else "", state=state.to_json() if state else None,
                script=cell, imports=self._live.imports_digest, env=env, network=self.network)))
            if snap is None:
                return []
            chain.append(snap)
            parent, state = snap, ShellState.of_snapshot(snap.state)
        return chain

    def _replay(self, hit: Snapshot, cell_id: str | None, on_output: OutputFn | None,
                t0: float, before: list[Snapshot] = ()) -> StepOutcome:
        """A cache hit, once the live rootfs is a writable snapshot of `hit` and the
        session points at it: nothing runs, the stored output is replayed (first
        that of the cells `before` it that the step stands for, in order)."""
        log = self.store.log_path(hit.id)
        outcome = StepOutcome(True, True, hit.id, "", 0, False, str(log), 0.0,
                              index=len(self.session.history), layer=self.layer.name,
                              size_delta=hit.size_delta)
        if self._on_hit is not None:
            self._on_hit(outcome)
        if self.replay_cached:
            for cell in before:
                replay_output(self.store.log_path(cell.id), on_output)
            replay_output(log, on_output)
        self.layer.steps.append(Step(hit.source, cell_id))
        outcome.duration = time.monotonic() - t0
        return outcome

    def _check_shell(self) -> None:
        """A layer on an empty base (scratch, e.g. a notebook's first cell without
        %from) has no shell to run a cell: say how to pick a base instead."""
        if self.layer.from_.type != "scratch" or self.layer_steps():
            return
        if self.layer.binds or self._live.has("bin/sh"):
            return
        if self.session.kind != "kernel":
            raise RecipeError(f"layer {self.layer.name} is from scratch, which is empty: it has no"
                              " /bin/sh to run its steps; give it a base (from: type tar, oci or docker)")
        where = "" if self.layer.name == self.default_layer else f" of layer {self.layer.name}"
        raise RecipeError(
            f"there is no base image{where} yet (scratch is empty: no /bin/sh to run this cell):"
            " start with a cell like %from tar ROOTFS.tar, %from oci DIR:TAG or"
            " %from docker docker://HOST/REPO:TAG, then run this cell again")

    def _failed(self, result, log_path: str, script: str = "", cell_id: str | None = None) -> StepOutcome:
        message = result.message
        index = len(self.session.history) + 1
        if self.keep_failed:
            if not self.inspecting_failure:  # a step failing in the kept state keeps the first
                self._kept_failure = KeptFailure(index, self.layer.name, cell_id,
                                                 first_line(script, skip_shebang=True),
                                                 result.duration, result.message)
            self.inspecting_failure = True
            if self.session.kind == "kernel":  # a build stops here: no later steps, no %rollback
                message += " (keep_failed: the container keeps the failed state for inspection; later steps are not committed until %rollback)"
        else:
            # No trace: back to the last snapshot (a fresh container at the next step).
            self._replace_live(self.head)
        return StepOutcome(False, False, None, message, result.status, result.interrupted, log_path,
                           result.duration, index=index, layer=self.layer.name,
                           kept_failed=self.keep_failed)

    def kept_failure(self) -> KeptFailure | None:
        """The uncommitted failed state the container holds under keep_failed, if any."""
        with self._lock:
            return self._kept_failure if self.inspecting_failure else None

    def keep_failed_state(self, script: str, cell_id: str | None = None) -> Snapshot:
        """Freeze the rootfs a failed step left (under `keep_failed`) as a read-only
        snapshot with status "failed", so `chroot` can open it after the build. It
        is in no history and no cache: gc collects it once its session has ended."""
        with self._lock:
            snap = Snapshot(parent=self.head.id if self.head else None, session=self.session.id,
                            layer=self.layer.name, cell_id=cell_id, source=script, cache_key=None,
                            state=self.state.to_json() if self.state else "null", status="failed",
                            started=time.time())
            self._live.before_commit()
            return self.store.commit(self.live, snap)

    def failure_shell(self, argv: list[str] | None = None) -> int:
        """Run `argv` (default /bin/sh) on this terminal in the container of the failed
        step (stacker's --on-run-failure): its files, imports, binds and shell state."""
        with self._lock:
            container = self._ensure_container()
            env = build_environment(self.layer)
            state = self.state
        return container.interact(env, state, argv)

    def interrupt(self) -> None:
        """Interrupt the running step (SIGINT to its process group, SIGKILL after a grace).
        An interrupt while the step is still being prepared (base import, container
        start) reaches it as soon as it starts."""
        self._interrupt_requested = True
        self._live.interrupt()

    # --- history and rollback --------------------------------------------------

    def history(self, measure: bool = True) -> list[StepView]:
        """The session's steps, oldest first (see History.views)."""
        with self._lock:
            return self._history.views(measure)

    def sizes_pending(self) -> bool:
        """True while step size changes are being measured in the background."""
        return self._history.sizes_pending()

    def when_size_known(self, snapshot_id: str, fn: Callable[[int | None], None]) -> None:
        """Call `fn` with the size change of step `snapshot_id` once it is measured (None if
        it could not be), from the measuring thread: a face can then show it."""
        self._history.when_measured(snapshot_id, fn)

    def wait_for_sizes(self) -> None:
        """Wait until the background size measurements have finished (history() then has them)."""
        self._history.wait_for_sizes()

    def _rollback_for_rerun(self, cell_id: str, slot: bool = True) -> list[str]:
        """A cell keeps its place. Re-running a cell that produced a snapshot goes back to
        that snapshot's parent; running a cell (failed before, edited, new) whose slot is
        above steps committed after it goes back to its slot. Either way the later steps
        are undone. Returns the lines saying so (naming the cells and layers dropped)."""
        self.note_cell(cell_id)
        keep = self._history.position_of_cell(cell_id)
        rerun, layer, from_runs = keep is not None, None, False
        if keep is None:
            if not slot:
                return []
            keep, layer, from_runs = self._slot_position(cell_id)
            if keep is None:
                return []
        snaps = self._history.snaps()
        target = layer or (snaps[keep].layer if keep < len(snaps) else self.layer.name)
        dropped = self._later_layers_note(target)
        others = [(i, s) for i, s in enumerate(snaps[keep:], keep + 1) if s.cell_id != cell_id]
        self._rollback_to_position(keep, layer)
        lines = []
        if others:
            many = len(others) > 1
            names = "; ".join(f"{self.cell_name(s.cell_id) or f'step {i}'} "
                              f"{first_line(s.source, skip_shebang=True, width=40)}" for i, s in others)
            cells = f"cell{'s' if many else ''} {names}"
            again = f"(back to step {keep}); run {'them' if many else 'it'} again to rebuild"
            if rerun:
                lines.append(f"re-running this cell undoes the step{'s' if many else ''} of the later {cells} {again}")
            else:
                where = (" (as the cells were first run: the notebook is not saved yet)" if from_runs else "")
                lines.append(f"this cell stands above {cells} in the notebook{where}: "
                             f"{'their steps are' if many else 'its step is'} undone {again}")
        if dropped:
            lines.append(f"re-running a cell of layer {target}{dropped}")
        return lines

    def slot_order(self) -> tuple[list[str], set[str]]:
        """Where cells stand: the saved notebook's code cells in order, with the cells it
        does not hold placed after the cell run before them; and the cells placed by the
        order they were first run in (not in the saved notebook)."""
        from stacker_kernel.engine.identity import place_cells

        saved = self.document() if self.document is not None else None
        return place_cells(saved.ids if saved is not None else None, self._cell_order)

    def _slot_position(self, cell_id: str) -> tuple[int | None, str | None, bool]:
        """For a cell with no step: how many history entries stand before its slot
        (None: every step stands before it), the layer it belongs to if known (the
        layer whose %layer cell stands last before it), and whether its place came
        from the order of first runs."""
        from stacker_kernel.engine.identity import slot_position

        order, by_runs = self.slot_order()
        snaps = self._history.snaps()
        keep, layer = slot_position(order, cell_id, [(s.cell_id, s.layer) for s in snaps],
                                    self._layer_cells, list(self.recipe.layers))
        if keep is None:
            return None, None, False
        return keep, layer, cell_id in by_runs or (keep < len(snaps) and snaps[keep].cell_id in by_runs)

    def _later_layers_note(self, name: str) -> str:
        """', so the later layers A, B leave the image (...)': the layers after `name`
        that going back into layer `name` drops ('' if none)."""
        names = list(self.recipe.layers)
        later = names[names.index(name) + 1:] if name in names else []
        if not later:
            return ""
        many = len(later) > 1
        return (f", so the later layer{'s' if many else ''} {', '.join(later)}"
                f" {'leave' if many else 'leaves'} the image (run {'their' if many else 'its'}"
                " cells again to rebuild)")

    def _rollback_to_position(self, keep: int, layer: str | None = None) -> StepView | None:
        """Keep the first `keep` history entries; the head becomes the last kept (or a layer
        base). The session goes on in `layer` (default: that of the first entry dropped)."""
        rolled = self.timeline.rollback_to(keep, layer, self.layer.name)
        if self._run.layer is not rolled.layer:
            self._run = _LayerRun(rolled.layer, base_dir=self._layer_dirs.get(rolled.layer.name, self.base_dir))
        self._stop_container()
        self.inspecting_failure = False
        if rolled.live_on is not None:
            self._set_live(rolled.live_on)
        else:
            self._live.ready = False
        return self._history.views(measure=False)[-1] if rolled.kept else None

    def rollback(self, to: int | str | None = None) -> StepView | None:
        """Return to an earlier snapshot: `to` is a 1-based history index, a cell id,
        or None for one step back. Later steps leave the history (kept until gc)."""
        with self._step_lock, self._lock:
            keep = self._history.rollback_position(to, self.inspecting_failure)
            return self._rollback_to_position(keep)

    def forget_cells(self, cell_ids) -> None:
        """JupyterLab's deletedCells: their snapshots leave the history (kept on disk until gc)."""
        ids = set(cell_ids or ())
        if not ids:
            return
        with self._lock:
            if self._history.forget_cells(ids):
                self._persist()

    # --- reading snapshots -----------------------------------------------------

    def snapshot_at(self, index: int | None = None) -> Snapshot:
        if index is None:
            if self.head is not None:
                return self.head
            snaps = self._history.snaps()
            if not snaps:
                raise RecipeError("no snapshot yet: run a step first")
            return snaps[-1]
        return self._history.at(index)

    def find_snapshot(self, target: str | int | None = None) -> tuple[Snapshot, StepView | None]:
        """The snapshot `%browse [LAYER|N]` means, with its %layers row (None for a layer's
        base): the head (None), step N (negative counts from the end), or a layer's last
        step. RecipeError names what is wrong."""
        with self._lock:
            views = self._history.views(measure=False)
            if target is None:
                snap = self.snapshot_at(None)
            elif isinstance(target, int):
                n = target if target > 0 else len(views) + 1 + target
                if not 1 <= n <= len(views) or target == 0:
                    raise RecipeError(f"no step {target}: %layers lists steps 1..{len(views)}")
                snap = self.snapshot_at(n)
            else:
                tips = self.layer_tips()
                if target not in tips:
                    known = ", ".join(tips) or "none yet"
                    raise RecipeError(f"no step of layer {target!r} in this session (layers: {known}):"
                                      " use %browse N with a step number from %layers")
                snap = tips[target]
            return snap, next((v for v in views if v.snapshot_id == snap.id), None)

    def _kept_snapshot(self, snapshot_id: str) -> Snapshot:
        snap = self.store.get(snapshot_id)
        if snap is None:
            raise RecipeError(f"snapshot {snapshot_id[:12]} no longer exists (gc removed it):"
                              " open %browse again on a step %layers lists")
        return snap

    def list_dir(self, snapshot_id: str, path: str):
        """Container directory `path` of a snapshot (engine/browse.Listing), from any thread:
        snapshots are read-only, so this never waits for a step. GrabError for a bad path."""
        from stacker_kernel.engine.browse import list_directory

        return list_directory(self._kept_snapshot(snapshot_id).path, path)

    def prepare_download(self, snapshot_id: str, path: str, copy_to: Path, inline_limit: int):
        """Container file `path` of a snapshot made ready for a download (engine/browse.Download):
        its bytes up to `inline_limit`, else a copy below `copy_to`. Any thread, like list_dir."""
        from stacker_kernel.engine.browse import prepare_download

        return prepare_download(self._kept_snapshot(snapshot_id).path, path, copy_to, inline_limit)

    def diff(self, index: int | None = None) -> list[tuple[str, str]]:
        """Files added (A), modified (M) and removed (D) by step `index` (default: the last)."""
        from stacker_kernel.engine.inspect import diff_summary

        snap = self.snapshot_at(index)
        parent = self.store.get(snap.parent) if snap.parent else None
        return diff_summary(parent.path if parent else None, snap.path)

    def grab(self, path: str, dest: str, index: int | None = None) -> str:
        """Copy `path` out of the current snapshot (or step `index`) to `dest`, like `stacker grab`."""
        from stacker_kernel.engine.inspect import grab

        snap = self.snapshot_at(index)
        return grab(snap.path, path, dest)

    def rootfs_path(self) -> str:
        return str(self.live if self._live.ready else (self.head.path if self.head else self.live))

    def built_steps(self) -> list[Snapshot]:
        """What the layers are made of, oldest first: the steps in the snapshot chain of
        each layer's last snapshot. Unlike the history, this keeps the steps of deleted
        cells that later steps were built on (the export must have them)."""
        with self._lock:
            tips = dict(self.session.tags)
            tips[self.layer.name] = self.head.id if self.head is not None else None
            steps: list[Snapshot] = []
            for name in self.recipe.layers:
                if tips.get(name):
                    steps += [self._history.with_cell_id(s)
                              for s in self.store.chain(tips[name]) if s.kind == "step" and s.layer == name]
            return steps

    def layer_tips(self) -> dict[str, Snapshot]:
        """Each layer's last snapshot, in recipe order."""
        tips: dict[str, Snapshot] = {}
        for snap in self.built_steps():
            tips[snap.layer] = snap
        return tips

    def export_recipe(self) -> Recipe:
        """The recipe of what was actually built: each layer's steps are its snapshot chain."""
        with self._lock:
            built = self.built_steps()
            out = Recipe()
            for name, layer in self.recipe.layers.items():
                steps = [Step(s.source, s.cell_id) for s in built if s.layer == name]
                out.layers[name] = replace(layer, steps=steps)
            return out

    def document_differences(self, full: bool = True) -> "Differences":
        """Where the saved notebook and the image differ (nothing when it is not saved).
        Unless `full`, only the history's steps are compared (no store reads: after
        every step), not those of deleted cells that later steps are built on."""
        doc = self.document() if self.document is not None else None
        if doc is None:
            return Differences()
        with self._lock:
            steps = self.built_steps() if full else self._history.snaps()
            built = [s for s in steps if s.cell_id]
            ran_at = dict(self._ran_at)
        return Differences.of(doc, built, ran_at, self.cell_name)

    def export_yaml(self, path: str | None = None) -> str:
        from stacker_kernel.recipe.stacker_yaml import dump

        text = dump(self.export_recipe())
        if path:
            from stacker_kernel.engine.beside import write_bytes

            write_bytes(Path(path), text.encode())  # never through a link planted in a shared folder
        return text

    def export_oci(self, oci_dir: str, **kwargs) -> list[str]:
        from stacker_kernel.engine.export import export_session_oci

        return export_session_oci(self, oci_dir, **kwargs)

