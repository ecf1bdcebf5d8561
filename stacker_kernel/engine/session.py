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

The session ties three parts together, each in its own module: the live
rootfs and its container (engine/live.py), the history and positions in it
(engine/history.py) and the step cache (engine/cache.py). The faces (kernel,
CLI) call this class; it knows nothing about Jupyter.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from stacker_kernel.container.runtime import Container, ContainerConfig, Mount
from stacker_kernel.container.step import ShellState
from stacker_kernel.engine.cache import StepCache, StepInputs, replay_output
from stacker_kernel.engine.cache import cache_key as key_of
from stacker_kernel.engine.history import History, StepView
from stacker_kernel.engine.live import BUILD_PATH, LiveRootfs, absolute_source, build_environment
from stacker_kernel.errors import RecipeError, StackerKernelError, StepError, StorageError
from stacker_kernel.recipe.cells import split_script
from stacker_kernel.recipe.model import ImageSource, Layer, Recipe, Step, first_line
from stacker_kernel.storage.store import Session, Snapshot, Store, make_tmp_dir

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


class BuildSession:
    """A notebook's (or a build's) sequence of layers and steps over one store."""

    def __init__(self, store: Store, session: Session, *, default_layer: str, base_dir: str,
                 resolve_built: Callable[[str], Snapshot] | None = None):
        self.store = store
        self.session = session
        self.default_layer = default_layer
        self.base_dir = base_dir
        self.external_built = resolve_built
        self.keep_failed = False
        self.use_cache = True
        # A cache hit replays the step's stored output (the kernel shows it under
        # the cell); a headless build prints one line per cached step instead.
        self.replay_cached = True
        self.network = "host"
        self.remote_cache = None  # engine/remote_cache.RemoteCache: --cache-from/--cache-to, %cache
        self.resumed: StepView | None = None
        self.recipe = Recipe()
        self._run = _LayerRun(Layer(name=default_layer, from_=ImageSource(type="scratch")), base_dir=base_dir)
        self.recipe.layers[default_layer] = self._run.layer
        self.head: Snapshot | None = None  # last committed snapshot of the current layer (or its base)
        self.state: ShellState | None = None
        self.inspecting_failure = False
        self._kept_failure: KeptFailure | None = None
        self._on_hit: Callable[[StepOutcome], None] | None = None  # see run_step
        self._interrupt_requested = False
        self._live = LiveRootfs(store, session.id)
        self._history = History(store, session)
        self._cache = StepCache(store)
        self._lock = threading.RLock()  # session state; widgets read it from other threads
        self._step_lock = threading.Lock()  # one step at a time

    # --- opening and closing -------------------------------------------------

    @classmethod
    def open(cls, store: Store, name: str, *, kind: str = "kernel", resume: bool = True,
             default_layer: str | None = None, base_dir: str | None = None,
             resolve_built: Callable[[str], Snapshot] | None = None) -> "BuildSession":
        """A new session for `name` (a notebook or stacker.yaml path). With `resume`,
        a previous session of the same name whose owner is gone is taken over at
        its last snapshot (`self.resumed` says which).

        One session of a `kind` per name at a time: while another one's owner is
        alive (a second build of a file, a second kernel of a notebook), this
        raises SessionBusyError naming it, and nothing of it is touched.
        """
        # Containers of crashed engines on this store (PDEATHSIG should have ended them).
        Container.kill_orphans(str(store.root / "live"))
        default_layer = default_layer or Path(name).stem or "layer"
        base_dir = base_dir or str(Path(name).parent if os.path.isabs(name) else os.getcwd())
        # Under the write lock: two opening at once cannot both see the name free.
        with store.write_lock():
            sess = store.new_session(kind, name, exclusive=True)
            previous = None
            if resume:
                for old in store.find_sessions(name=name, kind=kind):
                    if old.id != sess.id and not store.session_alive(old) and old.history:
                        previous = old
                        break
        self = cls(store, sess, default_layer=default_layer, base_dir=base_dir, resolve_built=resolve_built)
        if previous is not None:
            self._take_over(previous)
        return self

    def _take_over(self, old: Session) -> None:
        history = [sid for sid in old.history if self.store.get(sid) is not None]
        if not history:
            return
        self._history.keep(history)
        self.session.tags = dict(old.tags)
        head = self.store.get(history[-1])
        self.session.head = head.id
        self.session.layer = head.layer
        self.store.update_session(self.session)
        self.store.forget_session(old.id)
        # Rebuild the layer skeleton: names and order come from the history.
        self.recipe = Recipe()
        for sid in history:
            snap = self.store.get(sid)
            if snap.layer not in self.recipe.layers:
                self.recipe.layers[snap.layer] = Layer(name=snap.layer, from_=ImageSource(type="scratch"))
            self.recipe.layers[snap.layer].steps.append(Step(snap.source, snap.cell_id))
        self._run = _LayerRun(self.recipe.layers[head.layer], base_dir=self.base_dir)
        self.head = head
        self.state = ShellState.of_snapshot(head.state)
        self.resumed = self._history.views(measure=False)[-1]

    def close(self) -> None:
        """Stop the container, drop the live rootfs and give up the name (another
        session may open or resume it); snapshots and records stay."""
        with self._lock:
            self._stop_container()
            self._history.stop_measuring()
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
            self._run = _LayerRun(layer, base_dir=base_dir or self.base_dir)
            self._reset_live()

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
            if (cell_id is not None and not self.inspecting_failure
                    and not any(d.name == "layer" for d in directives)):
                # A cell run again goes back to its step's parent first, so its
                # directives change the layer that step belongs to (not the current
                # one); a `%layer` cell goes back to the layer's start by itself.
                info.extend(self._rollback_for_rerun(cell_id))
            for d in directives:
                if d.interactive:
                    continue
                if d.name == "layer":
                    info.extend(self._directive_layer(d.args))
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
        return info

    def _set_layer(self, layer: Layer) -> None:
        self._run.layer = layer
        self.recipe.layers[layer.name] = layer

    def _directive_layer(self, name: str) -> list[str]:
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
        self._run = _LayerRun(layer, base_dir=self.base_dir)
        self._reset_live()
        self.session.layer = name
        self.store.update_session(self.session)
        return []

    def _implicit_layer_unused(self) -> bool:
        layer = self.layer
        return (layer.name == self.default_layer and not self.layer_steps()
                and layer == Layer(name=layer.name, from_=ImageSource(type="scratch")))

    def _finish_layer(self) -> None:
        if self.head is not None:
            self.session.tags[self.layer.name] = self.head.id
            self.store.update_session(self.session)
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
        self._run = _LayerRun(fresh, base_dir=self.base_dir)
        self._history.keep(keep)
        self.session.head = None
        self.session.layer = name
        self.store.update_session(self.session)
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
            base = import_base(self.store, source, resolve_built=self._resolve_built, warn=warn)
            with self.store.write_lock():
                if self.store.get(base.id) is not None and base.path.is_dir():
                    self.session.head = base.id
                    self.store.update_session(self.session)
                    return base
        raise StorageError(f"the base of layer {self.layer.name} was deleted while it was being "
                           "imported (a gc running beside the build?): run the step again")

    def _replace_live(self, snap: Snapshot) -> None:
        self._live.replace(snap)

    def _stage_imports(self) -> None:
        """Stage the layer's imports for the container, and land `dest` imports in the
        rootfs before the layer's first step."""
        self._live.stage_imports(self.layer, self._run.base_dir, self._fetch_layer_path)
        if not self.layer_steps():
            self._land_dest_imports()

    def _fetch_layer_path(self, layer: str, path: str, dest: str) -> str:
        from stacker_kernel.engine.inspect import grab

        return grab(self._resolve_built(layer).path, path, dest)

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
                self._replace_live(hit)
                self._advance(hit)
        if hit is not None:
            return
        started = time.time()
        self._live.land_dest_imports(self.layer)
        snap = Snapshot(parent=self.head.id if self.head else None, session=self.session.id,
                        layer=self.layer.name, source=source, cache_key=key,
                        state=self.state.to_json() if self.state else "null", started=started,
                        duration=time.time() - started)
        self._live.before_commit()
        stored = self._cache.commit(self.live, snap, None, reuse_cached=self.use_cache)
        if stored.id != snap.id:  # landed by another session meanwhile: see _run_step
            self._replace_live(stored)
        self._advance(stored)

    def _ensure_container(self) -> Container:
        return self._live.ensure_container(self.layer, self._run.base_dir, self.network)

    def _stop_container(self) -> None:
        self._live.stop_container()

    # --- steps ---------------------------------------------------------------

    def cache_key(self, script: str, env: dict[str, str]) -> str:
        """The cache key of `script` run next, with `env`, in this session."""
        return key_of(StepInputs(parent=self.head.id if self.head else "",
                                  state=self.state.to_json() if self.state else None,
                                  script=script, imports=self._live.imports_digest,
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
                return outcome
            finally:
                self._on_hit = None
                self._interrupt_requested = False  # an interrupt ends at most the step it came during

    def _run_step(self, script: str, cell_id: str | None, on_output: OutputFn | None,
                  on_progress: OutputFn | None = None) -> StepOutcome:
        with self._lock:
            if cell_id is not None and not self.inspecting_failure:
                for line in self._rollback_for_rerun(cell_id):
                    if on_output is not None:
                        on_output(line + "\n")
            self._ensure_live(on_output, on_progress)
            self._check_shell()
            env = build_environment(self.layer)
            key = self.cache_key(script, env)
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
                        self._replace_live(hit)
                        self._advance(hit, cell_id, hit=True)
                if hit is not None:
                    return self._replay(hit, cell_id, on_output, t0, before)
                if self.remote_cache is not None:  # remote cache: a hit from --cache-from
                    remote = self.remote_cache.lookup(self, key, script, cell_id, on_output)
                    if remote is not None:
                        return remote
            container = self._ensure_container()
            state = self.state
        log_tmp = self.store.root / "logs" / f"running-{self.session.id}"
        log_tmp.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        try:
            result = container.run_step(script, env, state, on_output=on_output, log_path=str(log_tmp),
                                    interrupted=lambda: self._interrupt_requested,
                                    script_name=f"layer {self.layer.name} "
                                                + (f"cell {cell_id[:8]}" if cell_id else "run"))
        except OSError as e:  # the step's log is on the storage: a full disk shows here
            with self._lock:
                self._back_to_head()
            raise StorageError(f"the step's output could not be stored ({e.strerror}): free space "
                               f"on {self.store.root} (e.g. stacker-kernel gc) and run the step again") from None
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
                            duration=result.duration)
            try:
                self._live.before_commit()
                # A step with binds is never taken from the cache (what they hold is not
                # in its key), so it is not swapped for another's either.
                stored = self._cache.commit(self.live, snap, log_tmp,
                                            reuse_cached=self.use_cache and not self.layer.binds)
            except (OSError, StorageError):  # e.g. a full disk: the step leaves no trace
                self._back_to_head()
                raise
            if stored.id != snap.id:
                # Another session committed this step first: go on from its snapshot, so
                # that both sessions (and the cache) agree on what the step made.
                self._replace_live(stored)
                self._advance(stored, cell_id, hit=True)
            else:
                self._advance(stored)
            self.layer.steps.append(Step(script, cell_id))
            return StepOutcome(True, False, stored.id, "", 0, False, str(self.store.log_path(stored.id)),
                               result.duration, index=len(self.session.history), layer=self.layer.name,
                               size_delta=stored.size_delta)

    def _back_to_head(self) -> None:
        """Drop what a step did after an error outside it (a full disk); if even that
        fails, the next step prepares the live rootfs from the head again."""
        self._live.ready = False
        try:
            self._set_live(self.head)
        except (OSError, StackerKernelError):
            pass

    def _advance(self, snap: Snapshot, cell_id: str | None = None, *, hit: bool = False) -> None:
        self.head = snap
        self.state = ShellState.of_snapshot(snap.state)
        self._history.append(snap, cell_id, hit=hit)
        self.session.head = snap.id
        self.session.layer = snap.layer
        self.store.update_session(self.session)

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

    def _rollback_for_rerun(self, cell_id: str) -> list[str]:
        """Re-running a cell that produced a snapshot: back to that snapshot's parent.
        Returns a line naming the later layers this drops, said before dropping them."""
        keep = self._history.position_of_cell(cell_id)
        if keep is None:
            return []
        snaps = self._history.snaps()
        target = snaps[keep].layer if keep < len(snaps) else self.layer.name
        dropped = self._later_layers_note(target)
        self._rollback_to_position(keep)
        return [f"re-running a cell of layer {target}{dropped}"] if dropped else []

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

    def _rollback_to_position(self, keep: int) -> StepView | None:
        """Keep the first `keep` history entries; the head becomes the last kept (or a layer base)."""
        snaps = self._history.snaps()
        target_layer = snaps[keep].layer if keep < len(snaps) else self.layer.name
        kept = snaps[:keep]
        self._history.keep([s.id for s in kept])
        # Layers after the target's layer leave the recipe.
        names = list(self.recipe.layers)
        if target_layer in names:
            for later in names[names.index(target_layer) + 1:]:
                del self.recipe.layers[later]
                self.session.tags.pop(later, None)
            layer = self.recipe.layers[target_layer]
        else:
            layer = Layer(name=target_layer, from_=ImageSource(type="scratch"))
            self.recipe.layers[target_layer] = layer
        layer.steps = [Step(s.source, s.cell_id) for s in kept if s.layer == target_layer]
        if self._run.layer is not layer:
            self._run = _LayerRun(layer, base_dir=self.base_dir)
        same_layer = [s for s in kept if s.layer == target_layer]
        self._stop_container()
        self.inspecting_failure = False
        if same_layer:
            self.head = same_layer[-1]
            self.state = ShellState.of_snapshot(self.head.state)
            self._set_live(self.head)
        else:
            # Back to the layer's base: the parent of the layer's first step (its recipe
            # may be unknown, e.g. after a resume), else prepared again at the next step.
            first = next((s for s in snaps if s.layer == target_layer), None)
            base = self.store.get(first.parent) if first is not None and first.parent else None
            self.state = None
            if base is not None:
                self.head = base
                self._set_live(base)
            else:
                self.head = None
                self._live.ready = False
        self.session.head = self.head.id if self.head else None
        self.session.layer = target_layer
        self.store.update_session(self.session)
        return self._history.views(measure=False)[-1] if kept else None

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
                self.store.update_session(self.session)

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

    def order_warnings(self, notebook_cell_ids: list[str]) -> list[str]:
        """Where the notebook (its code cells' ids, in order) differs from what was built."""
        if not notebook_cell_ids:
            return []  # nothing to compare with (e.g. the notebook is not saved yet)
        built = [s.cell_id for s in self.built_steps() if s.cell_id]
        pos = {cid: i for i, cid in enumerate(notebook_cell_ids)}
        warnings = []
        gone = [cid for cid in built if cid not in pos]
        if gone:
            warnings.append(f"{len(gone)} built step(s) come from cells no longer in the notebook "
                            f"({', '.join(c[:8] for c in gone)}): the export has them")
        order = [pos[cid] for cid in built if cid in pos]
        if order != sorted(order):
            warnings.append("cells were run in another order than the notebook shows them: "
                            "the export follows the order they were built in")
        return warnings

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

