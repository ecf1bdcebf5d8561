"""Files written beside a notebook (step logs, downloads, exports), safely in a folder
others may write: a shared scratch folder, a group share.

Another user there can plant a symbolic link where we are about to write
(`stacker-logs/NB-step3-LAYER-failed.log -> ~/.bashrc`) or a file of theirs. So
a file is written under a fresh name created exclusively without following
links, then renamed over its target (which is never opened); a target that is a
link or belongs to someone else is refused in one line, and so is a folder of
ours (stacker-logs/, stacker-downloads/) that is a link or someone else's.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Callable

from stacker_kernel.errors import StorageError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _refuse(path: Path, why: str) -> StorageError:
    return StorageError(f"{path} {why}: not written (remove it, or work in a folder only you can write)")


def _check_existing(path: Path, st: os.stat_result, kind: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "is a symbolic link")
    if st.st_uid != os.geteuid():
        raise _refuse(path, "belongs to another user")
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "is not a directory")
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        raise _refuse(path, "is not a regular file")


def check_target(path: Path, kind: str) -> None:
    """Refuse (StorageError) an existing `path` that is a link, someone else's, or not a
    `kind` ("file" or "dir"); a missing one is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    _check_existing(path, st, kind)


def own_dir(path: Path) -> Path:
    """Directory `path` (created when missing), refused unless it is a real directory of ours."""
    path = Path(path)
    try:
        os.mkdir(path, 0o777)  # the umask decides, as for any folder the user makes; never follows a link
    except FileExistsError:
        pass
    check_target(path, "dir")
    return path


def write_file(path: Path, fill: Callable[[int], None], mode: int = 0o666) -> Path:
    """Create or replace file `path` with what `fill(fd)` writes; see the module doc."""
    path = Path(path)
    check_target(path, "file")
    parent = os.open(path.parent, _DIR)
    tmp = f".{path.name[:200]}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                     dir_fd=parent)
        try:
            fill(fd)
        finally:
            os.close(fd)
        # Checked again just before: a link planted meanwhile is replaced, never opened.
        check_target(path, "file")
        os.rename(tmp, path.name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise
    finally:
        os.close(parent)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    def fill(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    return write_file(path, fill)


def copy_file(src: str | os.PathLike, path: Path) -> Path:
    """`path` becomes a copy of our own file `src`."""
    def fill(fd: int) -> None:
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]

    return write_file(path, fill)
