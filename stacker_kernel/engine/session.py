"""BuildSession: steps in a persistent container, a read-only snapshot after each.

The contract is DESIGN.md's step semantics:

- a step runs in the layer's container; shell state (cwd, variables) carries
  to the next step of the same layer; a new layer starts fresh;
- after a successful step the rootfs is frozen as a read-only snapshot with
  its record; a failed, interrupted or dead step leaves no trace (the rootfs
  and the shell state go back to the last snapshot), unless `keep_failed`;
- a step whose cache key (parent snapshot, state before, script, imports,
  build environment) was built before does not run: the live rootfs becomes a
  writable snapshot of the cached one and the stored output is replayed;
- rollback to any earlier snapshot is a snapshot of it, whatever its size.

The faces (kernel, CLI) call this class; it knows nothing about Jupyter.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from stacker_kernel.container.runtime import Container, ContainerConfig, Mount
from stacker_kernel.container.step import ShellState
from stacker_kernel.engine import imports as imports_mod
from stacker_kernel.errors import RecipeError, StackerKernelError, StepError, StorageError
from stacker_kernel.recipe.model import ImageSource, Layer, Recipe, Step, first_line
from stacker_kernel.storage import btrfs
from stacker_kernel.storage.store import Session, Snapshot, Store

BUILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# stacker's default build_env_passthrough (pkg/types/layer.go)
DEFAULT_PASSTHROUGH = ["ftp_proxy", "http_proxy", "https_proxy", "no_proxy", "FTP_PROXY",
                       "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "TERM", "SOURCE_DATE_EPOCH"]
REPLAY_CAP = 2_000_000

OutputFn = Callable[[str], None]


@dataclass
class StepView:
    """One row of `%layers` / `stacker-kernel layers`."""
    index: int  # 1-based position in the session history
    snapshot_id: str
    layer: str
    cell_id: str | None
    first_line: str
    status: str
    duration: float
    size_delta: int | None
    cached: bool


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


def build_environment(layer: Layer, host_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `run` step, as stacker builds it (not `environment:`)."""
    host_env = os.environ if host_env is None else host_env
    env = {"PATH": BUILD_PATH}
    patterns = DEFAULT_PASSTHROUGH if layer.build_env_passthrough is None else layer.build_env_passthrough
    for key, value in host_env.items():
        if value and any(re.fullmatch(p, key) for p in patterns):
            env[key] = value
    env.update({k: str(v) for k, v in layer.build_env.items() if str(v) != ""})
    env["STACKER_LAYER_NAME"] = layer.name
    return env


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
        self.network = "host"
        self.remote_cache = None  # engine/remote_cache.RemoteCache: --cache-from/--cache-to, %cache
        self.resumed: StepView | None = None
        self.recipe = Recipe()
        self._run = _LayerRun(Layer(name=default_layer, from_=ImageSource(type="scratch")), base_dir=base_dir)
        self.recipe.layers[default_layer] = self._run.layer
        self.head: Snapshot | None = None  # last committed snapshot of the current layer (or its base)
        self.state: ShellState | None = None
        self.container: Container | None = None
        self.inspecting_failure = False
        self._live_ready = False
        self._interrupt_requested = False
        self._imports_digest = ""
        # A cache hit's record names the cell that first built it; in this session
        # the step belongs to the cell that hit it (re-run and %rollback use that).
        self._cell_ids: dict[str, str | None] = {}
        self._lock = threading.RLock()  # session state; widgets read it from other threads
        self._step_lock = threading.Lock()  # one step at a time

    # --- opening and closing -------------------------------------------------

    @classmethod
    def open(cls, store: Store, name: str, *, kind: str = "kernel", resume: bool = True,
             default_layer: str | None = None, base_dir: str | None = None,
             resolve_built: Callable[[str], Snapshot] | None = None) -> "BuildSession":
        """A new session for `name` (a notebook or stacker.yaml path). With `resume`,
        a previous session of the same name whose owner is gone is taken over at
        its last snapshot (`self.resumed` says which)."""
        # Containers of crashed engines on this store (PDEATHSIG should have ended them).
        Container.kill_orphans(str(store.root / "live"))
        default_layer = default_layer or Path(name).stem or "layer"
        base_dir = base_dir or str(Path(name).parent if os.path.isabs(name) else os.getcwd())
        previous = None
        if resume:
            for old in store.find_sessions(name=name, kind=kind):
                if not store.session_alive(old) and old.history:
                    previous = old
                    break
        sess = store.new_session(kind, name)
        self = cls(store, sess, default_layer=default_layer, base_dir=base_dir, resolve_built=resolve_built)
        if previous is not None:
            self._take_over(previous)
        return self

    def _take_over(self, old: Session) -> None:
        history = [sid for sid in old.history if self.store.get(sid) is not None]
        if not history:
            return
        self.session.history = history
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
        self.state = ShellState.from_json(head.state)
        self.resumed = self.history(measure=False)[-1]

    def close(self) -> None:
        """Stop the container and drop the live rootfs; snapshots and records stay."""
        with self._lock:
            self._stop_container()
            try:
                self.store.end_session(self.session.id)
            except StackerKernelError:
                pass

    # --- layers and directives -------------------------------------------------

    @property
    def layer(self) -> Layer:
        return self._run.layer

    def layer_steps(self, name: str | None = None) -> list[Snapshot]:
        name = name or self.layer.name
        return [s for s in self._history_snaps() if s.layer == name]

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
                self._rollback_for_rerun(cell_id)
            for d in directives:
                if d.interactive:
                    continue
                if d.name == "layer":
                    info.extend(self._directive_layer(d.args))
                    continue
                if d.name == "from" and self.layer_steps():
                    # A new base invalidates every step of the layer: this is the cell that
                    # starts the layer being run again (e.g. Run All after a restart).
                    self._rollback_to_layer_start(self.layer.name)
                    info.append(f"layer {self.layer.name}: back to its start (its base is set again)")
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
            self._rollback_to_layer_start(name)
            return [f"layer {name}: back to its start (its steps and later layers left the history)"]
        self._finish_layer()
        layer = Layer(name=name, from_=ImageSource(type="scratch"))
        self.recipe.layers[name] = layer
        self._run = _LayerRun(layer, base_dir=self.base_dir)
        self._reset_live()
        self.session.layer = name
        self.store.update_session(self.session)
        return []

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
        import tempfile

        layer = self.recipe.layers.get(name)
        tip = self.layer_tips().get(name) or (self.head if name == self.layer.name else None)
        if layer is None or not layer.generate_labels or tip is None:
            return {}
        throwaway = self.store.new_session("chroot", self.session.name + "#generate_labels")
        live = self.store.live_path(throwaway.id)
        labels_dir = Path(tempfile.mkdtemp(prefix="oci-labels-", dir=self.store.root))
        container = None
        try:
            btrfs.snapshot(tip.path, live, readonly=False)
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
        self.session.history = keep
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
        self._live_ready = False
        self.inspecting_failure = False

    @property
    def live(self) -> Path:
        return self.store.live_path(self.session.id)

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

    def _ensure_live(self, on_output: OutputFn | None = None) -> None:
        """The live rootfs is a writable snapshot of the head (importing the base first;
        its warnings, e.g. device nodes made empty files, go to `on_output`)."""
        if self._live_ready:
            return
        if self.head is None:
            source = _absolute_source(self.layer.from_, self._run.base_dir)
            warn = (lambda msg: on_output(f"warning: {msg}\n")) if on_output else None
            base = self._import_pinned_base(source, warn)
            self.head = base
            self.state = None
        self._replace_live(self.head)
        self._stage_imports()
        self._live_ready = True

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
        self._stop_container()
        live = self.live
        if live.exists():
            btrfs.delete_subvolume(live)
        live.parent.mkdir(parents=True, exist_ok=True)
        btrfs.snapshot(snap.path, live, readonly=False)

    def _imports_dir(self) -> Path:
        return self.store.root / "imports" / self.session.id

    def _stage_imports(self) -> None:
        """Copy the layer's imports to the staging dir the container shows read-only at
        /stacker/imports (stale files gone), and land `dest` imports in the rootfs."""
        self._imports_digest = imports_mod.stage(self.layer, self._imports_dir(), self._run.base_dir,
                                                 fetch_layer_path=self._fetch_layer_path)
        if not self.layer_steps():
            self._land_dest_imports()

    def _fetch_layer_path(self, layer: str, path: str, dest: str) -> str:
        from stacker_kernel.engine.inspect import grab

        return grab(self._resolve_built(layer).path, path, dest)

    def _land_dest_imports(self) -> None:
        """Imports with `dest` land in the image, as stacker does: as their own
        snapshot (an OCI layer of their own), before the layer's first step."""
        from stacker_kernel.container.userns import run_in_userns

        dests = [i for i in self.layer.imports if i.dest]
        if not dests:
            return
        source = "\n".join(f"# stacker import {i.path} -> {i.dest}" for i in dests)
        key = self.cache_key(source, {"dest-imports": "v1"})
        with self.store.write_lock():  # see run_step: gc must not take the hit meanwhile
            hit = self.store.find_cache(key) if self.use_cache else None
            if hit is not None:
                self._replace_live(hit)
                self._advance(hit)
        if hit is not None:
            return
        items = [(imports_mod.staged_name(i), i.dest, i.mode, i.uid, i.gid) for i in dests]
        started = time.time()
        run_in_userns(imports_mod.land_in_rootfs, str(self._imports_dir()), str(self.live), items)
        snap = Snapshot(parent=self.head.id if self.head else None, session=self.session.id,
                        layer=self.layer.name, source=source, cache_key=key,
                        state=(self.state or ShellState()).to_json(), started=started,
                        duration=time.time() - started)
        self._advance(self.store.commit(self.live, snap))

    def _ensure_container(self) -> Container:
        if self.container is not None and self.container.alive:
            if self.container.config.network == self.network:
                return self.container
            # `%network` changed: the mode is the container's, so start it again (the
            # live rootfs and the shell state carry over, as between any two steps).
            self._stop_container()
        # The legacy `import:` key put files at /stacker/ (stacker < 1.0); `imports:` at /stacker/imports.
        where = "/stacker" if self.layer.uses_legacy_import() else "/stacker/imports"
        mounts = [Mount(str(self._imports_dir()), where, readonly=True)]
        for b in self.layer.binds:
            src = b.source if os.path.isabs(b.source) else os.path.join(self._run.base_dir, b.source)
            if not os.path.exists(src):
                raise StepError(f"bind source {src} does not exist: fix the binds of layer {self.layer.name}")
            mounts.append(Mount(src, b.dest or b.source, readonly=False))
        self.container = Container.start(ContainerConfig(rootfs=str(self.live), mounts=mounts,
                                                         network=self.network))
        return self.container

    def _stop_container(self) -> None:
        if self.container is not None:
            try:
                self.container.stop()
            finally:
                self.container = None

    # --- steps ---------------------------------------------------------------

    def cache_key(self, script: str, env: dict[str, str]) -> str:
        parent = self.head.id if self.head else ""
        blob = json.dumps({
            "parent": parent,
            "state": self.state.to_json() if self.state else None,
            "script": script,
            "imports": self._imports_digest,
            "env": env,
            "network": self.network,
        }, sort_keys=True)
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def run_step(self, script: str, cell_id: str | None = None,
                 on_output: OutputFn | None = None) -> StepOutcome:
        """Run one step (a cell, or a layer's `run`) and commit it; blocking."""
        with self._step_lock:
            try:
                outcome = self._run_step(script, cell_id, on_output)
                if self.remote_cache is not None and outcome.ok and outcome.snapshot_id:  # remote cache: push
                    self.remote_cache.push(self, outcome.snapshot_id, on_output)
                return outcome
            finally:
                self._interrupt_requested = False  # an interrupt ends at most the step it came during

    def _run_step(self, script: str, cell_id: str | None, on_output: OutputFn | None) -> StepOutcome:
        with self._lock:
            if cell_id is not None and not self.inspecting_failure:
                self._rollback_for_rerun(cell_id)
            self._ensure_live(on_output)
            env = build_environment(self.layer)
            key = self.cache_key(script, env)
            if self.use_cache and not self.layer.binds and not self.inspecting_failure:
                # Under the write lock, so a concurrent gc cannot delete the hit
                # between finding it and the session pointing at it.
                with self.store.write_lock():
                    hit = self.store.find_cache(key)
                    if hit is not None:
                        t0 = time.monotonic()
                        self._replace_live(hit)
                        self._advance(hit)
                if hit is not None:
                    return self._replay(hit, cell_id, on_output, t0)
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
                                    interrupted=lambda: self._interrupt_requested)
        except OSError as e:  # the step's log is on the storage: a full disk shows here
            with self._lock:
                self._back_to_head()
            raise StorageError(f"the step's output could not be stored ({e.strerror}): free space "
                               f"on {self.store.root} (e.g. stacker-kernel gc) and run the step again") from None
        with self._lock:
            if not result.ok:
                return self._failed(result, str(log_tmp))
            if self.inspecting_failure:
                return StepOutcome(True, False, None, "", 0, False, str(log_tmp), result.duration)
            snap = Snapshot(parent=self.head.id if self.head else None, session=self.session.id,
                            layer=self.layer.name, cell_id=cell_id, source=script, cache_key=key,
                            state=result.state.to_json(), status="ok", started=started,
                            duration=result.duration)
            try:
                snap = self.store.commit(self.live, snap)
            except (OSError, StorageError):  # e.g. a full disk: the step leaves no trace
                self._back_to_head()
                raise
            os.replace(log_tmp, self.store.log_path(snap.id))
            self._advance(snap)
            self.layer.steps.append(Step(script, cell_id))
            return StepOutcome(True, False, snap.id, "", 0, False, str(self.store.log_path(snap.id)),
                               result.duration)

    def _back_to_head(self) -> None:
        """Drop what a step did after an error outside it (a full disk); if even that
        fails, the next step prepares the live rootfs from the head again."""
        self._live_ready = False
        try:
            self._replace_live(self.head)
            self._stage_imports()
            self._live_ready = True
        except (OSError, StackerKernelError):
            pass

    def _advance(self, snap: Snapshot) -> None:
        self.head = snap
        self.state = ShellState.from_json(snap.state)
        self.session.history.append(snap.id)
        self.session.head = snap.id
        self.session.layer = snap.layer
        self.store.update_session(self.session)

    def _replay(self, hit: Snapshot, cell_id: str | None, on_output: OutputFn | None,
                t0: float) -> StepOutcome:
        """A cache hit, once the live rootfs is a writable snapshot of `hit` and the
        session points at it: nothing runs, the stored output is replayed."""
        log = self.store.log_path(hit.id)
        if on_output is not None and log.exists():
            with open(log, "rb") as f:
                data = f.read(REPLAY_CAP + 1)
            text = data[:REPLAY_CAP].decode("utf-8", errors="replace")
            if len(data) > REPLAY_CAP:
                text += f"\n[output truncated: full log in {log}]\n"
            if text:
                on_output(text)
        if cell_id != hit.cell_id:
            self._cell_ids[hit.id] = cell_id
        self.layer.steps.append(Step(hit.source, cell_id))
        return StepOutcome(True, True, hit.id, "", 0, False, str(log), time.monotonic() - t0)

    def _failed(self, result, log_path: str) -> StepOutcome:
        message = result.message
        if self.keep_failed:
            self.inspecting_failure = True
            message += " (keep_failed: the container keeps the failed state for inspection; later steps are not committed until %rollback)"
        else:
            # No trace: back to the last snapshot (a fresh container at the next step).
            self._replace_live(self.head)
        return StepOutcome(False, False, None, message, result.status, result.interrupted, log_path,
                           result.duration)

    def interrupt(self) -> None:
        """Interrupt the running step (SIGINT to its process group, SIGKILL after a grace).
        An interrupt while the step is still being prepared (base import, container
        start) reaches it as soon as it starts."""
        self._interrupt_requested = True
        container = self.container
        if container is not None:
            container.interrupt()

    # --- history and rollback --------------------------------------------------

    def _history_snaps(self) -> list[Snapshot]:
        snaps = []
        for sid in self.session.history:
            snap = self.store.get(sid)
            if snap is not None:
                if sid in self._cell_ids:
                    snap = replace(snap, cell_id=self._cell_ids[sid])
                snaps.append(snap)
        return snaps

    def history(self, measure: bool = True) -> list[StepView]:
        """The session's steps, oldest first. Size changes are measured here, from the
        snapshot diffs, the first time a step is shown (not on the step's hot path;
        `measure=False` leaves unknown ones None)."""
        with self._lock:
            snaps = self._history_snaps()
            if measure:
                self._measure_sizes(snaps)
            views = []
            for i, snap in enumerate(snaps, 1):
                views.append(StepView(i, snap.id, snap.layer, snap.cell_id,
                                      first_line(snap.source, skip_shebang=True),
                                      snap.status, snap.duration, snap.size_delta,
                                      cached=snap.session != self.session.id))
            return views

    def _measure_sizes(self, snaps: list[Snapshot]) -> None:
        from stacker_kernel.engine.inspect import size_changes

        todo = [s for s in snaps if s.size_delta is None]
        if not todo:
            return
        parents = [self.store.get(s.parent) if s.parent else None for s in todo]
        deltas = size_changes([(p.path if p else None, s.path) for s, p in zip(todo, parents)])
        for snap, delta in zip(todo, deltas):
            snap.size_delta = delta
            self.store.set_size_delta(snap.id, delta)

    def _rollback_for_rerun(self, cell_id: str) -> None:
        """Re-running a cell that produced a snapshot: back to that snapshot's parent."""
        snaps = self._history_snaps()
        for i, snap in enumerate(snaps):
            if snap.cell_id == cell_id:
                self._rollback_to_position(i)  # keep history[:i]
                return

    def _rollback_to_position(self, keep: int) -> StepView | None:
        """Keep the first `keep` history entries; the head becomes the last kept (or a layer base)."""
        snaps = self._history_snaps()
        target_layer = snaps[keep].layer if keep < len(snaps) else self.layer.name
        kept = snaps[:keep]
        self.session.history = [s.id for s in kept]
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
            self.state = ShellState.from_json(self.head.state)
            self._replace_live(self.head)
            self._live_ready = True
            self._stage_imports()
        else:
            # Back to the layer's base: the parent of the layer's first step (its recipe
            # may be unknown, e.g. after a resume), else prepared again at the next step.
            first = next((s for s in snaps if s.layer == target_layer), None)
            base = self.store.get(first.parent) if first is not None and first.parent else None
            self.state = None
            if base is not None:
                self.head = base
                self._replace_live(base)
                self._live_ready = True
                self._stage_imports()
            else:
                self.head = None
                self._live_ready = False
        self.session.head = self.head.id if self.head else None
        self.session.layer = target_layer
        self.store.update_session(self.session)
        return self.history(measure=False)[-1] if kept else None

    def rollback(self, to: int | str | None = None) -> StepView | None:
        """Return to an earlier snapshot: `to` is a 1-based history index, a cell id,
        or None for one step back. Later steps leave the history (kept until gc)."""
        with self._step_lock, self._lock:
            snaps = self._history_snaps()
            if not snaps and not self.inspecting_failure:
                raise RecipeError("nothing to roll back: no step has been committed in this session")
            if to is None:
                keep = len(snaps) if self.inspecting_failure else len(snaps) - 1
            elif isinstance(to, int) or (isinstance(to, str) and to.isdigit()):
                n = int(to)
                if not 0 <= n <= len(snaps):
                    raise RecipeError(f"no step {n}: %layers lists steps 1..{len(snaps)}")
                keep = n
            else:
                idx = [i for i, s in enumerate(snaps) if s.cell_id == to or s.id.startswith(to)]
                if not idx:
                    raise RecipeError(f"no step of cell or snapshot {to!r} in this session's history (%layers lists them)")
                keep = idx[-1] + 1
            return self._rollback_to_position(keep)

    def forget_cells(self, cell_ids) -> None:
        """JupyterLab's deletedCells: their snapshots leave the history (kept on disk until gc)."""
        ids = set(cell_ids or ())
        if not ids:
            return
        with self._lock:
            before = self.session.history
            self.session.history = [s.id for s in self._history_snaps() if s.cell_id not in ids]
            if self.session.history != before:
                self.store.update_session(self.session)

    # --- reading snapshots -----------------------------------------------------

    def snapshot_at(self, index: int | None = None) -> Snapshot:
        snaps = self._history_snaps()
        if index is None:
            if self.head is not None:
                return self.head
            if not snaps:
                raise RecipeError("no snapshot yet: run a step first")
            return snaps[-1]
        if not 1 <= index <= len(snaps):
            raise RecipeError(f"no step {index}: %layers lists steps 1..{len(snaps)}")
        return snaps[index - 1]

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
        return str(self.live if self._live_ready else (self.head.path if self.head else self.live))

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
                    steps += [replace(s, cell_id=self._cell_ids.get(s.id, s.cell_id))
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
            Path(path).write_text(text)
        return text

    def export_oci(self, oci_dir: str, **kwargs) -> list[str]:
        from stacker_kernel.engine.export import export_session_oci

        return export_session_oci(self, oci_dir, **kwargs)


def _absolute_source(src: ImageSource, base_dir: str) -> ImageSource:
    """Local tar/oci paths are relative to the notebook's (or stacker.yaml's) directory."""
    url = src.url
    if not url or src.type not in ("tar", "oci") or "://" in url or os.path.isabs(url):
        return src
    return replace(src, url=os.path.join(base_dir, url))
