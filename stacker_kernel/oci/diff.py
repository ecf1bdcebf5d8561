"""File-level difference between two read-only btrfs snapshots.

A path is unchanged when it has the same file type, inode number and ctime in
both snapshots (btrfs snapshots share inodes with their source): a snapshot keeps every inode
item byte for byte, any change to content, mode, owner, xattrs, link count or
name sets ctime, and user space cannot set ctime. So unchanged files are
never hashed; only the few inodes whose ctime falls in the coarse-clock tick of
the old snapshot's creation are compared in full (see COARSE_CLOCK_WINDOW_NS).
When that creation time cannot be known (the old tree is no subvolume, or its
otime cannot be read), every entry with equal inode and ctime is compared in
full: a doubt costs time, never a file missing from a layer.

Run `diff_snapshots` inside the user namespace (`run_in_userns`): rootfs
files belong to subordinate ids and directories may be unreadable from
outside. The result is a plain picklable dataclass, so it crosses back.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Literal

from stacker_kernel.errors import ImageError, StorageError

ChangeKind = Literal["added", "modified", "metadata", "removed"]
FileType = Literal["file", "dir", "symlink", "char", "block", "fifo", "socket"]

# btrfs: a subvolume's root directory is inode 256; a nested subvolume seen
# through a snapshot of its parent is an empty placeholder directory, inode 2.
SUBVOL_ROOT_INO = 256
EMPTY_SUBVOL_DIR_INO = 2

# ctime comes from the coarse clock (one jiffy, 1-10 ms): a file changed just
# after the old snapshot, within the tick that stamped it, could show the old
# ctime. Entries whose ctime is this close to the old snapshot's creation are
# compared in full (lstat fields, xattrs, content): a handful of files at most.
COARSE_CLOCK_WINDOW_NS = 20_000_000

_TYPES: dict[int, FileType] = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Change:
    """One changed path (relative, no leading '/').

    `kind`: added (new path, or a path whose inode was replaced), modified
    (content or entries changed), metadata (only mode/owner/xattrs/links: ctime
    moved but mtime and size did not; a layer still carries the whole entry),
    removed. `type` is the new file type (the old one for removed paths).
    `opaque` marks a directory replaced by a new directory: the layer must hide
    every lower child of it. `ino`/`nlink` are the new inode's (0 for removed),
    so a writer can find hard links.
    """
    path: str
    kind: ChangeKind
    type: FileType
    ino: int = 0
    nlink: int = 1
    opaque: bool = False


@dataclass
class Diff:
    """The difference `old` -> `new`: every path to put in a layer, sorted.

    Removed paths are collapsed (a removed directory is listed once, never its
    children; children of a replaced path are never listed as removed). Every
    path of a changed multi-link inode appears (they share the inode's ctime),
    and every descendant of an opaque directory appears as added.
    `nested_subvolumes` lists directories that are (placeholders of) nested
    subvolumes: their contents are not part of the snapshot and are not walked.
    """
    old: str | None
    new: str
    changes: list[Change] = field(default_factory=list)
    nested_subvolumes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes

    def paths(self, *kinds: ChangeKind) -> list[str]:
        return [c.path for c in self.changes if not kinds or c.kind in kinds]


@dataclass(frozen=True)
class _Entry:
    type: FileType
    ino: int
    ctime_ns: int
    mtime_ns: int
    size: int
    nlink: int
    mode: int
    uid: int
    gid: int
    rdev: int


def _entry(st: os.stat_result) -> _Entry:
    return _Entry(_TYPES.get(stat.S_IFMT(st.st_mode), "file"), st.st_ino, st.st_ctime_ns,
                  st.st_mtime_ns, st.st_size, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, st.st_rdev)


def walk(root: str) -> tuple[dict[str, _Entry], list[str]]:
    """Every path below `root` (relative, sorted by the walk) with its lstat
    record, and the nested subvolumes found (not descended into)."""
    entries: dict[str, _Entry] = {}
    nested: list[str] = []
    try:
        root_dev = os.lstat(root).st_dev
    except OSError as e:
        raise ImageError(f"cannot read snapshot {root} ({e.strerror}): check that it exists and run inside the user namespace") from None
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            for de in it:
                rel = f"{rel_dir}{de.name}"
                st = de.stat(follow_symlinks=False)
                e = _entry(st)
                entries[rel] = e
                if e.type != "dir":
                    continue
                if _is_nested(st, root_dev):
                    nested.append(rel)
                    continue
                stack.append((rel + "/", de.path))
    return entries, sorted(nested)


def _is_nested(st: os.stat_result, root_dev: int) -> bool:
    """Whether a directory is (the placeholder of) a nested subvolume, or another mount."""
    return st.st_ino in (SUBVOL_ROOT_INO, EMPTY_SUBVOL_DIR_INO) or st.st_dev != root_dev


def scan_nested(root: str) -> tuple[bool, list[str]]:
    """Whether `root` holds any entry, and its nested subvolumes, as `walk` finds
    them; only directories are stat'ed (the file types come from readdir), a
    quarter of walk's time: all a whole-rootfs layer needs to know."""
    try:
        root_dev = os.lstat(root).st_dev
    except OSError as e:
        raise ImageError(f"cannot read snapshot {root} ({e.strerror}): check that it exists and run inside the user namespace") from None
    nested: list[str] = []
    anything = False
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            for de in it:
                anything = True
                if not de.is_dir(follow_symlinks=False):
                    continue
                rel = f"{rel_dir}{de.name}"
                if _is_nested(de.stat(follow_symlinks=False), root_dev):
                    nested.append(rel)
                else:
                    stack.append((rel + "/", de.path))
    return anything, sorted(nested)


def compare(old: dict[str, _Entry], new: dict[str, _Entry], *, old_taken_ns: int | None = None,
            same: Callable[[str, _Entry, _Entry], bool] | None = None) -> list[Change]:
    """The sorted changes from `old` to `new` (the maps `walk` returns).

    `old_taken_ns` is when the old snapshot was taken: an entry with equal
    ino and ctime whose ctime falls in the coarse-clock window before it is
    unchanged only if `same(path, old, new)` says so (see above). With
    `old_taken_ns=None` (unknown), `same` decides for every such entry.
    """
    changes: list[Change] = []
    opaque_dirs: list[str] = []  # replaced directories: all their children are new
    replaced: set[str] = set()   # paths whose old object is gone (old children need no whiteout)
    for path in sorted(new):
        n = new[path]
        o = old.get(path)
        parent = path.rpartition("/")[0]
        under_opaque = bool(opaque_dirs) and _under_any(parent, opaque_dirs)
        if o is None or under_opaque:
            changes.append(Change(path, "added", n.type, n.ino, n.nlink))
            if under_opaque and o is not None:
                replaced.add(path)
            continue
        if o.type != n.type or o.ino != n.ino:
            # The old object is gone: file->file or type change is a plain add
            # (appliers unlink first); dir->dir needs an opaque whiteout.
            opaque = o.type == "dir" and n.type == "dir"
            changes.append(Change(path, "added", n.type, n.ino, n.nlink, opaque=opaque))
            replaced.add(path)
            if opaque:
                opaque_dirs.append(path)
            continue
        in_window = old_taken_ns is None or n.ctime_ns >= old_taken_ns - COARSE_CLOCK_WINDOW_NS
        if o.ctime_ns != n.ctime_ns and n.type == "dir" and same is not None and same(path, o, n):
            # A directory's own record (mode, owner, mtime, xattrs) is as before: its
            # ctime moved only because something was made and removed in it with
            # its times restored (the container's mount points): no change.
            continue
        if o.ctime_ns != n.ctime_ns or (in_window and same is not None and not same(path, o, n)):
            metadata_only = o.mtime_ns == n.mtime_ns and o.size == n.size and n.type != "symlink"
            changes.append(Change(path, "metadata" if metadata_only else "modified", n.type, n.ino, n.nlink))
    removed_dirs: list[str] = []
    for path in sorted(old):
        if path in new:
            continue
        parent = path.rpartition("/")[0]
        # The old parent is gone (removed or replaced): its whiteout or the
        # replacing entry hides this path already.
        if parent and (parent not in new or _under_any(parent, removed_dirs) or parent in replaced
                       or _under_any(parent, opaque_dirs) or _replaced_ancestor(parent, replaced)):
            continue
        changes.append(Change(path, "removed", old[path].type, 0, 0))
        if old[path].type == "dir":
            removed_dirs.append(path)
    changes.sort(key=lambda c: c.path)
    return changes


def _under_any(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


def _replaced_ancestor(path: str, replaced: set[str]) -> bool:
    while path:
        if path in replaced:
            return True
        path = path.rpartition("/")[0]
    return False


def diff_snapshots(old: str | None, new: str,
                   walks: dict[str, tuple[dict[str, _Entry], list[str]]] | None = None) -> Diff:
    """The difference between snapshot `old` and snapshot `new` (`old=None`:
    everything in `new` is added). Both should be read-only snapshots so they
    do not move under the walk. Run inside the user namespace.

    `walks` (snapshot path -> its walk) lends walks made before and gets this
    diff's: a chain of steps is walked once per snapshot, not twice."""
    from stacker_kernel.storage import overlay  # storage is below oci; import late to keep diff pure

    layer = overlay.step_layer(old, new)
    if layer is not None:
        # Overlay storage: the step's own layer is the difference (its whiteouts the
        # removals): read it, not the two trees.
        return Diff(old=old, new=new, changes=layer_changes(old, new, layer))

    def walked(root: str) -> tuple[dict[str, _Entry], list[str]]:
        if walks is None:
            return walk(root)
        if root not in walks:
            walks[root] = walk(root)
        return walks[root]

    new_entries, nested = walked(new)
    old_entries: dict[str, _Entry] = {}
    old_taken_ns: int | None = None
    if old is not None:
        old_entries, _ = walked(old)
        old_taken_ns = _snapshot_time_ns(old)
        if old_taken_ns is not None and old_entries:
            # A subvolume filled and then made read-only (a base) was created before
            # its files: it froze no earlier than its newest ctime, so the window
            # starts there, and the base's files are not all hashed on every export.
            old_taken_ns = max(old_taken_ns, max(e.ctime_ns for e in old_entries.values()))
    changes = compare(old_entries, new_entries, old_taken_ns=old_taken_ns,
                      same=lambda path, o, n: _same_in_full(old, new, path, o, n))
    return Diff(old=old, new=new, changes=changes, nested_subvolumes=nested)


def layer_changes(old: str, new: str, layer: str) -> list[Change]:
    """The changes an overlayfs layer directory `layer` makes to tree `old`, giving tree
    `new` (overlayfs whiteouts and opaque directories, Documentation/filesystems/overlayfs.rst)."""
    from stacker_kernel.storage.overlay import is_opaque, is_whiteout

    changes: list[Change] = []
    stack = [("", layer)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            for de in it:
                rel = f"{rel_dir}{de.name}"
                st = de.stat(follow_symlinks=False)
                try:
                    ost = os.lstat(os.path.join(old, rel))
                except (FileNotFoundError, NotADirectoryError):
                    ost = None
                if is_whiteout(de.path, st):
                    if ost is not None:
                        changes.append(Change(rel, "removed", _TYPES.get(stat.S_IFMT(ost.st_mode), "file"), 0, 0))
                    continue
                nst = os.lstat(os.path.join(new, rel))  # the tree's inode numbers: hard links
                kind = _TYPES.get(stat.S_IFMT(nst.st_mode), "file")
                same_type = ost is not None and stat.S_IFMT(ost.st_mode) == stat.S_IFMT(nst.st_mode)
                opaque = kind == "dir" and same_type and is_opaque(de.path)
                if kind == "dir" and same_type and not opaque and _same_dir_attrs(old, new, rel, ost, nst):
                    # Only copied up for what changed below it (or for a mount point the
                    # container made and removed): the directory itself is unchanged.
                    stack.append((rel + "/", de.path))
                    continue
                changes.append(Change(rel, "modified" if same_type and not opaque else "added", kind,
                                      nst.st_ino, nst.st_nlink, opaque=opaque))
                if kind == "dir":
                    stack.append((rel + "/", de.path))
    changes.sort(key=lambda c: c.path)
    return changes


def _same_dir_attrs(old: str, new: str, rel: str, o: os.stat_result, n: os.stat_result) -> bool:
    if (o.st_mode, o.st_uid, o.st_gid, o.st_mtime_ns) != (n.st_mode, n.st_uid, n.st_gid, n.st_mtime_ns):
        return False
    try:
        return _xattrs(os.path.join(old, rel)) == _xattrs(os.path.join(new, rel))
    except OSError:
        return False


def _same_in_full(old_root: str | None, new_root: str, path: str, o: _Entry, n: _Entry) -> bool:
    """Whether `path` is identical in both trees by every recorded attribute,
    its xattrs and its content (files are hashed, symlinks read). What
    cannot be read is taken as changed: the layer then carries it (or its
    writer says why it cannot)."""
    try:
        return _same_attrs_and_content(old_root, new_root, path, o, n)
    except OSError:
        return False


def _same_attrs_and_content(old_root: str | None, new_root: str, path: str, o: _Entry, n: _Entry) -> bool:
    if (o.mode, o.uid, o.gid, o.size, o.mtime_ns, o.nlink, o.rdev) != (n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.nlink, n.rdev):
        return False
    assert old_root is not None
    a, b = os.path.join(old_root, path), os.path.join(new_root, path)
    if _xattrs(a) != _xattrs(b):
        return False
    if n.type == "symlink":
        return os.readlink(a) == os.readlink(b)
    if n.type == "file":
        return _sha256(a) == _sha256(b)
    return True


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):  # no xattrs here at all
            return {}
        raise
    return {k: os.getxattr(path, k, follow_symlinks=False) for k in names}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _snapshot_time_ns(path: str) -> int | None:
    """When subvolume `path` was created (its otime); None when that is unknown
    (it is no subvolume, or the kernel does not say), and compare() then
    compares every candidate in full."""
    from stacker_kernel.storage import btrfs  # storage is below oci; import late to keep diff pure
    try:
        if not btrfs.is_subvolume(path):
            return None
        return int(btrfs.subvolume_info(path).otime * 1e9)
    except (StorageError, OSError):
        return None


def summary(diff: Diff) -> list[tuple[str, str]]:
    """`[(letter, "/path")]` for `%diff`: A added, M modified (content or
    metadata), D removed; directories end with '/'."""
    letters = {"added": "A", "modified": "M", "metadata": "M", "removed": "D"}
    return [(letters[c.kind], "/" + c.path + ("/" if c.type == "dir" else "")) for c in diff.changes]
