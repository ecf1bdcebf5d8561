"""Copying out of a snapshot onto the host: `grab`, `%grab`, widget downloads, stacker:// imports.

What a snapshot holds was made by a build step, so it is treated as hostile.
The copy runs as root of a user namespace (the snapshot's files belong to
subordinate ids) and walks the snapshot with directory fds and O_NOFOLLOW:
the path to grab is resolved one component at a time as the container sees it
(absolute symlinks point into the rootfs) and never leaves the snapshot;
inside the grabbed tree symlinks are copied as symlinks, never followed.
Only regular files are opened (O_NONBLOCK, then fstat, so a FIFO cannot
block), directories and symlinks are recreated, and anything else is skipped
with a one-line note: a device's contents are never read. Written files belong
to the caller, never carry setuid/setgid/sticky bits and honour the umask.
Holes stay holes (a reflink when both sides share a btrfs, else
SEEK_DATA/SEEK_HOLE), and the destination's free space is checked against the
blocks to copy before anything is written. The destination tree is also
walked with directory fds: a symlink planted there is replaced, never followed.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.errors import StackerKernelError
from stacker_kernel.recipe.model import human_size
from stacker_kernel.storage.btrfs import copy_data

MAX_SYMLINKS = 40
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class GrabError(StackerKernelError):
    """A path to grab or browse is missing or escapes the rootfs, or the copy cannot be written."""


@dataclass
class Grabbed:
    """Where a grab wrote its copy, and one line for each entry it skipped."""

    path: str
    notes: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # the copies, when a wildcard matched several

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def kind_of(mode: int) -> str:
    """'a FIFO', 'a block device', ... for a note about a skipped entry."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def escapes(done: list[str], target: str) -> bool:
    """Whether relative symlink `target` in directory /done climbs above the rootfs."""
    depth = len(done)
    for p in target.split("/"):
        if p == "..":
            depth -= 1
            if depth < 0:
                return True
        elif p not in ("", "."):
            depth += 1
    return False


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


# --- the source: resolved with directory fds inside the snapshot -------------------


def resolve_at(rootfd: int, path: str) -> tuple[int, str, os.stat_result, str]:
    """(a new fd of the parent directory, name, lstat, container path) of container path
    `path` below directory fd `rootfd`, following symlinks as the container would but
    never out of it. The name is "." for the rootfs itself. The caller closes the fd.
    Raises GrabError when `path` is missing or would leave the rootfs."""
    todo = _parts(path)
    stack: list[int] = []  # fds opened below rootfd, one per name in `done`
    done: list[str] = []
    links = 0

    def top() -> int:
        return stack[-1] if stack else rootfd

    try:
        while todo:
            part = todo.pop(0)
            if part == "..":
                if not done:
                    raise GrabError(f"{path} escapes the rootfs through '..'")
                os.close(stack.pop())
                done.pop()
                continue
            try:
                st = os.stat(part, dir_fd=top(), follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                raise GrabError(f"{path} does not exist in the rootfs") from None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise GrabError(f"{path}: too many levels of symbolic links")
                target = os.readlink(part, dir_fd=top())
                if target.startswith("/"):
                    while stack:
                        os.close(stack.pop())
                    done = []
                elif escapes(done, target):
                    raise GrabError(f"{path} escapes the rootfs through the symlink "
                                    f"/{'/'.join(done + [part])} -> {target}")
                todo = _parts(target) + todo
                continue
            if not todo:
                return os.dup(top()), part, st, "/" + "/".join(done + [part])
            if not stat.S_ISDIR(st.st_mode):
                raise GrabError(f"{path} does not exist in the rootfs "
                                f"(/{'/'.join(done + [part])} is not a directory)")
            stack.append(os.open(part, _DIR, dir_fd=top()))
            done.append(part)
        return os.dup(top()), ".", os.stat(".", dir_fd=top()), "/" + "/".join(done)
    finally:
        for fd in stack:
            os.close(fd)


def open_regular(dirfd: int, name: str) -> tuple[int | None, os.stat_result]:
    """Open `name` in `dirfd` for reading if it is a regular file (fd None otherwise).
    O_NONBLOCK and O_NOFOLLOW: a FIFO or a device opened by mistake never blocks,
    and the fstat on the open file is what decides."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EOPNOTSUPP, errno.ENODEV):
            return None, os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None, st
    return fd, st


def open_in_snapshot(root: str, path: str) -> tuple[int | None, str, os.stat_result]:
    """Resolve container path `path` of a snapshot (in the user namespace) and open it
    when it is a regular file: (fd or None, name, stat). For the widget's download."""
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent, name, st, _ = resolve_at(rootfd, path)
    finally:
        os.close(rootfd)
    try:
        if not stat.S_ISREG(st.st_mode):
            return None, name, st
        fd, st = open_regular(parent, name)
        return fd, name, st
    finally:
        os.close(parent)


# --- the copy ------------------------------------------------------------------------


def _allocated(dirfd: int, name: str, st: os.stat_result) -> int:
    """Bytes the regular files under `name` take on disk (holes are free)."""
    if stat.S_ISREG(st.st_mode):
        return st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return 0
    fd = os.open(name, _DIR, dir_fd=dirfd)
    try:
        return sum(_allocated(fd, n, os.stat(n, dir_fd=fd, follow_symlinks=False)) for n in os.listdir(fd))
    finally:
        os.close(fd)


class _Copier:
    """One grab's walk: source and destination both by directory fd."""

    def __init__(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        self.umask = umask
        self.notes: list[str] = []

    def mode(self, st: os.stat_result) -> int:
        # Never setuid/setgid/sticky on the host, and the caller's umask applies.
        return stat.S_IMODE(st.st_mode) & 0o777 & ~self.umask

    def skip(self, cpath: str, why: str) -> None:
        self.notes.append(f"skipped {cpath}: {why}")

    def _existing(self, ddir: int, dname: str) -> os.stat_result | None:
        try:
            return os.stat(dname, dir_fd=ddir, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _replace(self, ddir: int, dname: str, make) -> None:
        """Write a new entry under a temporary name, then rename it over `dname`:
        whatever was at `dname` (a file, a planted symlink) is replaced, never opened."""
        tmp = f".{dname[:200]}.{secrets.token_hex(6)}.grab"  # created exclusively, never reused
        try:
            make(tmp)
            os.rename(tmp, dname, src_dir_fd=ddir, dst_dir_fd=ddir)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=ddir)
            except OSError:
                pass
            raise

    def entry(self, sdir: int, name: str, st: os.stat_result, ddir: int, dname: str, cpath: str) -> None:
        if stat.S_ISDIR(st.st_mode):
            self.directory(sdir, name, st, ddir, dname, cpath)
        elif stat.S_ISREG(st.st_mode):
            self.file(sdir, name, ddir, dname, cpath)
        elif stat.S_ISLNK(st.st_mode):
            self.symlink(sdir, name, ddir, dname, cpath)
        else:
            self.skip(cpath, kind_of(st.st_mode))

    def file(self, sdir: int, name: str, ddir: int, dname: str, cpath: str) -> None:
        src, st = open_regular(sdir, name)
        if src is None:
            self.skip(cpath, kind_of(st.st_mode))
            return
        try:
            there = self._existing(ddir, dname)
            if there is not None and stat.S_ISDIR(there.st_mode):
                self.skip(cpath, "a directory of that name is in the way on the host")
                return

            def make(tmp: str) -> None:
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                              stat.S_IMODE(st.st_mode) & 0o777, dir_fd=ddir)
                try:
                    copy_data(src, out, st.st_size)
                    os.fchmod(out, self.mode(st))
                    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(out)

            self._replace(ddir, dname, make)
        finally:
            os.close(src)

    def symlink(self, sdir: int, name: str, ddir: int, dname: str, cpath: str) -> None:
        target = os.readlink(name, dir_fd=sdir)
        there = self._existing(ddir, dname)
        if there is not None and stat.S_ISDIR(there.st_mode):
            self.skip(cpath, "a directory of that name is in the way on the host")
            return
        self._replace(ddir, dname, lambda tmp: os.symlink(target, tmp, dir_fd=ddir))

    def directory(self, sdir: int, name: str, st: os.stat_result, ddir: int, dname: str, cpath: str) -> None:
        there = self._existing(ddir, dname)
        if there is not None and not stat.S_ISDIR(there.st_mode):
            self.skip(cpath, f"{kind_of(there.st_mode)} of that name is in the way on the host")
            return
        if there is None:
            os.mkdir(dname, 0o700, dir_fd=ddir)  # its own mode once it is filled
        src = os.open(name, _DIR, dir_fd=sdir)
        try:
            dst = os.open(dname, _DIR, dir_fd=ddir)
            try:
                for n in sorted(os.listdir(src)):
                    child = os.stat(n, dir_fd=src, follow_symlinks=False)
                    self.entry(src, n, child, dst, n, cpath.rstrip("/") + "/" + n)
                if there is None:
                    os.fchmod(dst, self.mode(st))
            finally:
                os.close(dst)
        finally:
            os.close(src)


def _free_bytes(dirfd: int) -> int:
    vfs = os.fstatvfs(dirfd)
    return vfs.f_bavail * vfs.f_frsize


def _grab_in_ns(root: str, path: str, dest: str, into: bool | None) -> Grabbed:
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sdir, name, st, cpath = resolve_at(rootfd, path)
    finally:
        os.close(rootfd)
    try:
        is_dir = stat.S_ISDIR(st.st_mode)
        if not is_dir and not stat.S_ISREG(st.st_mode):
            raise GrabError(f"{path} is {kind_of(st.st_mode)}: only regular files, directories"
                            " and symlinks are copied")
        base = "rootfs" if name == "." else name
        dest_is_dir = os.path.isdir(dest)
        if into or (dest_is_dir and (into is None or not is_dir)):
            target = os.path.join(dest, base)
        else:
            target = dest
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        ddir = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            need, free = _allocated(sdir, name, st), _free_bytes(ddir)
            if need > free:
                raise GrabError(f"{path} takes {human_size(need)} but {parent} has {human_size(free)} free:"
                                " free some space there or grab to another place")
            there = os.stat(os.path.basename(target), dir_fd=ddir, follow_symlinks=False) \
                if os.path.lexists(target) else None
            if there is not None and stat.S_ISDIR(there.st_mode) != is_dir:
                raise GrabError(f"cannot copy {path} to {target}: that is {kind_of(there.st_mode)} on the host;"
                                " remove it or grab to another place")
            copier = _Copier()
            copier.entry(sdir, name, st, ddir, os.path.basename(target), cpath)
        finally:
            os.close(ddir)
        return Grabbed(target, copier.notes)
    except OSError as e:
        raise GrabError(f"cannot copy {path} to {dest}: {e.strerror or e}") from e
    finally:
        os.close(sdir)


def has_glob(path: str) -> bool:
    """Whether `path` has shell wildcards (`*`, `?`, `[...]`) to expand."""
    return any(c in path for c in "*?[")


def _expand_in_ns(root: str, pattern: str) -> list[str]:
    """The container paths matching `pattern`, sorted, as the container's shell would
    expand it (a wildcard matches no leading '.' unless the pattern has one; symlinks
    are followed within the rootfs, never out of it)."""
    import fnmatch

    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        found = [""]
        for part in _parts(pattern):
            if not has_glob(part):
                found = [f"{p}/{part}" for p in found]
                continue
            matched = []
            for p in found:
                try:
                    parent, name, st, _ = resolve_at(rootfd, p or "/")
                except GrabError:
                    continue
                try:
                    if not stat.S_ISDIR(st.st_mode):
                        continue
                    fd = os.open(name, _DIR, dir_fd=parent)
                    try:
                        names = os.listdir(fd)
                    finally:
                        os.close(fd)
                finally:
                    os.close(parent)
                matched += [f"{p}/{n}" for n in sorted(names)
                            if fnmatch.fnmatchcase(n, part) and (part.startswith(".") or not n.startswith("."))]
            found = matched
        return [p for p in found if _exists(rootfd, p)]
    finally:
        os.close(rootfd)


def _exists(rootfd: int, path: str) -> bool:
    try:
        os.close(resolve_at(rootfd, path)[0])
        return True
    except GrabError:
        return False


def _grab_all_in_ns(root: str, paths: list[str], dest: str) -> Grabbed:
    """Each of `paths` into directory `dest` (one user namespace for them all)."""
    done = Grabbed(dest)
    for path in paths:
        one = _grab_in_ns(root, path, dest, True)
        done.notes += one.notes
        done.copied.append(one.path)
    return done


def _planted(path: str) -> GrabError:
    return GrabError(f"{path} is a symbolic link another user made: not followed; remove it or "
                     "grab to another place")


def _make_dirs(path: str) -> None:
    """mkdir -p `path` on the host, as the caller, refusing a symbolic link on the way that
    neither the caller nor root made: in a folder others can write (`share/out/` with `out`
    theirs) it could lead anywhere of ours. Like the kernel's protected_symlinks, which
    covers the last component only in sticky folders, this covers every one."""
    done = "/"
    for part in Path(path).parts[1:]:
        done = os.path.join(done, part)
        try:
            try:
                st = os.lstat(done)
            except FileNotFoundError:
                try:
                    os.mkdir(done, 0o777)  # the umask decides, as for any folder the user makes
                    continue
                except FileExistsError:
                    st = os.lstat(done)
        except OSError as e:
            raise GrabError(f"cannot make the folder {done}: {e.strerror or e}") from e
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.geteuid(), 0):
            raise _planted(done)


def grab(snapshot_root: str | Path, path: str, dest: str | Path, into: bool | None = None) -> Grabbed:
    """Copy container path `path` out of a snapshot to host path `dest`, owned by the caller.

    `into` None is `cp -r`: an existing directory `dest` receives the copy under its
    own name. `into` True always does that (creating `dest`); False makes `dest` the
    copy itself (a directory is merged into an existing one, so grabbing twice gives
    the same tree), except that a file still lands inside an existing directory.
    Wildcards in `path` (`/build/*.deb`) expand in the snapshot, as the container's
    shell would; several matches all go into directory `dest`."""
    dest = os.path.abspath(str(dest))
    try:
        planted = os.path.islink(dest) and os.lstat(dest).st_uid != os.geteuid()
    except FileNotFoundError:
        planted = False
    if planted:  # in a folder others can write, theirs could lead anywhere of ours
        raise _planted(dest)
    _make_dirs(os.path.dirname(dest))
    if has_glob(path):
        matches = run_in_userns(_expand_in_ns, str(snapshot_root), path)
        if not matches:
            raise GrabError(f"nothing in the rootfs matches {path}")
        if len(matches) > 1:
            return run_in_userns(_grab_all_in_ns, str(snapshot_root), matches, dest)
        path = matches[0]
    return run_in_userns(_grab_in_ns, str(snapshot_root), path, dest, into)
