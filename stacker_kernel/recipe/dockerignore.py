"""`.dockerignore` patterns, with Docker's rules (github.com/moby/patternmatcher).

Pure: it is handed the file's text and answers for paths relative to the
build context (`/` between parts). The rules: a line starting with `#` is a
comment; lines are trimmed and cleaned (`a/./b` is `a/b`, a leading `/` is
dropped); `!` makes a line an exception that includes again what an earlier
line excluded; the last line that matches a path (or one of its parent
directories) decides; `*` and `?` match within one part, `**` any number of
parts (none too), `[...]` a character class, `\\` escapes.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    text: str
    exception: bool
    regex: re.Pattern


def _regex(pattern: str) -> re.Pattern:
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return re.compile("".join(out), re.S)


def parse(text: str) -> list[Pattern]:
    """The patterns of a .dockerignore's text, in order."""
    patterns = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
            if not line:
                continue
        line = posixpath.normpath(line).lstrip("/") or "."
        patterns.append(Pattern(line, exception, _regex(line)))
    return patterns


def excluded(patterns: list[Pattern], path: str) -> bool:
    """Whether the context path `path` (relative, `/` between parts) is excluded."""
    path = posixpath.normpath(path)
    if path == "." or not patterns:
        return False
    parts = path.split("/")
    parents = ["/".join(parts[:k]) for k in range(1, len(parts))]
    matched = False
    for p in patterns:
        if p.regex.match(path) or any(p.regex.match(d) for d in parents):
            matched = not p.exception
    return matched


def may_include_below(patterns: list[Pattern], directory: str) -> bool:
    """Whether an exception could include again something below the excluded `directory`
    (so the directory must be walked, as Docker walks it)."""
    directory = posixpath.normpath(directory)
    for p in patterns:
        if p.exception and (p.text.startswith(directory + "/") or "*" in p.text or "?" in p.text
                            or "[" in p.text):
            return True
    return False
