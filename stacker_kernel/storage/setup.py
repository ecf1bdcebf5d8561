"""Root-only storage setup: one loop-mounted btrfs image per user, bounded by its size.

Each user gets a sparse image STATE/images/<user>.img (root-owned, 0600, in a
0700 directory: no other user can read it) loop-mounted at MOUNT/<user>/storage
(MOUNT/<user> is root's, 0700, with an ACL letting only that user pass: a mount
point others can reach answers their statfs, so `df` would show the user's
usage; users set up before keep MOUNT/<user>) with
`user_subvol_rm_allowed` (users may delete their own subvolumes) and `noatime`
(reads do not dirty snapshots' ctransid). The filesystem's top directory is
the user's storage root, owned by them with mode 0700. Its size is the
user's bound: a full disk stops only that user. Mounts do not survive a
reboot; running setup-storage again remounts (and grows with a larger --size).

What root created for a user is recorded in STATE/users/<user>.json
(root-only); teardown removes exactly that, never a path from the user's own
config file. Root walks every path without following symlinks and only below
directories that root (or, for an explicit --storage, that user) owns.

A user set up before per-user images (a directory on the one shared image at
MOUNT) keeps that directory; the shared image is made 0600 too.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import re
import stat
import subprocess
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from stacker_kernel.container import limits
from stacker_kernel.errors import StorageError
from stacker_kernel.storage import btrfs
from stacker_kernel.storage.location import (
    DEFAULT_MOUNT, STATE_DIR, config_file, find_mount, is_mount_point, mounts, read_config_storage)

MOUNT_OPTIONS = "loop,user_subvol_rm_allowed,noatime"
# btrfs tree blocks of 4 KiB (mkfs's default is 16 KiB). A Debian rootfs's tree then has a
# root of a dozen children instead of hundreds, and a snapshot adds a back reference to
# each child of its tree's root: with 16 KiB nodes a step in a store of 400 snapshots of
# one base took 2.8x a fresh store's, with 4 KiB 1.2x; a `true` step's disk went from
# 67 to 29 KiB (docs/benchmarks.md, issue 25). Only a new image gets it.
NODESIZE = "4096"
DEFAULT_SIZE = "20G"
LIMITS_FILE = "limits.json"  # the admin's --max-user-processes, in STATE
STORAGE_NAME = "storage"  # MOUNT/<user>/storage: the mount point, behind the user's gate
# The btrfs superblock sits at 64 KiB; its magic at offset 0x40 inside it.
_SUPER_MAGIC_OFFSET = 0x10040
_SUPER_MAGIC = b"_BHRfS_M"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class UserInfo:
    """The account whose storage is set up (home is None for an account already deleted)."""

    name: str
    uid: int
    gid: int
    home: Path | None


@dataclass(frozen=True)
class Record:
    """What setup-storage created for one user (STATE/users/<user>.json); teardown removes only this."""

    user: str
    uid: int
    gid: int
    storage: Path  # the user's storage root
    image: Path | None  # their own image, mounted at `storage`; None: a directory on an existing btrfs


def lookup_user(name: str) -> UserInfo:
    """The passwd entry of `name`; StorageError if there is none."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise StorageError(f"user {name!r} does not exist: create it first or pass an existing --user") from None
    return UserInfo(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


def parse_size(size: str) -> int:
    """Bytes in `size` such as "20G", "512M", "1T" or "1048576" (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise StorageError(f"invalid size {size!r}: use a number with an optional K, M, G or T suffix, e.g. 20G")
    return int(m.group(1)) * 1024 ** " KMGTP".index(m.group(2).upper() or " ")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise StorageError("setup-storage mounts a btrfs filesystem and must run as root: "
                           "run 'sudo stacker-kernel setup-storage --user NAME'")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise StorageError(f"'{' '.join(cmd)}' failed: {msg[-1] if msg else 'exit status ' + str(proc.returncode)}")


# --- paths walked without following links -------------------------------------------------

def _open_dir(path: Path, trusted: frozenset[int] = frozenset({0}), create: bool = False, mode: int = 0o755) -> int:
    """An fd of directory `path`, reached from / without following any symlink.

    Every ancestor must be owned by a uid in `trusted` (else another user could
    swap what lies below it). With `create`, missing directories are made
    root-owned with `mode`. The directory itself is not checked: callers look at it.
    """
    path = Path(os.path.abspath(path))
    fd = os.open("/", _DIR_FLAGS)
    try:
        here = Path("/")
        for name in path.parts[1:]:
            owner = os.fstat(fd).st_uid
            if owner not in trusted:
                raise StorageError(f"{here} belongs to uid {owner}: root-run setup-storage works only below "
                                   "directories root owns; pass a path in one")
            here = here / name
            try:
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o700, dir_fd=fd)
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, mode)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StorageError(f"{here} is a symbolic link or not a directory: root-run setup-storage "
                                       "never follows links; remove it or pass another path") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _usable(path: Path) -> bool:
    """True when the nearest existing ancestor of `path` is on btrfs mounted with user_subvol_rm_allowed."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    mount = find_mount(probe)
    return btrfs.is_btrfs(probe) and mount is not None and "user_subvol_rm_allowed" in mount.options


def _backing_file(mount_point: Path) -> Path | None:
    """The image file behind the loop device mounted at (or holding) `mount_point`, if any."""
    m = find_mount(mount_point)
    if m is None or not re.fullmatch(r"/dev/loop\d+", m.source):
        return None
    try:
        text = Path(f"/sys/block/{m.source[5:]}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return Path(text.removesuffix(" (deleted)"))


def _mounts_at(path: Path) -> list:
    """The mounts whose mount point is `path` itself, bottom first (never touching `path`:
    a user's FUSE mount there answers root with EACCES)."""
    path = Path(os.path.abspath(path))
    return [m for m in mounts() if m.mount_point == path]


def _check_mounts(rec: Record, action: str) -> bool:
    """True when rec.storage is rec.image loop-mounted (btrfs, and nothing else is mounted
    there), False when nothing is mounted there; StorageError, touching nothing, when
    something else is (a user's FUSE mount over their storage)."""
    found = _mounts_at(rec.storage)
    for m in found:
        ours = (rec.image is not None and m.fstype == "btrfs" and re.fullmatch(r"/dev/loop\d+", m.source)
                and _loop_backing(m.source) == rec.image)
        if not ours:
            fix = (f"{rec.user} should unmount it (fusermount3 -u {rec.storage})" if m.fstype.startswith("fuse")
                   else f"unmount it (umount {rec.storage})")
            what = f"the image {rec.image}" if rec.image is not None else "their directory"
            raise StorageError(f"{rec.storage} has a {m.fstype} mount over {rec.user}'s storage, not {what}: "
                               f"{fix}, then run {action} again")
    return bool(found)


def _loop_backing(device: str) -> Path | None:
    """The image file behind loop `device` (/dev/loopN); None when gone or deleted."""
    try:
        text = Path(f"/sys/block/{device[5:]}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return None if text.endswith(" (deleted)") else Path(text)


def _check_unmounted(image: Path) -> None:
    """StorageError when `image` is loop-mounted anywhere (it would keep its space, deleted)."""
    for m in mounts():
        if re.fullmatch(r"/dev/loop\d+", m.source) and _loop_backing(m.source) == image:
            raise StorageError(f"{image} is still mounted at {m.mount_point}: unmount it, "
                               "then run setup-storage --teardown again")


def _restrict_image(image: Path, create_size: int | None = None, grow_to: int | None = None) -> bool:
    """Make `image` root-owned 0600 (creating it sparse with `create_size`); grow it to `grow_to`.

    Returns True when an existing image was grown. Its directory must be root's
    (a new one is made 0700).
    """
    pfd = _open_dir(image.parent, create=create_size is not None, mode=0o700)
    try:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create_size is not None else 0)
        try:
            fd = os.open(image.name, flags, 0o600, dir_fd=pfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StorageError(f"image {image} is a symbolic link: remove it or pass another --image") from None
            raise
    finally:
        os.close(pfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
            raise StorageError(f"image {image} is not a regular file owned by root: remove it or pass another --image")
        os.fchmod(fd, 0o600)  # the raw image holds every file of its user
        if st.st_size == 0 and create_size:
            os.ftruncate(fd, create_size)  # sparse: takes no space until written
            return False
        if grow_to and grow_to > st.st_size:
            os.ftruncate(fd, grow_to)
            return True
        return False
    finally:
        os.close(fd)


def _has_btrfs_superblock(image: Path) -> bool:
    with image.open("rb") as f:
        f.seek(_SUPER_MAGIC_OFFSET)
        return f.read(len(_SUPER_MAGIC)) == _SUPER_MAGIC


# --- records ------------------------------------------------------------------------------

def _users_dir(state: Path) -> Path:
    return state / "users"


def read_record(user: str, state: Path = STATE_DIR) -> Record | None:
    """The record of what setup-storage created for `user`, or None (also when not root)."""
    try:
        dfd = _open_dir(_users_dir(state))
    except (FileNotFoundError, PermissionError):
        return None
    try:
        fd = os.open(f"{user}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except (FileNotFoundError, PermissionError):
        return None
    finally:
        os.close(dfd)
    with os.fdopen(fd) as f:
        d = json.load(f)
    return Record(d["user"], d["uid"], d["gid"], Path(d["storage"]), Path(d["image"]) if d["image"] else None)


def _write_record(rec: Record, state: Path) -> None:
    users = _users_dir(state)
    dfd = _open_dir(users, create=True)
    try:
        os.fchmod(dfd, 0o700)
        tmp = f".{rec.user}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        with os.fdopen(fd, "w") as f:
            json.dump({"user": rec.user, "uid": rec.uid, "gid": rec.gid, "storage": str(rec.storage),
                       "image": str(rec.image) if rec.image else None}, f, indent=2)
            f.write("\n")
        os.replace(tmp, f"{rec.user}.json", src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def _delete_record(user: str, state: Path) -> None:
    try:
        dfd = _open_dir(_users_dir(state))
    except FileNotFoundError:
        return
    try:
        os.unlink(f"{user}.json", dir_fd=dfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)


def storage_path(user: str, mount: Path = DEFAULT_MOUNT, state: Path = STATE_DIR) -> Path:
    """The storage root of `user`: root's record, else that user's config file, else MOUNT/USER."""
    rec = read_record(user, state)
    if rec is not None:
        return rec.storage
    configured = read_config_storage(lookup_user(user).home)
    return configured if configured is not None else mount / user / STORAGE_NAME


# --- acting as the user -------------------------------------------------------------------

def _as_user(user: UserInfo, fn: Callable[[], None]) -> None:
    """Run `fn` in a child process with the user's uid/gid, so root never follows a user's symlinks."""
    if user.uid == 0:
        fn()
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        status = 0
        try:
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            fn()
        except BaseException as e:
            os.write(w, (str(e) or traceback.format_exc()).encode())
            status = 1
        os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise StorageError(f"as user {user.name}: {message or 'failed'}")


def _write_config(user: UserInfo, storage: Path) -> None:
    def write() -> None:
        path = config_file(user.home)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"storage": str(storage)}, indent=2) + "\n")
        os.replace(tmp, path)
    _as_user(user, write)


def _remove_config(user: UserInfo) -> None:
    if user.home is not None:
        _as_user(user, lambda: config_file(user.home).unlink(missing_ok=True))


# --- setup --------------------------------------------------------------------------------

def _mount_image(rec: Record, size: str | None) -> None:
    """Make sure rec.storage is rec.image mounted with our options: create, format, mount, grow."""
    image, mnt = rec.image, rec.storage
    want = parse_size(size) if size else None
    grown = _restrict_image(image, create_size=want or parse_size(DEFAULT_SIZE), grow_to=want)
    mounted = _check_mounts(rec, "setup-storage")  # before touching what is mounted there
    if not _has_btrfs_superblock(image):
        _run(["mkfs.btrfs", "-q", "--nodesize", NODESIZE, str(image)])
    os.close(_open_dir(mnt, create=True))  # the mount point: no links, every ancestor root's
    if mounted:
        m = find_mount(mnt)
        if "user_subvol_rm_allowed" not in m.options:
            _run(["mount", "-o", "remount,user_subvol_rm_allowed,noatime", str(mnt)])
        if grown:
            _run(["losetup", "--set-capacity", m.source])
    else:
        _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(mnt)])
    if grown:
        _run(["btrfs", "filesystem", "resize", "max", str(mnt)])


def _mount_old_shared_image(mount: Path, state: Path) -> None:
    """Remount the image all users shared before per-user images (after a reboot), locked to root.

    Its users keep their directories on it; it is mounted before any user's own
    image, whose mount point may lie on it.
    """
    image = state / "btrfs.img"
    if not image.is_file() or is_mount_point(mount):
        return
    _restrict_image(image)
    os.close(_open_dir(mount, create=True))
    _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(mount)])


def _new_record(info: UserInfo, image: Path | None, mount: Path, storage: Path | None, state: Path) -> Record:
    if storage is not None:
        # The admin named a directory on a btrfs they manage: bounded only by that filesystem.
        target = Path(os.path.abspath(storage))
        if not _usable(target):
            raise StorageError(f"storage {target} is not on a btrfs mounted with user_subvol_rm_allowed: "
                               f"omit --storage to give {info.name} their own image")
        return Record(info.name, info.uid, info.gid, target, None)
    target = Path(os.path.abspath(mount)) / info.name
    if target.is_dir() and not target.is_symlink() and not is_mount_point(target) and _usable(target):
        return Record(info.name, info.uid, info.gid, target, None)  # set up on the old shared image
    return Record(info.name, info.uid, info.gid, target / STORAGE_NAME,
                  Path(os.path.abspath(image)) if image else state / "images" / f"{info.name}.img")


def _gate(rec: Record, mount: Path) -> Path | None:
    """MOUNT/<user> when rec's mount point lies in it (set up since the gate exists)."""
    gate = Path(os.path.abspath(mount)) / rec.user
    return gate if rec.image is not None and rec.storage == gate / STORAGE_NAME else None


def _make_gate(gate: Path, uid: int, gid: int) -> None:
    """`gate` root's, mode 0700 plus an ACL giving `uid` search (--x) only: the user
    passes to their mount point, no one else reaches it (not even to statfs it).
    Without ACLs on that filesystem: group `gid`, 0710."""
    os.close(_open_dir(gate.parent, create=True))  # MOUNT: everyone passes to their own gate
    fd = _open_dir(gate, create=True, mode=0o700)
    try:
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
        # posix_acl_xattr (include/uapi/linux/posix_acl_xattr.h): version 2, then
        # (tag, perm, id) for user::rwx, user:UID:--x, group::---, mask::--x, other::---
        undefined = 0xFFFFFFFF
        entries = [(0x01, 7, undefined), (0x02, 1, uid), (0x04, 0, undefined), (0x10, 1, undefined),
                   (0x20, 0, undefined)]
        acl = (2).to_bytes(4, "little") + b"".join(
            t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little") for t, p, i in entries)
        try:
            os.setxattr(fd, "system.posix_acl_access", acl)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            os.fchown(fd, 0, gid)
            os.fchmod(fd, 0o710)
    finally:
        os.close(fd)


@contextmanager
def _state_lock(state: Path) -> Iterator[None]:
    """One setup-storage at a time per state dir (a hub may spawn a user's server twice at once)."""
    fd = _open_dir(state, create=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def setup_storage(user: str, size: str | None = None, image: Path | None = None, mount: Path = DEFAULT_MOUNT,
                  storage: Path | None = None, state: Path = STATE_DIR,
                  max_user_processes: int | None = None) -> Path:
    """Give `user` a private, bounded storage root on btrfs; return it. Root only, idempotent.

    By default the user's own image (of `size`, default 20G) is created and
    mounted at MOUNT/USER. With `storage`, a directory on an existing btrfs is
    used instead. Re-running remounts after a reboot and grows the image to a
    larger `size`. The root is owned by the user with mode 0700, and the
    user's config file names it.
    """
    _require_root()
    info = lookup_user(user)
    with _state_lock(state):
        return _setup_storage(info, size, image, mount, storage, state, max_user_processes)


def _setup_storage(info: UserInfo, size: str | None, image: Path | None, mount: Path,
                   storage: Path | None, state: Path, max_user_processes: int | None = None) -> Path:
    _mount_old_shared_image(Path(os.path.abspath(mount)), state)
    rec = read_record(info.name, state)
    if rec is None:
        rec = _new_record(info, image, mount, storage, state)
    elif storage is not None and Path(os.path.abspath(storage)) != rec.storage:
        raise StorageError(f"{info.name} already has storage at {rec.storage}: "
                           "run 'stacker-kernel setup-storage --teardown' first to move it")
    if rec.image is not None:
        gate = _gate(rec, mount)
        if gate is not None:
            _make_gate(gate, info.uid, info.gid)
        _mount_image(rec, size)
        if rec.image.parent == state / "images":
            dfd = _open_dir(rec.image.parent)
            os.fchmod(dfd, 0o700)  # nobody else even sees whose images exist
            os.close(dfd)
    elif not _check_mounts(rec, "setup-storage") and not _usable(rec.storage):  # nothing over a directory
        raise StorageError(f"storage {rec.storage} is no longer on a btrfs mounted with user_subvol_rm_allowed: "
                           "mount that filesystem again, then re-run setup-storage")
    # A directory the admin named may lie in the user's own tree; an image's mount point is root's.
    trusted = frozenset({0}) if rec.image is not None else frozenset({0, info.uid})
    fd = _open_dir(rec.storage, trusted, create=rec.image is None)
    try:
        owner = os.fstat(fd).st_uid
        if owner not in (0, info.uid):
            raise StorageError(f"{rec.storage} belongs to uid {owner}, not {info.name}: pass another --storage")
        os.fchown(fd, info.uid, info.gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    backing = _backing_file(rec.storage)
    if backing is not None:
        _restrict_image(backing)  # also the old shared image: it holds every user's files
    _write_record(rec, state)
    _write_config(info, rec.storage)
    _cap_processes(state, max_user_processes)  # a pids cgroup per user's builds (container/limits.py)
    return rec.storage


def _record_users(state: Path) -> list[str]:
    try:
        dfd = _open_dir(_users_dir(state))
    except FileNotFoundError:
        return []
    try:
        return sorted(n[:-5] for n in os.listdir(dfd) if n.endswith(".json") and not n.startswith("."))
    finally:
        os.close(dfd)


def _cap_processes(state: Path, configured: int | None = None) -> None:
    """Give every user with storage their pids cgroup, capped at an equal share of
    pid_max (limits.user_cap): one more user lowers everyone's cap. `configured`
    (--max-user-processes) is kept in STATE/limits.json for later runs."""
    path = state / LIMITS_FILE
    if configured is not None:
        dfd = _open_dir(state)
        try:
            fd = os.open(LIMITS_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644, dir_fd=dfd)
            with os.fdopen(fd, "w") as f:
                json.dump({"max_user_processes": configured}, f)
                f.write("\n")
        finally:
            os.close(dfd)
    else:
        try:
            configured = json.loads(path.read_text()).get("max_user_processes")
        except (OSError, ValueError, AttributeError):
            configured = None
    users = _record_users(state)
    cap = limits.user_cap(limits.pid_max(), len(users), configured if isinstance(configured, int) else None)
    for user in users:
        try:
            limits.delegate(user, cap)
        except KeyError:
            pass  # an account deleted since: its record waits for --teardown


# --- teardown -----------------------------------------------------------------------------

def _empty_as_user(user: UserInfo, path: Path) -> None:
    """Delete everything inside `path` with the user's rights (their subvolumes included)."""
    def empty() -> None:
        for entry in path.iterdir():
            btrfs.remove_tree(entry)
    _as_user(user, empty)


def teardown_storage(user: str, mount: Path = DEFAULT_MOUNT, state: Path = STATE_DIR) -> list[str]:
    """Remove what setup-storage created for `user` (per root's record) and their config.

    Never a path from the user's config: their own image is unmounted and
    deleted; a directory is emptied with the user's rights and removed. Without
    a record (set up before records existed) only MOUNT/USER is removed.
    Returns what was done, one line per action. Root only; missing parts are fine.
    """
    _require_root()
    with _state_lock(state):
        return _teardown_storage(user, mount, state)


def _teardown_storage(user: str, mount: Path, state: Path) -> list[str]:
    _mount_old_shared_image(Path(os.path.abspath(mount)), state)
    rec = read_record(user, state)
    try:
        info = lookup_user(user)
    except StorageError:
        if rec is None:
            raise
        info = UserInfo(user, rec.uid, rec.gid, None)
    if rec is None:
        rec = Record(info.name, info.uid, info.gid, Path(os.path.abspath(mount)) / info.name, None)
    done = []
    mounted = _check_mounts(rec, "setup-storage --teardown")  # before touching what is mounted there
    parent = _open_dir(rec.storage.parent, frozenset({0, info.uid}))
    try:
        if rec.image is not None:
            if mounted:
                proc = subprocess.run(["umount", str(rec.storage)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise StorageError(f"cannot unmount {rec.storage} ({proc.stderr.strip()}): stop {info.name}'s "
                                       "kernels and builds first, then run --teardown again")
                done.append(f"unmounted {rec.storage}")
            _check_unmounted(rec.image)  # mounted elsewhere, a deleted image would keep its space
            ifd = _open_dir(rec.image.parent)
            try:
                os.unlink(rec.image.name, dir_fd=ifd)
                done.append(f"deleted {rec.image}")
            except FileNotFoundError:
                pass
            finally:
                os.close(ifd)
        else:
            try:
                os.close(os.open(rec.storage.name, _DIR_FLAGS, dir_fd=parent))
                exists = True
            except FileNotFoundError:
                exists = False
            except OSError as e:
                raise StorageError(f"{rec.storage} is not a directory: remove it by hand") from e
            if exists:
                _empty_as_user(info, rec.storage)
        try:
            os.rmdir(rec.storage.name, dir_fd=parent)
            if rec.image is None:
                done.append(f"removed {rec.storage}")
        except FileNotFoundError:
            pass
    finally:
        os.close(parent)
    gate = _gate(rec, mount)
    if gate is not None:
        gfd = _open_dir(gate.parent)
        try:
            os.rmdir(gate.name, dir_fd=gfd)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise
        finally:
            os.close(gfd)
    _delete_record(info.name, state)
    _remove_config(info)
    if limits.undelegate(info.name):
        done.append(f"removed the process-limit cgroup of {info.name}")
    _cap_processes(state)  # one user fewer: the others' shares grow
    return done
