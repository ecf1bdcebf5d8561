"""The container's init: `python -m stacker_kernel.container.init CONFIG_JSON`.

Started by `runtime.Container.start` on a pty. P0 (this process) enters a new
user namespace with mount, pid, uts, ipc (and, for network "none", net)
namespaces and forks P1, pid 1 of the new pid namespace; P0 only waits. P1
builds the root (the rootfs nodev, proc with a read-only /proc/sys, a tmpfs
/dev, read-only /sys without /sys/firmware, staged binds), pivots into it, then enters a second user
namespace (same ids) with its own mount namespace, writes the ready sentinel
and serves one command per line from the pty (protocol in step.py).

The second user namespace is what makes "read-only" hold against the
container's root, who owns the first one: mounts copied into a mount
namespace of a less privileged user namespace are locked (the kernel refuses
to make them writable, drop nodev or unmount them), so neither a step of a
root-run build (uid 0 on the host) nor a rootless one can remount /proc/sys,
/sys or a host file given read-only (resolv.conf, imports) writable.

The whole container is in a pids cgroup of its own, or else under
RLIMIT_NPROC (limits.py), so a fork bomb stops at the cap. Both P0 and P1 die
with their parent (PR_SET_PDEATHSIG), and when P1 dies the kernel kills
everything in its pid namespace.

P1 loses the host filesystem at pivot_root, so everything it uses is imported
at the top of this module, before that.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import platform
import select
import signal
import socket
import struct
import sys
import termios
import time
import traceback
import tty
from collections import deque
from dataclasses import dataclass, field

from stacker_kernel.container import limits, userns
from stacker_kernel.container.step import (
    SCRIPT_FD, STATE_FD, WRAPPER_FD, decode_command, format_sentinel,
)
from stacker_kernel.errors import ContainerError, StackerKernelError
from stacker_kernel.storage.overlay import Stack, mount_stack

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
# statvfs f_flag bit -> the MS_ flag a read-only remount must keep (the
# kernel refuses to drop flags locked when the mount entered our userns)
_KEEP_FLAGS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 16: 16, 64: 64,
               1024: 1024, 2048: 2048, 4096: 1 << 21}
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# /proc entries that change the host (sysctls, sysrq, irq affinity): read-only, as runc has them
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
STAGING = "/dev/.stacker-kernel"
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
# signals P1 ignores (Python's SIGINT handler would raise in pid 1) and every
# step gets back at their defaults: ignored dispositions survive exec
_STEP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGTERM,
                 signal.SIGHUP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


@dataclass(frozen=True)
class StagedMount:
    """A host source bound under STAGING before pivot_root, bound at `dest` per step
    (with a `key`: only in the steps that ask for it)."""
    staged: str
    dest: str
    readonly: bool
    is_dir: bool
    key: str | None = None


@dataclass
class StepMounts:
    """The per-step binds made, and the placeholders created for them (to remove)."""
    mounted: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    # (directory, atime_ns, mtime_ns, entries) of each directory a placeholder was
    # made in, its times restored once it is removed if its entries are as before:
    # a step that changes nothing leaves no trace (stacker emits no layer for it),
    # not even a parent's mtime; a step that added or removed an entry keeps its mtime.
    parent_times: list[tuple[str, int, int, list[str]]] = field(default_factory=list)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    userns.libc_call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))


def umount(target: str, flags: int = MNT_DETACH) -> None:
    userns.libc_call("umount2", target.encode(), ctypes.c_int(flags))


def remount_readonly(path: str) -> None:
    """Make the bind mount at `path` read-only, keeping its locked flags."""
    remount_adding(path, MS_RDONLY)


def remount_adding(path: str, flags: int) -> None:
    """Add `flags` (MS_RDONLY, MS_NODEV) to the bind mount at `path`, keeping its locked flags."""
    f_flag = os.statvfs(path).f_flag
    keep = 0
    for st, ms in _KEEP_FLAGS.items():
        if f_flag & st:
            keep |= ms
    mount(None, path, None, MS_BIND | MS_REMOUNT | flags | keep)


def _mount_points_under(prefix: str) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        data = data[n:]


def _create_placeholder(path: str, is_dir: bool) -> None:
    if is_dir:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def setup_root(config: dict) -> list[StagedMount]:
    """Build the container's root from config["rootfs"] and pivot into it.

    Guarantees on return: cwd and / are the rootfs (nodev), the host
    filesystem is gone, /proc (its host knobs read-only) /dev /sys (read-only)
    are mounted, and each configured bind (plus the host's resolv.conf) waits
    under STAGING for `mount_step`.
    """
    root = os.path.realpath(config["rootfs"])
    if not os.path.isdir(root):
        raise ContainerError(f"the rootfs {root} is not a directory: give the path of an extracted root filesystem")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if config.get("overlay"):
        # The overlay storage driver: the rootfs is the stack of its layers, the
        # step writing to its own upper dir (storage/overlay.py).
        spec = config["overlay"]
        mount_stack(Stack(tuple(spec["layers"]), spec.get("upper"), spec.get("work")), root)
    else:
        mount(root, root, None, MS_BIND | MS_REC)
    # A device node in the rootfs (from a layer, a bind, anywhere) opens nothing; /dev is set up below.
    remount_adding(root, MS_NODEV)
    for d in ("proc", "dev", "sys"):
        # A rootfs without them gains the empty directory, as LXC does.
        if not os.path.isdir(f"{root}/{d}"):
            os.mkdir(f"{root}/{d}", 0o555 if d != "dev" else 0o755)
    try:
        mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except PermissionError:
        # The kernel lets a user namespace mount a procfs only where the one it
        # sees is not partly covered (fs/namespace.c, mnt_already_visible): a
        # container runtime masks paths of /proc unless told otherwise.
        raise ContainerError(
            "cannot mount /proc for the build container: the container this kernel runs in masks "
            "parts of /proc; run it unmasked (Kubernetes: securityContext.procMount: Unmasked; "
            "podman: --security-opt unmask=/proc/*)") from None
    for name in PROC_READONLY:
        path = f"{root}/proc/{name}"
        if os.path.exists(path):
            mount(path, path, None, MS_BIND | MS_REC)
            remount_readonly(path)
    dev = f"{root}/dev"
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=65536k")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            _create_placeholder(f"{dev}/{name}", False)
            mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/pts", 0o755)
    mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    os.mkdir(f"{dev}/shm", 0o1777)
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("/sys", f"{root}/sys", None, MS_BIND | MS_REC)
    for point in reversed(_mount_points_under(f"{root}/sys")):
        try:
            remount_readonly(point)
        except OSError:
            if point == f"{root}/sys":
                raise
    if os.path.isdir(f"{root}/sys/firmware"):
        # Firmware tables (ACPI, DMI, memory map) are root-only on the host: a root-run
        # step would read them through the bind. An empty read-only tmpfs hides them,
        # locked in place by lock_mounts.
        mount("tmpfs", f"{root}/sys/firmware", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    staged = _stage_binds(config, root)
    name = config.get("hostname", "stacker").encode()
    try:
        userns.libc_call("sethostname", name, ctypes.c_size_t(len(name)))
    except PermissionError:
        # Podman's default seccomp profile (and so a pod's, with that profile)
        # refuses sethostname without CAP_SYS_ADMIN, even in a UTS namespace of
        # our own: the step sees the pod's hostname then, in a namespace of its own.
        pass
    os.chdir(root)
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise ContainerError(f"pivot_root's syscall number on {platform.machine()} is unknown: add it to _SYS_PIVOT_ROOT")
    userns.libc_call("syscall", ctypes.c_long(nr), b".", b".")
    umount(".")
    os.chdir("/")
    if not os.path.exists("/bin/sh"):
        raise ContainerError(f"the rootfs {root} has no /bin/sh: steps run with /bin/sh, so use a base image that has one")
    if config.get("network") == "none":
        _loopback_up()
    return staged


def _stage_binds(config: dict, root: str) -> list[StagedMount]:
    binds = [(m["source"], m["dest"], bool(m.get("readonly", True)), m.get("key"))
             for m in config.get("mounts", [])]
    if os.path.exists("/etc/resolv.conf") and os.path.isdir(f"{root}/etc"):
        binds.append(("/etc/resolv.conf", "/etc/resolv.conf", True, None))
    if not binds:
        return []
    os.mkdir(f"{root}{STAGING}", 0o700)
    staged = []
    for i, (source, dest, readonly, key) in enumerate(binds):
        if not os.path.exists(source):
            raise ContainerError(f"the bind source {source} does not exist: create it or remove it from the binds")
        is_dir = os.path.isdir(source)
        path = f"{root}{STAGING}/{i}"
        _create_placeholder(path, is_dir)
        mount(source, path, None, MS_BIND | MS_REC)
        if readonly:
            remount_readonly(path)
        staged.append(StagedMount(f"{STAGING}/{i}", "/" + dest.strip("/"), readonly, is_dir, key))
    return staged


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def mount_step(staged: list[StagedMount], requests: list[dict] | None = None) -> StepMounts:
    """Bind the staged sources at their destinations, and the step's own mounts
    (`requests`, see runtime.Container.run_step), creating (and recording)
    whatever mount points the rootfs lacks, so `unmount_step` leaves no trace."""
    done = StepMounts()
    by_key = {s.key: s for s in staged if s.key}
    todo: list[tuple[StagedMount | None, dict]] = [(s, {}) for s in staged if not s.key]
    for r in requests or []:
        if "tmpfs" in r:
            todo.append((None, r))
        elif r.get("key") in by_key:
            s = by_key[r["key"]]
            todo.append((StagedMount(s.staged, "/" + r["dest"].strip("/"), bool(r.get("readonly")),
                                     s.is_dir, s.key), r))
        else:
            raise OSError(f"the step's mount {r.get('dest')} was not staged in this container")
    try:
        for s, r in todo:
            path = os.path.realpath(s.dest if s is not None else r["tmpfs"])  # a symlinked resolv.conf mounts at its target
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/" + "/".join(parts[:i])
                if not os.path.lexists(d):
                    _keep_times(done, os.path.dirname(d))
                    os.mkdir(d, 0o755)
                    done.created.append(d)
            if not os.path.lexists(path):
                _keep_times(done, os.path.dirname(path))
                _create_placeholder(path, s.is_dir if s is not None else True)
                done.created.append(path)
            if s is None:
                size = f",size={r['size']}" if r.get("size") else ""
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" + size)
                done.mounted.append(path)
                continue
            mount(s.staged, path, None, MS_BIND | MS_REC)
            done.mounted.append(path)
            if s.is_dir and ("uid" in r or "gid" in r or "mode" in r) and not os.listdir(path):
                # a new cache directory gets the owner and mode its mount asks for, as BuildKit's
                os.chown(path, int(r.get("uid", 0)), int(r.get("gid", 0)))
                os.chmod(path, int(r.get("mode", "755"), 8))
            if s.readonly:
                remount_readonly(path)
    except OSError:
        unmount_step(done)  # a half-mounted step must not leave mounts or placeholders
        raise
    return done


def _keep_times(done: StepMounts, directory: str) -> None:
    """Record `directory`'s times before the first placeholder is made in it."""
    if any(d == directory for d, _, _, _ in done.parent_times):
        return
    st = os.lstat(directory)
    done.parent_times.append((directory, st.st_atime_ns, st.st_mtime_ns, sorted(os.listdir(directory))))


def _mount_or_answer(staged: list[StagedMount], nonce: str, requests: list[dict] | None = None
                     ) -> StepMounts | None:
    """mount_step, or (None) the error and a status-125 sentinel for the engine."""
    try:
        return mount_step(staged, requests)
    except OSError as e:
        _write_all(1, f"stacker-kernel: cannot mount the step's binds: {e}\n".encode())
        _write_all(1, format_sentinel(nonce, 125, b""))
        return None


def unmount_step(done: StepMounts) -> None:
    """Undo `mount_step`: unmount, then remove the placeholders it created
    (a directory the step filled through a placeholder parent stays)."""
    for path in reversed(done.mounted):
        try:
            umount(path)
        except OSError:
            pass
    for path in reversed(done.created):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
        except OSError:
            pass
    for directory, atime_ns, mtime_ns, entries in reversed(done.parent_times):
        try:
            if sorted(os.listdir(directory)) == entries:
                os.utime(directory, ns=(atime_ns, mtime_ns), follow_symlinks=False)
        except OSError:
            pass  # e.g. the step removed the directory


class CommandReader:
    """Reads `base64(json)` lines from the raw pty into `queue`, in order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.queue: deque[dict] = deque()

    def read(self) -> bool:
        """Read what is available; False when the engine has closed the pty."""
        try:
            data = os.read(self.fd, 1 << 16)
        except InterruptedError:
            return True
        except OSError:
            data = b""  # EIO: the engine closed the pty
        if not data:
            return False
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                self.queue.append(decode_command(line))
        return True

    def next(self) -> dict | None:
        """The next command, blocking; None at EOF."""
        while not self.queue:
            if not self.read():
                return None
        return self.queue.popleft()


def kill_all() -> None:
    """SIGKILL every other process of the pid namespace and reap them all."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _status(wstatus: int) -> int:
    code = os.waitstatus_to_exitcode(wstatus)
    return 128 - code if code < 0 else code


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)  # not CLOEXEC: the step opens it by /proc/self/fd/N
    _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _id_file(path: str) -> list[list[str]]:
    """The entries of the rootfs's /etc/passwd or /etc/group (none when it is missing)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [ln.rstrip("\n").split(":") for ln in f if ln.strip() and not ln.startswith("#")]
    except OSError:
        return []


def resolve_user(spec: str, passwd: list[list[str]], group: list[list[str]]
                 ) -> tuple[int, int, list[int], str]:
    """uid, gid, supplementary gids and home of USER[:GROUP] (names or numbers), as
    runc resolves a Dockerfile USER (libcontainer/user.GetExecUser): a user missing from
    /etc/passwd is an error unless numeric (then gid 0, home /); with a GROUP, that
    group only, else the groups that list the user."""
    user, _, grp = spec.partition(":")
    entry = next((e for e in passwd if len(e) >= 6 and (e[0] == user or e[2] == user)), None)
    if entry is None:
        if not user.isdigit():
            raise ContainerError(f"USER {user}: there is no user {user} in the image's /etc/passwd: "
                                 "add it (useradd) or give a numeric uid")
        uid, gid, name, home = int(user), 0, None, "/"
    else:
        uid, gid, name, home = int(entry[2]), int(entry[3]), entry[0], entry[5] or "/"
    if grp:
        g = next((e for e in group if len(e) >= 3 and (e[0] == grp or e[2] == grp)), None)
        if g is None and not grp.isdigit():
            raise ContainerError(f"USER {spec}: there is no group {grp} in the image's /etc/group: "
                                 "add it (groupadd) or give a numeric gid")
        gid = int(g[2]) if g is not None else int(grp)
        return uid, gid, [gid], home
    extra = [int(e[2]) for e in group if len(e) >= 4 and name and name in e[3].split(",")
             and e[2].isdigit()]
    return uid, gid, list(dict.fromkeys([gid] + extra)), home


def _become_user(cmd: dict, env: dict[str, str]) -> None:
    """Drop the step to cmd["user"] (ids from the rootfs's own files), setting
    `__sk_home` (the wrapper's HOME) or, for a shebang step, HOME itself."""
    uid, gid, groups, home = resolve_user(cmd["user"], _id_file("/etc/passwd"), _id_file("/etc/group"))
    if cmd.get("home"):
        env["HOME" if cmd.get("shebang") else "__sk_home"] = home
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        raise ContainerError(f"USER {cmd['user']} (uid {uid}, gid {gid}) cannot be taken in this "
                             f"container ({e.strerror}): its ids are outside the user namespace's "
                             "range (give the build user a subuid/subgid range)") from None


def _exec_step(cmd: dict, state_w: int, wrapper_fd: int | None, script_fd: int) -> None:
    """In the forked child: become the step. Never returns."""
    try:
        os.setsid()
        os.umask(0o022)  # every step starts like stacker's run, whatever the engine's umask
        for sig in _STEP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        wanted = {STATE_FD: state_w, SCRIPT_FD: script_fd}
        if wrapper_fd is not None:
            wanted[WRAPPER_FD] = wrapper_fd
        # dup high first so no target clobbers a source
        high = {t: fcntl.fcntl(s, fcntl.F_DUPFD, 64) for t, s in wanted.items()}
        for t, h in high.items():
            os.dup2(h, t, inheritable=True)
        os.closerange(3, STATE_FD)
        os.closerange(SCRIPT_FD + 1, 1 << 20)
        if wrapper_fd is None:
            os.closerange(WRAPPER_FD, WRAPPER_FD + 1)
        os.chdir(cmd.get("cwd") or "/")
        env = {str(k): str(v) for k, v in cmd["env"].items()}
        if cmd.get("user"):
            _become_user(cmd, env)
        if cmd.get("shebang"):
            path = f"/proc/self/fd/{SCRIPT_FD}"
            os.execve(path, [path], env)
        os.execve("/bin/sh", ["/bin/sh", "-e", f"/proc/self/fd/{WRAPPER_FD}"], env)
    except ContainerError as e:
        os.write(2, f"stacker-kernel: {e}\n".encode(errors="replace"))
    except BaseException as e:
        os.write(2, f"stacker-kernel: cannot start the step: {e}\n".encode(errors="replace"))
    os._exit(127)


def run_step(cmd: dict, staged: list[StagedMount], grace: float, reader: CommandReader,
             watch: limits.Watch) -> None:
    """Run one step and answer with its sentinel. Returns when everything the
    step started is dead, its mounts are gone and the sentinel is written."""
    nonce = cmd["nonce"]
    done = _mount_or_answer(staged, nonce, cmd.get("mounts"))
    if done is None:
        return
    script_fd = _memfd("step", cmd["script"].encode("utf-8", "surrogateescape"))
    wrapper_fd = None if cmd.get("shebang") else _memfd("wrapper", cmd["wrapper"].encode("utf-8", "surrogateescape"))
    state_r, state_w = os.pipe()
    watch.start()
    pid = os.fork()
    if pid == 0:
        _exec_step(cmd, state_w, wrapper_fd, script_fd)
    for fd in (state_w, script_fd, wrapper_fd):
        if fd is not None:
            os.close(fd)
    state, exit_requested = _wait_step(pid, state_r, grace, reader)
    wstatus = os.waitpid(pid, 0)[1]
    flags = "pids" if watch.hit() else ""  # before kill_all: what is left shows how close the step got
    kill_all()  # nothing a step started outlives it; the rootfs is quiet for the snapshot
    unmount_step(done)
    while True:  # every writer is dead now: read to EOF
        chunk = os.read(state_r, 1 << 16)
        if not chunk:
            break
        state += chunk
    os.close(state_r)
    _write_all(1, format_sentinel(nonce, _status(wstatus), bytes(state), flags))
    if exit_requested:
        os._exit(0)


def _wait_step(pid: int, state_r: int, grace: float, reader: CommandReader) -> tuple[bytearray, bool]:
    """Wait for the step's shell to exit while reading its state pipe (which
    may exceed a pipe buffer) and serving `int` and `exit` commands."""
    pidfd = os.pidfd_open(pid)
    state = bytearray()
    state_open, deadline, killed, exit_requested = True, None, False, False
    try:
        while True:
            # Commands first: an "int" may have come in one read with the "run" command.
            if reader.queue:
                later = deque()
                while reader.queue:
                    c = reader.queue.popleft()
                    if c.get("op") not in ("int", "exit"):
                        later.append(c)  # served after this step
                        continue
                    if deadline is None:
                        try:
                            os.killpg(pid, signal.SIGINT)
                        except ProcessLookupError:
                            pass
                        deadline = time.monotonic() + (0.0 if c["op"] == "exit" else grace)
                    exit_requested = exit_requested or c["op"] == "exit"
                reader.queue = later
            fds = [pidfd, reader.fd] + ([state_r] if state_open else [])
            timeout = None if deadline is None or killed else max(0.0, deadline - time.monotonic())
            ready = select.select(fds, [], [], timeout)[0]
            if state_r in ready:
                chunk = os.read(state_r, 1 << 16)
                state += chunk
                state_open = bool(chunk)
            if reader.fd in ready and not reader.read():  # the engine is gone
                kill_all()
                os._exit(1)
            if pidfd in ready:
                return state, exit_requested
            if deadline is not None and not killed and time.monotonic() >= deadline:
                os.kill(-1, signal.SIGKILL)
                killed = True
    finally:
        os.close(pidfd)


def run_shell(cmd: dict, staged: list[StagedMount], cooked: list, raw: list) -> None:
    """An interactive shell on the pty (for `chroot`): cooked mode, foreground
    process group, then back to raw mode and the sentinel."""
    nonce = cmd["nonce"]
    done = _mount_or_answer(staged, nonce)
    if done is None:
        return
    # Cooked mode before the engine forwards any typing: until this marker, what the
    # user types would reach our command reader instead of the shell.
    termios.tcsetattr(0, termios.TCSANOW, cooked)
    _write_all(1, format_sentinel(nonce + "-ready", 0, b""))
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            for sig in _STEP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.chdir(cmd.get("cwd") or "/")
            argv = cmd.get("argv") or ["/bin/sh"]
            os.execve(argv[0], argv, {str(k): str(v) for k, v in cmd["env"].items()})
        except BaseException as e:
            os.write(2, f"stacker-kernel: cannot start the shell: {e}\n".encode(errors="replace"))
        os._exit(127)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child did it first
    termios.tcsetattr(0, termios.TCSANOW, cooked)
    try:
        os.tcsetpgrp(0, pid)
    except OSError:
        pass
    wstatus = os.waitpid(pid, 0)[1]
    os.tcsetpgrp(0, os.getpgrp())
    kill_all()
    unmount_step(done)
    termios.tcsetattr(0, termios.TCSANOW, raw)
    _write_all(1, format_sentinel(nonce, _status(wstatus), b""))


def _cooked(attrs: list) -> list:
    attrs = list(attrs)
    attrs[6] = list(attrs[6])
    attrs[0] |= termios.ICRNL
    attrs[1] |= termios.OPOST | termios.ONLCR
    attrs[3] |= termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ICANON | termios.ISIG | termios.IEXTEN
    return attrs


def serve(staged: list[StagedMount], grace: float, watch: limits.Watch) -> None:
    """P1's loop: one command at a time until `exit` or EOF."""
    orig = termios.tcgetattr(0)
    tty.setraw(0)  # no echo, no line editing, no signals, no output processing
    raw = termios.tcgetattr(0)
    cooked = _cooked(orig)
    _write_all(1, format_sentinel("ready", 0, b""))
    reader = CommandReader(0)
    while True:
        cmd = reader.next()
        if cmd is None or cmd.get("op") == "exit":
            kill_all()
            os._exit(0)
        if cmd.get("op") == "run":
            run_step(cmd, staged, grace, reader, watch)
        elif cmd.get("op") == "shell":
            run_shell(cmd, staged, cooked, raw)
        # "int" between steps: nothing to interrupt


def lock_mounts() -> None:
    """Enter a nested user namespace (the same ids, one to one) with a copy of
    this mount namespace: every mount made so far is locked there, so root in
    the container can no longer make a read-only mount writable or undo nodev.
    Its process cap is our RLIMIT_NPROC, fixed now (limits.py)."""
    # The same extents as ours: the kernel maps each extent through one extent of the parent.
    uids, gids = _same_ids("/proc/self/uid_map"), _same_ids("/proc/self/gid_map")
    # rootful=True: we are root of the outer namespace, so the maps are written directly
    userns.enter_new_userns(userns.IdMap(uids, gids, rootful=True), userns.CLONE_NEWNS)


def _same_ids(path: str) -> tuple[userns.IdRange, ...]:
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    return tuple(userns.IdRange(int(r[0]), int(r[0]), int(r[2])) for r in rows)


def report_error(message: str) -> None:
    _write_all(1, format_sentinel("error", 1, message.encode("utf-8", "replace")))


def p1_main(config: dict, pid_r: int) -> None:
    """pid 1 of the container. Never returns."""
    code = 1
    try:
        userns.set_pdeathsig()
        os.read(pid_r, 64)  # P0 has written the host pid to the engine: keep going
        os.close(pid_r)
        for sig in _STEP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # Our own process group, in the foreground of the pty: a background
        # group's reads of its terminal fail (EIO with SIGTTIN ignored), and
        # the shell op hands the terminal to the shell and back.
        os.setpgid(0, 0)
        os.tcsetpgrp(0, os.getpgrp())
        limit = int(config.get("max_processes") or limits.DEFAULT_MAX_PROCESSES)
        cgroup = config.get("cgroup")
        watch = limits.Watch(limit if cgroup else limits.set_nproc(limit), cgroup)
        staged = setup_root(config)
        lock_mounts()
        serve(staged, float(config.get("interrupt_grace", 3.0)), watch)
        code = 0
    except StackerKernelError as e:
        report_error(str(e))
    except OSError as e:
        report_error(f"cannot set up the container: {e}")
    except BaseException:
        report_error("container init failed:\n" + traceback.format_exc())
    os._exit(code)


def main(argv: list[str]) -> None:
    """P0: namespaces, fork P1, wait for it and exit with its status."""
    config = json.loads(argv[1])
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    try:
        userns.set_pdeathsig()
        if os.getppid() != config.get("engine_pid", os.getppid()):
            os._exit(1)  # the engine died before we could tie ourselves to it
        if config.get("cgroup"):
            limits.join_cgroup(config["cgroup"])  # before any fork: all of the container is in it
        flags = userns.CLONE_NEWNS | userns.CLONE_NEWPID | userns.CLONE_NEWUTS | userns.CLONE_NEWIPC
        if config.get("network") == "none":
            flags |= userns.CLONE_NEWNET
        userns.enter_new_userns(userns.IdMap.for_current_user(), flags)
    except StackerKernelError as e:
        report_error(str(e))
        os._exit(1)
    except OSError as e:
        report_error(f"cannot create the container's namespaces: {e}")
        os._exit(1)
    pid_r, pid_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(pid_w)
        p1_main(config, pid_r)
    os.close(pid_r)
    _write_all(1, format_sentinel("pid", pid, b""))
    os.close(pid_w)
    while True:
        try:
            wstatus = os.waitpid(pid, 0)[1]
            break
        except InterruptedError:
            continue
    os._exit(_status(wstatus))


if __name__ == "__main__":
    main(sys.argv)
