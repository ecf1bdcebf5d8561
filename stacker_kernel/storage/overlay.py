"""Trees as stacks of overlayfs layers: mounting them, and reading them without a mount.

A tree of the overlay driver (storage/driver.py) is a directory holding one
file, MARK, that lists the layer directories it is made of (top first) and,
for a writable tree, its upper and work directories. Whoever reads or runs a
tree mounts it over that directory inside a user and mount namespace of its
own (unprivileged overlayfs, `userxattr`: Linux >= 5.11): the container before
pivot_root (container/init.py), the helpers that read snapshots
(`run_in_userns` calls `mount_views`). Outside, `lexists` looks a path up
through the layers, honouring overlayfs's whiteouts and opaque directories
(Documentation/filesystems/overlayfs.rst).

Deep stacks are mounted with the new mount API (fsopen/fsconfig "lowerdir+",
Linux >= 6.8), which takes one layer per call: mount(2)'s options must fit
in a page.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import stat
from typing import Any, Iterable

MARK = "stacker-overlay.json"
WHITEOUT_XATTR = "user.overlay.whiteout"
OPAQUE_XATTR = "user.overlay.opaque"

_libc = ctypes.CDLL(None, use_errno=True)

# x86_64 and aarch64 share the numbers of the new mount API (include/uapi/asm-generic/unistd.h).
_SYS = {"move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432}
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
MS_RDONLY = 1


@dataclasses.dataclass(frozen=True)
class Stack:
    """What a tree is: its layers (absolute paths, top first) and, when writable, its upper and work dirs."""

    layers: tuple[str, ...]
    upper: str | None = None
    work: str | None = None


def read_stack(tree: os.PathLike | str) -> Stack | None:
    """The stack of overlay tree `tree`, or None when it is no overlay tree."""
    tree = os.fspath(tree)
    try:
        with open(os.path.join(tree, MARK), encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, OSError):
        return None
    base = os.path.dirname(os.path.dirname(os.path.abspath(tree)))  # the storage root
    layers = tuple(os.path.join(base, "layers", name) for name in data.get("layers", []))
    upper = os.path.join(tree, data["upper"]) if data.get("upper") else None
    work = os.path.join(tree, data["work"]) if data.get("work") else None
    return Stack(layers, upper, work)


def write_stack(tree: os.PathLike | str, layers: list[str], writable: bool) -> None:
    """Record in `tree` that it is layers `layers` (names under <root>/layers, top first),
    with an upper and work dir of its own when `writable`."""
    data: dict[str, Any] = {"layers": list(layers)}
    if writable:
        data.update(upper="upper", work="work")
    tmp = os.path.join(tree, MARK + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(tree, MARK))


def layer_names(tree: os.PathLike | str) -> list[str]:
    """The layer names tree `tree` records (top first); [] when it is no overlay tree."""
    try:
        with open(os.path.join(tree, MARK), encoding="utf-8") as f:
            return list(json.load(f).get("layers", []))
    except (OSError, ValueError):
        return []


# --- mounting (inside a user + mount namespace) --------------------------------

def _syscall(name: str, *args: Any) -> int:
    nr = _SYS[name] if os.uname().machine in ("x86_64", "aarch64") else None
    if nr is None:
        raise OSError(errno.ENOSYS, f"{name}: unknown syscall number on {os.uname().machine}")
    ret = _libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def _fsconfig(fd: int, key: str, value: str | None) -> None:
    if value is None:
        _syscall("fsconfig", ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_FLAG), key.encode(), None, ctypes.c_int(0))
    else:
        _syscall("fsconfig", ctypes.c_int(fd), ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(),
                 value.encode(), ctypes.c_int(0))


def _mount_new_api(stack: Stack, target: str, readonly: bool) -> None:
    fs = _syscall("fsopen", b"overlay", ctypes.c_uint(FSOPEN_CLOEXEC))
    try:
        _fsconfig(fs, "userxattr", None)
        for layer in stack.layers:  # "lowerdir+" appends: the first one given is the top
            _fsconfig(fs, "lowerdir+", layer)
        if stack.upper and not readonly:
            _fsconfig(fs, "upperdir", stack.upper)
            _fsconfig(fs, "workdir", stack.work)
        _syscall("fsconfig", ctypes.c_int(fs), ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, ctypes.c_int(0))
        mnt = _syscall("fsmount", ctypes.c_int(fs), ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(0))
    finally:
        os.close(fs)
    try:
        _syscall("move_mount", ctypes.c_int(mnt), b"", ctypes.c_int(AT_FDCWD), target.encode(),
                 ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    finally:
        os.close(mnt)


def _mount_legacy(stack: Stack, target: str, readonly: bool) -> None:
    opts = "userxattr,lowerdir=" + ":".join(s.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")
                                             for s in stack.layers)
    if stack.upper and not readonly:
        opts += f",upperdir={stack.upper},workdir={stack.work}"
    if _libc.mount(b"overlay", target.encode(), b"overlay", ctypes.c_ulong(0), opts.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount overlay on {target}: {os.strerror(err)}")


def mount_stack(stack: Stack, target: str, readonly: bool = False) -> None:
    """Mount `stack` on `target` (this process must be root of its user namespace and own
    its mount namespace). Read-only (no upper) when `readonly` or the stack has no upper."""
    layers = list(stack.layers)
    if not layers or (len(layers) == 1 and not (stack.upper and not readonly)):
        # overlayfs needs two lowers without an upper: an empty layer below is the same tree.
        empty = os.path.join(os.path.dirname(layers[0]) if layers else target, ".empty")
        layers.append(empty)
        stack = dataclasses.replace(stack, layers=tuple(layers))
    try:
        _mount_new_api(stack, target, readonly)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        # Kernels before 6.8 know no "lowerdir+": the option string must fit in a page then.
        _mount_legacy(stack, target, readonly)


def umount(target: str) -> None:
    """Detach the mount on `target` (MNT_DETACH)."""
    if _libc.umount2(target.encode(), ctypes.c_int(2)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _paths_in(value: Any, out: list[str], depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if value.startswith("/") and "\n" not in value and len(value) < 4096:
            out.append(value)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _paths_in(v, out, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            _paths_in(v, out, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _paths_in(getattr(value, f.name, None), out, depth + 1)


def mount_views(args: Iterable[Any]) -> None:
    """Mount every overlay tree named in `args` (paths of trees or of files in them, also
    inside lists, dicts and dataclasses) over its own directory, so that code written for a directory tree reads
    (or, for a writable tree, writes) the union. Run inside a fresh user + mount
    namespace (`run_in_userns`); nothing is visible outside it."""
    paths: list[str] = []
    _paths_in(list(args), paths)
    trees: list[str] = []
    for path in paths:  # a path inside a tree shows the tree's file: mount the tree
        cur = os.path.normpath(path)
        while cur != "/" and cur not in _MOUNTED and not os.path.isfile(os.path.join(cur, MARK)):
            cur = os.path.dirname(cur)
        if cur != "/" and cur not in trees and cur not in _MOUNTED:  # mounted before, in a long-lived helper
            trees.append(cur)
    for path in trees:
        stack = read_stack(path)
        if stack is not None:
            try:
                mount_stack(stack, path)
            except OSError as e:
                from stacker_kernel.errors import StorageError

                raise StorageError(f"cannot show snapshot {path} ({e.strerror}): overlayfs must mount in a "
                                   "user namespace (Linux 5.11 or later)") from None
            _MOUNTED[path] = stack


# What mount_views mounted in this process: path -> stack (the record is hidden under the mount).
_MOUNTED: dict[str, Stack] = {}


def step_layer(old: str | None, new: str) -> str | None:
    """The layer directory holding exactly what changed from tree `old` to tree `new`
    (both mounted by mount_views here): new's top layer when new stacks on old's
    layers alone. None otherwise (the caller then compares the trees)."""
    a, b = _MOUNTED.get(old or ""), _MOUNTED.get(new)
    if a is None or b is None or a.upper or b.upper or len(b.layers) != len(a.layers) + 1:
        return None
    return b.layers[0] if b.layers[1:] == a.layers else None


# --- reading without a mount ------------------------------------------------------

def is_whiteout(path: str, st: os.stat_result | None = None) -> bool:
    """True when `path` is an overlayfs whiteout: a 0/0 character device, or (with
    userxattr) a file carrying user.overlay.whiteout."""
    try:
        st = st or os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        try:
            os.getxattr(path, WHITEOUT_XATTR, follow_symlinks=False)
            return True
        except OSError:
            return False
    return False


def is_opaque(path: str) -> bool:
    """True when directory `path` hides what the layers below hold at that path."""
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def locate(stack: Stack, rel: str) -> str | None:
    """The host path holding `rel` (relative to the tree's root; symlinks not followed)
    in the union of `stack`, as the mounted tree would show it, or None when it is not
    there. A directory's entries may lie in lower layers too (see `lexists`)."""
    parts = [p for p in rel.split("/") if p and p != "."]
    layers = ([stack.upper] if stack.upper else []) + list(stack.layers)
    for layer in layers:
        cur, stop = layer, False
        for i, part in enumerate(parts):
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                break
            if is_whiteout(cur, st):
                return None
            if i == len(parts) - 1:
                return cur
            if not stat.S_ISDIR(st.st_mode):
                return None  # a file here hides everything below it
            if is_opaque(cur):
                stop = True
        else:
            return layer  # the root itself
        if stop:
            return None
    return None


def listdir(stack: Stack, rel: str) -> list[str] | None:
    """The names in directory `rel` of the union of `stack`, as the mounted tree would
    list them (whiteouts hide names of the layers below; an opaque directory, or a
    file or whiteout in the way, hides all of them), sorted; None when `rel` is no
    directory there. Entries the user may not read from the host are left out."""
    parts = [p for p in rel.split("/") if p and p != "."]
    layers = ([stack.upper] if stack.upper else []) + list(stack.layers)
    names: set[str] = set()
    decided: set[str] = set()  # shown or whited out by a layer above
    found = False
    for layer in layers:
        cur, last = layer, False
        for part in parts:
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                cur = None
                break
            if not stat.S_ISDIR(st.st_mode):  # a whiteout or a file hides what lies below
                return sorted(names) if found else None
            last = last or is_opaque(cur)
        if cur is None:
            if last:
                break
            continue
        try:
            entries = list(os.scandir(cur))
        except OSError:
            entries = []
        found = True
        for e in entries:
            if e.name in decided:
                continue
            decided.add(e.name)
            try:
                if is_whiteout(e.path, e.stat(follow_symlinks=False)):
                    continue
            except OSError:
                continue
            names.add(e.name)
        if last:
            break
    return sorted(names) if found else None


def lexists(stack: Stack, rel: str) -> bool:
    """Whether `rel` exists in the union of `stack` (symlinks not followed)."""
    return locate(stack, rel) is not None
