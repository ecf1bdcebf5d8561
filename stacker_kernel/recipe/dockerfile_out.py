"""Recipe -> Dockerfile: `%export dockerfile`, `export --to dockerfile`, `nbconvert --to dockerfile`.

Each layer is one stage named after it (build_only layers are intermediate
stages; the last image layer is the last stage, others build with `--target`).
The Dockerfile builds with `buildah bud` (or docker) into the image the
notebook exports, because each instruction keeps the kernel's step semantics
(docs/architecture.md §1):

- a layer's cells, joined as one `run:` script (the shell state carries between
  cells exactly as between its lines), are ONE exec-form RUN that runs
  `/bin/sh -ec SCRIPT` from `/`, with stdin /dev/null and only the build
  environment (PATH, HOME, STACKER_LAYER_NAME, build_env), as a step runs here:
  neither the base image's ENV nor its WORKDIR reach the step;
- the image config (ENV, LABEL, ENTRYPOINT, CMD, WORKDIR, VOLUME, USER) comes
  after the RUN, since here it describes the image and never the build;
  ENTRYPOINT and CMD are always written, since a layer never inherits them;
- imports with a `dest` are COPY before the RUN: local paths from the build
  context (the notebook's folder), `stacker://LAYER/PATH` from that stage.

What a Dockerfile cannot say is refused, one line naming the layer: imports
without `dest` (they exist only while the layer runs), URL imports, binds,
overlay_dirs, generate_labels, manifest annotations, os/arch, cells starting
with `#!` (their own interpreter: no shell state to carry), `tar` bases that
are not a local file. Known difference: a RUN runs as the base image's USER
when it names one (a step here runs as root); stacker-built stages are
switched back to root for their RUN.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import STACKER_URL, Layer, Recipe, stacker_url_host

#: the PATH a step runs with (engine/live.py's BUILD_PATH; recipe/ may not import the engine)
BUILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONFIG_ANNOTATION = "io.stacker-kernel.config."
_STAGE_RE = re.compile(r"^[a-z][a-z0-9._-]*$")
# cd / and a clean environment: what the kernel gives a step, whatever the base's config
_LAUNCH = 'cd / && exec env -i "$@" </dev/null'


def _stage(name: str) -> str:
    stage = name.lower()
    if not _STAGE_RE.match(stage):
        raise RecipeError(f"layer {name}: a Dockerfile stage name must be letters, digits, "
                          "'.', '_' or '-' starting with a letter; rename the layer to export it")
    return stage


def _word(value: str) -> str:
    """`value` as one double-quoted Dockerfile word, safe from variable substitution."""
    if "\n" in value:
        raise ValueError("a Dockerfile value cannot hold a newline")
    return '"' + re.sub(r'(["\\$])', r"\\\1", value) + '"'


def _json(argv: list[str]) -> str:
    return json.dumps([str(a) for a in argv])


def _from(layer: Layer, stages: dict[str, str]) -> list[str]:
    src = layer.from_
    if src.type == "scratch":
        return ["FROM scratch"]
    if src.type == "built":
        if src.tag not in stages:
            raise RecipeError(f"layer {layer.name}: its base, layer {src.tag}, is not defined "
                              "in this notebook (a prerequisite): a Dockerfile cannot name it")
        return [f"FROM {stages[src.tag]}"]
    url = src.url or ""
    if src.type == "docker":
        ref = url[len("docker://"):] if url.startswith("docker://") else url
        return [f"FROM {ref}"]
    if src.type == "oci":
        return [f"FROM oci:{url}"]  # buildah's transport syntax, as `buildah from oci:DIR:TAG`
    if src.type == "tar":
        if "://" in url or url.startswith("/"):
            raise RecipeError(f"layer {layer.name}: tar base {url} is not a file of the build "
                              "context (the notebook's folder): a Dockerfile ADDs only those")
        return ["FROM scratch", f"ADD {_json([url, '/'])}"]  # ADD unpacks a local tar
    raise RecipeError(f"layer {layer.name}: base type {src.type} has no Dockerfile form")


def _copies(layer: Layer, stages: dict[str, str]) -> list[str]:
    out = []
    for imp in layer.imports:
        if imp.dest is None:
            raise RecipeError(f"layer {layer.name}: import {imp.path} has no dest: it exists only "
                              "while the layer runs, which a Dockerfile cannot say; give it a dest")
        flags = []
        path = imp.path
        if path.startswith(STACKER_URL):
            host = stacker_url_host(path)
            if host not in stages:
                raise RecipeError(f"layer {layer.name}: import {path} names layer {host}, "
                                  "not defined in this notebook")
            flags.append(f"--from={stages[host]}")
            path = path[len(STACKER_URL) + len(host):].rstrip("/") or "/"
        elif "://" in path or path.startswith("/"):
            raise RecipeError(f"layer {layer.name}: import {path} is not a file of the build "
                              "context (the notebook's folder): a Dockerfile COPYs only those")
        if imp.uid is not None or imp.gid is not None:
            flags.append(f"--chown={imp.uid or 0}:{imp.gid if imp.gid is not None else imp.uid or 0}")
        if imp.mode is not None:
            flags.append(f"--chmod={imp.mode:o}")
        out.append(" ".join(["COPY", *flags, _json([path, imp.dest])]))
    return out


def _run(layer: Layer, env: dict[str, str]) -> list[str]:
    sources = [s.source for s in layer.steps if s.source.strip()]
    if not sources:
        return []
    for index, source in enumerate(sources, start=1):
        if source.startswith("#!"):
            raise RecipeError(f"layer {layer.name}: step {index} starts with #! (its own "
                              "interpreter), which one shell RUN cannot carry state through")
    env_words = [f"{k}={v}" for k, v in env.items()]
    return [f"RUN {_json(['/bin/sh', '-c', _LAUNCH, 'sh', *env_words, '/bin/sh', '-ec', layer.run_script()])}"]


def _config(layer: Layer) -> list[str]:
    out = []
    if layer.environment:
        out.append("ENV " + " ".join(f"{k}={_word(str(v))}" for k, v in layer.environment.items()))
    if layer.labels:
        out.append("LABEL " + " ".join(f"{_word(k)}={_word(str(v))}" for k, v in layer.labels.items()))
    if layer.full_command is not None:
        entrypoint, cmd = _argv(layer.full_command), []
    else:
        entrypoint, cmd = _argv(layer.entrypoint), _argv(layer.cmd)
    out += [f"ENTRYPOINT {_json(entrypoint)}", f"CMD {_json(cmd)}"]
    if layer.working_dir:
        out.append(f"WORKDIR {_word(layer.working_dir)}")
    if layer.volumes:
        out.append(f"VOLUME {_json(layer.volumes)}")
    annotations = dict(layer.annotations)
    ports = annotations.pop(CONFIG_ANNOTATION + "ExposedPorts", None)
    if ports:
        out.append("EXPOSE " + " ".join(ports.split()))
    signal = annotations.pop(CONFIG_ANNOTATION + "StopSignal", None)
    if signal:
        out.append(f"STOPSIGNAL {signal}")
    if annotations:
        raise RecipeError(f"layer {layer.name}: annotation {sorted(annotations)[0]} has no "
                          "Dockerfile form (a Dockerfile sets no manifest annotations)")
    if layer.runtime_user:
        out.append(f"USER {layer.runtime_user}")
    return out


def _argv(value: Any) -> list[str]:
    import shlex
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _refuse_inexpressible(layer: Layer) -> None:
    for key, what in (("binds", "binds (host folders mounted while it runs)"),
                      ("overlay_dirs", "overlay_dirs"), ("generate_labels", "generate_labels"),
                      ("os", "os"), ("arch", "arch")):
        if getattr(layer, key):
            raise RecipeError(f"layer {layer.name}: {what} has no Dockerfile form; "
                              "export to stacker.yaml or OCI instead")


def _runs_as(layer: Layer, recipe: Recipe) -> str | None:
    """The USER a stacker-built base leaves set (None: unknown or not set)."""
    seen = set()
    while layer.from_.type == "built" and layer.from_.tag in recipe.layers and layer.name not in seen:
        seen.add(layer.name)
        layer = recipe.layers[layer.from_.tag]
        if layer.runtime_user:
            return layer.runtime_user
    return None


def recipe_to_dockerfile(recipe: Recipe) -> str:
    """The Dockerfile text of `recipe`: one stage per layer in build order."""
    order = recipe.dependency_order(provided=[])
    stages: dict[str, str] = {}
    for name in order:
        stage = _stage(name)
        if stage in stages.values():
            raise RecipeError(f"layer {name}: its stage name {stage} is taken by another layer "
                              "(Dockerfile stage names ignore case); rename one of them")
        stages[name] = stage
    images = [n for n in order if not recipe.layers[n].build_only]
    lines = ["# Written by stacker-kernel from a notebook; the build context is the notebook's folder."]
    if len(images) > 1:
        lines.append(f"# Images: {', '.join(stages[n] for n in images)}; "
                     "build one with `buildah bud --target NAME`.")
    for name in order:
        layer = recipe.layers[name]
        _refuse_inexpressible(layer)
        lines.append("")
        if layer.build_only:
            lines.append(f"# layer {name}: build_only (an intermediate stage)")
        first, *rest = _from(layer, stages)
        lines.append(f"{first} AS {stages[name]}")
        lines += rest
        lines += _copies(layer, stages)
        env = {"PATH": BUILD_PATH, "HOME": "/root",
               **{k: str(v) for k, v in layer.build_env.items() if str(v) != ""},
               "STACKER_LAYER_NAME": name}
        run = _run(layer, env)
        user = _runs_as(layer, recipe) if run else None
        if user:
            lines.append("USER root")
        lines += run
        if user and not layer.runtime_user:
            lines.append(f"USER {user}")
        try:
            lines += _config(layer)
        except ValueError as e:
            raise RecipeError(f"layer {name}: {e}") from None
    return "\n".join(lines) + "\n"


def notebook_to_dockerfile(nb: Mapping[str, Any], name: str) -> str:
    """The Dockerfile of a notebook named `name` (its file stem); placeholders take their defaults."""
    from stacker_kernel.recipe.notebook import recipe_from_notebook
    return recipe_to_dockerfile(recipe_from_notebook(nb, name, substitutions={}))
