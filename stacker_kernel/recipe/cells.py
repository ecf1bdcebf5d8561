"""Cell text <-> (directives, script): the magic syntax of a stacker notebook.

A cell starts with magic lines (`%layer NAME`, `%from oci ./oci:busybox`, ...),
one per line, with blank and `#` comment lines allowed among them; the first
other line starts the shell script. Recipe magics mirror stacker's layer keys;
interactive magics (`%rollback`, `%grab`, ...) drive the kernel and never reach
the recipe. Splitting a `run` script into cells and joining them back is
recipe/script.py's.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from dataclasses import dataclass
from typing import Any, Callable

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import (
    MOUNT_MARKER, SOURCE_TYPES, USER_MARKER, Bind, ImageSource, Import, Layer, check_import, check_imports_kinds,
    check_layer_name, check_source, parse_mount,
)

from stacker_kernel.recipe.script import (  # noqa: F401 (split_script, join_steps: part of this module's interface)
    CELL_MARKER, _top_level, join_steps, split_script,
)


def _close_matches(word: str, names, n: int) -> list[str]:
    """difflib's close matches (for "did you mean"), loaded only for a mistake."""
    import difflib

    return difflib.get_close_matches(word, names, n)


# --- magic records ------------------------------------------------------------


@dataclass
class GrabArgs:
    """`%grab PATH [DEST]`: copy PATH out of the container to DEST (default: its basename)."""
    path: str
    dest: str | None = None


@dataclass
class BrowseArgs:
    """`%browse [LAYER|N] [PATH]`: `target` is a layer name, a snapshot number or None (live)."""
    target: str | int | None = None
    path: str | None = None


@dataclass
class ExportArgs:
    """`%export [stacker.yaml|oci|dockerfile] [ARGS]`: the format and the remaining arguments.

    For oci, stacker's `--layer-type TYPE` (repeatable) and `--no-verity` are
    taken out of ARGS into `layer_types` (None: tar) and `no_verity`, and
    `--compression gzip|zstd` (of tar layers) into `compression`.
    """
    format: str = "stacker.yaml"
    args: list[str] | None = None
    layer_types: list[str] | None = None
    no_verity: bool = False
    compression: str = "gzip"


@dataclass
class CacheSource:
    """`%cache to URL` / `%cache from URL...`: the shared cache of the session
    (`none` as the only URL: no shared cache that way)."""
    direction: str  # "to" | "from"
    urls: list[str]


@dataclass
class Directive:
    """One parsed magic line.

    `args` is typed per magic (see `MagicSpec.args`): ImageSource for %from,
    list[Import] for %import, dict[str, str] for K=V magics, list[str] for
    commands and lists, Bind for %binds, dict for %overlay_dirs, str for
    single values, bool for on/off, None for flags, and the *Args records for
    %grab, %browse, %export.
    """
    name: str
    args: Any
    line: int
    text: str

    @property
    def interactive(self) -> bool:
        """True for magics that drive the kernel rather than the recipe."""
        return MAGICS[self.name].interactive


@dataclass
class Cell:
    """A code cell split into its magic lines and its shell script."""
    directives: list[Directive]
    script: str

    def recipe_directives(self) -> list[Directive]:
        """The directives that change the recipe (not the interactive ones)."""
        return [d for d in self.directives if not d.interactive]


@dataclass(frozen=True)
class MagicSpec:
    """What %help and completion know about a magic."""
    name: str
    usage: str
    help: str
    interactive: bool
    args: str
    choices: tuple[str, ...] = ()


class _Bad(Exception):
    """An argument problem; parse_cell turns it into a RecipeError with line and usage."""


def _tokens(rest: str) -> list[str]:
    try:
        return shlex.split(rest)
    except ValueError as e:
        raise _Bad(f"cannot split the arguments ({e})") from None


def _count(tokens: list[str], lo: int, hi: int) -> list[str]:
    if not lo <= len(tokens) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}" if hi < 99 else f"at least {lo}"
        raise _Bad(f"expected {want} argument{'s' if hi != 1 else ''}, got {len(tokens)}")
    return tokens


def _int(text: str, what: str, base: int = 10) -> int:
    try:
        return int(text, base)
    except ValueError:
        raise _Bad(f"{what} {text!r} is not a number") from None


def _options(tokens: list[str], names: dict[str, bool]) -> tuple[list[str], dict[str, str]]:
    """Split `--opt VALUE`, `--opt=VALUE` and `--flag` from positional tokens."""
    pos: list[str] = []
    opts: dict[str, str] = {}
    it = iter(tokens)
    for tok in it:
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            if key not in names:
                close = _close_matches(key, names, 1)
                hint = f" (did you mean --{close[0]}?)" if close else ""
                raise _Bad(f"unknown option --{key}{hint}")
            if names[key]:
                if not eq:
                    value = next(it, None)
                    if value is None:
                        raise _Bad(f"--{key} needs a value")
            elif eq:
                raise _Bad(f"--{key} takes no value")
            opts[key] = value
        else:
            pos.append(tok)
    return pos, opts


def _pairs(rest: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for tok in _count(_tokens(rest), 1, 999):
        key, eq, value = tok.partition("=")
        if not eq or not key:
            raise _Bad(f"{tok!r} is not KEY=VALUE")
        out[key] = value
    return out


def _arrow(rest: str) -> tuple[str, str | None]:
    toks = _tokens(rest)
    if len(toks) == 1:
        return toks[0], None
    if len(toks) == 3 and toks[1] == "->":
        return toks[0], toks[2]
    raise _Bad("expected SOURCE or SOURCE -> DEST")


def _command(rest: str) -> list[str]:
    if rest.lstrip().startswith("["):
        try:
            value = json.loads(rest)
        except json.JSONDecodeError as e:
            raise _Bad(f"invalid JSON list ({e.msg})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Bad("the JSON form must be a list of strings")
        return value
    return _count(_tokens(rest), 1, 999)


def _parse_from(rest: str) -> ImageSource:
    toks = _tokens(rest)
    if not toks:
        raise _Bad("expected a base type")
    kind, toks = toks[0], toks[1:]
    if kind not in SOURCE_TYPES:
        close = _close_matches(kind, SOURCE_TYPES, 1)
        raise _Bad(f"unknown base type {kind!r}"
                   + (f" (did you mean {close[0]}?)" if close else "")
                   + f"; types are {', '.join(SOURCE_TYPES)}")
    pos, opts = _options(toks, {"insecure": False})
    if kind == "scratch":
        _count(pos, 0, 0)
        src = ImageSource("scratch", insecure="insecure" in opts)
    elif kind == "built":
        src = ImageSource("built", tag=_count(pos, 1, 1)[0], insecure="insecure" in opts)
    else:
        src = ImageSource(kind, url=_count(pos, 1, 1)[0], insecure="insecure" in opts)  # type: ignore[arg-type]
    try:
        check_source(src, "")
    except RecipeError as e:
        raise _Bad(str(e).removeprefix("layer : ")) from None
    return src


def _mount(rest: str) -> str:
    spec = rest.strip()
    try:
        parse_mount(spec)
    except RecipeError as e:
        raise _Bad(str(e)) from None
    return spec


def _id(text: str, what: str) -> int | str:
    """A uid or gid: a number, or a name the image's /etc/passwd or /etc/group gives."""
    return text if re.match(r"[A-Za-z_]", text) else _int(text, what)


def _parse_import(rest: str) -> list[Import]:
    pos, opts = _options(_tokens(rest), {"dest": True, "mode": True, "uid": True,
                                          "gid": True, "hash": True, "legacy": False})
    _count(pos, 1, 1 if set(opts) - {"legacy"} else 999)
    out = []
    for path in pos:
        imp = Import(path, hash=opts.get("hash"), dest=opts.get("dest"),
                     mode=_int(opts["mode"], "mode", 8) if "mode" in opts else None,
                     uid=_id(opts["uid"], "uid") if "uid" in opts else None,
                     gid=_id(opts["gid"], "gid") if "gid" in opts else None,
                     legacy="legacy" in opts)
        try:
            check_import(imp, "")
        except RecipeError as e:
            raise _Bad(str(e).removeprefix("layer : ")) from None
        out.append(imp)
    return out


def _on_off(rest: str) -> bool:
    value = _count(_tokens(rest), 1, 1)[0]
    if value not in ("on", "off"):
        raise _Bad(f"expected on or off, not {value!r}")
    return value == "on"


def _cache(rest: str) -> bool | CacheSource:
    toks = _tokens(rest)
    if toks and toks[0] in ("to", "from"):
        urls = _count(toks[1:], 1, 1 if toks[0] == "to" else 99)
        if urls != ["none"] and not all(u.startswith(("docker://", "oci:")) for u in urls):
            raise _Bad("expected docker://HOST[:PORT]/REPO or oci:DIR")
        return CacheSource(toks[0], [] if urls == ["none"] else urls)
    return _on_off(rest)


def _number_or_word(text: str) -> int | str:
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def _parse_browse(rest: str) -> BrowseArgs:
    toks = _count(_tokens(rest), 0, 2)
    if len(toks) == 2:
        return BrowseArgs(_number_or_word(toks[0]), toks[1])
    if len(toks) == 1:
        if toks[0].startswith("/"):
            return BrowseArgs(None, toks[0])
        return BrowseArgs(_number_or_word(toks[0]), None)
    return BrowseArgs()


def _parse_export(rest: str) -> ExportArgs:
    toks = _tokens(rest)
    if not toks:
        return ExportArgs("stacker.yaml", [])
    first = toks[0]
    if first in ("stacker.yaml", "yaml", "stacker"):
        return ExportArgs("stacker.yaml", toks[1:])
    if first == "oci":
        return _parse_export_oci(toks[1:])
    if first.lower() in ("dockerfile", "containerfile"):
        return ExportArgs("dockerfile", toks[1:])
    if first.endswith((".yaml", ".yml")) or first.startswith("-"):
        return ExportArgs("stacker.yaml", toks)
    raise _Bad(f"unknown export format {first!r}: use stacker.yaml, oci or dockerfile")


def _parse_log(rest: str) -> int | str | None:
    toks = _count(_tokens(rest), 0, 1)
    if not toks:
        return None
    if toks[0] == "failed":
        return "failed"
    return _int(toks[0], "N")


def _parse_export_oci(toks: list[str]) -> ExportArgs:
    args: list[str] = []
    types: list[str] = []
    no_verity = False
    compression = "gzip"
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok in ("--no-verity", "--no-squashfs-verity"):
            no_verity = True
        elif tok == "--compression" or tok.startswith("--compression="):
            if tok == "--compression":
                if i + 1 >= len(toks):
                    raise _Bad("--compression needs gzip or zstd")
                i += 1
                compression = toks[i]
            else:
                compression = tok.split("=", 1)[1]
            if compression not in ("gzip", "zstd"):
                raise _Bad(f"invalid compression {compression!r}: use --compression gzip or zstd")
        elif tok == "--layer-type" or tok.startswith("--layer-type="):
            if tok == "--layer-type":
                if i + 1 >= len(toks):
                    raise _Bad("--layer-type needs a type: tar, squashfs or erofs")
                i += 1
                value = toks[i]
            else:
                value = tok.split("=", 1)[1]
            if value not in ("tar", "squashfs", "erofs"):
                raise _Bad(f"invalid layer type {value!r}: use --layer-type tar, squashfs or erofs")
            types.append(value)
        else:
            args.append(tok)
        i += 1
    return ExportArgs("oci", args, types or None, no_verity, compression)


def _parse_help(rest: str) -> str | None:
    toks = _count(_tokens(rest), 0, 1)
    if not toks:
        return None
    name = toks[0].lstrip("%")
    if name not in MAGICS:
        raise _Bad(f"there is no magic %{name}")
    return name


def _no_args(rest: str) -> None:
    _count(_tokens(rest), 0, 0)


def _one(rest: str) -> str:
    return _count(_tokens(rest), 1, 1)[0]


def _layer_name(rest: str) -> str:
    name = _one(rest)
    try:
        check_layer_name(name)
    except RecipeError as e:
        raise _Bad(str(e)) from None
    return name


def _rollback(rest: str) -> int | str | None:
    toks = _count(_tokens(rest), 0, 1)
    return _number_or_word(toks[0]) if toks else None


def _diff(rest: str) -> int | None:
    toks = _count(_tokens(rest), 0, 1)
    return _int(toks[0], "N") if toks else None


def _grab(rest: str) -> GrabArgs:
    toks = _count(_tokens(rest), 1, 2)
    return GrabArgs(toks[0], toks[1] if len(toks) > 1 else None)


def _network(rest: str) -> str:
    value = _one(rest)
    if value not in ("none", "host"):
        raise _Bad(f"expected none or host, not {value!r}")
    return value


def _bind(rest: str) -> Bind:
    src, dest = _arrow(rest)
    return Bind(src, dest if dest is not None else src)


def _overlay(rest: str) -> dict[str, str]:
    src, dest = _arrow(rest)
    return {"source": src} if dest is None else {"source": src, "dest": dest}


_SPECS: list[tuple[MagicSpec, Callable[[str], Any]]] = [
    (MagicSpec("layer", "%layer NAME", "start a new layer named NAME (a fresh shell)",
               False, "str"), _layer_name),
    (MagicSpec("from", "%from TYPE ARGS", "the layer's base: scratch | tar PATH_OR_URL | "
               "oci DIR:TAG | built LAYER | docker docker://REF [--insecure]", False,
               "ImageSource", SOURCE_TYPES), _parse_from),
    (MagicSpec("import", "%import PATH [--dest D] [--mode M] [--uid U] [--gid G] [--hash H] "
               "[--legacy]", "make PATH visible at /stacker/imports (or copy it to D in the "
               "image)", False, "list[Import]"), _parse_import),
    (MagicSpec("build_env", "%build_env K=V ...", "environment of the build steps", False,
               "dict[str, str]"), _pairs),
    (MagicSpec("build_env_passthrough", "%build_env_passthrough REGEX ...",
               "host variables (full-match regexes) passed to the build steps", False,
               "list[str]"), lambda rest: _tokens(rest)),
    (MagicSpec("binds", "%binds SRC [-> DEST]", "bind-mount a host path during the build",
               False, "Bind"), _bind),
    (MagicSpec("overlay_dirs", "%overlay_dirs SRC [-> DEST]",
               "copy a host directory into the image as its own layer", False,
               "dict[str, str]"), _overlay),
    (MagicSpec("environment", "%environment K=V ...", "image environment (not set during "
               "the build)", False, "dict[str, str]"), _pairs),
    (MagicSpec("labels", "%labels K=V ...", "image labels", False, "dict[str, str]"), _pairs),
    (MagicSpec("generate_labels", "%generate_labels", "this cell's script writes labels to "
               "/stacker/oci-labels/NAME", False, "None"), _no_args),
    (MagicSpec("cmd", "%cmd ARGS | %cmd [JSON list]", "image Cmd", False, "list[str]"),
     _command),
    (MagicSpec("entrypoint", "%entrypoint ARGS | %entrypoint [JSON list]", "image Entrypoint",
               False, "list[str]"), _command),
    (MagicSpec("full_command", "%full_command ARGS | %full_command [JSON list]",
               "image Entrypoint, with Cmd cleared", False, "list[str]"), _command),
    (MagicSpec("working_dir", "%working_dir DIR", "image working directory", False, "str"),
     _one),
    (MagicSpec("volumes", "%volumes PATH ...", "image volumes", False, "list[str]"),
     lambda rest: _count(_tokens(rest), 1, 999)),
    (MagicSpec("runtime_user", "%runtime_user USER", "image user", False, "str"), _one),
    (MagicSpec("dockerignore", "%dockerignore FILE", "imports from FILE's directory skip what "
               "FILE excludes (Docker's .dockerignore rules)", False, "str"), _one),
    (MagicSpec("mount", "%mount type=cache|bind|secret|tmpfs,target=PATH[,OPTION=VALUE...]",
               "a mount of this cell's step only, as a Dockerfile's RUN --mount: cache (kept in "
               "your storage between builds), bind (a context path or from=LAYER, read-only "
               "unless rw), secret (id=ID, given with --secret), tmpfs", False, "str"),
     _mount),
    (MagicSpec("user", "%user USER[:GROUP]", "run this cell's script as USER (names from the "
               "image's /etc/passwd and /etc/group, or numbers), HOME the user's", False, "str"),
     _one),
    (MagicSpec("annotations", "%annotations K=V ...", "image manifest annotations", False,
               "dict[str, str]"), _pairs),
    (MagicSpec("build_only", "%build_only", "build the layer but emit no image", False,
               "None"), _no_args),
    (MagicSpec("os", "%os OS", "image os (and base platform)", False, "str"), _one),
    (MagicSpec("arch", "%arch ARCH", "image architecture (and base platform)", False, "str"),
     _one),
    (MagicSpec("rollback", "%rollback [N|CELL_ID]", "return to an earlier snapshot", True,
               "int | str | None"), _rollback),
    (MagicSpec("layers", "%layers", "table of the session's steps", True, "None"), _no_args),
    (MagicSpec("diff", "%diff [N]", "files added, changed, removed by a step", True,
               "int | None"), _diff),
    (MagicSpec("sbom", "%sbom [LAYER|N]", "the packages of a step, and which cell added, removed "
               "or upgraded which", True, "int | str | None"), _rollback),
    (MagicSpec("grab", "%grab PATH [DEST]", "copy a file out of the container", True,
               "GrabArgs"), _grab),
    (MagicSpec("browse", "%browse [LAYER|N] [PATH]", "browse and download files", True,
               "BrowseArgs"), _parse_browse),
    (MagicSpec("export", "%export [stacker.yaml|oci [DIR] [--layer-type T]... [--no-verity] [--compression gzip|zstd] [--no-sbom] "
               "[--no-provenance] | dockerfile [PATH]]", "export the build (oci: with an SBOM and provenance)",
               True, "ExportArgs", ("stacker.yaml", "oci", "dockerfile")), _parse_export),
    (MagicSpec("keep_failed", "%keep_failed on|off", "keep a failed step's state to inspect "
               "it", True, "bool", ("on", "off")), _on_off),
    (MagicSpec("cache", "%cache on|off | to URL | from URL...", "reuse cached steps; push them to "
               "or take them from a shared cache (docker://HOST/REPO, oci:DIR, none)", True,
               "bool | CacheSource", ("on", "off", "to", "from")), _cache),
    (MagicSpec("network", "%network none|host", "network of the build container", True,
               "str", ("none", "host")), _network),
    (MagicSpec("log", "%log [N|failed]", "a step's whole output, saved beside the notebook "
               "(default: the latest step's)", True, "int | str | None"), _parse_log),
    (MagicSpec("shell", "%shell", "a JupyterLab terminal in a throwaway copy of the current (or "
               "kept failed) state: nothing done there is kept", True, "None"), _no_args),
    (MagicSpec("help", "%help [MAGIC]", "list the magics, or explain one", True,
               "str | None"), _parse_help),
]

MAGICS: dict[str, MagicSpec] = {spec.name: spec for spec, _ in _SPECS}

# What the interactive magics mean when a notebook is built or exported without a
# kernel (`build -f NB.ipynb`, `export`, nbconvert). Only a magic that changes the
# state later cells run on has no headless meaning; it is refused, naming the cell:
#   %rollback     refused: in the kernel the next cells run on an earlier snapshot
#   %keep_failed  no effect: a headless build stops at the first failed step anyway
#   %network      no effect: the build runs with the host's network, as stacker does
#                 (%network none only takes it away from the kernel's steps)
#   %cache        no effect: reuse only, never the result (build has --no-cache)
#   %layers %diff %browse %grab %export %log %sbom %help
#                 no effect: they show or copy out, the image does not change
HEADLESS_REFUSED: dict[str, str] = {
    "rollback": "which only means something in a live kernel (the cells after it run on an "
                "earlier snapshot there): delete the cells it undoes and the %rollback line",
}
_PARSERS: dict[str, Callable[[str], Any]] = {spec.name: fn for spec, fn in _SPECS}


def parse_magic(line: str, lineno: int = 1) -> Directive:
    """Parse one `%name args` line; raise RecipeError naming the line and the fix."""
    m = re.match(r"%(\S*)\s*(.*)$", line.strip(), re.S)
    assert m is not None  # callers pass lines starting with %
    name, rest = m.group(1), m.group(2).strip()
    if name not in MAGICS:
        close = _close_matches(name, MAGICS, 1)
        hint = f"did you mean %{close[0]}? " if close else ""
        raise RecipeError(f"unknown magic %{name} on line {lineno}: {hint}(%help lists them)")
    try:
        args = _PARSERS[name](rest)
    except _Bad as e:
        raise RecipeError(f"%{name} on line {lineno}: {e}: write {MAGICS[name].usage}") from None
    return Directive(name, args, lineno, line)


def parse_cell(text: str) -> Cell:
    """Split a cell into its magic lines (parsed) and its script.

    Guarantees: the script is the cell text after the last magic line (leading
    empty lines dropped), or the whole text when there is no magic; a `%` line
    at top level of the script raises RecipeError (lines inside heredocs or
    quotes are script text).
    """
    lines = text.split("\n")
    directives: list[Directive] = []
    last = -1
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("%"):
            directives.append(parse_magic(line, i + 1))
            last = i
        elif stripped and not (stripped.startswith("#") and not stripped.startswith("#!")):
            break
    if last < 0:
        script = text
    else:
        rest = lines[last + 1:]
        while rest and not rest[0].strip():
            rest.pop(0)
        script = "\n".join(rest)
    script_lines = script.split("\n")
    offset = len(lines) - len(script_lines)
    for i, (ln, top) in enumerate(zip(script_lines, _top_level(script_lines))):
        if top and ln.lstrip().startswith("%"):
            raise RecipeError(f"magic {ln.strip().split()[0]} on line {i + offset + 1} comes "
                              "after the script started: move it to the top of the cell")
    for d in directives[1:]:
        if d.name == "layer":
            raise RecipeError(f"%layer on line {d.line} is not the cell's first magic: "
                              "start the new layer in its own cell or put %layer first")
    users = [d.args for d in directives if d.name == "user"]
    mounts = [d.args for d in directives if d.name == "mount"]
    if script.strip():  # the step carries its user and mounts (see model.Step)
        script = "".join(f"{MOUNT_MARKER}{m}\n" for m in mounts) + script
        if users:
            script = f"{USER_MARKER}{users[-1]}\n{script}"
    return Cell(directives, script)


def complete_magic(prefix: str) -> list[str]:
    """Completions for the last word of a magic line being typed.

    `%lay` gives `%layer`, `%layers`; `%from d` gives `docker`; `%help ro`
    gives `%rollback`. Returns [] when nothing applies.
    """
    stripped = prefix.lstrip()
    if not stripped.startswith("%"):
        return []
    if " " not in stripped:
        word = stripped[1:]
        return sorted("%" + n for n in MAGICS if n.startswith(word))
    name, _, rest = stripped[1:].partition(" ")
    words = rest.split(" ")
    if name == "help" and len(words) == 1:
        return sorted("%" + n for n in MAGICS if ("%" + n).startswith("%" + words[0].lstrip("%")))
    spec = MAGICS.get(name)
    if spec is None or len(words) != 1:
        return []
    return [c for c in spec.choices if c.startswith(words[0])]


# --- directives <-> layer ---------------------------------------------------


def apply_directive(layer: Layer, d: Directive, script: str = "") -> Layer:
    """A copy of `layer` with the recipe directive `d` applied; `layer` is untouched.

    Mapping magics merge keys, list magics append, single values replace;
    `%generate_labels` sets the layer's script to `script` (the cell's).
    Raises RecipeError when imports mix `import` and `imports`, and
    ValueError for interactive magics (they never reach a recipe).
    """
    if d.interactive:
        raise ValueError(f"%{d.name} is interactive and does not change a layer")
    new = copy.deepcopy(layer)
    a = d.args
    if d.name == "layer":
        new.name = a
    elif d.name == "from":
        new.from_ = copy.deepcopy(a)
    elif d.name == "import":
        new.imports += copy.deepcopy(a)
        check_imports_kinds(new.imports, new.name)
    elif d.name in ("build_env", "environment", "labels", "annotations"):
        getattr(new, d.name).update(a)
    elif d.name == "build_env_passthrough":
        new.build_env_passthrough = (new.build_env_passthrough or []) + list(a)
    elif d.name == "binds":
        new.binds.append(copy.deepcopy(a))
    elif d.name == "overlay_dirs":
        new.overlay_dirs.append(dict(a))
    elif d.name == "volumes":
        new.volumes += list(a)
    elif d.name == "build_only":
        new.build_only = True
    elif d.name == "generate_labels":
        new.generate_labels = script
    elif d.name in ("user", "mount"):
        pass  # the cell's step, not the layer (parse_cell marks its script)
    else:  # cmd, entrypoint, full_command, working_dir, runtime_user, os, arch
        setattr(new, d.name, copy.deepcopy(a))
    return new


def apply_cell(layer: Layer, cell: Cell) -> Layer:
    """`layer` with every recipe directive of `cell` applied, except %layer."""
    for d in cell.recipe_directives():
        if d.name != "layer":
            layer = apply_directive(layer, d, cell.script.rstrip())
    return layer


def _q(value: str) -> str:
    return shlex.quote(value)


def _command_text(cmd: list[str]) -> str:
    return shlex.join(cmd) if cmd else "[]"


def format_directives(layer: Layer) -> str:
    """The directive cell for `layer`: parse_cell of it rebuilds the same layer.

    Covers every key except the steps and `generate_labels` (which needs a
    script: see `format_generate_labels`).
    """
    src = layer.from_
    out = [f"%layer {_q(layer.name)}"]
    ref = src.tag if src.type == "built" else src.url
    out.append(" ".join(["%from", src.type] + ([_q(ref)] if ref is not None else [])
                        + (["--insecure"] if src.insecure else [])))
    if layer.build_only:
        out.append("%build_only")
    for imp in layer.imports:
        parts = ["%import", _q(imp.path)]
        for key in ("dest", "hash", "uid", "gid"):
            if getattr(imp, key) is not None:
                parts += [f"--{key}", _q(str(getattr(imp, key)))]
        if imp.mode is not None:
            parts += ["--mode", f"0{imp.mode:o}"]
        if imp.legacy:
            parts.append("--legacy")
        out.append(" ".join(parts))
    for od in layer.overlay_dirs:
        tail = f" -> {_q(od['dest'])}" if "dest" in od else ""
        out.append(f"%overlay_dirs {_q(od['source'])}{tail}")
    for key, value in layer.build_env.items():
        out.append(f"%build_env {_q(f'{key}={value}')}")
    if layer.build_env_passthrough is not None:
        out.append(" ".join(["%build_env_passthrough"]
                            + [_q(r) for r in layer.build_env_passthrough]))
    for b in layer.binds:
        out.append(f"%binds {_q(b.source)}" + (f" -> {_q(b.dest)}" if b.dest != b.source else ""))
    for magic in ("environment", "labels", "annotations"):
        for key, value in getattr(layer, magic).items():
            out.append(f"%{magic} {_q(f'{key}={value}')}")
    for magic in ("cmd", "entrypoint", "full_command"):
        if getattr(layer, magic) is not None:
            out.append(f"%{magic} {_command_text(getattr(layer, magic))}")
    for magic in ("working_dir", "runtime_user", "os", "arch", "dockerignore"):
        if getattr(layer, magic) is not None:
            out.append(f"%{magic} {_q(getattr(layer, magic))}")
    if layer.volumes:
        out.append("%volumes " + " ".join(_q(v) for v in layer.volumes))
    return "\n".join(out)


def format_generate_labels(layer: Layer) -> str | None:
    """The `%generate_labels` cell for `layer`, or None when it has no such script."""
    if layer.generate_labels is None:
        return None
    return "%generate_labels\n" + layer.generate_labels
