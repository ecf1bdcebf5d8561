"""Is a cell's script a complete POSIX shell program? (`is_complete_request`)

The judge is the shell that runs steps: `sh -n` (Debian's /bin/sh is dash),
run on the host, never in the container, so it answers while a step runs.
dash reports an unterminated quote or construct as "end of file unexpected" /
"Unterminated quoted string" (incomplete); any other syntax error is invalid.
Two cases dash -n accepts are incomplete for a console: a trailing
backslash, and an unterminated here-document (found by appending a line
that is a syntax error anywhere but inside a here-document).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

_INCOMPLETE_MARKERS = ("end of file unexpected", "Unterminated quoted string")
_PROBE = "\n)\n"  # a syntax error everywhere except inside an open here-document


@dataclass(frozen=True)
class Completeness:
    """The is_complete verdict: "complete", "incomplete", "invalid" or "unknown"."""

    status: str
    message: str = ""


def _shell() -> str | None:
    return shutil.which("dash") or shutil.which("sh")


def _check(sh: str, text: str) -> tuple[int, str]:
    proc = subprocess.run([sh, "-n"], input=text, capture_output=True, text=True, timeout=10)
    return proc.returncode, proc.stderr.strip()


def _ends_with_continuation(script: str) -> bool:
    tail = script.rstrip("\n")
    backslashes = len(tail) - len(tail.rstrip("\\"))
    return backslashes % 2 == 1


def shell_completeness(script: str) -> Completeness:
    """Classify `script` with `sh -n`; "unknown" only when no shell is on the host."""
    if not script.strip():
        return Completeness("complete")
    sh = _shell()
    if sh is None:
        return Completeness("unknown", "no /bin/sh on the host to check the syntax")
    if _ends_with_continuation(script):
        return Completeness("incomplete", "the last line ends with a backslash")
    status, err = _check(sh, script + "\n")
    if status != 0:
        if any(marker in err for marker in _INCOMPLETE_MARKERS):
            return Completeness("incomplete", err)
        return Completeness("invalid", err)
    status, _ = _check(sh, script + _PROBE)
    if status == 0:
        return Completeness("incomplete", "a here-document is not terminated")
    return Completeness("complete")
