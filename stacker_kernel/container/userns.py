"""User namespaces that hold the caller's whole subordinate uid/gid range.

Inside, root is the caller and ids 1..65535 are the caller's subordinate ids
(inside id N is outside id SUBID_START + N), so `apt` can drop to `_apt` and
files keep their owners. The maps are written by the setuid helpers
newuidmap/newgidmap (Debian's `uidmap`), which check /etc/subuid and
/etc/subgid. Root needs no subordinate ranges: it maps the ids its own
namespace holds one to one (all of them on a host, 65536 in a pod).

Single-id mode: a user with no subordinate range (or no newuidmap, or
STACKER_KERNEL_SINGLE_ID=1) gets a namespace holding only their own uid/gid, as
root, as `unshare -r` makes it; the caller writes that map itself. Every file
is then owned by root inside, chown to other ids fails, setgroups is denied,
and a tool `isolate` runs has no spare id to run as (README, Security).

Everything here works in a forked, single-threaded child: unshare(CLONE_NEWUSER)
fails with EINVAL in a process with several threads (ipykernel has several).
"""
from __future__ import annotations

import ctypes
import errno
import os
import pwd
import shutil
import signal
import sys
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


NOBODY = 65534  # mapped in every user namespace this project makes (NS_SIZE ids), but single-id ones
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECUREBITS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 28, 24, 47, 4
# SECBIT_NOROOT, _NO_SETUID_FIXUP and _NO_CAP_AMBIENT_RAISE, and the lock bits of all four
SECURE_ALL = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
SINGLE_ID_ENV = "STACKER_KERNEL_SINGLE_ID"


def become_nobody() -> None:
    """Drop from root of a user namespace to its `nobody`, for good: no capabilities
    (so no second chroot climbs out of a chroot) and no_new_privs (no setuid file of
    an image gives root back). For a child about to run a tool on untrusted input."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    libc_call("prctl", ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), 0, 0, 0)


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_all_capabilities(last: int) -> None:
    """For a root with no other id to become (a single-id namespace): keep the id
    but give up every capability for good, so no chroot is climbed out of and no
    mount is made or undone: empty bounding, ambient, inheritable, permitted and
    effective sets, securebits that stop an exec as root (or a setuid file) from
    giving any back, and no_new_privs. Needs CAP_SETPCAP (root of a namespace);
    `last` is last_capability(), read while /proc is still there."""
    def prctl(option: int, arg: int) -> None:
        libc_call("prctl", ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), 0, 0)

    prctl(PR_SET_SECUREBITS, SECURE_ALL)
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}: all empty
    libc_call("capset", header, data)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def _ids_mapped() -> int:
    """How many uids this process's user namespace holds (1 in single-id mode)."""
    with open("/proc/self/uid_map") as f:
        return sum(int(line.split()[2]) for line in f if line.strip())


def in_single_id_namespace() -> bool:
    """Whether this process runs in a user namespace that holds one id only."""
    return _ids_mapped() == 1


# A root-run kernel has no subordinate range to take an unused id from: its tools on
# untrusted input run as this host id, which no account and no process should use
# (README, Security). Below 2^31: some tools still read ids as signed.
ISOLATED_HOST_ID = 2147483646
DEVICES = ("null", "zero", "full", "random", "urandom")


def isolated_id() -> int:
    """The id, as the calling namespace sees it, that `isolate` runs a tool as: the
    namespace's nobody (a subordinate id) in a user namespace of ours, 0 in a
    single-id namespace (there is no other id: the tool keeps root's id without
    any capability), else ISOLATED_HOST_ID, never the host's own nobody."""
    with open("/proc/self/uid_map") as f:
        initial = f.read().split() == ["0", "0", "4294967295"]
    if not initial:
        if not in_single_id_namespace():
            return NOBODY
        _check_confinement_kernel()
        return 0
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
    from a process with threads. With `outside` 0 (a single-id namespace) the new
    namespace maps root only and the tool runs as that root without capabilities
    (drop_all_capabilities), which is the user's own id on the host: what it could
    reach is taken out of its view instead (_confine_single_id)."""
    outside = isolated_id() if outside is None else outside
    ids = (IdRange(0, 0, 1),) if outside == 0 else (IdRange(0, 0, 1), IdRange(NOBODY, outside, 1))
    enter_new_userns(IdMap(ids, ids, rootful=True), CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC)
    last_cap = last_capability()
    if outside == 0:
        _confine_single_id(chroot=root is not None)
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
    if outside == 0:
        drop_all_capabilities(last_cap)
    else:
        become_nobody()


# Where a user's own files and sockets are (ssh-agent, the D-Bus session, systemd --user):
# hidden from a tool that runs as the user's own id (single-id mode).
_HIDDEN = ("/home", "/root", "/run", "/var/run", "/var/tmp", "/dev/shm", "/proc", "/mnt", "/media", "/srv",
           "/var/lib/stacker-kernel")
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # the same on every architecture
_OPEN_TREE_CLONE, _AT_RECURSIVE, _MOVE_MOUNT_F_EMPTY_PATH = 1, 0x8000, 4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 1, 2


def _check_confinement_kernel(release: str | None = None) -> None:
    """_confine_single_id needs mount_setattr (Linux 5.12): say so before the fork, where
    an error still reaches the user."""
    release = release or os.uname().release
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return  # an unusual version string: let the call tell
    if (major, minor) < (5, 12):
        raise ContainerError(f"Linux {release} cannot confine image tools in single-id mode (needs 5.12 or later "
                             "for mount_setattr): upgrade the kernel, or give the user a subordinate id range")


def _confine_single_id(chroot: bool) -> None:
    """In isolate's new mount namespace, for a tool that keeps the user's own host id:
    every mount read-only and nosuid; unless it is chrooted into an image, empty
    read-only tmpfs over _HIDDEN and $HOME, and its working folder (fsck.erofs's
    scratch, the one place it may write) moved over /tmp, which it runs in."""
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long

    def check(ret: int, what: str) -> int:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ret

    work = None
    if not chroot:  # a detached copy of the working folder's mount, still writable
        work = check(syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(-100), b".",
                             ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC)), "open_tree")
    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)  # devices: /dev/null
    check(syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(-100), b"/", ctypes.c_uint(_AT_RECURSIVE),
                  attr, ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr")
    if work is None:
        return
    ms_rdonly, ms_nosuid, ms_nodev = 1, 2, 4
    for path in _HIDDEN + tuple(p for p in (os.environ.get("HOME"),) if p):
        if os.path.isdir(path) and not os.path.islink(path):
            libc_call("mount", b"tmpfs", path.encode(), b"tmpfs",
                      ctypes.c_ulong(ms_rdonly | ms_nosuid | ms_nodev), b"size=4k")
    check(syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(work), b"", ctypes.c_int(-100), b"/tmp",
                  ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)), "move_mount")
    os.close(work)
    os.chdir("/tmp")


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
    single: str = ""  # single-id mode: why (the line single_id_notice prints); "" for a full range

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
        why = _single_id_reason(name, sub_u, sub_g)
        if why:  # only the user's own ids, as root (what `unshare -r` maps)
            return cls((IdRange(0, uid, 1),), (IdRange(0, gid, 1),), rootful=False, single=why)
        assert sub_u is not None and sub_g is not None
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


def _single_id_reason(name: str, sub_u: int | None, sub_g: int | None) -> str:
    """Why this user's namespaces hold only their own id, with the fix; "" if they need not."""
    if os.environ.get(SINGLE_ID_ENV, "") not in ("", "0"):
        return f"{SINGLE_ID_ENV} is set"
    if sub_u is None or sub_g is None:
        missing = " and ".join(p for p, s in (("/etc/subuid", sub_u), ("/etc/subgid", sub_g)) if s is None)
        start = _free_subordinate_start()
        ids = f"{start}-{start + NS_SIZE - 1}"
        return (f"user {name} has no subordinate range of {NS_SIZE} ids in {missing}; for full mode, as root: "
                f"usermod --add-subuids {ids} --add-subgids {ids} {name}")
    for tool in ("newuidmap", "newgidmap"):
        if _id_tool(tool) is None:
            return f"{tool} is missing; for full mode, install Debian's uidmap package (apt-get install uidmap)"
    return ""


def single_id_notice() -> str | None:
    """The one line that says this user builds in single-id mode, what it cannot do
    and how to get the full mode; None with a full range (or as root)."""
    if os.geteuid() == 0:
        return None
    why = IdMap.for_current_user().single
    if not why:
        return None
    return (f"[single-id mode: {why}. The container holds only your own uid, as root: every file of the "
            "image is owned by root, chown to other ids fails, setgroups is denied (apt cannot drop to "
            "_apt: give it -o APT::Sandbox::User=root)]")


def _free_subordinate_start() -> int:
    """A start for a new range in /etc/subuid and /etc/subgid after every range there."""
    end = 100000
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                        end = max(end, int(parts[1]) + int(parts[2]))
        except OSError:
            pass
    return end


def _id_tool(tool: str) -> str | None:
    """The path of newuidmap/newgidmap: on PATH, else /usr/bin (a kernel's PATH may lack it)."""
    exe = shutil.which(tool) or f"/usr/bin/{tool}"
    return exe if os.path.exists(exe) else None


def _subordinate_start(path: str, name: str, uid: int) -> int | None:
    """Start of the first range in `path` for this user that holds NS_SIZE ids, if any."""
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
    return None


def write_maps(pid: int, idmap: IdMap) -> None:
    """Write the uid/gid maps of `pid`, which has just unshared its user namespace."""
    if idmap.rootful or idmap.single:
        if idmap.single:  # an unprivileged writer maps its own ids only, and gives up setgroups
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
        for kind, ranges in (("uid_map", idmap.uids), ("gid_map", idmap.gids)):
            with open(f"/proc/{pid}/{kind}", "w") as f:
                f.write("".join(f"{r.inside} {r.outside} {r.count}\n" for r in ranges))
        return
    import subprocess  # loaded by enter_new_userns before its helper forks

    for tool, ranges in (("newuidmap", idmap.uids), ("newgidmap", idmap.gids)):
        exe = _id_tool(tool)
        if exe is None:
            raise ContainerError(f"{tool} is missing: install Debian's uidmap package (apt-get install uidmap)")
        args = [exe, str(pid)] + [str(x) for r in ranges for x in (r.inside, r.outside, r.count)]
        res = subprocess.run(args, capture_output=True, text=True)
        if res.returncode != 0:
            raise ContainerError(f"{tool} refused the id map ({res.stderr.strip()}): check /etc/subuid and /etc/subgid")


def _userns_refused(e: OSError) -> str:
    """The one line for an unshare(CLONE_NEWUSER) the kernel refused: which setting, and its fix."""
    if e.errno == errno.ENOSPC:  # user.max_user_namespaces (0: disabled), in this namespace or above
        try:
            with open("/proc/sys/user/max_user_namespaces") as f:
                limit = f.read().strip()
        except OSError:
            limit = "?"
        return (f"cannot create a user namespace: the limit user.max_user_namespaces ({limit} here) is reached "
                "(0 disables them): as root, sysctl -w user.max_user_namespaces=15000")
    if e.errno == errno.EPERM:
        return ("cannot create a user namespace: unprivileged user namespaces are disabled: as root, "
                "sysctl -w kernel.unprivileged_userns_clone=1 (Debian) or, on Ubuntu, allow them in AppArmor "
                "(kernel.apparmor_restrict_unprivileged_userns=0)")
    return (f"cannot create a user namespace ({e.strerror}): enable unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0)")


def become_root() -> None:
    """Become root of the user namespace just entered (its maps written)."""
    with open("/proc/self/setgroups") as f:
        if f.read().strip() == "allow":  # "deny" in (and under) a single-id namespace
            os.setgroups([0])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def enter_new_userns(idmap: IdMap, flags: int = 0) -> None:
    """Move the calling (single-threaded) process into a new user namespace with
    `idmap`, plus the other namespaces in `flags`, and become root in it.

    A helper forked before the unshare writes the maps from outside, as the
    setuid helpers require; the pipes order the two processes.
    """
    import subprocess  # noqa: F401 (write_maps runs the setuid helpers: loaded before the fork)

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
            raise ContainerError(_userns_refused(e)) from None
        os.write(go_w, b"x")
        answer = os.read(done_r, 4096)
    finally:
        os.close(go_w)
        os.close(done_r)
        os.waitpid(helper, 0)
    if answer != b"ok":
        raise ContainerError(answer.decode(errors="replace"))
    become_root()
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
    # Loaded before the fork (a forked child of a threaded process must not import), and
    # only here: the CLI loads this module for its single-id notice alone.
    import pickle
    import subprocess  # noqa: F401 (for enter_new_userns in the child)
    import traceback

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
