"""btrfs subvolumes through raw ioctls: create, snapshot, read-only flag, delete, info.

Every call here works for an unprivileged user on subvolumes it owns and for
root inside a user namespace (the kernel's fs/btrfs/ioctl.c): only ioctls without
a CAP_SYS_ADMIN check are used, never TREE_SEARCH. python-btrfs supplies the
ioctl-number encoding and the space-info call; the subvolume ioctls are ours,
one `struct.Struct` per kernel structure (python-btrfs style).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stacker_kernel.errors import StorageError

BTRFS_SUPER_MAGIC = 0x9123683E
#: inode number of every subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID)
SUBVOL_ROOT_INO = 256
BTRFS_SUBVOL_RDONLY = 1 << 1  # in the ioctl flags (GETFLAGS/SETFLAGS/SNAP_CREATE)
BTRFS_ROOT_SUBVOL_RDONLY = 1 << 0  # in the root item flags (GET_SUBVOL_INFO)
#: BTRFS_SUBVOL_NAME_MAX: longest name a subvolume may have
SUBVOL_NAME_MAX = 4039

# struct btrfs_ioctl_vol_args: { __s64 fd; char name[4088]; }
vol_args = struct.Struct("=q4088s")
# struct btrfs_ioctl_vol_args_v2: { __s64 fd; __u64 transid; __u64 flags;
#   union { struct { __u64 size; qgroup_inherit *ptr; }; __u64 unused[4]; };
#   union { char name[4040]; __u64 devid; __u64 subvolid; }; }
vol_args_v2 = struct.Struct("=qQQ32s4040s")
# __u64 flags for SUBVOL_GETFLAGS / SUBVOL_SETFLAGS
subvol_flags = struct.Struct("=Q")
# struct btrfs_ioctl_get_subvol_info_args (504 bytes); the four timespecs are
# { __u64 sec; __u32 nsec; } padded to 16 bytes.
get_subvol_info_args = struct.Struct("=Q256sQQQQ16s16s16sQQQQ" + "QI4x" * 4 + "8Q")

# The ioctl numbers, as linux/btrfs.h and asm-generic/ioctl.h make them (_IOW, _IOR):
# defined here, python-btrfs (the `btrfs` package) is imported only by the functions
# that use its ioctls (sync, fs_usage), not by every command that opens a store.
BTRFS_IOCTL_MAGIC = 0x94


def _IOW(type_: int, nr: int, arg: struct.Struct) -> int:
    return (1 << 30) | (arg.size << 16) | (type_ << 8) | nr


def _IOR(type_: int, nr: int, arg: struct.Struct) -> int:
    return (2 << 30) | (arg.size << 16) | (type_ << 8) | nr


IOC_SNAP_DESTROY = _IOW(BTRFS_IOCTL_MAGIC, 15, vol_args)
IOC_SNAP_CREATE_V2 = _IOW(BTRFS_IOCTL_MAGIC, 23, vol_args_v2)
IOC_SUBVOL_CREATE_V2 = _IOW(BTRFS_IOCTL_MAGIC, 24, vol_args_v2)
IOC_SUBVOL_GETFLAGS = _IOR(BTRFS_IOCTL_MAGIC, 25, subvol_flags)
IOC_SUBVOL_SETFLAGS = _IOW(BTRFS_IOCTL_MAGIC, 26, subvol_flags)
IOC_GET_SUBVOL_INFO = _IOR(BTRFS_IOCTL_MAGIC, 60, get_subvol_info_args)
IOC_SNAP_DESTROY_V2 = _IOW(BTRFS_IOCTL_MAGIC, 63, vol_args_v2)

_FIX = "run 'sudo stacker-kernel setup-storage --user NAME'"


@dataclass(frozen=True)
class SubvolumeInfo:
    """Decoded `btrfs_ioctl_get_subvol_info_args` of one subvolume."""

    id: int
    name: str
    parent_id: int
    dir_id: int
    generation: int
    flags: int
    uuid: str
    parent_uuid: str | None
    received_uuid: str | None
    ctransid: int
    otransid: int
    ctime: float
    otime: float

    @property
    def readonly(self) -> bool:
        return bool(self.flags & BTRFS_ROOT_SUBVOL_RDONLY)


# --- statfs: the only exact test for "this path is on btrfs" ----------------

class _Statfs(ctypes.Structure):
    # Only f_type is read; the rest is padding large enough for struct statfs.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(None, use_errno=True)  # libc, already loaded (find_library would run ldconfig)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def _fs_type(path: os.PathLike | str) -> int:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return buf.f_type & 0xFFFFFFFF


def is_btrfs(path: os.PathLike | str) -> bool:
    """True when `path` exists and lives on a btrfs filesystem (statfs magic)."""
    try:
        return _fs_type(path) == BTRFS_SUPER_MAGIC
    except FileNotFoundError:
        return False


def is_subvolume(path: os.PathLike | str) -> bool:
    """True when `path` is the root directory of a btrfs subvolume (inode 256)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOL_ROOT_INO and is_btrfs(path)


# --- helpers ----------------------------------------------------------------

@contextmanager
def _open_dir(path: os.PathLike | str, what: str) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StorageError(f"{what} {path} does not exist") from None
    except NotADirectoryError:
        raise StorageError(f"{what} {path} is not a directory") from None
    except PermissionError:
        raise StorageError(f"cannot open {what} {path}: permission denied; "
                           "it must belong to you (or to your container's ids)") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _name_of(path: Path) -> bytes:
    name = os.fsencode(path.name)
    if not name or name in (b".", b".."):
        raise StorageError(f"{path} has no usable last component for a subvolume name")
    if len(name) > SUBVOL_NAME_MAX:
        raise StorageError(f"subvolume name {path.name[:40]}... is longer than {SUBVOL_NAME_MAX} bytes")
    return name


def _fail(action: str, path: Path, err: OSError) -> StorageError:
    """Translate an ioctl failure into one clear sentence."""
    code = err.errno
    if code == errno.ENOTTY or code == errno.EOPNOTSUPP:
        return StorageError(f"cannot {action} {path}: it is not on btrfs; {_FIX}")
    if code == errno.EEXIST:
        return StorageError(f"cannot {action} {path}: it already exists; delete it first")
    if code == errno.EXDEV:
        return StorageError(f"cannot {action} {path}: source and destination are on different btrfs filesystems")
    if code == errno.EROFS:
        return StorageError(f"cannot {action} {path}: it is inside a read-only snapshot")
    if code in (errno.EPERM, errno.EACCES):
        return StorageError(f"cannot {action} {path}: permission denied; the subvolume and the "
                            "target directory must belong to you")
    if code == errno.ENOSPC:
        return StorageError(f"cannot {action} {path}: the btrfs filesystem is full; "
                            "run 'stacker-kernel gc --wait' or grow the image")
    return StorageError(f"cannot {action} {path}: {os.strerror(code)}")


def _subvol_ioctl(parent: Path, req: int, args: bytearray, action: str, target: Path) -> None:
    with _open_dir(parent, "directory") as dfd:
        try:
            fcntl.ioctl(dfd, req, args)
        except OSError as e:
            raise _fail(action, target, e) from None


# --- the API ----------------------------------------------------------------

def create_subvolume(path: os.PathLike | str) -> None:
    """Create an empty writable subvolume at `path` (SUBVOL_CREATE_V2 on its parent).

    The parent directory must exist on btrfs; `path` must not exist.
    """
    path = Path(path)
    args = bytearray(vol_args_v2.pack(0, 0, 0, b"", _name_of(path)))
    _subvol_ioctl(path.parent, IOC_SUBVOL_CREATE_V2, args, "create subvolume", path)


def snapshot(src: os.PathLike | str, dest: os.PathLike | str, readonly: bool = False) -> None:
    """Snapshot subvolume `src` to `dest` (SNAP_CREATE_V2 on dest's parent).

    With `readonly` the snapshot is born read-only (BTRFS_SUBVOL_RDONLY, atomic):
    nobody ever sees it writable. Cost does not depend on the size of `src`;
    the kernel flushes src's pending writes first, so the snapshot holds them.
    """
    src, dest = Path(src), Path(dest)
    name = _name_of(dest)
    with _open_dir(src, "snapshot source") as sfd:
        if os.fstat(sfd).st_ino != SUBVOL_ROOT_INO:
            raise StorageError(f"cannot snapshot {src}: it is not a btrfs subvolume")
        args = bytearray(vol_args_v2.pack(sfd, 0, BTRFS_SUBVOL_RDONLY if readonly else 0, b"", name))
        _subvol_ioctl(dest.parent, IOC_SNAP_CREATE_V2, args, "create snapshot", dest)


def _get_flags(fd: int, path: Path) -> int:
    buf = bytearray(subvol_flags.size)
    try:
        fcntl.ioctl(fd, IOC_SUBVOL_GETFLAGS, buf)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise StorageError(f"{path} is not a btrfs subvolume") from None
        raise _fail("read the flags of", path, e) from None
    return subvol_flags.unpack(buf)[0]


def is_readonly(path: os.PathLike | str) -> bool:
    """True when subvolume `path` carries the read-only flag (SUBVOL_GETFLAGS)."""
    path = Path(path)
    with _open_dir(path, "subvolume") as fd:
        return bool(_get_flags(fd, path) & BTRFS_SUBVOL_RDONLY)


def set_readonly(path: os.PathLike | str, readonly: bool) -> None:
    """Set or clear the read-only flag of subvolume `path` (SUBVOL_SETFLAGS); owner only."""
    path = Path(path)
    with _open_dir(path, "subvolume") as fd:
        flags = _get_flags(fd, path)
        new = flags | BTRFS_SUBVOL_RDONLY if readonly else flags & ~BTRFS_SUBVOL_RDONLY
        if new == flags:
            return
        try:
            fcntl.ioctl(fd, IOC_SUBVOL_SETFLAGS, bytearray(subvol_flags.pack(new)))
        except OSError as e:
            raise _fail("change the read-only flag of", path, e) from None


def _uuid(raw: bytes) -> str | None:
    import uuid

    return None if raw == bytes(16) else str(uuid.UUID(bytes=raw))


def subvolume_info(path: os.PathLike | str) -> SubvolumeInfo:
    """Id, generation, transids, flags and uuids of subvolume `path` (GET_SUBVOL_INFO).

    Works for any subvolume the caller can open; `path` may be any file inside
    it, the answer is about the subvolume containing it.
    """
    path = Path(path)
    buf = bytearray(get_subvol_info_args.size)
    with _open_dir(path, "subvolume") as fd:
        try:
            fcntl.ioctl(fd, IOC_GET_SUBVOL_INFO, buf)
        except OSError as e:
            raise _fail("read subvolume info of", path, e) from None
    (treeid, name, parent_id, dirid, generation, flags, uuid_, parent_uuid, received_uuid,
     ctransid, otransid, _stransid, _rtransid, ctime_s, ctime_ns, otime_s, otime_ns,
     *_rest) = get_subvol_info_args.unpack(buf)
    return SubvolumeInfo(
        id=treeid, name=os.fsdecode(name.rstrip(b"\0")), parent_id=parent_id, dir_id=dirid,
        generation=generation, flags=flags, uuid=_uuid(uuid_) or "",
        parent_uuid=_uuid(parent_uuid), received_uuid=_uuid(received_uuid),
        ctransid=ctransid, otransid=otransid,
        ctime=ctime_s + ctime_ns / 1e9, otime=otime_s + otime_ns / 1e9)


def _nested_subvolumes(path: Path) -> list[Path]:
    """Subvolume roots below `path` (not `path` itself), outermost first.

    Directories we cannot read (owned by container ids) are skipped: a nested
    subvolume hidden there makes the later destroy fail with a clear error.
    """
    found: list[Path] = []
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (PermissionError, FileNotFoundError):
            continue
        with it:
            for entry in it:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                p = Path(entry.path)
                # readdir's d_ino of a subvolume entry is its tree id; stat gives 256.
                if entry.stat(follow_symlinks=False).st_ino == SUBVOL_ROOT_INO:
                    found.append(p)
                else:
                    stack.append(p)
    return found


def _destroy(path: Path) -> None:
    name = _name_of(path)
    with _open_dir(path.parent, "directory") as dfd:
        try:
            fcntl.ioctl(dfd, IOC_SNAP_DESTROY_V2, bytearray(vol_args_v2.pack(0, 0, 0, b"", name)))
        except OSError as e:
            if e.errno != errno.ENOTTY:  # kernels before 5.7 lack the v2 call
                raise
            fcntl.ioctl(dfd, IOC_SNAP_DESTROY, bytearray(vol_args.pack(0, name)))


def delete_subvolume(path: os.PathLike | str) -> None:
    """Delete subvolume `path` and every subvolume nested in it (SNAP_DESTROY_V2 on the parent).

    Clears the read-only flag first (the kernel refuses to destroy a read-only
    subvolume for a non-root caller). Needs the mount option
    `user_subvol_rm_allowed` unless the caller is real root. The space is freed
    by btrfs in the background.
    """
    path = Path(path)
    if not is_subvolume(path):
        raise StorageError(f"cannot delete {path}: it is not a btrfs subvolume")
    was_readonly = is_readonly(path)
    set_readonly(path, False)
    try:
        try:
            _destroy(path)
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise _delete_error(path, e) from None
        # Nested subvolumes block the destroy (ENOTEMPTY): delete them first.
        for nested in _nested_subvolumes(path):
            delete_subvolume(nested)
        try:
            _destroy(path)
        except OSError as e:
            raise _delete_error(path, e) from None
    except BaseException:
        if was_readonly and path.exists():
            set_readonly(path, True)  # a snapshot that stays must stay frozen
        raise


def _delete_error(path: Path, err: OSError) -> StorageError:
    if err.errno == errno.EPERM:
        from stacker_kernel.storage.location import find_mount  # late: location imports us

        mount = find_mount(path)
        if mount is not None and "user_subvol_rm_allowed" not in mount.options:
            return StorageError(
                f"cannot delete subvolume {path}: the btrfs filesystem at {mount.mount_point} is "
                f"mounted without user_subvol_rm_allowed; {_FIX}")
    if err.errno == errno.ENOTEMPTY:
        return StorageError(f"cannot delete subvolume {path}: it contains a nested subvolume "
                            "in a directory you cannot read; delete it from inside the container")
    return _fail("delete subvolume", path, err)


def remove_tree(path: os.PathLike | str) -> None:
    """Delete the directory tree at `path`, including every subvolume in it.

    Subvolumes are destroyed with one ioctl each (no file walk inside them);
    plain files and directories are removed normally. A missing `path` is fine.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
        return
    on_btrfs = is_btrfs(path)
    _remove(path, st, on_btrfs)


def _remove(path: Path, st: os.stat_result, on_btrfs: bool) -> None:
    if on_btrfs and st.st_ino == SUBVOL_ROOT_INO:
        delete_subvolume(path)
        return
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        p = Path(entry.path)
        try:
            est = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(est.st_mode):
            _remove(p, est, on_btrfs)
        else:
            p.unlink(missing_ok=True)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def sync(path: os.PathLike | str) -> None:
    """Commit the current btrfs transaction of the filesystem holding `path` (BTRFS_IOC_SYNC)."""
    import btrfs.ioctl

    with _open_dir(path, "directory") as fd:
        try:
            btrfs.ioctl.sync(fd)
        except OSError as e:
            raise _fail("sync", Path(path), e) from None


def fs_usage(path: os.PathLike | str) -> int:
    """Bytes used (data + metadata + system) on the btrfs filesystem holding `path`.

    From SPACE_INFO (unprivileged). Deleted subvolumes are freed in the
    background, so a drop shows up only after btrfs's cleaner has run.
    """
    import btrfs.ctree
    import btrfs.ioctl

    with _open_dir(path, "directory") as fd:
        try:
            spaces = btrfs.ioctl.space_info(fd)
        except OSError as e:
            raise _fail("read the space usage of", Path(path), e) from None
    return sum(s.used_bytes for s in spaces if not s.flags & btrfs.ctree.SPACE_INFO_GLOBAL_RSV)


# chattr's flags ioctls (linux/fs.h); the argument is a C int.
FS_IOC_GETFLAGS = _IOR(ord("f"), 1, struct.Struct("l"))
FS_IOC_SETFLAGS = _IOW(ord("f"), 2, struct.Struct("l"))
FS_NOCOW_FL = 0x00800000


def create_nocow_file(path: os.PathLike | str) -> bool:
    """Create `path` empty with btrfs's No_COW flag (chattr +C), if it does not exist yet.

    A NOCOW file is overwritten in place, so writes through a shared mmap of
    already allocated pages need no new space: SQLite's WAL index (-shm) on a
    full btrfs then fails with ENOSPC instead of killing the process with
    SIGBUS. Returns False when the file already existed (it is left as it is).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        flags = bytearray(struct.pack("i", 0))
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        value = struct.unpack("i", flags)[0] | FS_NOCOW_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, bytearray(struct.pack("i", value)))
    except OSError as e:
        raise _fail("set No_COW on", Path(path), e) from None
    finally:
        os.close(fd)
    return True


def wait_reclaimed(path: os.PathLike | str, timeout: float = 60.0) -> None:
    """Commit and wait until btrfs's cleaner has freed what deleted subvolumes held.

    Deleted subvolumes are freed in the background after a commit; `btrfs
    subvolume sync` waits for them with a root-only tree search. Unprivileged,
    we commit (BTRFS_IOC_SYNC, which also wakes the cleaner) until the usage
    has not shrunk for a few rounds (other writers may make it grow), or
    `timeout` seconds passed.
    """
    deadline = time.monotonic() + timeout
    last, steady = None, 0
    while steady < 3 and time.monotonic() < deadline:
        sync(path)
        used = fs_usage(path)
        steady = steady + 1 if last is not None and used >= last else 0
        last = min(used, last) if last is not None else used
        time.sleep(0.1)


# --- copying file data ----------------------------------------------------------

FICLONE = 0x40049409  # ioctl: share the extents of another file (btrfs reflink)
CHUNK = 1 << 20


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    end = offset + count
    try:
        while offset < end:
            n = os.copy_file_range(src, dst, min(end - offset, 1 << 30), offset, offset)
            if n == 0:
                return
            offset += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while offset < end:
        data = os.pread(src, min(end - offset, CHUNK), offset)
        if not data:
            return
        os.pwrite(dst, data, offset)
        offset += len(data)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy a regular file's bytes, keeping its holes: a reflink when the filesystem can,
    else only the data extents (SEEK_DATA/SEEK_HOLE), then the size."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        pass
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        hole = os.lseek(src, data, os.SEEK_HOLE)
        _copy_range(src, dst, data, hole - data)
        offset = hole
    os.ftruncate(dst, size)
