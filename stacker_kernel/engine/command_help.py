"""What a command in a snapshot is for: its whatis line and the first lines of its `--help`.

Both read a read-only snapshot, never the build shell, so they answer while a
step runs and cannot change the image:

- `whatis` reads the NAME section of the command's man page from the host
  side (man pages are world-readable in an image; nothing runs);
- `help_text` runs `COMMAND --help` chrooted into the read-only snapshot, as
  `nobody` of a user namespace whose nobody is an id the host does not use
  (userns.isolate; in single-id mode, root of that namespace holding only the
  user's id), with no capabilities and no_new_privs (a chroot alone
  would not hold root), as pid 1 of its own pid namespace (it can signal no
  other process), in a new network namespace (no network), with stdin at
  /dev/null, a fresh /dev/null and an empty /tmp where the image has those
  folders (`git --help` opens /dev/null for writing), its output capped and
  its run bounded in time. It runs from a fresh interpreter: a
  user namespace needs a single-threaded process, and forking the kernel
  (several threads) could inherit a lock another thread holds.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import re
import signal
import subprocess
import sys

import stacker_kernel
from stacker_kernel.container.userns import isolate, isolated_id
from stacker_kernel.engine.live import BUILD_PATH

HELP_SECONDS = 3.0  # a --help that takes longer is cut off
HELP_BYTES = 64 * 1024
MAN_SECTIONS = ("1", "8", "6", "5", "7", "3")


def _roff_text(line: str) -> str:
    """A roff line as text: escapes and font changes dropped."""
    line = re.sub(r"\\f[BIRP]|\\f\(..|\\s[-+]?\d", "", line)
    line = line.replace("\\-", "-").replace("\\(em", "-").replace("\\(en", "-").replace("\\&", "")
    return re.sub(r"\\(.)", r"\1", line).strip()


def _name_section(text: str) -> str | None:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r'^\.S[Hh]\s+"?NAME"?\s*$', line):
            words = []
            for body in lines[i + 1:]:
                if body.startswith((".SH", ".Sh")):
                    break
                if body.startswith(".") and not body.startswith((".Nm", ".Nd")):
                    continue
                words.append(_roff_text(re.sub(r"^\.N[md]\s*", "", body)))
            found = " ".join(w for w in words if w)
            return found or None
    return None


def whatis(rootfs: str, name: str) -> str | None:
    """`name (SECTION) - description` from the man page in `rootfs`, or None."""
    if "/" in name or name.startswith("."):
        return None
    for section in MAN_SECTIONS:
        for suffix in ("", ".gz"):
            path = os.path.join(rootfs, "usr/share/man", f"man{section}", f"{name}.{section}{suffix}")
            real = os.path.realpath(path)
            # any symlink on the way (usr, share/man, the page) could point out of the rootfs
            if real != os.path.join(os.path.realpath(rootfs), os.path.relpath(path, rootfs)) \
                    or not os.path.isfile(real):
                continue
            try:
                raw = gzip.open(path).read(HELP_BYTES) if suffix else open(path, "rb").read(HELP_BYTES)
            except OSError:
                continue
            line = _name_section(raw.decode("utf-8", errors="replace"))
            if line:
                head, sep, desc = line.partition(" - ")
                return f"{head.strip()} ({section}) - {desc.strip()}" if sep else line
    return None


def _help_in_ns(root: str, command: str, seconds: float) -> tuple[str, bool]:
    """In the user namespace: run `command --help` chrooted into `root`."""
    devnull = os.open("/dev/null", os.O_RDONLY)
    outside = isolated_id()

    def enter() -> None:
        isolate(root, dev_and_tmp=True, outside=outside)  # a chroot holds no root: the binary gets none

    env = {"PATH": BUILD_PATH, "HOME": "/root", "TERM": "dumb", "COLUMNS": "80", "LANG": "C"}
    try:
        proc = subprocess.Popen([command, "--help"], stdin=devnull, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=enter,
                                start_new_session=True, close_fds=True)
    except OSError:  # not in this snapshot (only in the live rootfs), or not runnable
        return "", True
    try:
        out, _ = proc.communicate(timeout=seconds)
        finished = True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        finished = False
    return out[:HELP_BYTES].decode("utf-8", errors="replace"), finished


_RUN = ("import json, sys\n"
        "from stacker_kernel.container.userns import CLONE_NEWNET, CLONE_NEWNS, run_in_userns\n"
        "from stacker_kernel.engine.command_help import _help_in_ns\n"
        "root, command, seconds = json.load(sys.stdin)\n"
        "print(json.dumps(run_in_userns(_help_in_ns, root, command, seconds,"
        " flags=CLONE_NEWNS | CLONE_NEWNET)))")


@functools.lru_cache(maxsize=256)  # a snapshot never changes: its answer stays right
def help_text(snapshot: str, command: str, lines: int = 15, seconds: float = HELP_SECONDS) -> str | None:
    """The first `lines` lines `command --help` prints (stdout and stderr) in the
    read-only `snapshot`; `command` is its absolute path in the container. None
    if it printed nothing or could not run."""
    top = os.path.dirname(os.path.dirname(stacker_kernel.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [top, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-P", "-c", _RUN], input=json.dumps([snapshot, command, seconds]),
                              capture_output=True, text=True, env=env, timeout=seconds + 10)
        text, finished = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError):
        return None
    shown = [line.rstrip() for line in text.splitlines()]
    while shown and not shown[0]:
        shown.pop(0)
    if not shown:
        return None
    more = len(shown) > lines
    shown = shown[:lines] + (["..."] if more else [])
    if not finished:
        shown.append(f"({os.path.basename(command)} --help did not finish within {seconds:g} s: cut off)")
    return "\n".join(shown)
