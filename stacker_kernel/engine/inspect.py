"""Reading snapshots from outside the container: paths, diffs and sizes (`grab` is engine/grab.py).

Snapshot files belong to subordinate ids, so the work runs as root of a
user namespace (run_in_userns). Paths are resolved inside the snapshot as the
container would see them (absolute symlinks point into the rootfs), and a path
that would leave the rootfs through `..` or a symlink is refused.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.grab import MAX_SYMLINKS, GrabError, Grabbed, escapes, grab

if TYPE_CHECKING:
    from stacker_kernel.storage.driver import Driver

__all__ = ["TreeReader", "GrabError", "Grabbed", "grab", "resolve_in_root", "diff_summary", "size_changes"]


def _follow(path: str, host_of: Callable[[list[str]], "str | os.PathLike | None"],
            clamp: bool) -> tuple[list[str], list[str] | None]:
    """Walk container path `path` part by part, following symlinks inside the rootfs
    (`host_of(parts)` is where those parts are on the host, None when absent). Returns
    the resolved parts and, from the first missing part on, the rest (None when all
    exist). Raises GrabError on a loop, or when the path escapes the rootfs, unless
    `clamp` (`..` at the root stays there, as inside the container)."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            elif not clamp:
                raise GrabError(f"{path} escapes the rootfs through '..'")
            continue
        host = host_of(done + [part])
        try:
            st = os.lstat(host) if host is not None else None
        except FileNotFoundError:
            st = None
        if st is None:
            return done, [part] + todo
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise GrabError(f"{path}: too many levels of symbolic links")
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            elif not clamp and escapes(done, target):
                raise GrabError(f"{path} escapes the rootfs through the symlink /{'/'.join(done + [part])} -> {target}")
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(part)
    return done, None


def resolve_in_root(root: str, path: str, missing_ok: bool = False, clamp: bool = False) -> str:
    """The host path of container path `path` in rootfs `root`, following symlinks
    inside the rootfs. Raises GrabError if it would leave the rootfs, or (unless
    `missing_ok`, which keeps the missing rest as plain names) if it does not exist.
    With `clamp`, `..` at the root stays at the root, as inside the container."""
    root = os.path.abspath(root)
    done, missing = _follow(path, lambda parts: os.path.join(root, *parts), clamp)
    if missing is None:
        return os.path.join(root, *done)
    if missing_ok and ".." not in missing[1:]:
        return os.path.join(root, *done, *missing)
    raise GrabError(f"{path} does not exist in the rootfs")


class TreeReader:
    """A rootfs (a snapshot or a live tree) read from the host through its storage
    driver, by the paths the container sees: an overlay tree is a stack of layer
    directories (storage/overlay.py), a btrfs one a plain directory. Symlinks are
    resolved inside the rootfs (an absolute target starts at its root, `..` stops
    there), never on the host. Files the user cannot read from the host (other
    subordinate ids' private ones) read as absent."""

    def __init__(self, tree: str | Path, driver: "Driver | None" = None) -> None:
        from stacker_kernel.storage import driver as drivers, overlay

        self.tree = Path(tree)
        if driver is None:  # a tree of either driver: an overlay tree holds its stack's record
            driver = drivers.OverlayDriver() if overlay.read_stack(self.tree) is not None else drivers.Driver()
        self.driver = driver

    def resolve(self, path: str) -> str | None:
        """Container path `path` with its symlinks resolved, None if it is not there."""
        try:
            done, missing = _follow(path, lambda parts: self.driver.locate(self.tree, "/".join(parts)),
                                    clamp=True)
        except (GrabError, OSError):  # a loop, or a file the user may not read from the host
            return None
        return "/" + "/".join(done) if missing is None else None

    def host_path(self, path: str) -> str | None:
        """Where container path `path` (symlinks resolved) is on the host, None if absent."""
        resolved = self.resolve(path)
        found = self.driver.locate(self.tree, resolved) if resolved is not None else None
        return str(found) if found is not None else None

    def listdir(self, path: str) -> list[str]:
        """The names in directory `path` (symlinks resolved), sorted; [] when it is none."""
        resolved = self.resolve(path)
        if resolved is None:
            return []
        try:
            return self.driver.listdir(self.tree, resolved)
        except OSError:
            return []

    def is_dir(self, path: str) -> bool:
        host = self.host_path(path)
        return host is not None and os.path.isdir(host)

    def is_file(self, path: str) -> bool:
        host = self.host_path(path)
        return host is not None and os.path.isfile(host)


def _diff_in_ns(old: str | None, new: str) -> list[tuple[str, str]]:
    from stacker_kernel.oci.diff import diff_snapshots, summary

    return summary(diff_snapshots(old, new))


def diff_summary(old: str | Path | None, new: str | Path) -> list[tuple[str, str]]:
    """[(A|M|D, path)] between two snapshots (old None: everything is added)."""
    return run_in_userns(_diff_in_ns, str(old) if old else None, str(new))


def _tree_bytes(path: str) -> int:
    """Bytes of regular-file content under `path` (a file or a directory), not following links."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _file_bytes(root: str | None, rel: str) -> int:
    if root is None:
        return 0
    try:
        st = os.lstat(os.path.join(root, rel))
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _size_changes_in_ns(pairs: list[tuple[str | None, str]]) -> list[int]:
    from stacker_kernel.oci.diff import diff_snapshots

    out = []
    walks: dict = {}  # a step's snapshot is the next step's parent: walked once for both
    for old, new in pairs:
        for path in [p for p in walks if p != old]:
            del walks[path]  # only the walk the next pair may share is kept (a rootfs's entries each)
        delta = 0
        for change in diff_snapshots(old, new, walks).changes:
            if change.kind == "removed":
                delta -= _tree_bytes(os.path.join(old, change.path)) if old else 0
            elif change.kind in ("added", "modified") and change.type == "file":
                delta += _file_bytes(new, change.path) - _file_bytes(old, change.path)
        out.append(delta)
    return out


def size_changes(pairs: list[tuple[str | Path | None, str | Path]]) -> list[int]:
    """For each (parent snapshot, snapshot): bytes of file content the step added
    (negative when it removed more), from the snapshot diff, in one helper."""
    if not pairs:
        return []
    return run_in_userns(_size_changes_in_ns, [(str(o) if o else None, str(n)) for o, n in pairs])
