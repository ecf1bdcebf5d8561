"""Stored output made safe to show again: a cache entry's log (possibly written by
whoever could push to a shared cache) or a step's saved log.

A terminal obeys what a log holds: OSC 52 writes the clipboard, cursor moves and
a lone carriage return overwrite lines already shown (a fake "build succeeded"),
other sequences retitle the window or answer back. `safe_text` drops every
escape sequence and control character but newline and tab, turns a lone CR into
a newline, and keeps SGR colours (ESC [ ... m) only when asked. Sequences as
ECMA-48 defines them (5.4 control sequences, 5.6 control strings).
"""
from __future__ import annotations

import re

_TOKENS = re.compile(
    r"(?:\x1b\[|\x9b)([0-?]*)([ -/]*)([@-~])"            # CSI: parameters, intermediates, final
    r"|(?:\x1b[\]P^_X]|[\x90\x98\x9d\x9e\x9f])"         # OSC, DCS, SOS, PM, APC: a string ...
    r"[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c|(?=\x1b)|$)"  # ... to BEL or ST (or what cuts it)
    r"|\x1b[ -/]*[0-~]?"                                # any other escape sequence
    r"|\r\n?"                                          # CR LF, or a lone CR
    r"|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"              # any other control character
)
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def safe_text(text: str, keep_colours: bool = True) -> str:
    """`text` without terminal control: see the module doc."""
    def token(m: re.Match) -> str:
        t = m.group(0)
        if t[0] == "\r":
            return "\n"
        return t if keep_colours and _SGR.fullmatch(t) else ""

    return _TOKENS.sub(token, text)
