"""User namespaces that hold the caller's whole subordinate uid/gid range.

Inside, root is the caller and ids 1..65535 are the caller's subordinate ids
(inside id N is outside id SUBID_START + N), so `apt` can drop to `_apt` and
files keep their owners. The maps are written by the setuid helpers
newuidmap/newgidmap (Debian's `uidmap`), which check /etc/subuid and
/etc/subgid. Root needs no subordinate ranges: it maps the ids its own
namespace holds one to one (all of them on a host, 65536 in a pod).

Everything here works in a forked, single-threaded child: unshare(CLONE_NEWUSER)
fails with EINVAL in a process with several threads (ipykernel has several).
"""
from __future__ import annotations

import ctypes
import os
import pickle
import pwd
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from stacker_kernel.errors import ContainerError, StackerKernelError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

PR_SET_PDEATHSIG = 1
NS_SIZE = 65536  # ids inside: 0 (the caller) and 1..65535 (subordinate ids)

_libc = ctypes.CDLL(None, use_errno=True)


def libc_call(name: str, *args: Any) -> int:
    """Call a libc function, raising OSError with errno on -1."""
    ret = getattr(_libc, name)(*args)
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    libc_call("unshare", ctypes.c_int(flags))


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent thread dies."""
    libc_call("prctl", ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), 0, 0, 0)


NOBODY = 65534  # mapped in every user namespace this project makes (NS_SIZE ids)
PR_SET_NO_NEW_PRIVS = 38


def become_nobody() -> None:
    """Drop from root of a user namespace to its `nobody`, for good: no capabilities
    (so no second chroot climbs out of a chroot) and no_new_privs (no setuid file of
    an image gives root back). For a child about to run a tool on untrusted input."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    libc_call("prctl", ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), 0, 0, 0)


# A root-run kernel has no subordinate range to take an unused id from: its tools on
# untrusted input run as this host id, which no account and no process should use
# (README, Security). Below 2^31: some tools still read ids as signed.
ISOLATED_HOST_ID = 2147483646
DEVICES = ("null", "zero", "full", "random", "urandom")


def isolated_id() -> int:
    """The id, as the calling namespace sees it, that `isolate` runs a tool as: the
    namespace's nobody (a subordinate id) in a user namespace of ours, else
    ISOLATED_HOST_ID, never the host's own nobody."""
    with open("/proc/self/uid_map") as f:
        initial = f.read().split() == ["0", "0", "4294967295"]
    if not initial:
        return NOBODY
    try:
        name = pwd.getpwuid(ISOLATED_HOST_ID).pw_name
    except KeyError:
        return ISOLATED_HOST_ID
    raise ContainerError(f"uid {ISOLATED_HOST_ID} belongs to the account {name}, but stacker-kernel runs "
                         "image tools as that id because no one uses it: give the account another uid")


def isolate(root: str | None = None, *, dev_and_tmp: bool = False, outside: int | None = None) -> None:
    """preexec_fn for a tool on untrusted input (Shift-Tab's --help, fsck.erofs), from
    root of a namespace: it runs as nobody of a new user namespace whose nobody is
    `isolated_id()` outside, pid 1 of a new pid namespace (it sees and can signal
    no process but its own), without network or shared IPC, chrooted into `root`
    if given, with fresh /dev/null, /dev/zero... and an empty /tmp there (tmpfs,
    gone with it) if `dev_and_tmp` and the image has those folders. A helper
    process outside waits for it and exits with its status, so the caller's Popen
    sees the tool's. Pass `outside` (isolated_id(), looked up before the fork)
    from a process with threads."""
    outside = isolated_id() if outside is None else outside
    ids = (IdRange(0, 0, 1), IdRange(NOBODY, outside, 1))
    enter_new_userns(IdMap(ids, ids, rootful=True), CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC)
    if root is not None and dev_and_tmp:
        _dev_and_tmp(root)
    pid = os.fork()  # the first child of the new pid namespace is its pid 1
    if pid:
        code = 1
        try:
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # Popen's error pipe: its end is the tool's alone
            _, wstatus = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(wstatus)
            code = 128 - code if code < 0 else code
        finally:
            os._exit(code)
    set_pdeathsig()
    if root is not None:
        os.chroot(root)
        os.chdir("/")
    become_nobody()


def _dev_and_tmp(root: str) -> None:
    """A tmpfs /dev holding the host's harmless devices, and a tmpfs /tmp, in `root`
    (read-only: only its existing folders can be mount points)."""
    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        enc = (lambda v: v.encode() if v is not None else None)
        libc_call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))

    ms_nosuid, ms_nodev, ms_bind, ms_rec, ms_private = 2, 4, 4096, 16384, 1 << 18
    mount(None, "/", None, ms_rec | ms_private)  # nothing made here reaches the caller
    dev, tmp = os.path.join(root, "dev"), os.path.join(root, "tmp")
    # a symlinked /dev or /tmp of the image must not put a mount elsewhere
    if os.path.isdir(dev) and not os.path.islink(dev):
        mount("tmpfs", dev, "tmpfs", ms_nosuid, "mode=755,size=64k")
        for name in DEVICES:
            if os.path.exists(f"/dev/{name}"):
                os.close(os.open(f"{dev}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                mount(f"/dev/{name}", f"{dev}/{name}", None, ms_bind)
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        mount("tmpfs", tmp, "tmpfs", ms_nosuid | ms_nodev, "mode=1777,size=16m")


@dataclass(frozen=True)
class IdRange:
    """`count` ids starting at `inside` map onto ids starting at `outside`."""
    inside: int
    outside: int
    count: int


@dataclass(frozen=True)
class IdMap:
    uids: tuple[IdRange, ...]
    gids: tuple[IdRange, ...]
    rootful: bool

    def to_outside_uid(self, uid: int) -> int:
        return _translate(self.uids, uid)

    def to_outside_gid(self, gid: int) -> int:
        return _translate(self.gids, gid)

    @classmethod
    def for_current_user(cls) -> "IdMap":
        """The map for this process's user; a clear error if it has no subordinate range."""
        if os.geteuid() == 0:
            return root_idmap()
        uid, gid = os.getuid(), os.getgid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        sub_u = _subordinate_start("/etc/subuid", name, uid)
        sub_g = _subordinate_start("/etc/subgid", name, uid)
        return cls(
            (IdRange(0, uid, 1), IdRange(1, sub_u + 1, NS_SIZE - 1)),
            (IdRange(0, gid, 1), IdRange(1, sub_g + 1, NS_SIZE - 1)),
            rootful=False,
        )


def root_idmap() -> IdMap:
    """Root's map: every id its own namespace holds, one to one. That is all 2^32
    ids on a host, but only 0..65535 as root of a Kubernetes pod with
    `hostUsers: false` or of `podman --userns=auto`: a map naming an id the
    namespace lacks is refused (EPERM), so read what it holds."""
    return IdMap(_held_ids("/proc/self/uid_map"), _held_ids("/proc/self/gid_map"), rootful=True)


def _held_ids(path: str) -> tuple[IdRange, ...]:
    """The extents of this process's namespace (`path` is its uid_map or gid_map),
    each mapped onto itself."""
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    return tuple(IdRange(int(r[0]), int(r[0]), int(r[2])) for r in rows)


def _translate(ranges: tuple[IdRange, ...], ident: int) -> int:
    for r in ranges:
        if r.inside <= ident < r.inside + r.count:
            return r.outside + ident - r.inside
    raise ValueError(f"id {ident} is not mapped")


def _subordinate_start(path: str, name: str, uid: int) -> int:
    """Start of the first range in `path` for this user that holds NS_SIZE ids."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (name, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count >= NS_SIZE:
            return start
    raise ContainerError(
        f"user {name} has no subordinate range of {NS_SIZE} ids in {path}: "
        f"as root, add a line like '{name}:100000:{NS_SIZE}' to /etc/subuid and /etc/subgid "
        f"(or run 'usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}')"
    )


def write_maps(pid: int, idmap: IdMap) -> None:
    """Write the uid/gid maps of `pid`, which has just unshared its user namespace."""
    if idmap.rootful:
        for kind, ranges in (("uid_map", idmap.uids), ("gid_map", idmap.gids)):
            with open(f"/proc/{pid}/{kind}", "w") as f:
                f.write("".join(f"{r.inside} {r.outside} {r.count}\n" for r in ranges))
        return
    for tool, ranges in (("newuidmap", idmap.uids), ("newgidmap", idmap.gids)):
        exe = shutil.which(tool) or f"/usr/bin/{tool}"
        if not os.path.exists(exe):
            raise ContainerError(f"{tool} is missing: install Debian's uidmap package (apt-get install uidmap)")
        args = [exe, str(pid)] + [str(x) for r in ranges for x in (r.inside, r.outside, r.count)]
        res = subprocess.run(args, capture_output=True, text=True)
        if res.returncode != 0:
            raise ContainerError(f"{tool} refused the id map ({res.stderr.strip()}): check /etc/subuid and /etc/subgid")


def enter_new_userns(idmap: IdMap, flags: int = 0) -> None:
    """Move the calling (single-threaded) process into a new user namespace with
    `idmap`, plus the other namespaces in `flags`, and become root in it.

    A helper forked before the unshare writes the maps from outside, as the
    setuid helpers require; the pipes order the two processes.
    """
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(go_w)
            os.close(done_r)
            os.read(go_r, 1)
            try:
                write_maps(me, idmap)
                os.write(done_w, b"ok")
            except BaseException as e:  # report, never raise in the helper
                os.write(done_w, str(e).encode()[:4000] or b"error")
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(done_w)
    try:
        try:
            unshare(CLONE_NEWUSER)
        except OSError as e:
            raise ContainerError(
                f"cannot create a user namespace ({e.strerror}): enable unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0)"
            ) from None
        os.write(go_w, b"x")
        answer = os.read(done_r, 4096)
    finally:
        os.close(go_w)
        os.close(done_r)
        os.waitpid(helper, 0)
    if answer != b"ok":
        raise ContainerError(answer.decode(errors="replace"))
    os.setgroups([0])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    if flags:
        unshare(flags)


def _closure_values(fn: Callable[..., Any]) -> list[Any]:
    """What a closure `fn` (a lambda) refers to: the paths it reads may be there."""
    out = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return out


def run_in_userns(fn: Callable[..., Any], *args: Any, idmap: IdMap | None = None,
                  flags: int = CLONE_NEWNS, views: bool = True, **kwargs: Any) -> Any:
    """Run fn(*args, **kwargs) as root of a new user namespace in a forked child and
    return its (picklable) result, or raise its exception here.

    Use it for file work on a rootfs, whose files belong to subordinate ids the
    caller cannot read or chown from outside. The child dies with the caller.
    With `views` (and a mount namespace), a tree of the overlay storage driver
    named in the arguments is mounted over its own directory first, so `fn`
    sees it as the directory tree it stands for (storage/overlay.py).
    """
    idmap = idmap or IdMap.for_current_user()
    # What this process buffered must not be written again by the child's flush.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            set_pdeathsig()
            enter_new_userns(idmap, flags)
            if views and flags & CLONE_NEWNS:
                from stacker_kernel.storage.overlay import mount_views

                mount_views([args, kwargs, _closure_values(fn)])
            payload = ("ok", fn(*args, **kwargs))
        except StackerKernelError as e:
            payload, code = ("err", e), 1
        except BaseException as e:  # keep the traceback text: it is our bug
            payload, code = ("bug", "".join(traceback.format_exception(e))), 1
        try:
            data = pickle.dumps(payload)
        except Exception as e:
            data, code = pickle.dumps(("bug", f"unpicklable result: {e!r}")), 1
        with os.fdopen(w, "wb") as f:
            f.write(data)
        sys.stdout.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise ContainerError("the user-namespace helper died before answering")
    kind, value = pickle.loads(data)
    if kind == "ok":
        return value
    if kind == "err":
        raise value
    raise RuntimeError(f"error in user-namespace helper:\n{value}")
