"""The recipe model: stacker's layer keys as typed records.

Pure data plus the checks stacker makes at parse time (stacker's
pkg/types/layer.go). Paths stay as the user wrote them; `Recipe.resolve` makes a local path
absolute against the declaring file, as stacker's `absolutify` does.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Iterable, Literal

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.script import join_steps

SourceType = Literal["scratch", "tar", "oci", "docker", "built"]
SOURCE_TYPES: tuple[str, ...] = ("docker", "tar", "oci", "built", "scratch")

_HASH_RE = re.compile(r"^[0-9a-fA-F]{64}$")
STACKER_URL = "stacker://"


@dataclass
class ImageSource:
    """A layer's `from`: the base it starts from.

    `url` is the reference for docker/oci/tar (`oci` is `LAYOUT:TAG`), `tag`
    names the layer for `built`; the other field is None.
    """
    type: SourceType
    url: str | None = None
    tag: str | None = None
    insecure: bool = False

    def stacker_host(self) -> str | None:
        """The layer this base is built from, if any (`built`, or a `tar` from `stacker://`)."""
        if self.type == "built":
            return self.tag
        if self.type == "tar" and self.url and self.url.startswith(STACKER_URL):
            return stacker_url_host(self.url)
        return None


@dataclass
class Import:
    """One `imports` (or legacy `import`) entry.

    `legacy` marks the deprecated `import:` key (files land at /stacker/);
    `mode`, `uid`, `gid` are None when unset; a trailing `/` on `path` or
    `dest` is significant and kept. `within` (set by the engine for a
    Dockerfile's COPY, never written to a recipe) is the build context: the
    path and its symlinks resolve inside it, as Docker's COPY. Ours, not stacker's: `uid`/`gid` may be
    names of the image's /etc/passwd and /etc/group (a Dockerfile's
    `COPY --chown=app:app`), and a named uid without gid means the gid of the
    same number (Docker's rule).
    """
    path: str
    hash: str | None = None
    dest: str | None = None
    mode: int | None = None
    uid: int | str | None = None
    gid: int | str | None = None
    legacy: bool = False
    within: str | None = field(default=None, compare=False)

    def is_simple(self) -> bool:
        """True when only `path` is set, so the plain string form expresses it."""
        return (self.hash, self.dest, self.mode, self.uid, self.gid) == (None,) * 5


@dataclass
class Bind:
    """A host path bind-mounted into the build container during `run`."""
    source: str
    dest: str


#: the first line of a step that runs as another user: a cell's `%user USER[:GROUP]`
#: (container/step.USER_MARKER, which the container reads, is the same text)
USER_MARKER = "#%user "
#: a first line of a step with a mount of its own: a cell's `%mount SPEC` (one line each)
MOUNT_MARKER = "#%mount "

_MOUNT_KEYS = {
    "cache": {"target", "id", "sharing", "mode", "uid", "gid", "ro", "readonly"},
    "bind": {"target", "source", "from", "rw", "readwrite", "ro", "readonly"},
    "secret": {"target", "id", "required", "mode", "uid", "gid"},
    "tmpfs": {"target", "size"},
}


def parse_mount(spec: str) -> dict[str, str]:
    """The options of a mount spec (a Dockerfile's `RUN --mount=...`): `type` (bind when
    absent, as Docker) and the others as written (`dst`/`destination` are `target`,
    `src` is `source`, a bare `ro`/`rw`/`required` is `=true`). Raises RecipeError."""
    out: dict[str, str] = {}
    for part in filter(None, spec.split(",")):
        key, eq, value = part.partition("=")
        key = {"dst": "target", "destination": "target", "src": "source"}.get(key.strip(), key.strip())
        out[key] = value.strip() if eq else "true"
    kind = out.setdefault("type", "bind")
    if kind not in _MOUNT_KEYS:
        raise RecipeError(f"mount type {kind} is not one of {', '.join(_MOUNT_KEYS)}")
    unknown = sorted(set(out) - _MOUNT_KEYS[kind] - {"type"})
    if unknown:
        raise RecipeError(f"a {kind} mount takes no {', '.join(unknown)}")
    if kind == "secret":
        if not out.get("id") and not out.get("target"):
            raise RecipeError("a secret mount needs id=ID")
        out.setdefault("id", (out.get("target") or "").rsplit("/", 1)[-1])
        out.setdefault("target", "/run/secrets/" + out["id"])
    if "target" not in out:
        raise RecipeError(f"a {kind} mount needs target=PATH")
    if "target" in out and not out["target"].startswith("/"):
        raise RecipeError(f"mount target {out['target']} is not absolute")
    for key in ("mode",):
        if key in out and not re.fullmatch(r"[0-7]{1,4}", out[key]):
            raise RecipeError(f"mount mode={out[key]} is not an octal mode")
    for key in ("uid", "gid"):
        if key in out and not out[key].isdigit():
            raise RecipeError(f"mount {key}={out[key]} is not a number")
    return out


@dataclass
class Step:
    """One build step: a script run in the layer's container.

    From a stacker.yaml a layer has one step (its whole `run`); from a
    notebook, one step per code cell, carrying the nbformat cell id. A step
    run as another user starts with the line USER_MARKER + USER.
    """
    source: str
    cell_id: str | None = None

    @property
    def user(self) -> str | None:
        if not self.source.startswith(USER_MARKER):
            return None
        return self.source.split("\n", 1)[0][len(USER_MARKER):].strip() or None


@dataclass(eq=False)
class Layer:
    """One stacker layer with every key of stacker's `Layer` struct.

    Equality compares what a stacker.yaml expresses: the steps through their
    concatenated `run` script (so one step or the same text split into cells
    compare equal), and never the warnings.
    """
    name: str
    from_: ImageSource
    steps: list[Step] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)
    build_env: dict[str, str] = field(default_factory=dict)
    build_env_passthrough: list[str] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    generate_labels: str | None = None
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    full_command: list[str] | None = None
    working_dir: str | None = None
    volumes: list[str] = field(default_factory=list)
    runtime_user: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    os: str | None = None
    arch: str | None = None
    build_only: bool = False
    binds: list[Bind] = field(default_factory=list)
    overlay_dirs: list[dict[str, str]] = field(default_factory=list)
    # ours, not stacker's: a .dockerignore whose rules filter the imports from its directory
    dockerignore: str | None = None
    warnings: list[str] = field(default_factory=list)

    def run_script(self) -> str:
        """The layer's steps as one `run` script (see `join_steps`)."""
        return join_steps([s.source for s in self.steps])

    def uses_legacy_import(self) -> bool:
        """True when the imports came from the deprecated `import:` key."""
        return any(i.legacy for i in self.imports)

    def dependencies(self) -> list[str]:
        """Layer names this layer needs built first, in order of mention.

        As stacker's DependencyOrder: a `built` base, a `tar` base from
        `stacker://`, and the host of every `stacker://` import.
        """
        deps: list[str] = []
        host = self.from_.stacker_host()
        if host:
            deps.append(host)
        for imp in self.imports:
            if imp.path.startswith(STACKER_URL):
                deps.append(stacker_url_host(imp.path))
        return list(dict.fromkeys(deps))

    def _key(self) -> tuple:
        values = tuple(getattr(self, f.name) for f in fields(self)
                       if f.name not in ("steps", "warnings"))
        return values + (self.run_script(),)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layer):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable record


@dataclass
class Recipe:
    """A stacker.yaml: layers in file order plus `config: prerequisites`.

    `source_path` (the file it was read from, if any) is not part of equality.
    """
    layers: dict[str, Layer] = field(default_factory=dict)
    prerequisites: list[str] = field(default_factory=list)
    source_path: str | None = field(default=None, compare=False)

    def external_built(self) -> list[str]:
        """Layer names this recipe depends on but does not define.

        They are `built` bases, `stacker://` tar bases and `stacker://` import
        hosts; the engine must find them among the prerequisites' layers.
        """
        missing: list[str] = []
        for layer in self.layers.values():
            missing += [d for d in layer.dependencies() if d not in self.layers]
        return list(dict.fromkeys(missing))

    def dependency_order(self, provided: Iterable[str] | None = None) -> list[str]:
        """Layer names in build order, as stacker's DependencyOrder computes it.

        Up to len(layers) passes over file order, emitting each layer whose
        dependencies are done, so file order is kept where it can be.
        `provided` names layers defined elsewhere (prerequisites); when it is
        None, external names are accepted only if this recipe has
        prerequisites that may define them. Raises RecipeError naming every
        layer whose dependencies cannot be found.
        """
        if provided is None:
            done = set(self.external_built()) if self.prerequisites else set()
        else:
            done = set(provided)
        order: list[str] = []
        for _ in range(len(self.layers)):
            for name, layer in self.layers.items():
                if name not in order and all(d in done for d in layer.dependencies()):
                    order.append(name)
                    done.add(name)
        if len(order) == len(self.layers):
            return order
        problems = []
        for name, layer in self.layers.items():
            if name in order:
                continue
            missing = [d for d in layer.dependencies() if d not in done]
            problems.append(f"couldn't find dependencies for {name}: "
                            + ", ".join(_describe_dep(layer, d) for d in missing))
        raise RecipeError(
            "couldn't resolve some dependencies (" + "; ".join(problems) + "): define the "
            "missing layers, list the file defining them under 'config: prerequisites', "
            "or break the cycle")

    def resolve(self, path: str) -> str:
        """`path` made absolute against the declaring file's directory.

        URLs (`scheme://`) and absolute paths are returned unchanged; a
        trailing `/` is kept. Without a source path, relative paths are
        resolved against the current directory, as stacker does for URLs.
        """
        if "://" in path or os.path.isabs(path):
            return path
        base = os.path.dirname(os.path.abspath(self.source_path)) if self.source_path \
            else os.getcwd()
        joined = os.path.normpath(os.path.join(base, path))
        return joined + "/" if path.endswith("/") and not joined.endswith("/") else joined


def _describe_dep(layer: Layer, dep: str) -> str:
    if layer.from_.type == "built" and layer.from_.tag == dep:
        return f"base layer {dep}"
    urls = [i.path for i in layer.imports if i.path.startswith(STACKER_URL)
            and stacker_url_host(i.path) == dep]
    if layer.from_.url and layer.from_.url.startswith(STACKER_URL) \
            and stacker_url_host(layer.from_.url) == dep:
        urls.insert(0, layer.from_.url)
    return ", ".join(urls) or dep


def stacker_url_host(url: str) -> str:
    """The layer name of a `stacker://LAYER/path` URL."""
    return url[len(STACKER_URL):].split("/", 1)[0]


# A layer name becomes the image's `org.opencontainers.image.ref.name` and a path
# component of `stacker://LAYER/...` and of publish destinations: one component
# of the OCI ref grammar (image-spec annotations.md), without ':' (stacker
# forbids it) and without '/' (a name, not a path).
_LAYER_NAME_RE = re.compile(r"[A-Za-z0-9]+(?:(?:[-._@+]|--)[A-Za-z0-9]+)*")


_PLACEHOLDER_DEFAULT = re.compile(r"\$\{\{([^}:]+):([^}]*)\}\}")
_PLACEHOLDER_PLAIN = re.compile(r"\$\{\{([^}:]+)\}\}")


def as_substituted(text: str) -> str:
    """`text` as stacker's substitution would make it, for checking a value that
    keeps its placeholders (import, export): `${{NAME:default}}` is its default,
    `${{NAME}}` (its value comes later) a plain word."""
    return _PLACEHOLDER_PLAIN.sub("x", _PLACEHOLDER_DEFAULT.sub(lambda m: m.group(2), text))


def check_layer_name(name: str, where: str = "") -> None:
    """Raise RecipeError unless `name` is a usable layer name: one OCI ref-name
    component without ':' (letters and digits joined by single `.`, `_`, `-`,
    `@`, `+` or `--`), not 'config'. `where` (e.g. " (line 3)") goes after the name.
    A name with placeholders ("${{REPO_NAME:zot}}") is checked as it will be built."""
    if "${{" in name:
        resolved = as_substituted(name)
        if resolved != name:
            try:
                check_layer_name(resolved, where)
            except RecipeError as e:
                raise RecipeError(f"layer {name} is {resolved!r} once substituted: {e}") from None
            return
    if not name:
        raise RecipeError(f"empty layer name{where}: give the layer a name")
    if ":" in name:
        raise RecipeError(
            f"using ':' in the layer name ({name}){where} is forbidden due to overlay "
            "constraints: rename the layer")
    if name == "config":
        raise RecipeError(f"'config' is reserved{where}: give the layer another name")
    if not _LAYER_NAME_RE.fullmatch(name):
        raise RecipeError(
            f"layer name {name!r}{where} cannot be an image tag: use letters and digits, "
            "joined by single '.', '_', '-', '@' or '+' (no spaces or '/', no separator first "
            "or last), e.g. my-layer")


def require_import_hashes(recipe: "Recipe") -> None:
    """stacker's --require-hash: every http(s) import names its hash (local files
    and stacker:// imports need none). RecipeError naming the layer and import."""
    for layer in recipe.layers.values():
        for imp in layer.imports:
            if imp.path.lower().startswith(("http://", "https://")) and not imp.hash:
                raise RecipeError(f"layer {layer.name}: remote import needs a hash in yaml for path: "
                                  f"{imp.path} (--require-hash): add 'hash: <sha256>' to the import")


_ID_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")


def check_import(imp: Import, layer: str) -> None:
    """Raise RecipeError if an import breaks stacker's rules (absolute dest, ids, hash)."""
    if not imp.path:
        raise RecipeError(f"layer {layer}: an import has an empty path: give its 'path'")
    if imp.dest is not None and not imp.dest.startswith("/"):
        raise RecipeError(f"layer {layer}: import {imp.path}: 'dest' path cannot be relative "
                          f"({imp.dest}): make it absolute, e.g. /{imp.dest}")
    # `..` would climb out of the rootfs (into other sessions' rootfs beside it) or out of
    # the layer a stacker:// path names; a local path may climb (it is the host's), but
    # must end in a name: the import is staged under it.
    if imp.dest is not None and ".." in imp.dest.split("/"):
        raise RecipeError(f"layer {layer}: import {imp.path}: 'dest' {imp.dest} has a '..': "
                          "write the destination in the rootfs without '..'")
    if imp.path.startswith("stacker://") and ".." in imp.path[len("stacker://"):].split("/"):
        raise RecipeError(f"layer {layer}: import {imp.path} has a '..': name the path in the "
                          "layer without '..'")
    if imp.path.rstrip("/").rpartition("/")[2] in ("", ".."):
        raise RecipeError(f"layer {layer}: import {imp.path} does not end in a name: name the "
                          "file or directory itself (a trailing '/' imports its contents)")
    for key in ("uid", "gid"):
        value = getattr(imp, key)
        if isinstance(value, str) and not _ID_NAME_RE.fullmatch(value):
            raise RecipeError(f"layer {layer}: import {imp.path}: {key} {value!r} is neither a "
                              "number nor a user or group name")
        if isinstance(value, int) and value < 0:
            raise RecipeError(f"layer {layer}: import {imp.path}: {key} must be >= 0, "
                              f"not {value}")
    if imp.mode is not None and not 0 <= imp.mode <= 0o7777:
        raise RecipeError(f"layer {layer}: import {imp.path}: mode {oct(imp.mode)} is not a "
                          "file mode: use an octal mode such as 0644")
    if imp.hash is not None and not _HASH_RE.match(imp.hash):
        raise RecipeError(f"layer {layer}: import {imp.path}: hash {imp.hash!r} is not a "
                          "sha256 hex digest: use the output of sha256sum")


def check_imports_kinds(imports: list[Import], layer: str) -> None:
    """Raise RecipeError when `import` and `imports` are mixed in one layer."""
    if len({i.legacy for i in imports}) > 1:
        raise RecipeError(f"layer {layer}: 'import' and 'imports' cannot be used together: "
                          "move every entry to 'imports'")


def check_source(src: ImageSource, layer: str) -> None:
    """Raise RecipeError when a `from` lacks what its type needs."""
    if src.type not in SOURCE_TYPES:
        raise RecipeError(f"layer {layer}: unknown from type {src.type!r}: use one of "
                          + ", ".join(SOURCE_TYPES))
    if src.type == "built" and not src.tag:
        raise RecipeError(f"layer {layer}: from tag cannot be empty for image type 'built': "
                          "set 'tag' to the name of the layer to build on")
    if src.type in ("docker", "oci", "tar") and not src.url:
        raise RecipeError(f"layer {layer}: from type {src.type!r} needs a 'url'")
    if src.type == "oci" and src.url and ":" not in src.url and "$" not in src.url:
        raise RecipeError(f"layer {layer}: oci url {src.url!r} has no tag: write "
                          "LAYOUT_DIR:TAG, e.g. ./oci:busybox")


def human_size(n: int | None, signed: bool = False) -> str:
    """`n` bytes as e.g. "12.3 MiB" (with a sign when `signed`); "" for None."""
    if n is None:
        return ""
    sign = ("+" if n >= 0 else "-") if signed else ("-" if n < 0 else "")
    v = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{sign}{v:.0f} {unit}" if unit == "B" else f"{sign}{v:.1f} {unit}"
        v /= 1024
    return ""


def first_line(script: str, *, skip_shebang: bool = False, width: int | None = None,
               empty: str = "") -> str:
    """The first non-blank line of a step's script, stripped, for one-line listings.

    `skip_shebang` passes over `#!` lines (unless there is nothing else);
    `width` cuts a longer line with "…"; `empty` is what a blank script gives.
    """
    lines = [ln.strip() for ln in script.splitlines() if ln.strip()]
    if skip_shebang:
        lines = [ln for ln in lines if not ln.startswith("#!")] or lines
    line = lines[0] if lines else empty
    return line if width is None or len(line) <= width else line[:width - 1] + "…"


def layer_record(layer: Layer) -> dict:
    """`layer`'s definition without its steps, as plain JSON data (what a session
    records so that its recipe outlives the process that built it)."""
    record = {f.name: getattr(layer, f.name) for f in fields(layer) if f.name not in ("steps", "warnings")}
    record["from_"] = vars(layer.from_).copy()
    record["imports"] = [vars(i).copy() for i in layer.imports]
    record["binds"] = [vars(b).copy() for b in layer.binds]
    return record


def layer_from_record(record: dict) -> Layer:
    """The Layer (without steps) `layer_record` made `record` from."""
    known = {f.name for f in fields(Layer)} - {"steps", "warnings"}
    values = {k: v for k, v in record.items() if k in known}
    values["from_"] = ImageSource(**record["from_"])
    values["imports"] = [Import(**i) for i in record.get("imports", [])]
    values["binds"] = [Bind(**b) for b in record.get("binds", [])]
    return Layer(**values)
