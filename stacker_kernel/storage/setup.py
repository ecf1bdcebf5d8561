"""Root-only storage setup, like `stacker unpriv-setup`: a loop-mounted btrfs per machine, a dir per user.

The filesystem is mounted with `user_subvol_rm_allowed` (users may delete their
own subvolumes) and `noatime` (reads do not dirty snapshots' ctransid). The
mount does not survive a reboot; running setup-storage again remounts it.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stacker_kernel.container import limits
from stacker_kernel.errors import StorageError
from stacker_kernel.storage import btrfs
from stacker_kernel.storage.location import (
    DEFAULT_IMAGE, DEFAULT_MOUNT, config_file, find_mount, is_mount_point, read_config_storage)

MOUNT_OPTIONS = "loop,user_subvol_rm_allowed,noatime"
# The btrfs superblock sits at 64 KiB; its magic at offset 0x40 inside it.
_SUPER_MAGIC_OFFSET = 0x10040
_SUPER_MAGIC = b"_BHRfS_M"


@dataclass(frozen=True)
class UserInfo:
    """The account whose storage is set up."""

    name: str
    uid: int
    gid: int
    home: Path


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


def storage_path(user: str, mount: Path = DEFAULT_MOUNT) -> Path:
    """The storage root of `user`: from that user's config file, else MOUNT/USER."""
    configured = read_config_storage(lookup_user(user).home)
    return configured if configured is not None else mount / user


def _require_root() -> None:
    if os.geteuid() != 0:
        raise StorageError("setup-storage mounts a btrfs filesystem and must run as root: "
                           "run 'sudo stacker-kernel setup-storage --user NAME'")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise StorageError(f"'{' '.join(cmd)}' failed: {msg[-1] if msg else 'exit status ' + str(proc.returncode)}")


def _usable(path: Path) -> bool:
    """True when the nearest existing ancestor of `path` is on btrfs mounted with user_subvol_rm_allowed."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    mount = find_mount(probe)
    return btrfs.is_btrfs(probe) and mount is not None and "user_subvol_rm_allowed" in mount.options


def _has_btrfs_superblock(image: Path) -> bool:
    with image.open("rb") as f:
        f.seek(_SUPER_MAGIC_OFFSET)
        return f.read(len(_SUPER_MAGIC)) == _SUPER_MAGIC


def _mount_image(image: Path, mount: Path, size: str) -> None:
    """Make sure `mount` holds a btrfs with our options, creating and formatting `image` if needed."""
    if is_mount_point(mount):
        m = find_mount(mount)
        if m is None or m.fstype != "btrfs":
            raise StorageError(f"{mount} is already a {m.fstype if m else 'non-btrfs'} mount point: "
                               "unmount it or pass another --mount for the btrfs")
        if "user_subvol_rm_allowed" not in m.options:
            _run(["mount", "-o", "remount,user_subvol_rm_allowed,noatime", str(mount)])
        return
    image.parent.mkdir(parents=True, exist_ok=True)
    if not image.exists():
        with image.open("wb") as f:
            f.truncate(parse_size(size))  # sparse: takes no space until written
    if not _has_btrfs_superblock(image):
        _run(["mkfs.btrfs", "-q", str(image)])
    mount.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(mount)])
    os.chmod(mount, 0o755)  # users traverse it to reach their own 0700 dirs


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
    _as_user(user, lambda: config_file(user.home).unlink(missing_ok=True))


def setup_storage(user: str, size: str = "20G", image: Path = DEFAULT_IMAGE,
                  mount: Path = DEFAULT_MOUNT, storage: Path | None = None) -> Path:
    """Give `user` a storage root on btrfs with user_subvol_rm_allowed; return it. Root only, idempotent.

    If the storage dir (default MOUNT/USER) already lies on such a btrfs, only
    the dir is created. Otherwise the sparse `image` is created (of `size`),
    formatted if it holds no btrfs yet, and loop-mounted at `mount`. The dir is
    owned by the user with mode 0700, and the user's config file names it.
    """
    _require_root()
    info = lookup_user(user)
    target = Path(os.path.abspath(storage)) if storage else mount / info.name
    if not _usable(target):
        if mount != target and mount not in target.parents:
            raise StorageError(f"storage {target} is not on a btrfs mounted with user_subvol_rm_allowed "
                               f"and not under --mount {mount}: omit --storage, or pass a --mount that contains it")
        _mount_image(image, mount, size)
    target.mkdir(parents=True, exist_ok=True)
    os.chown(target, info.uid, info.gid)
    os.chmod(target, 0o700)
    _write_config(info, target)
    limits.delegate(info.name)  # a pids cgroup for the user's builds (container/limits.py)
    return target


def teardown_storage(user: str, image: Path = DEFAULT_IMAGE, mount: Path = DEFAULT_MOUNT,
                     storage: Path | None = None) -> list[str]:
    """Remove `user`'s storage dir and config; unmount and delete the image when no user dir remains.

    Returns what was done, one line per action. Root only; missing parts are fine.
    """
    _require_root()
    info = lookup_user(user)
    target = Path(os.path.abspath(storage)) if storage else (read_config_storage(info.home) or mount / info.name)
    done = []
    if target.exists():
        btrfs.remove_tree(target)
        done.append(f"removed {target}")
    _remove_config(info)
    if is_mount_point(mount) and not any(Path(mount).iterdir()):
        _run(["umount", str(mount)])  # a `-o loop` mount frees its loop device itself
        done.append(f"unmounted {mount}")
        # Only an image we just unmounted empty is known to hold nobody's data.
        if image.exists():
            image.unlink()
            done.append(f"deleted {image}")
        try:
            mount.rmdir()
        except OSError:
            pass
    return done
