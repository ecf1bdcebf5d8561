"""Layer tars: safe extraction into a rootfs (the apply side).

`apply_layer` unpacks one (possibly compressed) tar onto a rootfs directory
with OCI whiteout semantics. It is written for hostile input: every path is
resolved one component at a time from a file descriptor of the root with
O_NOFOLLOW, so nothing outside the root is ever opened, created or removed.

Path rules (the same as umoci's unpack with KeepDirlinks, plus GNU tar's
guard against symlink attacks):

- absolute names are taken relative to the root, as GNU tar does;
- `..` is resolved lexically in entry names; one that climbs above the root
  is refused;
- a symlink already in the rootfs (from a lower layer) is followed as the
  container would see it: absolute targets start at the root and `..` stops
  at the root, so it can never lead outside (Debian's `lib -> usr/lib`);
- a symlink created by this same archive is never followed by later entries:
  an entry that goes through one is refused (the classic `evil -> /` then
  `evil/etc/passwd` attack), as GNU tar refuses it;
- hard links must name a path inside the root that exists.

Run it inside the user namespace (callers wrap it with run_in_userns), so that
numeric owners from the tar become the container's ids. Device nodes are never
made, whoever extracts: a base's `hostdisk` (block 7:N, 0666) extracted by root
would open the host's disk inside the container. They become empty files, as
rootless extraction (umoci, stacker) has always made them.
"""
from __future__ import annotations

import errno
import gzip
import lzma
import bz2
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from stacker_kernel.container.userns import in_single_id_namespace
from stacker_kernel.errors import ImageError

PATH_MAX = 4096
MAX_SYMLINK_HOPS = 40  # the kernel's MAXSYMLINKS
CHUNK = 1 << 20
WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."
# xattrs that describe the host, not the image (umoci skips the same ones)
SKIPPED_XATTRS = ("security.selinux", "system.nfs4_acl", "trusted.", "user.overlay.")

_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC = b"BZh"

# what a truncated or corrupt compressed/tar stream raises while being read
_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class ApplyReport:
    """What apply_layer did: entries processed and warnings for the user."""

    entries: int = 0
    warnings: list[str] = field(default_factory=list)


def detect_compression(src: str | os.PathLike) -> str:
    """'gzip', 'xz', 'zstd', 'bzip2' or 'none', from the file's magic bytes."""
    with open(src, "rb") as f:
        head = f.read(6)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if head.startswith(_BZIP2_MAGIC):
        return "bzip2"
    return "none"


@contextmanager
def open_decompressed(src: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary stream of the uncompressed content of `src` (gzip/xz/zstd/bzip2/plain).

    zstd goes through the `zstd` program (no stdlib module); its exit status
    is checked when the stream is closed, so a corrupt zstd file is an error.
    """
    kind = detect_compression(src)
    with ExitStack() as stack:
        raw = stack.enter_context(open(src, "rb"))
        if kind == "gzip":
            yield stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif kind == "xz":
            yield stack.enter_context(lzma.LZMAFile(raw, "rb"))
        elif kind == "bzip2":
            yield stack.enter_context(bz2.BZ2File(raw, "rb"))
        elif kind == "zstd":
            exe = shutil.which("zstd")
            if exe is None:
                raise ImageError(f"{src} is zstd-compressed but the zstd program is missing: "
                                 "install Debian's zstd package (apt-get install zstd)")
            proc = subprocess.Popen([exe, "-dcq"], stdin=raw, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            try:
                yield proc.stdout
                while proc.stdout.read(CHUNK):  # drain, so zstd reaches the end and reports errors
                    pass
            except BaseException:
                proc.kill()  # the reader's error is the one to report
                raise
            else:
                err = proc.stderr.read().decode(errors="replace").strip()
                if proc.wait() != 0:
                    detail = err.splitlines()[-1] if err else "zstd failed"
                    raise ImageError(f"{src} is not a readable zstd stream ({detail}): "
                                     "it is truncated or corrupt; download or rebuild it")
            finally:
                proc.stdout.close()
                proc.stderr.close()
                proc.wait()
        else:
            yield raw


class _Warnings:
    """Warnings grouped by kind, so a 10k-device archive gives one line, not 10k."""

    def __init__(self) -> None:
        self._first: dict[str, str] = {}
        self._count: dict[str, int] = {}

    def add(self, kind: str, message: str) -> None:
        self._first.setdefault(kind, message)
        self._count[kind] = self._count.get(kind, 0) + 1

    def lines(self) -> list[str]:
        out = []
        for kind, msg in self._first.items():
            n = self._count[kind] - 1
            out.append(msg + (f" (and {n} more like it)" if n else ""))
        return out


def _normalize(name: str, entry: str, src: str) -> list[str]:
    """Components of an archive path, relative to the root; `..` resolved lexically.

    Refuses names that climb above the root or are absurdly long.
    """
    if len(name.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise ImageError(f"entry {entry[:80]!r}… of {src} has a name longer than PATH_MAX ({PATH_MAX}): "
                         "the archive is broken or hostile; rebuild it")
    if "\0" in name:
        raise ImageError(f"entry {entry!r} of {src} has a NUL byte in its name: the archive is broken; rebuild it")
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise ImageError(f"entry {entry!r} of {src} points outside the root "
                                 "(through '..'): the archive is hostile or broken; do not use it")
            parts.pop()
        else:
            parts.append(comp)
    return parts


class _Root:
    """An open rootfs: resolves archive paths to (parent fd, name) without escaping."""

    def __init__(self, path: Path, src: str) -> None:
        self.fd = os.open(path, _DIR_FLAGS)
        self.src = src
        self.archive_symlinks: set[str] = set()  # in-root paths of symlinks this layer made
        self.created: set[str] = set()  # in-root paths this layer created or set
        self.ancestors: set[str] = set()  # every directory above a created path

    def close(self) -> None:
        os.close(self.fd)

    def mark_created(self, path: str) -> None:
        self.created.add(path)
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if path in self.ancestors:
                break
            self.ancestors.add(path)
        self.ancestors.add("")

    @contextmanager
    def directory(self, parts: list[str], entry: str, create: bool) -> Iterator[tuple[int, list[str]] | None]:
        """Open the directory at `parts` inside the root, following rootfs symlinks
        in-root and refusing this archive's symlinks; yields (fd, resolved parts).

        Missing directories are made (0755, owned by the caller) when `create`;
        otherwise a missing one yields None.
        """
        fds: list[int] = [os.dup(self.fd)]
        cur: list[str] = []
        todo = list(parts)
        hops = 0
        try:
            while todo:
                comp = todo.pop(0)
                if comp in ("", "."):
                    continue
                if comp == "..":  # only from a rootfs symlink's target: stop at the root
                    if cur:
                        cur.pop()
                        os.close(fds.pop())
                    continue
                path = "/".join(cur + [comp])
                try:
                    fd = os.open(comp, _DIR_FLAGS, dir_fd=fds[-1])
                except FileNotFoundError:
                    if not create:
                        yield None
                        return
                    os.mkdir(comp, 0o755, dir_fd=fds[-1])
                    self.mark_created(path)
                    fd = os.open(comp, _DIR_FLAGS, dir_fd=fds[-1])
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.stat(comp, dir_fd=fds[-1], follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        if not create:
                            yield None
                            return
                        raise ImageError(f"entry {entry!r} of {self.src} needs /{path} to be a directory, "
                                         "but it is a file: the layer does not fit this base; fix the archive")
                    if path in self.archive_symlinks:
                        raise ImageError(f"entry {entry!r} of {self.src} would be written through the symlink "
                                         f"/{path} from the same archive (it could point outside the root): "
                                         "the archive is hostile or broken; do not use it")
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise ImageError(f"entry {entry!r} of {self.src} goes through a symlink loop at /{path}: "
                                         "fix the symlinks in the base image")
                    target = os.readlink(comp, dir_fd=fds[-1])
                    if target.startswith("/"):  # absolute: from the root, as the container sees it
                        for extra in fds[1:]:
                            os.close(extra)
                        del fds[1:]
                        cur = []
                    todo = target.split("/") + todo
                    continue
                fds.append(fd)
                cur.append(comp)
            yield fds[-1], cur
        finally:
            for fd in fds:
                os.close(fd)


def _remove_entry(dirfd: int, name: str) -> None:
    """Remove `name` in `dirfd` whatever it is (a directory with its whole tree); never follows symlinks."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


class _Applier:
    """One run of apply_layer: the open root, the archive name and the bookkeeping."""

    def __init__(self, root: _Root, src: str, whiteouts: bool) -> None:
        self.root = root
        self.src = src
        self.whiteouts = whiteouts
        self.warnings = _Warnings()
        self.dir_times: list[tuple[list[str], int]] = []
        self.free = self._free_bytes()
        self.single_id = in_single_id_namespace()  # every owner becomes root (the one id there is)

    def _free_bytes(self) -> int:
        st = os.statvfs(self.root.fd)
        return st.f_bavail * st.f_frsize

    def _reserve(self, member: tarfile.TarInfo) -> None:
        """Refuse, before writing, a file larger than the free space left."""
        if member.size <= self.free:
            self.free -= member.size
            return
        self.free = self._free_bytes()  # others may have freed space meanwhile
        if member.size > self.free:
            raise ImageError(f"entry {member.name!r} of {self.src} needs {member.size} bytes but only "
                             f"{self.free} are free in the storage: free space or grow the btrfs filesystem")
        self.free -= member.size

    # --- one entry ------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _normalize(member.name, member.name, self.src)
        base = parts[-1] if parts else ""
        if self.whiteouts and base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member)
            return
        if not parts:  # the root itself ("./"): only its metadata
            self._metadata(self.root.fd, None, member, [])
            return
        with self.root.directory(parts[:-1], member.name, create=True) as found:
            assert found is not None  # create=True never yields None
            dirfd, dir_parts = found
            path = "/".join(dir_parts + [base])
            if member.isdir():
                self._directory(dirfd, base, path, dir_parts, member)
            else:
                self._non_directory(tar, dirfd, base, path, member)

    def _directory(self, dirfd: int, name: str, path: str, dir_parts: list[str],
                   member: tarfile.TarInfo) -> None:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode) and path not in self.root.archive_symlinks:
            # a rootfs dirlink (lib -> usr/lib) stays, as with umoci's KeepDirlinks
            with self.root.directory(dir_parts + [name], member.name, create=False) as target:
                if target is not None:
                    return
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dirfd)
            self.root.archive_symlinks.discard(path)
            st = None
        if st is None:
            os.mkdir(name, 0o700, dir_fd=dirfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
        try:
            self._metadata(fd, None, member, dir_parts + [name])
        finally:
            os.close(fd)
        self.root.mark_created(path)

    def _non_directory(self, tar: tarfile.TarFile, dirfd: int, name: str, path: str,
                       member: tarfile.TarInfo) -> None:
        if member.islnk():
            self._hardlink(dirfd, name, path, member)
            return
        _remove_entry(dirfd, name)
        self.root.archive_symlinks.discard(path)
        if member.issym():
            os.symlink(member.linkname, name, dir_fd=dirfd)
            self.root.archive_symlinks.add(path)
            self._metadata(None, (dirfd, name), member, None)
        elif member.isreg():
            self._reserve(member)
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dirfd)
            try:
                self._copy_data(tar, member, fd)
                self._metadata(fd, None, member, None)
            finally:
                os.close(fd)
        elif member.ischr() or member.isblk() or member.isfifo():
            self._special(dirfd, name, member)
        else:
            self.warnings.add(f"type-{member.type!r}", f"skipped entry {member.name!r} of {self.src}: "
                              f"tar entry type {member.type!r} is not a file type a rootfs can hold")
            return
        self.root.mark_created(path)

    def _copy_data(self, tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        reader = tar.extractfile(member)
        assert reader is not None  # regular members always have data
        with reader:
            while True:
                chunk = reader.read(CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]

    def _special(self, dirfd: int, name: str, member: tarfile.TarInfo) -> None:
        if member.isfifo():
            os.mknod(name, stat.S_IFIFO | 0o600, dir_fd=dirfd)
        else:
            # Never a real device, even as real root: a layer must not hand a step the host's devices.
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dirfd))
            self.warnings.add("device", f"created an empty file in place of device {member.name!r} "
                              f"({member.devmajor}:{member.devminor}) of {self.src}: "
                              "device nodes are never made from layers (the container has its own /dev)")
        self._metadata(None, (dirfd, name), member, None)

    def _hardlink(self, dirfd: int, name: str, path: str, member: tarfile.TarInfo) -> None:
        outside = ImageError(f"hard link {member.name!r} of {self.src} points at {member.linkname!r}, "
                             "which is not inside the root: the archive is hostile or broken; do not use it")
        try:
            target = _normalize(member.linkname, member.name, self.src)
        except ImageError:
            raise outside from None
        if not target:
            raise ImageError(f"hard link {member.name!r} of {self.src} points at the root directory: "
                             "the archive is hostile or broken; do not use it")
        with self.root.directory(target[:-1], member.name, create=False) as found:
            missing = found is None
            if not missing:
                tfd, tparts = found
                try:
                    tst = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
                except FileNotFoundError:
                    missing = True
            if missing:
                raise outside
            if stat.S_ISDIR(tst.st_mode):
                raise ImageError(f"hard link {member.name!r} of {self.src} points at the directory "
                                 f"{member.linkname!r}: the archive is broken; rebuild it")
            try:
                if os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_ino == tst.st_ino:
                    return  # already that file
            except FileNotFoundError:
                pass
            _remove_entry(dirfd, name)
            self.root.archive_symlinks.discard(path)
            os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=dirfd, follow_symlinks=False)
            if "/".join(tparts + [target[-1]]) in self.root.archive_symlinks:
                self.root.archive_symlinks.add(path)  # a link to a symlink is that symlink
        self.root.mark_created(path)

    def _whiteout(self, parts: list[str], member: tarfile.TarInfo) -> None:
        base = parts[-1]
        if base == OPAQUE:
            with self.root.directory(parts[:-1], member.name, create=True) as found:
                assert found is not None
                dirfd, dir_parts = found
                self._purge_lower(dirfd, "/".join(dir_parts))
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX) or base == WHITEOUT_PREFIX:
            self.warnings.add("aufs", f"ignored whiteout metadata {member.name!r} of {self.src}")
            return
        name = base[len(WHITEOUT_PREFIX):]
        if name in (".", ".."):  # would remove the directory itself, or its parent (outside, at the root)
            raise ImageError(f"whiteout {member.name!r} of {self.src} names {name!r}: "
                             "the archive is hostile or broken; do not use it")
        with self.root.directory(parts[:-1], member.name, create=False) as found:
            if found is None:
                return  # nothing below to hide
            dirfd, dir_parts = found
            path = "/".join(dir_parts + [name])
            if path in self.root.created:
                return  # a whiteout hides lower layers only
            _remove_entry(dirfd, name)

    def _purge_lower(self, dirfd: int, path: str) -> None:
        """Remove everything under `dirfd` that this layer did not create (opaque dir)."""
        with os.scandir(dirfd) as it:
            names = [e.name for e in it]
        for name in names:
            child = f"{path}/{name}" if path else name
            if child in self.root.created or child in self.root.ancestors:
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
                except OSError:
                    continue  # a file or symlink of this layer: keep it
                try:
                    self._purge_lower(fd, child)
                finally:
                    os.close(fd)
            else:
                _remove_entry(dirfd, name)

    # --- metadata ---------------------------------------------------------------

    def _metadata(self, fd: int | None, at: tuple[int, str] | None, member: tarfile.TarInfo,
                  dir_parts: list[str] | None) -> None:
        """Owner, mode, xattrs, mtime of a made entry, through its fd or (dirfd, name).

        chown comes first because it clears setuid bits and security.capability.
        Directory mtimes are only recorded here: set last, after their contents.
        """
        is_link = member.issym()
        uid, gid = member.uid, member.gid
        if self.single_id and (uid, gid) != (0, 0):
            self.warnings.add("single-id", f"{member.name!r} of {self.src} is owned by {uid}:{gid} in the archive, "
                              "by root here: in single-id mode every file is root's")
            uid = gid = 0
        try:
            if fd is not None:
                os.chown(fd, uid, gid)
            else:
                dirfd, name = at
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
        except OSError as e:
            self.warnings.add(f"chown-{e.errno}", f"could not give {member.name!r} of {self.src} the owner "
                              f"{member.uid}:{member.gid} ({e.strerror}): ids above 65535 are not mapped")
        if not is_link:
            mode = member.mode & 0o7777
            if fd is not None:
                os.chmod(fd, mode)
            else:  # a device or fifo we have just made, never a symlink
                dirfd, name = at
                os.chmod(name, mode, dir_fd=dirfd)
        self._xattrs(fd, at, member)
        if dir_parts is not None:
            self.dir_times.append((dir_parts, int(member.mtime)))
        elif fd is not None:
            os.utime(fd, ns=(int(member.mtime * 1e9),) * 2)
        else:
            dirfd, name = at
            os.utime(name, ns=(int(member.mtime * 1e9),) * 2, dir_fd=dirfd, follow_symlinks=False)

    def _xattrs(self, fd: int | None, at: tuple[int, str] | None, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(XATTR_PAX_PREFIX):
                continue
            attr = key[len(XATTR_PAX_PREFIX):]
            if attr.startswith(SKIPPED_XATTRS):
                continue
            data = value.encode("utf-8", "surrogateescape")
            try:
                if fd is not None:
                    os.setxattr(fd, attr, data)
                else:  # the parent fd's magic link pins the directory; the name is not followed
                    dirfd, name = at
                    os.setxattr(f"/proc/self/fd/{dirfd}/{name}", attr, data, follow_symlinks=False)
            except OSError as e:
                self.warnings.add(f"xattr-{attr}", f"could not set xattr {attr} on {member.name!r} of "
                                  f"{self.src} ({e.strerror})")

    def finish(self) -> None:
        """Set directory mtimes, deepest first, now that their contents are written."""
        for parts, mtime in sorted(self.dir_times, key=lambda t: -len(t[0])):
            fd = os.dup(self.root.fd)
            try:
                for comp in parts:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                os.utime(fd, ns=(mtime * 1_000_000_000,) * 2)
            except OSError:
                pass  # removed or replaced by a later entry: its time no longer matters
            finally:
                os.close(fd)


def open_in_root(rootfs: str | os.PathLike, path: str) -> int:
    """A read-only fd of the regular file `path` inside `rootfs`, resolved as the
    container sees it (symlinks followed but never out of the root).

    FileNotFoundError when it is missing or not a regular file.
    """
    root = _Root(Path(rootfs), str(rootfs))
    try:
        parts = _normalize(path, path, str(rootfs))
        if not parts:
            raise FileNotFoundError(path)
        with root.directory(parts[:-1], path, create=False) as found:
            if found is None:
                raise FileNotFoundError(path)
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=found[0])
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileNotFoundError(path)
        return fd
    except OSError as e:
        raise FileNotFoundError(path) from e
    finally:
        root.close()


def apply_layer(src: str | os.PathLike, rootfs: str | os.PathLike, *, whiteouts: bool = True,
                name: str | None = None) -> ApplyReport:
    """Unpack the tar at `src` (plain, gzip, xz, zstd or bzip2) onto the directory `rootfs`.

    Guarantees: nothing outside `rootfs` is opened for writing, created or
    removed, whatever the archive holds; hostile or corrupt input raises
    ImageError naming the entry or the file (the rootfs is then partly
    written: callers extract into a fresh subvolume and drop it on error).
    With `whiteouts`, `.wh.NAME` removes NAME of lower layers and
    `.wh..wh..opq` hides a directory's lower content. Member data is streamed.
    Must run as root of the container's user namespace (or as real root).
    `name` is how messages call the archive (default: `src`).
    """
    src_name = name or str(src)
    root = _Root(Path(rootfs), src_name)
    report = ApplyReport()
    try:
        applier = _Applier(root, src_name, whiteouts)
        with open_decompressed(src) as stream:
            try:
                tar = tarfile.open(fileobj=stream, mode="r|", errorlevel=2)
            except _STREAM_ERRORS as e:
                raise ImageError(f"{src_name} is not a readable tar archive ({e}): it is truncated, corrupt "
                                 "or not a tar; download or rebuild it") from None
            with tar:
                current = "<start>"
                try:
                    for member in tar:
                        current = member.name
                        report.entries += 1
                        try:
                            applier.apply(tar, member)
                        except _STREAM_ERRORS:
                            raise
                        except ImageError:
                            raise
                        except (OSError, ValueError) as e:
                            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                                raise ImageError(f"the storage is full while extracting {member.name!r} of "
                                                 f"{src_name}: free space or grow the btrfs filesystem") from None
                            raise ImageError(f"cannot extract entry {member.name!r} of {src_name} ({why}): "
                                             "the archive does not fit this rootfs; fix or rebuild it") from None
                except (*_STREAM_ERRORS, OSError) as e:  # bz2 reports corruption as OSError
                    raise ImageError(f"{src_name} is not a readable tar archive ({e}, at entry {current!r}): "
                                     "it is truncated or corrupt; download or rebuild it") from None
        applier.finish()
        report.warnings = applier.warnings.lines()
    finally:
        root.close()
    return report
