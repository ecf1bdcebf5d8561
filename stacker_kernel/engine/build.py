"""Headless builds: a stacker.yaml or a notebook, layer by layer, like `stacker build`.

Also the lookups the other headless commands share (`grab`, `chroot`,
`export`): which session built a file, and a layer's last snapshot in it.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from stacker_kernel.engine.remote_cache import CacheSettings, RemoteCache
from stacker_kernel.engine.session import BuildSession
from stacker_kernel.errors import RecipeError, StepError
from stacker_kernel.recipe.model import Recipe, first_line
from stacker_kernel.storage.store import Snapshot, Store

Printer = Callable[[str], None]


def load_recipes(path: str, substitutions: dict[str, str] | None = None) -> list[Recipe]:
    """The recipes to build for `path`, prerequisites first. A notebook is one recipe."""
    if path.endswith(".ipynb"):
        import nbformat

        from stacker_kernel.recipe.notebook import recipe_from_notebook

        invalid: dict = {}
        try:
            # Schema errors are captured (not logged) and refused: a cell whose source
            # is not text would otherwise reach the parser as a traceback.
            nb = nbformat.read(path, as_version=4, capture_validation_error=invalid)
        except FileNotFoundError:
            raise RecipeError(f"{path} does not exist") from None
        except Exception as e:  # nbformat raises many kinds for a broken file
            raise RecipeError(f"{path} is not a readable notebook: {_first_line_of(e)}") from None
        if invalid.get("ValidationError") is not None:
            raise RecipeError(f"{path} is not a valid notebook: "
                              f"{_first_line_of(invalid['ValidationError'])}: fix it in JupyterLab")
        recipe = recipe_from_notebook(nb, Path(path).stem, substitutions or {})
        recipe.source_path = os.path.abspath(path)
        return [recipe]
    from stacker_kernel.recipe.stacker_yaml import load_with_prerequisites

    if not os.path.exists(path):
        raise RecipeError(f"{path} does not exist: give the stacker.yaml with -f")
    return load_with_prerequisites(path, substitutions or {})


def _first_line_of(error: BaseException) -> str:
    """An exception's message cut to its first line (library messages may span many)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@dataclass
class BuildResult:
    session: BuildSession
    tags: dict[str, str] = field(default_factory=dict)  # layer -> snapshot id
    steps_run: int = 0
    steps_cached: int = 0
    oci_tags: list[str] = field(default_factory=list)


def build(store: Store, path: str, *, substitutions: dict[str, str] | None = None,
          no_cache: bool = False, oci_dir: str | None = None, squash: bool = False,
          annotations_namespace: str = "io.stackeroci", out: Printer = print,
          stream: Callable[[str], None] | None = None, cache: CacheSettings | None = None) -> BuildResult:
    """Build every layer of `path` in dependency order; print a line per layer and step.

    Step output goes to `stream` (default: stdout as it comes). `cache` names the
    shared caches steps are taken from and pushed to. The first
    failing step stops the build with a StepError naming the layer and step.
    """
    recipes = load_recipes(path, substitutions)
    abspath = os.path.abspath(path)
    if stream is None:
        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
    session = BuildSession.open(store, abspath, kind="build", resume=False,
                                default_layer=Path(path).stem, base_dir=os.path.dirname(abspath))
    session.use_cache = not no_cache
    result = BuildResult(session)
    try:
        session.remote_cache = RemoteCache.from_settings(cache or CacheSettings())
        for recipe in recipes:
            base_dir = os.path.dirname(recipe.source_path or abspath)
            for name in recipe.dependency_order():
                layer = recipe.layers[name]
                out(f"building layer {name}")
                session.begin_layer(replace(layer, steps=[]), base_dir=base_dir)
                for i, step in enumerate(layer.steps, 1):
                    t0 = time.monotonic()
                    outcome = session.run_step(step.source, step.cell_id, on_output=stream)
                    took = time.monotonic() - t0
                    if not outcome.ok:
                        raise StepError(f"run commands failed for layer {name} (step {i}): {outcome.message}")
                    mark = "cached" if outcome.cached else "ran"
                    result.steps_cached += outcome.cached
                    result.steps_run += not outcome.cached
                    shown = first_line(step.source, skip_shebang=True)[:60]
                    out(f"  {name} step {i}/{len(layer.steps)} {mark} in {took:.2f}s"
                        f" (snapshot {outcome.snapshot_id[:12]}): {shown}")
                if not layer.steps:
                    # A layer without run: its base is its content (prepared now so it can be built on).
                    session.prepare_empty_layer()
            session.finish()
        result.tags = dict(session.session.tags)
        if oci_dir:
            result.oci_tags = session.export_oci(oci_dir, squash=squash,
                                                 annotations_namespace=annotations_namespace)
            out(f"wrote {', '.join(result.oci_tags) or 'no tags'} to {oci_dir}")
        # Older builds of the same file are superseded: let gc reclaim them.
        for old in store.find_sessions(name=abspath, kind="build"):
            if old.id != session.session.id and not store.session_alive(old):
                store.forget_session(old.id)
        return result
    finally:
        session.close()


def latest_session(store: Store, path: str):
    """The newest session (build or kernel) of a stacker.yaml or notebook path."""
    abspath = os.path.abspath(path)
    sessions = store.find_sessions(name=abspath)
    if not sessions:
        raise RecipeError(f"{path} has not been built in this storage: run 'stacker-kernel build -f {path}' first")
    return sessions[0]


def layer_snapshot(store: Store, path: str, layer: str | None) -> Snapshot:
    """The last snapshot of `layer` (default: the last layer built) for `path`."""
    sess = latest_session(store, path)
    tips: dict[str, str] = dict(sess.tags)
    for sid in sess.history:
        snap = store.get(sid)
        if snap is not None:
            tips[snap.layer] = sid
    if layer is None:
        if not sess.history:
            raise RecipeError(f"{path} has no built layer yet")
        sid = sess.history[-1]
    elif layer in tips:
        sid = tips[layer]
    else:
        known = ", ".join(tips) or "none"
        raise RecipeError(f"layer {layer} is not built for {path} (built layers: {known})")
    snap = store.get(sid)
    if snap is None:
        raise RecipeError(f"the snapshot of layer {layer} is gone (gc?): build {path} again")
    return snap


def chroot(store: Store, path: str, layer: str | None) -> int:
    """An interactive shell in a throwaway writable snapshot of a built layer, as
    `stacker chroot`: nothing done in it is kept. Returns the shell's status."""
    from stacker_kernel.container.runtime import Container, ContainerConfig
    from stacker_kernel.container.step import ShellState
    from stacker_kernel.engine.session import build_environment
    from stacker_kernel.recipe.model import ImageSource, Layer
    from stacker_kernel.storage import btrfs

    snap = layer_snapshot(store, path, layer)
    sess = store.new_session("chroot", os.path.abspath(path))
    live = store.live_path(sess.id)
    live.parent.mkdir(parents=True, exist_ok=True)
    btrfs.snapshot(snap.path, live, readonly=False)
    container = None
    try:
        container = Container.start(ContainerConfig(rootfs=str(live)))
        env = build_environment(Layer(name=snap.layer, from_=ImageSource(type="scratch")))
        state = ShellState.from_json(snap.state) if snap.kind == "step" else None
        return container.interact(env, state)
    finally:
        if container is not None:
            container.stop()
        store.forget_session(sess.id)


def export_notebook(path: str, *, per_cell: bool = False, oci_dir: str | None = None,
                    open_store: Callable[[], Store] | None = None) -> str:
    """A notebook as stacker.yaml text; with `oci_dir`, also the images of its last
    session (what was actually built)."""
    import nbformat

    from stacker_kernel.recipe.nbconvert import notebook_to_stacker_yaml

    try:
        nb = nbformat.read(path, as_version=4)
    except FileNotFoundError:
        raise RecipeError(f"{path} does not exist") from None
    except Exception as e:
        raise RecipeError(f"{path} is not a readable notebook: {e}") from None
    text = notebook_to_stacker_yaml(nb, Path(path).stem, per_cell=per_cell)
    if oci_dir and open_store is not None:
        from stacker_kernel.engine.export import export_stored_session

        from stacker_kernel.recipe.notebook import recipe_from_notebook

        layers = recipe_from_notebook(nb, Path(path).stem, {}).layers  # as the kernel ran them: defaults
        with open_store() as store:
            export_stored_session(store, latest_session(store, path), oci_dir, layers=layers,
                                  stacker_yaml=text)
    return text
