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
from typing import Any, Callable, NoReturn

from stacker_kernel.container.step import ShellState
from stacker_kernel.engine import imports as imports_mod
from stacker_kernel.engine.live import build_environment
from stacker_kernel.engine.cache_settings import CacheSettings
from stacker_kernel.engine.session import BuildSession, Options, RecordedRecipe
from stacker_kernel.errors import RecipeError, StackerKernelError, StepError
from stacker_kernel.recipe.model import Layer, Recipe, first_line
from stacker_kernel.storage.store import Snapshot, Store

Printer = Callable[[str], None]


def load_recipes(path: str, substitutions: dict[str, str] | None = None,
                 dockerfile=None, cache: Path | None = None) -> list[Recipe]:
    """The recipes to build for `path`, prerequisites first. A notebook is one recipe,
    and so is a Dockerfile (`dockerfile`: its recipe.dockerfile.DockerfileOptions;
    `cache`: a store's cache folder, where its translation is kept)."""
    from stacker_kernel.recipe.dockerfile_options import is_dockerfile

    if is_dockerfile(path):
        return [load_dockerfile(path, dockerfile, cache=cache)]
    if path.endswith(".ipynb"):
        from stacker_kernel.recipe.notebook import recipe_from_notebook

        nb = read_notebook(path)
        recipe = recipe_from_notebook(nb, Path(path).stem, substitutions or {})
        recipe.source_path = os.path.abspath(path)
        context = imports_mod.notebook_context(nb, path)
        if context is not None:
            imports_mod.confine(recipe.layers.values(), context)
        return [recipe]
    from stacker_kernel.recipe.stacker_yaml import load_with_prerequisites

    if not os.path.exists(path):
        raise RecipeError(f"{path} does not exist: give the stacker.yaml with -f")
    return load_with_prerequisites(path, substitutions or {})


def _dockerfile_notebook(path: str, options, context: str, warn: Printer | None,
                         cache: Path | None = None):
    """The notebook of the Dockerfile at `path` (recipe.dockerfile), its warnings to
    `warn` (default: stderr), and the last stage's name. With `cache` (a store's cache
    folder), a translation of the same inputs made before is taken from there."""
    from stacker_kernel.recipe.dockerfile_options import DockerfileOptions, layer_name_for

    options = options or DockerfileOptions()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path} does not exist: give the Dockerfile with -f") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read {path}: {e}: check the file") from None
    name = layer_name_for(path)
    build_context = os.path.dirname(os.path.abspath(path))

    ignore_file = os.path.join(build_context, ".dockerignore")
    try:
        ignore_text: str | None = Path(ignore_file).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        ignore_text = None
    except OSError as e:
        raise RecipeError(f"cannot read {ignore_file}: {e.strerror}") from None
    excluded: Callable[[str], bool] = lambda p: False  # noqa: E731
    if ignore_text is not None:
        from stacker_kernel.recipe import dockerignore

        ignored = dockerignore.parse(ignore_text)
        excluded = lambda p: dockerignore.excluded(ignored, p)  # noqa: E731

    matched: list[tuple[str, list[str]]] = []  # what the translation asked `match`, in order

    def context_paths(pattern: str) -> list[str]:  # as Docker: `*` matches dot files too
        import glob

        return [p for p in glob.glob(pattern, root_dir=build_context, include_hidden=True) if not excluded(p)]

    def match(pattern: str) -> list[str]:
        found = context_paths(pattern)
        matched.append((pattern, found))
        return found

    # A local OCI base's ONBUILD triggers run in the stages FROM it, as Docker runs them.
    base_onbuild = {}
    for source in set(options.bases.values()):
        if source.startswith("oci:"):
            from stacker_kernel.oci.layout import OCILayout

            layout, _, tag = source[4:].rpartition(":")
            try:
                config = OCILayout(layout).resolve(tag).config.get("config") or {}
            except (OSError, ValueError, KeyError, StackerKernelError):  # fails where it is imported
                continue
            if isinstance(config.get("OnBuild"), list):
                base_onbuild[source] = [str(t) for t in config["OnBuild"]]
    inputs = {"text": text, "name": name, "build_args": options.build_args, "bases": options.bases,
              "context": context, "target": options.target, "all_stages": options.all_stages,
              "dockerignore": os.path.exists(ignore_file), "base_onbuild": base_onbuild,
              "machine": os.uname().machine}
    record = _translation_record(cache, path) if cache is not None else None
    translated = _kept_translation(record, inputs, context_paths) if record is not None else None
    if translated is not None:
        nb, warnings = translated
    else:
        from stacker_kernel.recipe.dockerfile import dockerfile_notebook

        try:
            nb, warnings = dockerfile_notebook(text, name, build_args=options.build_args,
                                               bases=options.bases, context=context, match=match,
                                               target=options.target, all_stages=options.all_stages,
                                               dockerignore=inputs["dockerignore"], base_onbuild=base_onbuild)
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from e
        if record is not None:
            _keep_translation(record, inputs, nb, warnings, matched)
    for w in warnings:
        (warn or (lambda m: print(m, file=sys.stderr)))(f"warning: {path}: {w}")
    return nb, name


# --- a Dockerfile translated before ----------------------------------------------------

# The code a kept translation stands for: one made by other code is not used.
_TRANSLATORS = ("recipe/dockerfile.py", "recipe/dockerfile_options.py", "recipe/notebook.py", "recipe/model.py",
                "engine/build.py")


def _translation_record(cache: Path, path: str) -> Path:
    """Where the last translation of the Dockerfile at `path` is kept (one file per path)."""
    import hashlib

    name = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:32]
    return cache / "dockerfiles" / f"{name}.json"


def _translation_key(inputs: dict) -> str:
    """A digest of what a translation is made of: the Dockerfile, its options, the
    translator's code and the Go parser it calls."""
    import hashlib
    import importlib.util
    import json

    top = Path(__file__).resolve().parent.parent
    code = [(rel, st.st_size, st.st_mtime_ns) for rel in _TRANSLATORS for st in [(top / rel).stat()]]
    spec = importlib.util.find_spec("dockerfile")
    parser = os.stat(spec.origin) if spec is not None and spec.origin else None
    stamp = [spec.origin, parser.st_size, parser.st_mtime_ns] if parser else None
    return hashlib.sha256(json.dumps([inputs, code, stamp], sort_keys=True).encode()).hexdigest()


def _kept_translation(record: Path, inputs: dict, context_paths: Callable[[str], list[str]]):
    """The notebook and warnings kept for these inputs, if the context still matches
    every wildcard source as it did; else None (translate again)."""
    import json

    try:
        kept = json.loads(record.read_text())
        if kept["key"] != _translation_key(inputs):
            return None
        if any(context_paths(pattern) != found for pattern, found in kept["matches"]):
            return None
        return kept["notebook"], kept["warnings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none kept, or unreadable: translated again


def _keep_translation(record: Path, inputs: dict, nb: dict, warnings: list[str],
                      matched: list[tuple[str, list[str]]]) -> None:
    import json

    text = json.dumps({"key": _translation_key(inputs), "notebook": nb, "warnings": warnings,
                       "matches": matched})
    try:
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, record)  # a lost record only means the next build translates again
    except OSError:
        pass


def load_dockerfile(path: str, options=None, warn: Printer | None = None, cache: Path | None = None) -> Recipe:
    """The recipe of the Dockerfile at `path`, as its notebook gives it; relative
    COPY sources are in the Dockerfile's directory (the build context). `cache`: see
    _dockerfile_notebook."""
    from stacker_kernel.recipe.notebook import recipe_from_notebook

    nb, name = _dockerfile_notebook(path, options, "", warn, cache)
    try:
        recipe = recipe_from_notebook(nb, name)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from e
    recipe.source_path = os.path.abspath(path)
    imports_mod.confine(recipe.layers.values(), os.path.dirname(recipe.source_path))
    return recipe


def convert_dockerfile(path: str, output: str, options=None, warn: Printer | None = None):
    """The Dockerfile at `path` as a notebook (an nbformat node) or, when `output`
    ends in .yaml/.yml, as stacker.yaml text; COPY sources relative to `output`."""
    from stacker_kernel.recipe.notebook import recipe_from_notebook
    from stacker_kernel.recipe.stacker_yaml import dump

    context = os.path.relpath(os.path.dirname(os.path.abspath(path)),
                              os.path.dirname(os.path.abspath(output)))
    nb, name = _dockerfile_notebook(path, options, "" if context == "." else context, warn)
    if not output.endswith((".yaml", ".yml")):  # a stacker.yaml has no context: stacker's imports
        nb.setdefault("metadata", {}).setdefault("stacker", {})[imports_mod.CONTEXT_KEY] = context
        return nb
    try:
        return dump(recipe_from_notebook(nb, name))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from e


def read_notebook(path: str) -> dict:
    """The notebook at `path` as nbformat 4 JSON; RecipeError when it is missing or broken.

    A plain nbformat 4 file is read with json: nbformat and jsonschema take
    over a second to import, most of a cached build. Anything else goes
    through nbformat, which converts older versions and says what is wrong.
    """
    import json

    from stacker_kernel.recipe.notebook import is_plain_v4

    try:
        with open(path, "rb") as f:
            nb = json.load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path} does not exist") from None
    except (OSError, ValueError):
        nb = None
    if is_plain_v4(nb):
        return nb
    import nbformat

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
    return nb


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
          stream: Callable[[str], None] | None = None, cache: CacheSettings | None = None,
          on_failure: list[str] | None = None, dockerfile=None,
          layer_types: tuple[Any, ...] | None = None, attestations=None,
          replay_cached: bool = False, require_hash: bool = False,
          secrets: dict[str, tuple[str, str]] | None = None) -> BuildResult:
    """Build every layer of `path` in dependency order; print a line per layer and step.

    Step output goes to `stream` (default: stdout as it comes). `cache` names the
    shared caches steps are taken from and pushed to. The first
    failing step stops the build with a StepError naming the layer and step;
    its rootfs is kept as a "failed" snapshot that `chroot` opens (until gc or the
    next build of `path`). With `on_failure` (an argv, e.g. ["/bin/sh"]), that
    command first runs on this terminal in the failed step's container, as
    stacker's --on-run-failure. `dockerfile` holds a Dockerfile's build args and bases.
    `layer_types` (oci/layer_types.py) are the
    output layer types (default tar), as stacker's --layer-type. The images get an
    SBOM and provenance unless `attestations` (engine/attest.Attestations) turns them off.
    A cached step is one line, as stacker's `found cached layer NAME`; with
    `replay_cached` its stored output is shown again too. `require_hash` refuses
    an http(s) import without a hash before anything runs (stacker's --require-hash).
    `secrets` (id -> ("src", FILE) or ("env", VARIABLE)) are what secret mounts show.
    """
    recipes = load_recipes(path, substitutions, dockerfile, cache=store.root / "cache")
    if require_hash:
        from stacker_kernel.recipe.model import require_import_hashes

        for recipe in recipes:
            require_import_hashes(recipe)
    abspath = os.path.abspath(path)
    if stream is None:
        def stream(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
    # Not written to the store while every step comes from the cache (see _supersede).
    session = BuildSession.open(store, abspath, kind="build", resume=False, record=False,
                                default_layer=Path(path).stem, base_dir=os.path.dirname(abspath))
    # keep_failed: the failed step's rootfs stays, for the shell and chroot
    session.options = Options(keep_failed=True, use_cache=not no_cache, replay_cached=replay_cached)
    session.secrets = dict(secrets or {})
    _drop_failed_states(store, abspath, session.session.id)
    result = BuildResult(session)
    pushes_reported = False
    try:
        if cache is not None and cache.any:  # the registry client, only for a named cache
            from stacker_kernel.engine.remote_cache import RemoteCache

            session.remote_cache = RemoteCache.from_settings(cache)
            if session.remote_cache.target is not None:
                session.keep()  # the pushes read the steps' snapshots, cached ones too
        for recipe in recipes:
            base_dir = os.path.dirname(recipe.source_path or abspath)
            for name in recipe.dependency_order():
                layer = recipe.layers[name]
                out(f"building layer {name}")
                session.begin_layer(replace(layer, steps=[]), base_dir=base_dir)
                for i, step in enumerate(layer.steps, 1):
                    t0 = time.monotonic()
                    outcome = session.run_step(step.source, step.cell_id, on_output=stream,
                                               on_progress=lambda line: out(f"  {line.rstrip()}"))
                    took = time.monotonic() - t0
                    if not outcome.ok:
                        _fail(session, path, name, i, step, outcome.message, on_failure, out)
                    result.steps_cached += outcome.cached
                    result.steps_run += not outcome.cached
                    shown = first_line(step.source, skip_shebang=True)[:60]
                    mark = "cached" if outcome.cached else "ran"
                    # stacker's words for a cache hit, for scripts that grep a build's output
                    where = f"found cached layer {name}: step" if outcome.cached else f"{name} step"
                    out(f"  {where} {i}/{len(layer.steps)} {mark} in {took:.2f}s"
                        f" (snapshot {outcome.snapshot_id[:12]}): {shown}")
                if not layer.steps:
                    # A layer without run: its base is its content (prepared now so it can be built on).
                    session.prepare_empty_layer()
            session.finish()
        result.tags = dict(session.session.tags)
        if session.remote_cache is not None and oci_dir:
            session.remote_cache.wait_for_layers()  # the export takes the layers the pushes made
        if oci_dir:
            extra = {"attestations": attestations} if attestations is not None else {}
            result.oci_tags = session.export_oci(oci_dir, squash=squash,
                                                 annotations_namespace=annotations_namespace,
                                                 progress=lambda line: out(f"  {line}"),
                                                 **({"layer_types": layer_types} if layer_types else {}),
                                                 **extra)
            out(f"wrote {', '.join(result.oci_tags) or 'no tags'} to {oci_dir}")
        pushes_reported = _finish_pushes(session, out)  # the last uploads went on beside the export
        _supersede(store, session)
        return result
    finally:
        if not pushes_reported:  # a failed build still sends the steps it made
            _finish_pushes(session, out)
        session.close()


# How old the record of a build may be for a build that changes nothing to leave it as
# it is: its time is when the file was last built (gc --older-than counts from it).
RECORD_KEPT_FOR = 600.0


def _supersede(store: Store, session: BuildSession) -> None:
    """The build is the file's build from now on: older builds are forgotten (gc may
    reclaim what only they hold). A build that took every step from the cache and left
    the layout as it was (its session never recorded) writes nothing when the file's
    one build recorded exactly this, less than RECORD_KEPT_FOR ago: it stands for it."""
    olds = [old for old in store.find_sessions(name=session.session.name, kind="build")
            if old.id != session.session.id]
    if (not session.session.recorded and len(olds) == 1 and not store.session_alive(olds[0])
            and olds[0].same_position(session.session) and 0 <= time.time() - olds[0].updated < RECORD_KEPT_FOR):
        return
    session.keep()
    for old in olds:
        if not store.session_alive(old):
            store.forget_session(old.id)


def build_order(paths: list[str], substitutions: dict[str, str] | None = None,
                dockerfile=None) -> list[tuple[str, list[str]]]:
    """The files `paths` build, prerequisites first, each once, with its direct
    prerequisites (absolute paths): what stacker's --order-only shows."""
    order: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for path in paths:
        for recipe in load_recipes(path, substitutions, dockerfile):
            where = os.path.normpath(os.path.abspath(recipe.source_path or path))
            if os.path.realpath(where) in seen:
                continue
            seen.add(os.path.realpath(where))
            base = os.path.dirname(where)
            order.append((where, [os.path.normpath(os.path.join(base, p)) for p in recipe.prerequisites]))
    return order


def find_stacker_files(search_dir: str, pattern: str) -> list[str]:
    """The files under `search_dir` whose path matches regex `pattern`, sorted, as
    stacker's recursive-build finds them (paths joined as Go's filepath.Walk does,
    so the default pattern `/stacker.yaml$` skips a stacker.yaml in `search_dir` itself
    only when `search_dir` is '.')."""
    import re

    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"--stacker-file-pattern {pattern!r} is not a regular expression: {e}") from None
    if not os.path.isdir(search_dir):
        raise RecipeError(f"--search-dir {search_dir} is not a directory")
    found = []
    for top, dirs, files in os.walk(search_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.normpath(os.path.join(top, name))
            if regex.search(path):
                found.append(path)
    if not found:
        raise RecipeError(f"no file under {search_dir} matches {pattern}: give --search-dir or "
                          "--stacker-file-pattern")
    return found


def _finish_pushes(session: BuildSession, out: Printer) -> bool:
    """Wait for the steps still being pushed to --cache-to (they went on while the
    next steps ran) and say how many went; True once said."""
    remote = session.remote_cache
    if remote is not None and remote.target is not None:
        remote.finish(lambda line: out(line.rstrip()))
        remote.close()
        out(remote.summary())
    return True


def _fail(session: BuildSession, path: str, layer: str, index: int, step, message: str,
          on_failure: list[str] | None, out: Printer) -> NoReturn:
    """Keep the failed step's state, run `on_failure` in it, raise the build's StepError."""
    error = f"run commands failed for layer {layer} (step {index}): {message}"
    try:
        session.keep_failed_state(step.source, step.cell_id)
    except (OSError, StackerKernelError):
        raise StepError(error) from None  # e.g. a full disk: the failure itself is the news
    if on_failure:
        shown = on_failure[2] if on_failure[:2] == ["/bin/sh", "-c"] else " ".join(on_failure)
        out(f"{error}\n  running {shown} in the failed state of layer {layer} step {index} "
            "(imports and binds as in the build); the build ends when it exits")
        try:
            session.failure_shell(on_failure)
        except StackerKernelError as e:  # e.g. the container died: the step's failure is the news
            out(f"  {shown} could not run in the failed state: {e}")
    raise StepError(f"{error}: open its failed state with 'stacker-kernel chroot -f {path} {layer}'")


def _drop_failed_states(store: Store, abspath: str, keep_session: str) -> None:
    """A new build of a file replaces the failed states its earlier builds left."""
    for old in store.find_sessions(name=abspath, kind="build"):
        if old.id != keep_session and not store.session_alive(old):
            for snap in store.snapshots(session=old.id):
                if snap.status == "failed":
                    store.delete_snapshot(snap.id)


def failed_state(store: Store, path: str, layer: str | None) -> Snapshot | None:
    """The state a failed step of the last build of `path` left (in `layer`, if given), or None.

    Only while no step was committed after it: a kernel that went on after a kept
    failure (new steps) stands in a committed state again."""
    sess = latest_session(store, path)
    head = store.get(sess.history[-1]) if sess.history else None
    for snap in reversed(store.snapshots(session=sess.id)):
        if snap.status == "failed" and (layer is None or snap.layer == layer) and snap.path.is_dir():
            return None if head is not None and head.started > snap.started else snap
    return None


def _step_number(store: Store, failed: Snapshot) -> int:
    """Which step of its layer `failed` was (1-based): the layer's steps before it, plus one."""
    done = [s for s in store.chain(failed.parent) if s.kind == "step" and s.layer == failed.layer
            and not s.source.startswith("# stacker import ")] if failed.parent else []
    return len(done) + 1


def latest_session(store: Store, path: str):
    """The newest session (build or kernel) of a stacker.yaml or notebook path. A saved
    notebook's is found by its cells (engine/identity.py): a session of its name that ran
    none of them is another notebook's, and a renamed notebook's build is found under
    its old name."""
    from stacker_kernel.engine.identity import holds, notebook_cells, session_cells

    abspath = os.path.abspath(path)
    # Not a `chroot` (a throwaway session of the same name, open while its shell runs).
    sessions = [s for s in store.find_sessions(name=abspath) if s.kind != "chroot"]
    cells = set(notebook_cells(abspath) or ()) if abspath.endswith(".ipynb") else set()
    if cells:
        sessions = [s for s in sessions if not session_cells(store, s) or session_cells(store, s) & cells]
        if not sessions:
            sessions = [s for s in store.find_sessions() if s.kind != "chroot" and s.history
                        and session_cells(store, s) & cells and not holds(s.name, session_cells(store, s))]
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


def chroot(store: Store, path: str, layer: str | None, substitutions: dict[str, str] | None = None,
           note: Printer | None = None, command: str | None = None) -> int:
    """An interactive shell in a throwaway writable snapshot of a built layer, as
    `stacker chroot`: nothing done in it is kept. After a failed build, the layer
    that failed (the default layer then) opens in the failed step's state. The
    layer's imports are at /stacker/imports and its binds mounted, as in the
    build. `note` says what is opened (default: stderr). `command` runs instead of
    /bin/sh (stacker's `chroot [tag] [cmd]`; found on the PATH unless absolute).
    Returns the shell's status."""
    from stacker_kernel.engine.inspect import grab
    from stacker_kernel.engine.live import LiveRootfs
    from stacker_kernel.recipe.model import ImageSource

    note = note or (lambda line: print(line, file=sys.stderr))
    failed = failed_state(store, path, layer)
    snap = failed or layer_snapshot(store, path, layer)
    if failed is not None:
        note(f"layer {failed.layer}: the failed state of step {_step_number(store, failed)} "
             "(where the last build stopped); nothing done here is kept")
    definition, base_dir = _layer_definition(path, snap.layer, substitutions, note)
    definition = definition or Layer(name=snap.layer, from_=ImageSource(type="scratch"))
    sess = store.new_session("chroot", os.path.abspath(path))
    live = LiveRootfs(store, sess.id)
    try:
        live.replace(snap)
        try:
            live.stage_imports(definition, base_dir,
                               lambda name, p, dest: grab(layer_snapshot(store, path, name).path, p, dest))
        except (OSError, StackerKernelError) as e:
            note(f"the imports of layer {snap.layer} are not at /stacker/imports: {e}")
        container = live.ensure_container(definition, base_dir, "host")
        state = ShellState.of_snapshot(snap.state) if snap.kind == "step" else None
        argv = None
        if command:
            import shlex

            argv = [command] if command.startswith("/") else ["/bin/sh", "-c", f"exec {shlex.quote(command)}"]
        return container.interact(build_environment(definition), state, argv)
    finally:
        live.stop_container()
        store.forget_session(sess.id)
        live.drop_imports()


def _layer_definition(path: str, name: str, substitutions: dict[str, str] | None,
                      note: Printer) -> tuple[Layer | None, str]:
    """Layer `name` as `path` defines it now (for its imports, binds and build_env), and
    the directory its relative paths are based on; None when the file no longer has it."""
    base_dir = os.path.dirname(os.path.abspath(path))
    try:
        recipes = load_recipes(path, substitutions)
    except StackerKernelError as e:
        note(f"{path} cannot be read now ({e}): the shell has no imports or binds")
        return None, base_dir
    for recipe in recipes:
        if name in recipe.layers:
            return recipe.layers[name], os.path.dirname(recipe.source_path or os.path.abspath(path))
    return None, base_dir


def export_notebook(path: str, *, per_cell: bool = False, oci_dir: str | None = None,
                    open_store: Callable[[], Store] | None = None, progress: Printer | None = None,
                    layer_types: tuple[Any, ...] | None = None, attestations=None) -> str:
    """A notebook as stacker.yaml text; with `oci_dir`, also the images of its last
    session (what was actually built)."""
    from stacker_kernel.recipe.nbconvert import notebook_to_stacker_yaml

    nb = read_notebook(path)
    text = notebook_to_stacker_yaml(nb, Path(path).stem, per_cell=per_cell)
    if oci_dir and open_store is not None:
        from stacker_kernel.engine.export import export_stored_session

        from stacker_kernel.recipe.notebook import recipe_from_notebook

        with open_store() as store:
            sess = latest_session(store, path)
            # The layers as they were built (their record), else as the notebook says now.
            layers = (RecordedRecipe.of(store, sess).recipe.layers if sess.recipe not in ("", "[]")
                      else recipe_from_notebook(nb, Path(path).stem, {}).layers)
            extra = {"attestations": attestations} if attestations is not None else {}
            export_stored_session(store, sess, oci_dir, layers=layers,
                                  stacker_yaml=text, progress=progress,
                                  **({"layer_types": layer_types} if layer_types else {}), **extra)
    return text
