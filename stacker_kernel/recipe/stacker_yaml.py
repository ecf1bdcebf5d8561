"""stacker.yaml <-> Recipe, with stacker's `${{VAR}}` substitution.

Parsing walks PyYAML's node tree rather than constructed objects: scalars keep
the text the user wrote (`1.10` stays `1.10`, as Go's yaml gives a string
field), duplicate keys are caught (PyYAML would keep the last one silently),
and every error can name its line. stacker's pkg/types/layer.go is the schema.
"""
from __future__ import annotations

import difflib
import os
import re
import shlex
from typing import Callable

import yaml

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import (
    SOURCE_TYPES, USER_MARKER, Bind, ImageSource, Import, Layer, Recipe, Step, check_import,
    check_imports_kinds, check_layer_name, check_source,
)
from stacker_kernel.recipe.substitution import substitute  # noqa: F401 (callers import it from here too)

# --- YAML nodes -----------------------------------------------------------------

_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"
_TRUE = {"y", "yes", "true", "on"}
_FALSE = {"n", "no", "false", "off", ""}


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Ctx:
    """Where we are, for error messages: `layer NAME: key (line N)`."""

    def __init__(self, layer: str, key: str, node: yaml.Node):
        self.layer, self.key, self.node = layer, key, node

    def fail(self, problem: str, node: yaml.Node | None = None) -> RecipeError:
        line = _line(node or self.node)
        return RecipeError(f"layer {self.layer}: {self.key} (line {line}) {problem}")


def _pairs(node: yaml.Node, ctx: _Ctx, what: str) -> list[tuple[str, yaml.Node, int]]:
    """A mapping node's (key, value node, line) in order; duplicate keys are an error."""
    if not isinstance(node, yaml.MappingNode):
        raise ctx.fail(f"must be a mapping of {what}", node)
    out: list[tuple[str, yaml.Node, int]] = []
    seen: dict[str, int] = {}
    merged: list[tuple[str, yaml.Node, int]] = []
    for knode, vnode in node.value:
        if knode.tag == _MERGE:
            sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
            for src in sources:
                merged += _pairs(src, ctx, what)
            continue
        if not isinstance(knode, yaml.ScalarNode):
            raise ctx.fail("has a key that is not a string", knode)
        key = knode.value
        if key in seen:
            raise RecipeError(f"layer {ctx.layer}: {what.rstrip('s')} {key} is given twice "
                              f"(lines {seen[key]} and {_line(knode)}): keep one"
                              if ctx.layer else
                              f"duplicate layer name {key} (lines {seen[key]} and "
                              f"{_line(knode)}): rename one of them")
        seen[key] = _line(knode)
        out.append((key, vnode, _line(knode)))
    out += [(k, v, ln) for k, v, ln in merged if k not in seen]
    return out


def _text(node: yaml.Node, ctx: _Ctx) -> str | None:
    if not isinstance(node, yaml.ScalarNode):
        raise ctx.fail("must be a string", node)
    return None if node.tag == _NULL else node.value


def _str(node: yaml.Node, ctx: _Ctx) -> str:
    value = _text(node, ctx)
    return "" if value is None else value


def _bool(node: yaml.Node, ctx: _Ctx) -> bool:
    value = _str(node, ctx).lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ctx.fail(f"must be true or false, not {value!r}", node)


def _int(node: yaml.Node, ctx: _Ctx) -> int:
    raw = _str(node, ctx)
    v = raw.replace("_", "")
    sign = -1 if v.startswith("-") else 1
    v = v.lstrip("+-")
    try:
        if v[:2].lower() in ("0x", "0o", "0b"):
            return sign * int(v, 0)
        if len(v) > 1 and v.startswith("0"):
            return sign * int(v, 8)  # YAML 1.1 octal, as Go's yaml reads `mode: 0755`
        return sign * int(v, 10)
    except ValueError:
        raise ctx.fail(f"must be an integer, not {raw!r}", node) from None


def _list(node: yaml.Node, ctx: _Ctx) -> list[str]:
    if not isinstance(node, yaml.SequenceNode):
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return []
        raise ctx.fail("must be a list of strings", node)
    return [_str(item, ctx) for item in node.value]


def _strmap(node: yaml.Node, ctx: _Ctx) -> dict[str, str]:
    if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
        return {}
    return {k: _str(v, ctx) for k, v, _ in _pairs(node, ctx, "keys")}


def _string_list(node: yaml.Node, ctx: _Ctx) -> str:
    """stacker's StringList: a string, or a list of lines, as one script."""
    if isinstance(node, yaml.SequenceNode):
        return "\n".join(_list(node, ctx))
    return _str(node, ctx)


def _command(node: yaml.Node, ctx: _Ctx) -> list[str] | None:
    """stacker's Command: a list as is, or a string split like a shell."""
    if isinstance(node, yaml.SequenceNode):
        return _list(node, ctx)
    value = _text(node, ctx)
    if value is None:
        return None
    try:
        return shlex.split(value)
    except ValueError as e:
        raise ctx.fail(f"cannot be split like a shell command ({e}): balance the quotes",
                       node) from None


# --- layer keys -------------------------------------------------------------------


def _from(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
    fields: dict[str, str | bool | None] = {}
    for key, vnode, line in _pairs(node, ctx, "keys"):
        if key == "insecure":
            fields[key] = _bool(vnode, ctx)
        elif key in ("type", "url", "tag"):
            fields[key] = _text(vnode, ctx)
        else:
            raise RecipeError(f"layer {layer.name}: stackerfile: unknown image source "
                              f"directive {key} (line {line}): use type, url, tag or insecure")
    kind = fields.get("type")
    if not kind:
        raise ctx.fail(f"needs a type: one of {', '.join(SOURCE_TYPES)}")
    src = ImageSource(kind, fields.get("url"), fields.get("tag"),  # type: ignore[arg-type]
                      bool(fields.get("insecure", False)))
    check_source(src, layer.name)
    if src.type == "built" and src.url is not None:
        layer.warnings.append(f"from url {src.url!r} is ignored for type built")
        src.url = None
    if src.type != "built" and src.tag is not None:
        layer.warnings.append(f"from tag {src.tag!r} is ignored for type {src.type}")
        src.tag = None
    layer.from_ = src


def _import_entry(node: yaml.Node, ctx: _Ctx, legacy: bool, layer: Layer) -> Import:
    if isinstance(node, yaml.ScalarNode):
        return Import(_str(node, ctx), legacy=legacy)
    if not isinstance(node, yaml.MappingNode):
        raise ctx.fail("entries must be a path or a mapping with 'path'", node)
    values: dict = {}
    for key, vnode, _ in _pairs(node, ctx, "keys"):
        if key in ("path", "hash", "dest"):
            values[key] = _text(vnode, ctx)
        elif key in ("mode", "uid", "gid"):
            values[key] = None if _text(vnode, ctx) is None else _int(vnode, ctx)
        else:  # stacker ignores unknown import keys too
            layer.warnings.append(f"{ctx.key}: key {key!r} of an import is ignored")
    if not values.get("path"):
        raise ctx.fail("entry needs a 'path'", node)
    return Import(legacy=legacy, **values)


def _empty(node: yaml.Node) -> bool:
    """A null or empty list/mapping value (`import:` with nothing after it)."""
    if isinstance(node, yaml.ScalarNode):
        return node.tag == _NULL
    return not node.value


def _imports(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
    legacy = ctx.key == "import"
    if legacy and _empty(node):
        return  # nothing imported: no deprecation warning either
    if isinstance(node, yaml.MappingNode):
        raise ctx.fail("expected an array: write each import as a list item ('- path: ...')")
    if isinstance(node, yaml.ScalarNode):
        entries = [] if node.tag == _NULL else [node]
    else:
        entries = node.value
    for entry in entries:
        imp = _import_entry(entry, ctx, legacy, layer)
        try:
            check_import(imp, layer.name)
        except RecipeError as e:
            raise RecipeError(f"{e} (line {_line(entry)})") from None
        layer.imports.append(imp)
    if legacy:
        layer.warnings.append("'import' is deprecated: use 'imports' (files then appear "
                              "under /stacker/imports)")


def _run(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
    script = _string_list(node, ctx).rstrip()
    if script.strip():
        layer.steps = [Step(script)]


def _generate_labels(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
    layer.generate_labels = _string_list(node, ctx).rstrip()


def _binds(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.fail("must be a list of 'SRC', 'SRC -> DEST' or {source, dest}", node)
    for item in node.value:
        if isinstance(item, yaml.MappingNode):
            d = {k: _str(v, ctx) for k, v, _ in _pairs(item, ctx, "keys")
                 if k in ("source", "dest")}
            source, dest = d.get("source"), d.get("dest")
        else:
            source, _, dest = _str(item, ctx).partition("->")
            source, dest = source.strip(), dest.strip()
        if not source:
            raise ctx.fail("entry needs a source", item)
        layer.binds.append(Bind(source, dest or source))


def _overlay_dirs(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
    if not isinstance(node, yaml.SequenceNode):
        raise ctx.fail("must be a list of {source, dest}", node)
    for item in node.value:
        entry = {}
        for k, v, _ in _pairs(item, ctx, "keys"):
            if k in ("source", "dest"):
                entry[k] = _str(v, ctx)
            else:
                layer.warnings.append(f"overlay_dirs: key {k!r} is ignored")
        if not entry.get("source"):
            raise ctx.fail("entry needs a source", item)
        layer.overlay_dirs.append(entry)


def _platform(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
    value = _text(node, ctx)
    if not value:
        raise RecipeError(f'layer {layer.name}: "{ctx.key}" value cannot be empty '
                          f"(line {_line(node)}): give a value such as "
                          + ("linux" if ctx.key == "os" else "amd64") + " or remove the key")
    setattr(layer, ctx.key, value)


def _ignored(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
    if ctx.key == "bom":
        layer.warnings.append("'bom' is accepted but ignored: stacker no longer generates SBOMs")
    else:
        layer.warnings.append(f"{ctx.key!r} is internal to stacker and ignored")


def _setter(attr: str, conv: Callable[[yaml.Node, _Ctx], object]):
    def set_value(layer: Layer, node: yaml.Node, ctx: _Ctx) -> None:
        setattr(layer, attr, conv(node, ctx))
    return set_value


_KEYS: dict[str, Callable[[Layer, yaml.Node, _Ctx], None]] = {
    "from": _from,
    "imports": _imports,
    "import": _imports,
    "overlay_dirs": _overlay_dirs,
    "run": _run,
    "cmd": _setter("cmd", _command),
    "entrypoint": _setter("entrypoint", _command),
    "full_command": _setter("full_command", _command),
    "build_env_passthrough": _setter("build_env_passthrough", _list),
    "build_env": _setter("build_env", _strmap),
    "environment": _setter("environment", _strmap),
    "volumes": _setter("volumes", _list),
    "labels": _setter("labels", _strmap),
    "generate_labels": _generate_labels,
    "working_dir": _setter("working_dir", _text),
    "build_only": _setter("build_only", _bool),
    "binds": _binds,
    "runtime_user": _setter("runtime_user", _text),
    "annotations": _setter("annotations", _strmap),
    "os": _platform,
    "arch": _platform,
    "bom": _ignored,
    "was_legacy_import": _ignored,
    "was_bom": _ignored,
}
LAYER_KEYS: tuple[str, ...] = tuple(k for k in _KEYS if not k.startswith("was_"))


def _layer(name: str, node: yaml.Node, line: int) -> Layer:
    check_layer_name(name, f" (line {line})")
    top = _Ctx(name, "layer", node)
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(f"layer {name} (line {line}) must be a mapping of directives: "
                          "give it at least 'from'")
    layer = Layer(name, ImageSource("scratch"))
    pairs = _pairs(node, top, "directives")
    keys = [k for k, _, _ in pairs]
    # As stacker: both only when each has entries (an empty `import:` beside `imports:` is fine).
    given = {k for k, v, _ in pairs if k in ("import", "imports") and not _empty(v)}
    if given == {"import", "imports"}:
        raise RecipeError(f"layer {name}: 'import' and 'imports' cannot be used together "
                          f"(line {line}): move every entry to 'imports'")
    for key, vnode, kline in pairs:
        handler = _KEYS.get(key)
        if handler is None:
            close = difflib.get_close_matches(key, LAYER_KEYS, 1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise RecipeError(f"layer {name}: stackerfile: unknown directive {key} "
                              f"(line {kline}): {hint}the directives are "
                              + ", ".join(LAYER_KEYS))
        handler(layer, vnode, _Ctx(name, key, vnode))
    if "from" not in keys:
        raise RecipeError(f"layer {name} (line {line}) has no 'from': add one, e.g. "
                          "from: {type: oci, url: ./oci:busybox}")
    check_imports_kinds(layer.imports, name)
    return layer


def _config(node: yaml.Node, recipe: Recipe) -> None:
    ctx = _Ctx("config", "config", node)
    if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
        return
    for key, vnode, _ in _pairs(node, ctx, "keys"):
        if key == "prerequisites":  # stacker ignores other config keys
            recipe.prerequisites = _list(vnode, _Ctx("config", "prerequisites", vnode))


# A real stacker.yaml has a few thousand nodes; aliases and merge keys (`<<`) share
# one node in many places, and the walk above visits it at each, so a 600-byte
# file of repeated `<<: [*a, *a, ...]` would be walked ~10^9 times.
MAX_EXPANDED_NODES = 200_000


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node, path: str | None) -> None:
    """Raise RecipeError when `root`, with every alias and merge key expanded, has
    more than MAX_EXPANDED_NODES nodes, or refers to itself.

    Counts once per distinct node (sizes are memoised and capped), so the check
    is linear in the file however far it would expand.
    """
    name = path or "stacker.yaml"
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # nodes whose subtree is being counted
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        key = id(node)
        if counted:
            total = 1 + sum(sizes[id(c)] for c in _children(node))
            sizes[key] = min(total, MAX_EXPANDED_NODES + 1)
            open_.discard(key)
            continue
        if key in sizes:
            continue
        if key in open_:
            raise RecipeError(f"{name} has an alias inside its own anchor (line {_line(node)}): "
                              "a stacker.yaml cannot refer to itself, write the value out")
        open_.add(key)
        stack.append((node, True))
        stack += [(c, False) for c in _children(node) if id(c) not in sizes]
    if sizes[id(root)] > MAX_EXPANDED_NODES:
        raise RecipeError(f"{name} expands too much: its aliases and merge keys (<<) make more "
                          f"than {MAX_EXPANDED_NODES} YAML nodes: write the repeated parts out "
                          "or repeat them fewer times")


def _compose(text: str, path: str | None) -> yaml.Node | None:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError as e:
        raise RecipeError(f"{path or 'stacker.yaml'} nests too deeply: flatten its lists and "
                          "mappings") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" on line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).split("\n")[0]
        raise RecipeError(f"{path or 'stacker.yaml'} is not valid YAML: {problem}{where}: "
                          "fix the syntax there") from None
    if root is not None:
        _check_expansion(root, path)
    return root


def load(text: str, subs: dict[str, str] | None = None, path: str | None = None,
         keep_placeholders: bool = False, keep_missing: bool = False) -> Recipe:
    """Parse a stacker.yaml text into a Recipe, as stacker would accept it.

    Substitutes first (`subs`, then defaults), then checks every layer key and
    the dependencies within the file (external ones are accepted only when the
    file has prerequisites: see `load_with_prerequisites`). Any problem is a
    RecipeError naming the layer, the key and the line. With `keep_placeholders`
    the `${{NAME...}}` left after `subs` stay in the values, unresolved; with
    `keep_missing` only those without a value or default do.
    """
    text = substitute(text, subs or {}, defaults=not keep_placeholders, require=not keep_missing)
    root = _compose(text, path)
    recipe = Recipe(source_path=path)
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL):
        return recipe
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{path or 'stacker.yaml'} must be a mapping of layer names to "
                          "layers: start with a line such as 'mylayer:'")
    for name, node, line in _pairs(root, _Ctx("", "file", root), "layers"):
        if name == "config":
            _config(node, recipe)
        else:
            recipe.layers[name] = _layer(name, node, line)
    recipe.dependency_order()
    return recipe


def load_file(path: str, subs: dict[str, str] | None = None, keep_placeholders: bool = False,
              keep_missing: bool = False) -> Recipe:
    """Read and `load` one stacker.yaml; its prerequisites are not read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RecipeError(f"cannot read {path}: {e.strerror}: check the path") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): "
                          "save it as UTF-8") from None
    return load(text, subs, path, keep_placeholders, keep_missing)


def load_with_prerequisites(path: str, subs: dict[str, str] | None = None) -> list[Recipe]:
    """The recipe at `path` and its prerequisites, transitively, in build order.

    Prerequisites are resolved against the directory of the file declaring
    them and come before it (depth first, in the order listed); each file
    appears once. Layer names must be unique across all files, and every
    dependency must be defined by some file. The requested recipe is last.
    """
    order: list[Recipe] = []
    done: set[str] = set()

    def visit(p: str, stack: list[str]) -> None:
        real = os.path.realpath(p)
        if real in stack:
            chain = " -> ".join(stack[stack.index(real):] + [real])
            raise RecipeError(f"prerequisites form a cycle ({chain}): remove one of them")
        if real in done:
            return
        recipe = load_file(p, subs)
        for pre in recipe.prerequisites:
            if "://" in pre:
                raise RecipeError(f"{p}: prerequisite {pre} is a URL: download it and list "
                                  "the local path")
            visit(os.path.join(os.path.dirname(os.path.abspath(p)), pre), stack + [real])
        done.add(real)
        order.append(recipe)

    visit(path, [])
    owner: dict[str, str] = {}
    for recipe in order:
        for name in recipe.layers:
            if name in owner:
                raise RecipeError(f"duplicate layer name: both {owner[name]} and "
                                  f"{recipe.source_path} have {name}: rename one of them")
            owner[name] = recipe.source_path or ""
    for recipe in order:
        recipe.dependency_order(provided=set(owner) - set(recipe.layers))
    return order


# --- dump ---------------------------------------------------------------------------


class _Octal(int):
    """An int written in YAML 1.1 octal (`0755`), as stacker files write modes."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def _repr_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _repr_octal(dumper: yaml.SafeDumper, value: _Octal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:int", f"0{int(value):o}")


_Dumper.add_representer(str, _repr_str)
_Dumper.add_representer(_Octal, _repr_octal)


def _import_value(imp: Import) -> str | dict:
    if imp.is_simple():
        return imp.path
    out: dict = {"path": imp.path}
    for key in ("hash", "dest", "mode", "uid", "gid"):
        value = getattr(imp, key)
        if value is not None:
            out[key] = _Octal(value) if key == "mode" else value
    return out


def _script(text: str) -> str:
    return text + "\n" if "\n" in text else text


def _layer_dict(layer: Layer) -> dict:
    src = layer.from_
    frm: dict = {"type": src.type}
    if src.url is not None:
        frm["url"] = src.url
    if src.tag is not None:
        frm["tag"] = src.tag
    if src.insecure:
        frm["insecure"] = True
    out: dict = {"from": frm}
    if layer.imports:
        out["import" if layer.uses_legacy_import() else "imports"] = \
            [_import_value(i) for i in layer.imports]
    if layer.overlay_dirs:
        out["overlay_dirs"] = [dict(d) for d in layer.overlay_dirs]
    run = layer.run_script()
    if run.strip():
        out["run"] = run + "\n"
    for key in ("cmd", "entrypoint", "full_command", "build_env_passthrough"):
        if getattr(layer, key) is not None:
            out[key] = list(getattr(layer, key))
    for key in ("build_env", "environment", "volumes", "labels"):
        if getattr(layer, key):
            out[key] = getattr(layer, key)
    if layer.generate_labels is not None:
        out["generate_labels"] = _script(layer.generate_labels)
    if layer.working_dir is not None:
        out["working_dir"] = layer.working_dir
    if layer.build_only:
        out["build_only"] = True
    if layer.binds:
        out["binds"] = [b.source if b.dest == b.source else f"{b.source} -> {b.dest}"
                        for b in layer.binds]
    if layer.runtime_user is not None:
        out["runtime_user"] = layer.runtime_user
    if layer.annotations:
        out["annotations"] = layer.annotations
    for key in ("os", "arch"):
        if getattr(layer, key) is not None:
            out[key] = getattr(layer, key)
    return out


def dump(recipe: Recipe) -> str:
    """A stacker.yaml for `recipe`; `load` reads it back to an equal Recipe.

    Keys follow stacker's Layer struct order and only non-default keys are
    written; a layer's steps become one literal `run: |` block.
    """
    doc: dict = {}
    if recipe.prerequisites:
        doc["config"] = {"prerequisites": list(recipe.prerequisites)}
    for name, layer in recipe.layers.items():
        doc[name] = _layer_dict(layer)
    if not doc:
        return ""
    text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=1 << 16)
    # stacker runs every step as root: say which steps it would run otherwise than built
    notes = [f"# layer {name}: the steps starting '{USER_MARKER}USER' ran as USER here (%user, a "
             "Dockerfile RUN after USER); stacker runs them as root\n"
             for name, layer in recipe.layers.items() if any(s.user for s in layer.steps)]
    notes += [f"# layer {name}: its imports skipped what {layer.dockerignore} excludes here; "
              "stacker takes them whole\n" for name, layer in recipe.layers.items() if layer.dockerignore]
    # A blank line between layers, as stacker files are usually written.
    return "".join(notes) + re.sub(r"\n(?=[^\s#-])", "\n\n", text)
