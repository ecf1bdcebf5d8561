"""How many processes one container may have, and how that is enforced.

A fork bomb in a step must not take the host's pid space from everyone. Each
container gets a cap (`max_processes`: `build --max-processes N`, else
$STACKER_KERNEL_MAX_PROCESSES, else "max_processes" in the user's config
file, else DEFAULT_MAX_PROCESSES), enforced by the first of:

1. a pids cgroup of its own, child of a cgroup this user may write:
   the cgroup v1 hierarchy's stacker-kernel/<user> (root creates it and gives
   it to the user at `setup-storage`: `delegate`; root itself always may), or
   the process's own cgroup v2 when systemd delegated it (pids enabled);
2. else RLIMIT_NPROC, set in the container's init before it creates the
   inner user namespace. That namespace's process cap is fixed at the
   creator's RLIMIT_NPROC, and every task of every id inside it is charged
   to it (kernel ucounts), so the cap holds for the whole container, and the
   user's processes outside do not count. It does not bind real uid 0 (the
   kernel exempts root), which is why root always gets the cgroup.

Both count threads as well as processes.
"""
from __future__ import annotations

import json
import os
import pwd
import resource
import time
from pathlib import Path

from stacker_kernel.errors import ContainerError

DEFAULT_MAX_PROCESSES = 4096
#: the whole of one user's builds, set by root on the delegated cgroup, at most
USER_MAX_PROCESSES = 4 * DEFAULT_MAX_PROCESSES
#: the share of pid_max all users' builds together may take; the rest stays the host's
USERS_SHARE = 3 / 4
ENV_VAR = "STACKER_KERNEL_MAX_PROCESSES"
CONFIG_KEY = "max_processes"
V1_PIDS = Path("/sys/fs/cgroup/pids")
V2_ROOT = Path("/sys/fs/cgroup")
DELEGATED_DIR = "stacker-kernel"
BUILD_PREFIX = "build-"


def _positive(text: object, where: str) -> int:
    try:
        n = int(str(text))
    except ValueError:
        n = 0
    if n < 1:
        raise ContainerError(f"{where} is {text!r}: give the most processes a build may run as a whole number, e.g. 4096")
    return n


def max_processes() -> int:
    """The configured cap: $STACKER_KERNEL_MAX_PROCESSES, the config file, else the default."""
    env = os.environ.get(ENV_VAR)
    if env:
        return _positive(env, f"${ENV_VAR}")
    from stacker_kernel.storage.location import config_file
    path = config_file(Path.home())
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None  # a missing or broken config file is the storage code's to report
    if isinstance(data, dict) and CONFIG_KEY in data:
        return _positive(data[CONFIG_KEY], f'"{CONFIG_KEY}" in {path}')
    return DEFAULT_MAX_PROCESSES


def limit_message(limit: int) -> str:
    return (f"step hit the process limit of {limit} (fork: Resource temporarily unavailable); raise it with "
            f"`stacker-kernel build --max-processes N`, ${ENV_VAR} or \"{CONFIG_KEY}\" in your config file")


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# --- root side: delegation at setup-storage ----------------------------------------

def pid_max() -> int:
    """The host's kernel.pid_max: how many pids (processes and threads) there are."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def user_cap(pids: int, users: int, configured: int | None = None) -> int:
    """Each user's cap for all their builds together: `configured` (the admin's
    `setup-storage --max-user-processes`), else an equal share of USERS_SHARE of
    `pids` among the `users` with storage, at most USER_MAX_PROCESSES. So all users
    at their caps together leave the host a quarter of its pids."""
    if configured:
        return configured
    return max(1, min(USER_MAX_PROCESSES, int(pids * USERS_SHARE) // max(1, users)))


def delegate(user: str, limit: int = USER_MAX_PROCESSES) -> Path | None:
    """As root: give `user` the pids cgroup v1 stacker-kernel/<user> (capped at
    `limit` for all their builds), in which their containers make their own.
    Idempotent; None where there is no cgroup v1 pids hierarchy (with cgroup v2,
    delegation is systemd's: Delegate=yes on the user's service)."""
    if not (V1_PIDS / "cgroup.procs").exists():
        return None
    info = pwd.getpwnam(user)
    top = V1_PIDS / DELEGATED_DIR
    mine = top / user
    try:
        top.mkdir(mode=0o755, exist_ok=True)
        mine.mkdir(mode=0o755, exist_ok=True)
        (mine / "pids.max").write_text(f"{limit}\n")
        # The user may make children and move their own processes into them; pids.max stays root's.
        for p in (mine, mine / "cgroup.procs", mine / "tasks"):
            os.chown(p, info.pw_uid, info.pw_gid)
    except OSError:
        return None  # e.g. a read-only cgroupfs: the user's builds fall back to RLIMIT_NPROC
    return mine


def undelegate(user: str) -> bool:
    """As root: remove `user`'s delegated pids cgroup (and the empty build
    cgroups below it); True when it is gone. A cgroup with live tasks stays."""
    mine = V1_PIDS / DELEGATED_DIR / user
    if not mine.is_dir():
        return False
    _remove_stale(mine)
    try:
        mine.rmdir()
    except OSError:
        return False
    return True


# --- engine side: one cgroup per container -------------------------------------------

def _candidates() -> list[Path]:
    found = []
    if (V1_PIDS / "cgroup.procs").exists():
        found.append(V1_PIDS / DELEGATED_DIR / ("root" if os.geteuid() == 0 else _user_name()))
    if os.geteuid() == 0 and (V2_ROOT / "cgroup.controllers").exists():
        found.append(V2_ROOT / DELEGATED_DIR)  # cgroup v2: root makes its own, beside systemd's
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::/"):
                    own = V2_ROOT / line.strip()[4:]
                    if (own / "cgroup.controllers").exists():
                        found.append(own)
    except OSError:
        pass
    return found


def _usable_base(base: Path) -> bool:
    if os.geteuid() == 0 and DELEGATED_DIR in base.parts:
        base.mkdir(parents=True, exist_ok=True, mode=0o755)  # root needs no delegation
    if not os.access(base, os.W_OK):
        return False
    if base.is_relative_to(V1_PIDS):
        return True
    # cgroup v2: children get pids.max only if this cgroup hands the pids controller down
    try:
        if "pids" not in (base / "cgroup.subtree_control").read_text().split():
            (base / "cgroup.subtree_control").write_text("+pids")
    except OSError:
        return False
    return True


def make_cgroup(limit: int) -> str | None:
    """A new pids cgroup for one container, capped at `limit`; None when this user
    may make none (the container then uses RLIMIT_NPROC)."""
    for base in _candidates():
        try:
            if not _usable_base(base):
                continue
            _remove_stale(base)
            path = base / f"{BUILD_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
            path.mkdir()
            try:
                (path / "pids.max").write_text(f"{limit}\n")
            except OSError:
                path.rmdir()
                continue
            return str(path)
        except OSError:
            continue
    return None


def _remove_stale(base: Path) -> None:
    # Containers of a crashed engine leave their cgroup (named after the engine's
    # pid). Only those of dead engines go: a live engine's new cgroup is empty
    # until its container joins it, and must not vanish under it.
    for d in base.glob(f"{BUILD_PREFIX}*"):
        pid = d.name[len(BUILD_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        try:
            d.rmdir()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_cgroup(path: str | None) -> None:
    """Remove a container's cgroup once everything in it is dead (the last
    tasks may take a moment to leave)."""
    if not path:
        return
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


# --- container side ------------------------------------------------------------------

def join_cgroup(path: str) -> None:
    """Move this process (the container's P0, before it forks) into `path`."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        raise ContainerError(f"cannot enter the build's pids cgroup {path} ({e.strerror}): "
                             "ask root to run 'stacker-kernel setup-storage' for you again") from e


def set_nproc(limit: int) -> int:
    """Cap RLIMIT_NPROC at `limit` (never above the hard limit we have); the cap set."""
    limit = effective(limit, None)
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    return limit


def effective(limit: int, cgroup: str | None) -> int:
    """The cap a container with `limit` gets: RLIMIT_NPROC cannot exceed our hard limit."""
    if cgroup:
        return limit
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    return limit if hard == resource.RLIM_INFINITY else min(limit, hard)


class Watch:
    """Tells, at a step's end, whether the step ran into the cap. Created
    before pivot_root (it keeps the cgroup's pids.events open)."""

    def __init__(self, limit: int, cgroup: str | None) -> None:
        self.limit = limit
        self.events_fd = os.open(os.path.join(cgroup, "pids.events"), os.O_RDONLY | os.O_CLOEXEC) if cgroup else None
        self.before = 0

    def _max_events(self) -> int:
        os.lseek(self.events_fd, 0, os.SEEK_SET)
        for line in os.read(self.events_fd, 4096).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
        return 0

    def start(self) -> None:
        if self.events_fd is not None:
            self.before = self._max_events()

    def hit(self) -> bool:
        """True if a fork failed for the cap since `start` (call it before the
        step's leftovers are killed)."""
        if self.events_fd is not None:
            return self._max_events() > self.before
        # RLIMIT_NPROC leaves no count of refusals: a step near the cap when it ended ran into it.
        return count_tasks() >= self.limit - max(4, self.limit // 50)


def count_tasks() -> int:
    """Tasks (threads included) in this pid namespace, as /proc shows them."""
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                n += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return n
