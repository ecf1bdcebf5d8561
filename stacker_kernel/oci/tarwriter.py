"""Write one OCI layer (tar+gzip) from a snapshot diff.

The tar is PAX, reproducible and what OCI appliers expect (image-spec
layer.md): whiteouts `.wh.NAME` for removed paths, an opaque
`.wh..wh..opq` only in a directory that was replaced by a new one, hard links
between paths of the same inode inside the layer, xattrs as
`SCHILY.xattr.NAME`, numeric owners with empty user/group names, integer
mtimes clamped to SOURCE_DATE_EPOCH, entries sorted with whiteouts before
their siblings. The tar streams into gzip (pigz on both cores when present,
else zlib) while the sha256 of the tar (DiffID) and of the gzip (digest) are
computed; nothing is held whole in memory.

`write_layer` reads the rootfs, so it runs inside the user namespace (the
caller wraps it in `run_in_userns`).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from stacker_kernel.errors import ImageError
from stacker_kernel.oci.diff import Change, Diff

MEDIA_TYPE_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"  # image-spec media-types.md
COMPRESSIONS = ("gzip", "zstd")
ZSTD_LEVEL = 3  # zstd's default: a third of pigz -4's time on this project's rootfs, 17% smaller
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
GZIP_LEVEL = 4  # pigz -4: 3% larger than -6 at half the CPU (bench/export.py)
# ISA-L's igzip at its level 3 (of 0-3): on a Debian rootfs, a sixth of zlib -4's CPU (one
# core: a half of pigz -4's time on two), 6% larger. Its output is the same for any thread
# count, so blobs stay reproducible; pigz, then zlib, where it is missing.
IGZIP_LEVEL = 3
_CHUNK = 1 << 20

_LOW_BYTES = bytes(range(128))


def _calc_chksums(buf: bytes) -> tuple[int, int]:
    """tarfile.calc_chksums (the header checksum, unsigned and signed, the chksum field
    counted as spaces), the same values with the sums in C: the stdlib's unpacks 504
    Python ints per header, twice per entry of a layer (its pax header and its own),
    a tenth of a whole rootfs layer's CPU."""
    head, tail = buf[:148], buf[156:512]
    unsigned = 256 + sum(head) + sum(tail)
    high = len(head.translate(None, _LOW_BYTES)) + len(tail.translate(None, _LOW_BYTES))
    return unsigned, unsigned - 256 * high


tarfile.calc_chksums = _calc_chksums  # tarfile calls it through its module globals

# Never exported, as umoci: host-specific labels and ACL flavours, overlay
# bookkeeping and the trusted namespace.
_SKIPPED_XATTRS = ("security.selinux", "system.nfs4_acl")
_SKIPPED_XATTR_PREFIXES = ("trusted.", "user.overlay.")

# security.capability: v3 (namespaced, with rootid) as seen from outside the
# user namespace; layers carry v2 (capabilities(7), "File capability extended attribute versioning").
_VFS_CAP_REVISION_MASK = 0xFF000000
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000


@dataclass(frozen=True)
class LayerBlob:
    """A layer blob stored at `<out_dir>/blobs/sha256/<digest hex>`.

    `digest` is of the gzip blob, `diff_id` of the raw tar (both
    `sha256:<hex>`); `size` is the blob's byte count; `empty` says the diff had
    no entries (the blob is then a valid empty tar).
    """
    digest: str
    diff_id: str
    size: int
    media_type: str
    empty: bool


def write_layer(new_root: str, diff: Diff, out_dir: str, *, source_date_epoch: int | None = None,
                compression: str = "gzip") -> LayerBlob:
    """Write the layer for `diff` (whose new side is `new_root`) into
    `out_dir/blobs/sha256/`, atomically (a temp file renamed to its digest),
    compressed by gzip (the default) or zstd (`compression`).

    Guarantees: the blob's sha256 is its name, the DiffID is the sha256 of the
    uncompressed tar, the same diff + tree + epoch give the same bytes.
    Raises ImageError for a path the OCI format cannot carry (a name starting
    with `.wh.`). Run inside the user namespace.
    """
    if compression not in COMPRESSIONS:
        raise ImageError(f"unknown layer compression {compression!r}: use gzip or zstd")
    blob_dir = os.path.join(out_dir, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".layer-", dir=blob_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            sink = _GzipSink(out, compression)
            try:
                tar_hash = _HashingWriter(sink)
                # Mode "w" (not the "w|" stream): tarfile then writes headers and 1 MiB
                # chunks straight to the hashing writer, without its stream buffer's
                # copies (a tenth of a whole rootfs's export time); the bytes are the same.
                with tarfile.open(fileobj=tar_hash, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.copybufsize = _CHUNK
                    for info, fileobj in _entries(new_root, diff, source_date_epoch):
                        tar.addfile(info, fileobj)
                        if fileobj is not None:
                            fileobj.close()
                digest, size = sink.finish()
            except BaseException:
                sink.abort()
                raise
        final = os.path.join(blob_dir, digest.split(":", 1)[1])
        if os.path.exists(final):  # the same bytes are there: an unchanged re-export writes nothing
            os.unlink(tmp)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return LayerBlob(digest=digest, diff_id="sha256:" + tar_hash.sha.hexdigest(), size=size,
                     media_type=MEDIA_TYPE_TAR_GZIP if compression == "gzip" else MEDIA_TYPE_TAR_ZSTD,
                     empty=diff.empty)


# --- entries ---------------------------------------------------------------

def _sort_key(path: str) -> tuple[tuple[int, str], ...]:
    # Per component: whiteouts first, then names; a directory sorts before
    # its contents because its key is a prefix of theirs.
    return tuple((0 if part.startswith(WHITEOUT_PREFIX) else 1, part) for part in path.split("/"))


def _plan(diff: Diff) -> list[tuple[str, Change | None]]:
    """(archive path, change) in archive order; change None = whiteout."""
    items: list[tuple[str, Change | None]] = []
    for c in diff.changes:
        parent, _, name = c.path.rpartition("/")
        if name.startswith(WHITEOUT_PREFIX):
            raise ImageError(f"/{c.path} cannot go into an OCI layer (names starting with '.wh.' mean deletions): rename or remove it in the step")
        if c.kind == "removed":
            items.append((f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else f"{WHITEOUT_PREFIX}{name}", None))
            continue
        items.append((c.path, c))
        if c.opaque:
            items.append((f"{c.path}/{OPAQUE_WHITEOUT}", None))
    items.sort(key=lambda item: _sort_key(item[0]))
    return items


def _clamp(mtime: int, epoch: int | None) -> int:
    return mtime if epoch is None or mtime <= epoch else epoch


def _entries(root: str, diff: Diff, epoch: int | None) -> Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]:
    first_path_of_inode: dict[int, str] = {}
    whiteout_mtime = epoch if epoch is not None else 0
    for path, change in _plan(diff):
        if change is None:
            info = tarfile.TarInfo(path)
            info.type, info.mode, info.mtime = tarfile.REGTYPE, 0o644, whiteout_mtime
            info.uname = info.gname = ""
            yield info, None
            continue
        full = os.path.join(root, path)
        st = os.lstat(full)
        info = tarfile.TarInfo(path)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = _clamp(int(st.st_mtime), epoch)
        info.pax_headers = _xattr_headers(full)
        fileobj: BinaryIO | None = None
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFREG:
            if st.st_nlink > 1 and st.st_ino in first_path_of_inode:
                info.type, info.linkname = tarfile.LNKTYPE, first_path_of_inode[st.st_ino]
            else:
                if st.st_nlink > 1:
                    first_path_of_inode[st.st_ino] = path
                info.type, info.size = tarfile.REGTYPE, st.st_size
                fileobj = open(full, "rb")
        elif fmt == stat.S_IFDIR:
            info.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFLNK:
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(full)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            info.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif fmt == stat.S_IFIFO:
            info.type = tarfile.FIFOTYPE
        else:  # sockets: tar has no type for them, and a socket is runtime state
            continue
        yield info, fileobj


def _xattr_headers(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # filesystem without xattrs
        return {}
    headers: dict[str, str] = {}
    for name in sorted(names):
        if name in _SKIPPED_XATTRS or name.startswith(_SKIPPED_XATTR_PREFIXES):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        if name == "security.capability":
            value = _capability_v2(value)
        if value:  # empty values are dropped, as umoci does
            # tarfile writes non-UTF-8 values as hdrcharset=BINARY when they
            # arrive surrogate-escaped (CPython tarfile PAX header code).
            headers["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    return headers


def _capability_v2(value: bytes) -> bytes:
    """A v2 `security.capability` blob: v3 drops its trailing rootid."""
    if len(value) >= 24:
        (magic,) = struct.unpack_from("<I", value)
        if magic & _VFS_CAP_REVISION_MASK == _VFS_CAP_REVISION_3:
            magic = (magic & ~_VFS_CAP_REVISION_MASK) | _VFS_CAP_REVISION_2
            return struct.pack("<I", magic) + value[4:20]
    return value


# --- streams ---------------------------------------------------------------

class _HashingWriter:
    """A write-only file that hashes what passes through to `sink`."""

    def __init__(self, sink: "_GzipSink") -> None:
        self.sha = hashlib.sha256()
        self._sink = sink
        self._offset = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self._sink.write(data)
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:  # tarfile asks where it starts
        return self._offset


class _DigestFile:
    """Writes to `out` and hashes; counts bytes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)


class _GzipSink:
    """gzip (mtime 0, no name) or zstd into `out`, hashing the compressed bytes.

    gzip is made by ISA-L's igzip when it is on PATH (the fastest), else by pigz
    (in its threads, on every core), and a reader thread hashes their output;
    otherwise zlib compresses in-line. Both programs give the same output
    whatever their thread count (pigz cuts its input in fixed blocks), so a
    blob is the same on any machine with the same program. zstd runs as
    `zstd -T0` (every core), whose multi-threaded frames are the same for any
    thread count.
    """

    def __init__(self, out: BinaryIO, compression: str = "gzip") -> None:
        self._dest = _DigestFile(out)
        if compression == "zstd":
            self._program = "zstd"
        else:
            self._program = "igzip" if shutil.which("igzip") else "pigz"
        exe = shutil.which(self._program)
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._error: BaseException | None = None
        if compression == "zstd" and exe is None:
            raise ImageError("zstd layers need the zstd program, which is missing: "
                             "install Debian's zstd package (apt-get install zstd)")
        if exe:
            argv = {"zstd": [exe, "-q", f"-{ZSTD_LEVEL}", "-T0", "-c"],
                    "igzip": [exe, "-n", f"-{IGZIP_LEVEL}", "-c"],
                    "pigz": [exe, "-n", "-T", f"-{GZIP_LEVEL}", "-c"]}[self._program]
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            self._reader = threading.Thread(target=self._pump, daemon=True)
            self._reader.start()
        else:
            self._z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip, mtime 0

    def _pump(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while chunk := self._proc.stdout.read(_CHUNK):
                self._dest.write(chunk)
        except BaseException as e:  # surfaced by finish()
            self._error = e

    def write(self, data: bytes) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.write(data)
        else:
            self._dest.write(self._z.compress(data))

    def finish(self) -> tuple[str, int]:
        """Flush and close the gzip stream; (digest, size) of the compressed blob."""
        if self._proc is not None:
            assert self._proc.stdin is not None and self._reader is not None
            self._proc.stdin.close()
            self._reader.join()
            if self._proc.wait() != 0 or self._error is not None:
                raise ImageError(f"{self._program} failed while compressing a layer ({self._error or self._proc.returncode}): check free space in the layout directory")
        else:
            self._dest.write(self._z.flush())
        return "sha256:" + self._dest.sha.hexdigest(), self._dest.size

    def abort(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._reader is not None:
                self._reader.join()
