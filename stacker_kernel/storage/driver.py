"""Storage drivers: how the store makes trees, freezes them and deletes them.

The store (storage/store.py) and the engine work on trees at fixed places:
bases/<digest> and snapshots/<id> (read-only) and live/<session> (writable).
A driver says what such a tree is:

- `BtrfsDriver`: a btrfs subvolume; a snapshot is a read-only subvolume
  snapshot, a writable copy a writable one (storage/btrfs.py).
- `OverlayDriver`: a stack of overlayfs layers (storage/overlay.py). Every
  step's changes are its own upper directory, moved to layers/<id> when the
  step commits; a snapshot records the layers it is made of (top first), a
  writable copy is a fresh empty upper over them. Trees are mounted by whoever
  uses them, in their own user namespace; nothing is mounted on the host.

The driver of a storage root is chosen when the store is first opened (btrfs
when the root is on btrfs, overlay otherwise, unless asked for one) and
recorded in the file `driver` of the root.
"""
from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Callable, ContextManager

from stacker_kernel.errors import StorageError
from stacker_kernel.storage import btrfs, overlay

DRIVER_FILE = "driver"
# A snapshot whose stack is deeper than this gets its lower layers flattened into one
# (OverlayDriver.flatten, in the background): a mount's cost grows with its layers,
# and overlayfs takes at most 500.
FLATTEN_DEPTH = 64
FLAT_TMP = ".tmp-flat-"
# <root>/layer-sizes/<layer>: the bytes layer <layer> holds, measured the first time
# `usage` counts it (a layer never changes once made), dropped with it.
SIZES = "layer-sizes"
NAMES = ("btrfs", "overlay")
# What gc deleted waits under this prefix, in the folder it was in (a rename within a
# folder: moving a read-only subvolume to another folder needs write access to it,
# which btrfs refuses), until the store's reaper destroys it (storage/store.py
# reap_trash). Nothing else in the store starts with it.
TRASH_PREFIX = ".trash-"
# The folders of a storage root that may hold trash.
TRASH_DIRS = ("snapshots", "bases", "layers")


def trash_entries(root: Path) -> list[Path]:
    """What waits in the trash of storage root `root` (see TRASH_PREFIX)."""
    found = []
    for sub in TRASH_DIRS:
        try:
            with os.scandir(root / sub) as it:
                found.extend(Path(e.path) for e in it if e.name.startswith(TRASH_PREFIX))
        except (FileNotFoundError, NotADirectoryError):
            pass
    return found


class Driver:
    """The operations the store and the engine need on trees (see the module docstring)."""

    name = ""
    #: True when the container's mount of its rootfs must be gone before the rootfs is
    #: committed (an overlay upper cannot change hands under a mount): the engine parks
    #: the container then and builds its root again on the new stack (engine/live.py).
    stop_before_commit = False

    def create(self, path: Path) -> None:
        """An empty writable tree at `path` that a caller fills as a plain directory (a base)."""
        raise NotImplementedError

    def adopt(self, tmp: Path, dest: Path, id: str) -> None:
        """Freeze tree `tmp` (made by `create`, filled) and move it to read-only `dest`."""
        raise NotImplementedError

    def commit(self, live: Path, dest: Path, id: str) -> None:
        """A read-only snapshot of writable tree `live` at `dest`; `live` stays writable with the same content."""
        raise NotImplementedError

    def uncommit(self, live: Path, dest: Path, id: str) -> None:
        """Undo `commit` (its record could not be written): `live` holds what it held before."""
        raise NotImplementedError

    def writable_copy(self, src: Path, dest: Path) -> None:
        """`dest` becomes a writable copy of snapshot `src` (whatever `dest` held is dropped)."""
        raise NotImplementedError

    def remove(self, path: Path) -> None:
        """Delete tree (or any directory or file) `path`; a missing one is fine."""
        raise NotImplementedError

    def remove_many(self, paths: list[Path]) -> None:
        for p in paths:
            self.remove(p)

    def trash(self, path: Path) -> Path:
        """Move tree `path` out of sight into the trash of its folder (see TRASH_PREFIX),
        where the reaper destroys it; returns where it went."""
        dest = path.with_name(f"{TRASH_PREFIX}{path.name}.{os.urandom(4).hex()}")
        os.rename(path, dest)
        return dest

    def locate(self, tree: Path, rel: str) -> Path | None:
        """Where `rel` of `tree` is on the host (symlinks not followed), None when it is not there."""
        path = tree / rel.lstrip("/")
        return path if os.path.lexists(path) else None

    def lexists(self, tree: Path, rel: str) -> bool:
        """Whether `rel` exists in `tree` (symlinks not followed), read from the host."""
        return self.locate(tree, rel) is not None

    def listdir(self, tree: Path, rel: str) -> list[str]:
        """The names in directory `rel` of `tree` (symlinks not followed), read from the
        host; OSError when it is no directory there or cannot be read."""
        return sorted(os.listdir(Path(tree) / rel.lstrip("/")))

    def usage(self, root: Path) -> int:
        """Bytes the storage uses."""
        raise NotImplementedError

    def wait_reclaimed(self, root: Path) -> None:
        """Return once what deleted trees held is free again."""

    def sync(self, root: Path) -> None:
        """Push pending deletions so that `usage` shows them."""

    def prepare_db_file(self, path: Path) -> None:
        """Create the database's shared-memory files as the filesystem needs them."""

    def collect(self, root: Path, trees: Callable[[], list[Path]], later: bool = False) -> bool:
        """After records were dropped: free what no tree left (`trees()` lists them) needs
        (with `later`: move it into the trash, for the reaper). True when a trash of the
        driver's own is left (one that the store's folders do not show)."""
        return False

    def after_commit(self, lock: Callable[[], ContextManager], snapshot: Path) -> None:
        """Called once snapshot `snapshot` is committed and recorded (`lock` is the store's write lock)."""


class BtrfsDriver(Driver):
    name = "btrfs"

    def create(self, path: Path) -> None:
        btrfs.create_subvolume(path)

    def adopt(self, tmp: Path, dest: Path, id: str) -> None:
        from stacker_kernel.storage.store import _any_owner  # late: store imports us

        _any_owner(btrfs.set_readonly, tmp, True)
        self.remove(dest)
        os.rename(tmp, dest)

    def commit(self, live: Path, dest: Path, id: str) -> None:
        btrfs.snapshot(live, dest, readonly=True)

    def uncommit(self, live: Path, dest: Path, id: str) -> None:
        btrfs.delete_subvolume(dest)

    def writable_copy(self, src: Path, dest: Path) -> None:
        if dest.exists():
            btrfs.delete_subvolume(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        btrfs.snapshot(src, dest, readonly=False)

    def remove(self, path: Path) -> None:
        from stacker_kernel.storage.store import remove_any_owner  # late: store imports us

        remove_any_owner(path)  # whoever owns its top

    def usage(self, root: Path) -> int:
        return btrfs.fs_usage(root)

    def wait_reclaimed(self, root: Path) -> None:
        btrfs.wait_reclaimed(root)

    def sync(self, root: Path) -> None:
        btrfs.sync(root)

    def prepare_db_file(self, path: Path) -> None:
        # SQLite mmaps the WAL index: on a full btrfs a copy-on-write page fault is
        # SIGBUS; NOCOW files make it an ordinary "disk is full" error instead.
        btrfs.create_nocow_file(path)


def _rmtree_in_ns(paths: list[str]) -> None:
    for p in paths:
        _rmtree(p)


def _rmtree(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    shutil.rmtree(path)


def _rmtree_own(path: str) -> None:
    """Delete `path` as the user: any file in a directory of the user's own goes, and the
    user's own directories are made writable first (overlayfs makes its work dir mode 0).
    OSError (EPERM) at a directory of another id: the namespace's root deletes the rest."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    if st.st_mode & 0o700 != 0o700:
        os.chmod(path, 0o700)
    for e in os.scandir(path):
        _rmtree_own(e.path)
    os.rmdir(path)


class OverlayDriver(Driver):
    name = "overlay"
    stop_before_commit = True

    def __init__(self) -> None:
        self._flattening = threading.Lock()  # held while a flattening runs (after_commit)

    @staticmethod
    def _root(tree: Path) -> Path:
        return tree.parent.parent  # bases/<x>, snapshots/<x>, live/<x>

    @staticmethod
    def _layers_dir(root: Path) -> Path:
        layers = root / "layers"
        layers.mkdir(mode=0o700, exist_ok=True)
        (layers / ".empty").mkdir(mode=0o755, exist_ok=True)
        return layers

    def create(self, path: Path) -> None:
        path.mkdir(mode=0o755)

    def adopt(self, tmp: Path, dest: Path, id: str) -> None:
        layers = self._layers_dir(self._root(dest))
        self.remove_many([dest, layers / id])
        _forget_size(self._root(dest), id)
        os.rename(tmp, layers / id)
        dest.mkdir(mode=0o755)
        overlay.write_stack(dest, [id], writable=False)

    def commit(self, live: Path, dest: Path, id: str) -> None:
        stack = overlay.layer_names(live)
        if not (live / "upper").is_dir():
            raise StorageError(f"cannot commit {live}: it is not a writable tree of this storage")
        layers = self._layers_dir(self._root(dest))
        new_stack = [id, *stack]
        dest.mkdir(mode=0o755)
        overlay.write_stack(dest, new_stack, writable=False)
        # The upper becomes the step's layer; the live tree goes on over it with a fresh upper.
        os.rename(live / "upper", layers / id)
        (live / "upper").mkdir(mode=0o755)
        # The work dir stays: overlayfs empties it at every mount.
        overlay.write_stack(live, new_stack, writable=True)

    def uncommit(self, live: Path, dest: Path, id: str) -> None:
        layers = self._layers_dir(self._root(dest))
        stack = overlay.layer_names(dest)[1:]
        _forget_size(self._root(dest), id)  # measured meanwhile: it is an upper again
        self.remove(live / "upper")
        os.rename(layers / id, live / "upper")
        overlay.write_stack(live, stack, writable=True)
        self.remove(dest)

    def writable_copy(self, src: Path, dest: Path) -> None:
        stack = overlay.layer_names(src)
        if not stack:
            raise StorageError(f"cannot copy {src}: it is not a snapshot of this storage")
        self._layers_dir(self._root(dest))
        self.remove(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.mkdir(mode=0o755)
        (dest / "upper").mkdir(mode=0o755)
        (dest / "work").mkdir(mode=0o700)
        overlay.write_stack(dest, stack, writable=True)

    def remove(self, path: Path) -> None:
        self.remove_many([path])

    def remove_many(self, paths: list[Path]) -> None:
        paths = [p for p in paths if os.path.lexists(p)]
        if not paths:
            return
        if os.geteuid() == 0:
            _rmtree_in_ns([str(p) for p in paths])
            return
        try:
            # Most often all the user's own (a live tree whose upper holds only files of the
            # container's root, or nothing after a commit): no namespace needed.
            for p in paths:
                _rmtree_own(str(p))
            return
        except OSError:
            pass
        # Layers hold files of the container's ids, which only its root may delete.
        from stacker_kernel.container.userns import CLONE_NEWNS, run_in_userns

        run_in_userns(_rmtree_in_ns, [str(p) for p in paths], flags=CLONE_NEWNS, views=False)

    def locate(self, tree: Path, rel: str) -> Path | None:
        stack = overlay.read_stack(tree)
        found = overlay.locate(stack, rel) if stack is not None else None
        return Path(found) if found is not None else None

    def listdir(self, tree: Path, rel: str) -> list[str]:
        stack = overlay.read_stack(tree)
        names = overlay.listdir(stack, rel) if stack is not None else None
        if names is None:
            raise NotADirectoryError(f"{rel} is no directory of {tree}")
        return names

    def usage(self, root: Path) -> int:
        """What the storage holds: its layers by their recorded sizes (each measured once,
        the first time it is counted), the rest (live uppers, logs, records) walked. So a
        call costs what changed since the last one, not the whole storage."""
        layers, sizes = root / "layers", root / SIZES
        total = 0
        try:
            recorded = set(os.listdir(sizes))
        except FileNotFoundError:
            recorded = set()
        present = set()
        for e in os.scandir(layers) if layers.is_dir() else ():
            if e.name.startswith(TRASH_PREFIX):
                continue  # deleted, being destroyed: not the user's any more
            present.add(e.name)
            frozen = not e.name.startswith(".")  # not a flattening under way (nor .empty)
            if frozen and e.name in recorded:
                try:
                    total += int((sizes / e.name).read_text())
                    continue
                except (OSError, ValueError):
                    pass
            size = _du_entry(e.path)
            if frozen:
                _record_size(root, e.name, size)
            total += size
        for name in recorded - present:  # a layer removed by another route: its record goes too
            _forget_size(root, name)
        return total + _du(root, skip=layers)  # last: with the records just written

    def prepare_db_file(self, path: Path) -> None:
        pass

    def collect(self, root: Path, trees: Callable[[], list[Path]], later: bool = False) -> bool:
        """Delete the layers no remaining tree is made of (those of dropped steps and
        bases: a layer lives as long as a snapshot stacks on it), and flattenings
        whose process is gone; with `later`, move them into the trash instead (the
        reaper deletes them). True when layers wait in the trash."""
        from stacker_kernel.storage.store import process_start_time  # late: store imports us

        layers = root / "layers"
        if not layers.is_dir():
            return False
        used: set[str] = set()
        for tree in trees():
            used.update(overlay.layer_names(tree))
        drop, trash = [], False
        for e in os.scandir(layers):
            if e.name.startswith(TRASH_PREFIX):
                trash = True
            elif e.name.startswith(FLAT_TMP):
                pid = e.name[len(FLAT_TMP):].partition("-")[0]
                if pid.isdigit() and process_start_time(int(pid)) is not None:
                    continue  # being flattened
                drop.append(layers / e.name)
            elif e.name != ".empty" and e.name not in used:
                drop.append(layers / e.name)
        if later:
            for path in drop:
                self.trash(path)
        else:
            self.remove_many(drop)
        for path in drop:
            _forget_size(root, path.name)
        return trash or (later and bool(drop))

    def after_commit(self, lock: Callable[[], ContextManager], snapshot: Path) -> None:
        # One flattening at a time: steps committed meanwhile move onto its result too
        # (see flatten), and a second copy of the same union would only compete with them.
        if len(overlay.layer_names(snapshot)) > FLATTEN_DEPTH and self._flattening.acquire(blocking=False):
            # Off the step's path: the next steps stack on the snapshot as it is meanwhile.
            threading.Thread(target=self._flatten_quietly, args=(lock, snapshot), daemon=True).start()

    def _flatten_quietly(self, lock: Callable[[], ContextManager], snapshot: Path) -> None:
        try:
            self.flatten(lock, snapshot)
        except Exception:
            pass  # the stack stays deep and works; the next commit tries again
        finally:
            self._flattening.release()

    def flatten(self, lock: Callable[[], ContextManager], snapshot: Path) -> bool:
        """Give `snapshot` a stack of two: its own layer over one layer holding the union
        of the layers below it (copied as the container's root). The layers below stay
        (the snapshots they make up still use them); live trees on the same stack, or
        on steps committed over it meanwhile, move to the short one. Returns False
        when there was nothing to do."""
        names = overlay.layer_names(snapshot)
        if len(names) <= 2:
            return False
        root = self._root(snapshot)
        layers = self._layers_dir(root)
        flat = f"flat-{names[1]}"  # the union of the parent's stack: its content never changes
        if not (layers / flat).is_dir():
            tmp = layers / f"{FLAT_TMP}{os.getpid()}-{os.urandom(16).hex()}"
            tmp.mkdir(mode=0o755)
            try:
                from stacker_kernel.container.userns import CLONE_NEWNS, run_in_userns

                # In a mount namespace of its own (also for root): the host sees no mount.
                run_in_userns(_copy_union, [str(layers / n) for n in names[1:]], str(tmp),
                              flags=CLONE_NEWNS, views=False)
                with lock():
                    if not (layers / flat).is_dir():
                        os.rename(tmp, layers / flat)
            finally:
                self.remove(tmp)
        with lock():
            if overlay.layer_names(snapshot) != names:
                return False  # deleted (or flattened) meanwhile
            below = names[1:]
            overlay.write_stack(snapshot, [names[0], flat], writable=False)
            live = root / "live"
            for e in os.scandir(live) if live.is_dir() else ():
                # A live tree on this stack, or on steps committed over it since: the
                # same union, with the flat layer for what lies below the snapshot's own.
                stack = overlay.layer_names(e.path)
                if len(stack) >= len(below) and stack[len(stack) - len(below):] == below:
                    overlay.write_stack(e.path, stack[:len(stack) - len(below)] + [flat], writable=True)
        return True


def _copy_union(layers: list[str], dest: str) -> None:
    """Copy the union of `layers` (top first) into directory `dest` (inside the user
    namespace: owners, modes and xattrs are kept; whiteouts are not part of a union)."""
    import subprocess

    mnt = dest + ".mnt"  # named like `dest`: collect leaves it while its process lives
    os.mkdir(mnt, 0o700)
    try:
        overlay.mount_stack(overlay.Stack(tuple(layers)), mnt, readonly=True)
        try:
            subprocess.run(["cp", "-a", "--reflink=auto", f"{mnt}/.", dest], check=True,
                           capture_output=True)
        finally:
            overlay.umount(mnt)
    finally:
        os.rmdir(mnt)


def _du(root: Path, skip: Path | None = None) -> int:
    """Bytes allocated under `root` (files the user may not stat count nothing), not
    counting what lies inside directory `skip`."""
    total, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and dirpath == str(skip):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def _du_entry(path: str) -> int:
    """Bytes allocated by `path` itself and, for a directory, everything under it."""
    try:
        own = os.lstat(path).st_blocks * 512
    except OSError:
        return 0
    return own + (_du(Path(path)) if os.path.isdir(path) and not os.path.islink(path) else 0)


def _record_size(root: Path, name: str, size: int) -> None:
    sizes = root / SIZES
    sizes.mkdir(mode=0o700, exist_ok=True)
    tmp = sizes / f".{name}.{os.getpid()}.tmp"
    try:
        tmp.write_text(f"{size}\n")
        os.replace(tmp, sizes / name)
    except OSError:  # a full disk: measured again next time
        tmp.unlink(missing_ok=True)


def _forget_size(root: Path, name: str) -> None:
    try:
        (root / SIZES / name).unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass


def by_name(name: str) -> Driver:
    if name == "btrfs":
        return BtrfsDriver()
    if name == "overlay":
        return OverlayDriver()
    raise StorageError(f"unknown storage driver {name!r}: use one of {', '.join(NAMES)}")


def recorded(root: Path) -> str | None:
    """The driver recorded in storage root `root`, or None for a root without one."""
    try:
        name = (root / DRIVER_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:  # another user's storage (each is 0700)
        raise StorageError(f"permission denied: storage {root} is not yours: use your own storage "
                           "(leave out --storage)") from None
    if name not in NAMES:
        raise StorageError(f"storage {root} names an unknown driver {name!r} in its file "
                           f"'{DRIVER_FILE}': write one of {', '.join(NAMES)} there")
    return name


def of_root(root: Path, wanted: str | None = None) -> Driver:
    """The driver storage root `root` has (or would get on first use), without recording it."""
    try:
        have = recorded(root)
    except StorageError:
        have = None
    name = have or wanted or ("btrfs" if btrfs.is_btrfs(root) else "overlay")
    return by_name(name)


def choose(root: Path, wanted: str | None = None) -> Driver:
    """The driver of storage root `root`: the recorded one, else `wanted`, else btrfs
    where the root is on btrfs and overlay elsewhere; recorded on first use."""
    if wanted is not None and wanted not in NAMES:
        raise StorageError(f"unknown storage driver {wanted!r}: use one of {', '.join(NAMES)}")
    have = recorded(root)
    if have is not None:
        if wanted is not None and wanted != have:
            raise StorageError(f"storage {root} uses the {have} driver, not {wanted}: pass "
                               f"--storage-driver {have}, or another --storage for {wanted}")
        return by_name(have)
    name = wanted or ("btrfs" if btrfs.is_btrfs(root) else "overlay")
    if name == "btrfs" and not btrfs.is_btrfs(root):
        raise StorageError(f"storage {root} is not on btrfs: use --storage-driver overlay, or "
                           "run 'sudo stacker-kernel setup-storage --user NAME'")
    # Two first opens may race (two builds started at once): each writes its own file and
    # links it in, so exactly one records the driver and the other takes what it recorded.
    tmp = root / f".{DRIVER_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(name + "\n")
    try:
        os.link(tmp, root / DRIVER_FILE)
    except FileExistsError:
        return choose(root, wanted)
    finally:
        tmp.unlink()
    return by_name(name)
