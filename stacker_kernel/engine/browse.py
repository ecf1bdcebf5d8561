"""Browsing a snapshot from outside the container: directory listings and downloads.

What `%browse` and the layer widget show, read from the read-only snapshot
subvolumes (never the build container), so it works while a cell runs and
cannot disturb the build shell. Snapshot files belong to subordinate ids: the
reads run as root of a user namespace (run_in_userns), resolve paths inside
the snapshot as the container sees them (engine/inspect.py) and open only
regular files (engine/grab.py). The faces reach this through BuildSession
(list_dir, prepare_download); the UI around it is kernel/widgets.py.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.grab import GrabError, grab, kind_of, open_in_snapshot
from stacker_kernel.engine.inspect import resolve_in_root

MAX_ENTRIES = 5000  # entries listed per directory
DIRECTORY, REGULAR_FILE, SYMLINK = kind_of(stat.S_IFDIR), kind_of(stat.S_IFREG), kind_of(stat.S_IFLNK)


@dataclass
class Entry:
    """One directory entry of a snapshot, with ids as the container sees them."""

    name: str
    path: str  # container path
    kind: str  # engine/grab.py's kind_of: "a directory", "a regular file", "a FIFO" ...
    size: int
    mode: str  # like `ls -l`: drwxr-xr-x
    uid: int
    gid: int
    mtime: float
    link_target: str | None = None  # symlinks: what the link says
    link_kind: str | None = None  # symlinks: kind of what it resolves to inside the rootfs
    link_path: str | None = None  # symlinks: the container path it resolves to
    link_problem: str | None = None  # symlinks: why it does not resolve (escapes, dangling)

    @property
    def is_dir(self) -> bool:
        """A directory, or a symlink to one inside the rootfs (opening it shows that one)."""
        return DIRECTORY in (self.kind, self.link_kind)

    @property
    def target_kind(self) -> str | None:
        """What a download would read: the entry's kind, or a symlink's target's (None: dangling)."""
        return self.link_kind if self.kind == SYMLINK else self.kind


@dataclass
class Listing:
    """A directory of a snapshot: its canonical container path and entries (dirs first)."""

    path: str
    entries: list[Entry]
    total: int  # entries in the directory (more than listed when over MAX_ENTRIES)


def _container_path(root: str, host: str) -> str:
    rel = os.path.relpath(host, root)
    return "/" if rel == "." else "/" + rel


def _list_in_ns(root: str, path: str) -> Listing:
    root = os.path.abspath(root)
    host = resolve_in_root(root, path)
    if not stat.S_ISDIR(os.lstat(host).st_mode):
        raise GrabError(f"{path} is not a directory: browse its directory and use its Download button")
    cpath = _container_path(root, host)
    with os.scandir(host) as it:
        names = sorted(de.name for de in it)
    entries = []
    for name in names[:MAX_ENTRIES]:
        child = os.path.join(cpath, name)
        st = os.lstat(os.path.join(host, name))  # a read-only snapshot: it is still there
        entry = Entry(name, child, kind_of(st.st_mode), st.st_size, stat.filemode(st.st_mode),
                      st.st_uid, st.st_gid, st.st_mtime)
        if entry.kind == SYMLINK:
            entry.link_target = os.readlink(os.path.join(host, name))
            try:
                resolved = resolve_in_root(root, child)
                entry.link_kind = kind_of(os.lstat(resolved).st_mode)
                entry.link_path = _container_path(root, resolved)
            except GrabError as e:
                entry.link_problem = str(e)
        entries.append(entry)
    entries.sort(key=lambda e: (not e.is_dir, e.name))
    return Listing(cpath, entries, len(names))


def list_directory(snapshot_root: str | Path, path: str) -> Listing:
    """The entries of container directory `path` in a snapshot; symlinks are followed
    only inside the rootfs. Raises GrabError for a missing path, a non-directory or an escape."""
    return run_in_userns(_list_in_ns, str(snapshot_root), path)


@dataclass
class Download:
    """A file made ready for a browser: its bytes, or a copy on the host."""

    name: str
    size: int
    data: bytes | None = None  # set for files up to the inline limit
    copy: str | None = None  # host path of the copy otherwise


def why_not_downloadable(path: str, kind: str) -> str:
    return (f"{path} is {kind}: only regular files can be downloaded"
            " (its contents do not exist in the snapshot)")


def _read_in_ns(root: str, path: str, limit: int) -> tuple[str, int, bytes | None]:
    # Opened by engine/grab.py's walk: inside the snapshot, regular files only.
    fd, name, st = open_in_snapshot(root, path)
    if fd is None:
        raise GrabError(why_not_downloadable(path, kind_of(st.st_mode)))
    with os.fdopen(fd, "rb") as f:  # the snapshot is read-only: the size cannot change
        return name, st.st_size, (f.read() if st.st_size <= limit else None)


def prepare_download(snapshot_root: str | Path, path: str, copy_to: Path, limit: int) -> Download:
    """Read container file `path` of a snapshot for a download: its bytes when at most
    `limit`, else a copy at copy_to/<path> (reflinked on the same btrfs, holes kept).
    Raises GrabError for a missing path, an escape or a special file."""
    name, size, data = run_in_userns(_read_in_ns, str(snapshot_root), path, limit)
    if data is not None:
        return Download(name, size, data=data)
    from stacker_kernel.engine.beside import own_dir

    own_dir(copy_to.parent)  # stacker-downloads/ and its folder of this snapshot: ours, no links
    own_dir(copy_to)
    dest = copy_to / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Download(name, size, copy=grab(snapshot_root, path, dest, into=False).path)
