"""A `run` script cut into cells and cells joined back into one script, exactly.

A script is cut at top-level empty lines or `# %%` marker lines (never inside
quotes, heredocs, continuations or compound commands); joining puts empty lines
(or markers, where empty lines would not cut back the same) between the cells.
The recipe model (Layer.run_script) and the cell syntax (recipe/cells.py) both
use it; it imports neither.
"""
from __future__ import annotations

import re

_OPENERS = {"if", "case", "do", "{"}
_CLOSERS = {"fi", "esac", "done", "}"}
# After these words the next word is again in command position.
_LEADERS = {"then", "do", "else", "elif", "{", "}", "!", "if", "while", "until", "time"}
_HEREDOC_RE = re.compile(r"<<(-?)[ \t]*(?:'([^']*)'|\"([^\"]*)\"|\\?([^\s;&|<>()'\"]+))")
_WORD_END = set(" \t;&|()<>'\"")
CELL_MARKER = "# %%"


def _top_level(lines: list[str]) -> list[bool]:
    """For each line: is the shell at top level when the line starts?

    Top level means outside quotes, heredoc bodies, line continuations,
    parentheses and compound commands (if/case/do/{}). Keywords count only in
    command position, so `echo if` does not open anything. A heuristic, but a
    conservative one: when unsure, it reports "not top level", which only makes
    cells larger.
    """
    result: list[bool] = []
    quote: str | None = None
    heredoc: tuple[str, bool] | None = None
    pending: list[tuple[str, bool]] = []
    depth = paren = 0
    continued = False
    for line in lines:
        result.append(quote is None and heredoc is None and depth == 0 and paren == 0
                      and not continued)
        if heredoc is not None:
            delim, strip_tabs = heredoc
            if (line.lstrip("\t") if strip_tabs else line) == delim:
                heredoc = pending.pop(0) if pending else None
            continue
        continued = False
        cmdpos = quote is None
        j, n = 0, len(line)
        while j < n:
            c = line[j]
            if quote == "'":
                quote = None if c == "'" else quote
                j += 1
            elif quote == '"':
                if c == "\\":
                    j += 2
                    continue
                quote = None if c == '"' else quote
                j += 1
            elif c == "\\":
                continued = j == n - 1
                j += 2
                cmdpos = False
            elif c in "'\"":
                quote, cmdpos = c, False
                j += 1
            elif c == "#" and (j == 0 or line[j - 1] in " \t;&|()"):
                break
            elif line.startswith("<<", j) and not line.startswith("<<<", j):
                m = _HEREDOC_RE.match(line, j)
                if m:
                    delim = next(g for g in m.groups()[1:] if g is not None)
                    pending.append((delim, m.group(1) == "-"))
                    j = m.end()
                else:
                    j += 2
                cmdpos = False
            elif c in ";&|":
                cmdpos = True
                j += 1
            elif c == "(":
                paren, cmdpos = paren + 1, True
                j += 1
            elif c == ")":
                paren, cmdpos = max(0, paren - 1), True
                j += 1
            elif c in " \t<>":
                j += 1
            else:
                k = j
                while k < n and line[k] not in _WORD_END:
                    k += 2 if line[k] == "\\" else 1
                word = line[j:k]
                if cmdpos and word in _OPENERS:
                    depth += 1
                elif cmdpos and word in _CLOSERS:
                    depth = max(0, depth - 1)
                cmdpos = word in _LEADERS
                j = k
        if heredoc is None and pending:
            heredoc = pending.pop(0)
    return result


def _is_comment_only(chunk: str) -> bool:
    return all(not ln.strip() or ln.lstrip().startswith("#") for ln in chunk.split("\n"))


def split_script(script: str) -> list[str]:
    """Cut a `run` script into cell texts; `join_steps` of the result gives it back.

    Cuts at top-level `# %%` marker lines if there are any (explicit cell
    boundaries, removed), else a script starting with `#!` stays whole (its
    interpreter covers all of it), else it is cut at empty lines that are at
    top level (never inside a heredoc, quote or compound command). Comment-only
    pieces join the following piece, so comments stay with their commands.
    The round trip is exact unless markers enclose an empty piece (dropped by
    `join_steps`).
    """
    body = script.rstrip("\n")
    trailing = script[len(body):]
    lines = body.split("\n")
    top = _top_level(lines)
    if any(t and ln == CELL_MARKER for ln, t in zip(lines, top)):
        chunks, cur = [], []
        for ln, t in zip(lines, top):
            if t and ln == CELL_MARKER:
                chunks.append("\n".join(cur))
                cur = []
            else:
                cur.append(ln)
        chunks.append("\n".join(cur))
        chunks[-1] += trailing
        return chunks
    if body.startswith("#!"):
        return [script]
    pieces: list[list[str]] = []
    cur = []
    for ln, t in zip(lines, top):
        if ln == "" and t and any(x.strip() for x in cur):
            pieces.append(cur)
            cur = []
        else:
            cur.append(ln)
    pieces.append(cur)
    merged: list[str] = []
    carry: str | None = None
    for piece in ("\n".join(p) for p in pieces):
        if carry is not None:
            piece = carry + "\n\n" + piece
            carry = None
        if _is_comment_only(piece):
            carry = piece
        else:
            merged.append(piece)
    if carry is not None:
        if merged:
            merged[-1] += "\n\n" + carry
        else:
            merged.append(carry)
    merged[-1] += trailing
    return merged


def join_steps(sources: list[str]) -> str:
    """Concatenate step scripts into one `run` script that `split_script` cuts back.

    Steps are joined with an empty line; when that would not cut back into the
    same steps (a step has its own top-level empty lines, or the first starts
    with `#!`), they are joined with `# %%` marker lines instead, which the
    shell ignores as comments.
    """
    sources = [s for s in sources if s.strip()]
    if len(sources) <= 1:
        return sources[0] if sources else ""
    plain = "\n\n".join(sources)
    if split_script(plain) == sources:
        return plain
    return f"\n{CELL_MARKER}\n".join(sources)
