"""Tab completion of a cell: magic names and arguments, rootfs paths, rootfs commands,
and `$NAME` from the layer shell's variables; host paths (relative to the notebook)
for `%from tar|oci` and `%import`, layer names for `%browse` and `%from built`.

Paths and commands are read from the host side of the container's rootfs
through its storage driver (engine/inspect.py TreeReader: an overlay tree is
the union of its layers), so completion never waits for the build shell. The rootfs belongs to the
user's subordinate ids; directories the user cannot read simply give no
matches. Symlinks are resolved inside the rootfs (an absolute link target
is taken relative to the rootfs), never on the host.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

from stacker_kernel.engine.inspect import TreeReader
from stacker_kernel.engine.session import BUILD_PATH

# The PATH a step gets (stacker's default for `run`), searched in order.
CONTAINER_PATH = tuple(BUILD_PATH.split(":"))
_WORD_BREAKS = " \t\n;|&()<>=\"'`"
_VARIABLE = re.compile(r"\$(\{?)([A-Za-z_][A-Za-z0-9_]*|)$")
# NAME= (also after export/readonly/local), `read NAME`, `for NAME in`: names a cell sets itself
_ASSIGNED = re.compile(r"(?:^|[\s;&|(])(?:(?:export|readonly|local)\s+)?([A-Za-z_][A-Za-z0-9_]*)="
                       r"|\bread\s+(?:-\w+\s+)*([A-Za-z_][A-Za-z0-9_]*)"
                       r"|\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b")
_COMMAND_POSITION = re.compile(r"(^|[;&|(`]|\$\(|\b(then|do|else|elif|if|while|until|!))\s*$")


@dataclass
class Completion:
    """A complete_reply body: matches replacing code[cursor_start:cursor_end]."""

    matches: list[str] = field(default_factory=list)
    cursor_start: int = 0
    cursor_end: int = 0

    def reply(self) -> dict:
        return {"status": "ok", "matches": self.matches, "cursor_start": self.cursor_start,
                "cursor_end": self.cursor_end, "metadata": {}}


Rootfs = Union[str, TreeReader]  # a tree's path, or its reader (kernel.py gives its driver's)


def _reader(rootfs: Rootfs) -> TreeReader:
    return rootfs if isinstance(rootfs, TreeReader) else TreeReader(rootfs)


def complete_path(rootfs: Rootfs, word: str, cwd: str = "/") -> list[str]:
    """Entries of the container rootfs that complete `word` (directories get a trailing /)."""
    tree = _reader(rootfs)
    head, _, prefix = word.rpartition("/")
    if "/" in word:
        base = head + "/" if head else "/"
    else:
        base = ""
    container_dir = base if base.startswith("/") else os.path.join(cwd, base)
    matches = []
    for name in tree.listdir(container_dir):
        if not name.startswith(prefix) or (name.startswith(".") and not prefix.startswith(".")):
            continue
        candidate = base + name
        if tree.is_dir(os.path.join(container_dir, name)):
            candidate += "/"
        matches.append(candidate)
    return matches


def complete_command(rootfs: Rootfs, prefix: str) -> list[str]:
    """Executables on the container's PATH whose names start with `prefix`, without duplicates."""
    tree = _reader(rootfs)
    seen: dict[str, None] = {}
    for directory in CONTAINER_PATH:
        for name in tree.listdir(directory):
            if name.startswith(prefix):
                seen.setdefault(name)
    return sorted(seen)


def find_command(rootfs: Rootfs, name: str) -> str | None:
    """The container path of command `name` on the container's PATH, or None."""
    tree = _reader(rootfs)
    for directory in CONTAINER_PATH:
        candidate = f"{directory}/{name}"
        if tree.is_file(candidate):
            return candidate
    return None


def current_word(code: str, cursor_pos: int) -> tuple[int, str]:
    """Start offset and text of the shell word that ends at the cursor."""
    start = cursor_pos
    while start > 0 and code[start - 1] not in _WORD_BREAKS:
        start -= 1
    return start, code[start:cursor_pos]


def assigned_names(script: str) -> set[str]:
    """Variable names `script` assigns (NAME=, export NAME=, read NAME, for NAME in)."""
    return {next(g for g in m.groups() if g) for m in _ASSIGNED.finditer(script)}


def complete_variable(word: str, names: Iterable[str]) -> list[str] | None:
    """`$PRE` / `${PRE` at the end of `word` completed from `names` (None: not a variable)."""
    m = _VARIABLE.search(word)
    if m is None:
        return None
    brace, prefix = m.group(1), m.group(2)
    head = word[:m.start()] + "$" + brace
    return [head + name + ("}" if brace else "") for name in sorted(set(names)) if name.startswith(prefix)]


def complete_shell(rootfs: Rootfs | None, code: str, cursor_pos: int, cwd: str = "/",
                   variables: Iterable[str] = ()) -> Completion:
    """`$NAME` from `variables` (and the names the cell assigns before the cursor),
    commands in command position, else paths; no commands or paths without a rootfs."""
    start, word = current_word(code, cursor_pos)
    result = Completion(cursor_start=start, cursor_end=cursor_pos)
    names = complete_variable(word, set(variables) | assigned_names(code[:start]))
    if names is not None:
        result.matches = names
        return result
    if rootfs is None:
        return result
    before = code[:start]
    line_before = before.rsplit("\n", 1)[-1]
    if "/" not in word and _COMMAND_POSITION.search(line_before):
        result.matches = complete_command(rootfs, word)
    else:
        result.matches = complete_path(rootfs, word, cwd)
    return result


def complete_magic_line(line: str, line_start: int, cursor_pos: int,
                        names: Callable[[str], list[str]],
                        arguments: Callable[[str, list[str], str], list[str]]) -> Completion:
    """Complete a `%magic args` line: the name via `names(prefix)`, later words via `arguments`.

    `arguments(name, previous_args, prefix)` lists candidates for the word at
    the cursor. `line` is the text of the line up to the cursor.
    """
    if " " not in line.rstrip("\n") and "\t" not in line:
        prefix = line[1:]
        return Completion(sorted("%" + n for n in names(prefix)), line_start, cursor_pos)
    name, *rest = line[1:].split()
    if line[-1:].isspace():
        previous, prefix = rest, ""
    else:
        previous, prefix = rest[:-1], rest[-1] if rest else ""
    return Completion(arguments(name, previous, prefix), cursor_pos - len(prefix), cursor_pos)


def complete_host_path(directory: str, word: str) -> list[str]:
    """Host paths completing `word`, relative to `directory` unless absolute (or ~);
    directories get a trailing '/', dot files only for a word starting with '.'."""
    head, _, prefix = word.rpartition("/")
    base = head + "/" if "/" in word else ""
    listed = os.path.join(directory, os.path.expanduser(base) or ".")
    try:
        names = sorted(os.listdir(listed))
    except OSError:
        return []
    matches = []
    for name in names:
        if not name.startswith(prefix) or (name.startswith(".") and not prefix.startswith(".")):
            continue
        matches.append(base + name + ("/" if os.path.isdir(os.path.join(listed, name)) else ""))
    return matches


# Magics whose argument (after these leading words) is a host path or a layer name.
_HOST_PATH_ARGS = {("from", "tar"), ("from", "oci"), ("import",)}
_LAYER_ARGS = {("from", "built"), ("browse",)}


def complete_magic_argument(line: str, cursor_pos: int, notebook_dir: str,
                            layers: Callable[[], Iterable[str]]) -> Completion | None:
    """The word at the cursor of `%from tar|oci PATH`, `%import PATH` (host paths, relative
    to the notebook's directory) or `%from built LAYER`, `%browse LAYER` (layer names,
    and rootfs paths for a word starting with '/' there); None for other magic lines."""
    words = line.lstrip()[1:].split()
    if line[-1:].isspace():
        words.append("")
    if len(words) < 2:
        return None
    lead, word = tuple(words[:-1]), words[-1]
    start = cursor_pos - len(word)
    if lead in _HOST_PATH_ARGS:
        return Completion(complete_host_path(notebook_dir, word), start, cursor_pos)
    if lead in _LAYER_ARGS and not word.startswith("/"):
        return Completion(sorted({n for n in layers() if n.startswith(word)}), start, cursor_pos)
    return None
