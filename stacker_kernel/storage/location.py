"""Where a user's storage root is, and whether it is usable.

The root comes from `--storage DIR`, else `$STACKER_KERNEL_STORAGE`, else the
config file that `stacker-kernel setup-storage` writes for the user, else
`$XDG_DATA_HOME/stacker-kernel` (no setup: the overlay driver). A usable btrfs
root is an existing directory on btrfs mounted with `user_subvol_rm_allowed`
(unprivileged users may delete their subvolumes only with that option); an
overlay root needs a kernel whose overlayfs mounts in a user namespace.
"""
from __future__ import annotations

import json
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from stacker_kernel.errors import StorageError
from stacker_kernel.storage import btrfs

ENV_VAR = "STACKER_KERNEL_STORAGE"
DRIVER_ENV_VAR = "STACKER_KERNEL_STORAGE_DRIVER"
CONFIG_RELPATH = Path(".config/stacker-kernel/config.json")
# Root's state: images/<user>.img (each user's btrfs), users/<user>.json (what
# setup-storage created, for teardown) and btrfs/<user>/storage (where it is mounted).
STATE_DIR = Path("/var/lib/stacker-kernel")
DEFAULT_MOUNT = STATE_DIR / "btrfs"
# The one image all users shared before per-user images (still mounted at DEFAULT_MOUNT there).
DEFAULT_IMAGE = STATE_DIR / "btrfs.img"


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, what, and all options (per-mount and fs)."""

    mount_point: Path
    fstype: str
    source: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    """All mounts of this mount namespace, in /proc/self/mountinfo order."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf, rf = left.split(" "), right.split(" ")
            if len(lf) < 6 or len(rf) < 3:
                continue
            opts = set(lf[5].split(",")) | set(rf[2].split(","))
            result.append(Mount(Path(_unescape(lf[4])), rf[0], _unescape(rf[1]), frozenset(opts)))
    return result


def find_mount(path: os.PathLike | str) -> Mount | None:
    """The mount that holds `path` (longest matching mount point; the last one wins on overmounts)."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts():
        point = str(m.mount_point)
        if real == point or real.startswith(point.rstrip("/") + "/"):  # (strings: Path's parents cost)
            if best is None or len(m.mount_point.parts) >= len(best.mount_point.parts):
                best = m
    return best


def is_mount_point(path: os.PathLike | str) -> bool:
    """True when `path` is itself a mount point in this mount namespace."""
    real = Path(os.path.realpath(path))
    return any(m.mount_point == real for m in mounts())


def config_file(home: os.PathLike | str) -> Path:
    """The per-user config file under home `home`."""
    return Path(home) / CONFIG_RELPATH


def read_config_storage(home: os.PathLike | str) -> Path | None:
    """The storage root recorded in the config file under `home`, or None if there is none."""
    try:
        data = json.loads(config_file(home).read_text())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    except ValueError:
        raise StorageError(f"{config_file(home)} is not valid JSON: fix it or run "
                           "'sudo stacker-kernel setup-storage --user NAME' again") from None
    storage = data.get("storage") if isinstance(data, dict) else None
    return Path(storage) if isinstance(storage, str) and storage else None


def current_user() -> str:
    """Login name of the effective user (for messages that tell how to fix things)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _setup_command() -> str:
    return f"'sudo stacker-kernel setup-storage --user {current_user()}'"


def _fix() -> str:
    return f"run {_setup_command()}"


def resolve_storage(arg: str | os.PathLike | None = None) -> Path:
    """The storage root: `arg`, else $STACKER_KERNEL_STORAGE, else the user's config file.

    Raises StorageError when none of them names one. Does not check the root;
    call `check_storage` for that.
    """
    if arg:
        return Path(arg).expanduser().absolute()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().absolute()
    configured = read_config_storage(Path.home())
    if configured is not None:
        return configured
    # No storage root prepared: one of the user's own, on the overlay driver
    # unless it is on btrfs (storage/driver.py).
    default = default_storage()
    try:
        default.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"no storage is configured and {default} cannot be created ({e.strerror}): "
                           f"pass --storage DIR, set {ENV_VAR}, or {_fix()}") from None
    return default


def default_storage() -> Path:
    """$XDG_DATA_HOME/stacker-kernel (~/.local/share/stacker-kernel): storage without setup."""
    data = os.environ.get("XDG_DATA_HOME") or ""
    base = Path(data) if os.path.isabs(data) else Path.home() / ".local" / "share"
    return base / "stacker-kernel"


def resolve_driver(arg: str | None = None) -> str | None:
    """The storage driver asked for: `arg` (--storage-driver), else $STACKER_KERNEL_STORAGE_DRIVER,
    else "storage-driver" in the user's config file; None to let the storage root decide."""
    if arg:
        return arg
    env = os.environ.get(DRIVER_ENV_VAR)
    if env:
        return env
    try:
        data = json.loads(config_file(Path.home()).read_text())
    except (OSError, ValueError):
        return None
    value = data.get("storage-driver") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def check_storage(path: os.PathLike | str, driver: str = "btrfs") -> None:
    """Raise StorageError unless `path` is an existing directory of the user's, usable by
    `driver`: for btrfs, on btrfs mounted with user_subvol_rm_allowed; for overlay, on a
    kernel whose overlayfs mounts in a user namespace."""
    path = Path(path)
    try:
        exists = path.is_dir()
        yours = exists and os.access(path, os.R_OK | os.W_OK | os.X_OK)
    except PermissionError:  # a path inside a directory we may not search
        exists, yours = True, False
    if exists and not yours:
        # Each user's storage is 0700: another user's (or a path inside it) is refused here.
        raise StorageError(f"permission denied: storage {path} is not yours ({current_user()} may not "
                           f"read and write it); use your own storage: {_fix()}")
    if not exists:
        if driver == "overlay":
            raise StorageError(f"storage {path} does not exist: create it (mkdir -p {path}) or "
                               "leave out --storage to use the default")
        raise StorageError(f"storage {path} does not exist: {_fix()} to create it on btrfs")
    if driver == "overlay":
        check_overlay_kernel()
        return
    if not btrfs.is_btrfs(path):
        raise StorageError(f"storage {path} is not on btrfs: {_fix()}")
    mount = find_mount(path)
    if mount is None or "user_subvol_rm_allowed" not in mount.options:
        where = mount.mount_point if mount else path
        raise StorageError(f"storage {path} is on a btrfs mounted without user_subvol_rm_allowed: "
                           f"run 'sudo mount -o remount,user_subvol_rm_allowed {where}' or {_setup_command()}")


def check_overlay_kernel(release: str | None = None) -> None:
    """Raise StorageError unless the kernel mounts overlayfs in a user namespace (Linux >= 5.11)."""
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return  # an unusual version string: let the first mount tell
    if (major, minor) < (5, 11):
        raise StorageError(f"Linux {release} cannot mount overlayfs without root (needs 5.11 or later): "
                           "upgrade the kernel, or use btrfs storage ('sudo stacker-kernel setup-storage --user "
                           f"{current_user()}')")
