"""The one way blobs of an OCI layout are read (after umoci's oci/cas).

Layouts are data from somewhere else, possibly from another user or made
hostile on purpose. So every read goes through here, and here:

- a digest is checked against a strict grammar (sha256 or sha512, lowercase
  hex of the right length) before any path is built from it;
- `blobs`, the algorithm directory and the blob are opened one component at
  a time relative to the layout's directory, never following a symlink, and
  the blob must be a regular file (a symlink to /dev/zero or a FIFO is
  refused, not read forever);
- a blob is read for at most the size its descriptor declares, and its size
  and hash are checked while it is read: content that is longer, shorter or
  different is an ImageError naming the layout and the blob.

The layout's own files (oci-layout, index.json) are read the same way, with
a size bound. Writing layouts is oci/layout_write.py's job; copying a blob
from one layout to another goes through `copy_blob` here, so the copy is
verified too.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterator

from stacker_kernel.errors import ImageError
from stacker_kernel.storage.btrfs import FICLONE

_DIGEST = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
_CHUNK = 1 << 20
#: manifests, indexes, configs and index.json are small; refuse absurd ones
MAX_JSON = 16 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted as a blob must not wait for a writer
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def check_digest(digest: Any, where: str) -> str:
    """`digest` itself if it is a well-formed sha256/sha512 digest, else ImageError."""
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ImageError(f"{where} names the malformed digest {str(digest)[:100]!r}: "
                         "the image is broken or hostile; re-create it")
    return digest


def check_size(size: Any, where: str) -> int:
    """`size` itself if it is a descriptor size (a whole number >= 0), else ImageError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ImageError(f"{where} gives the blob size {str(size)[:40]!r}, not a byte count: "
                         "the image is broken or hostile; re-create it")
    return size


class BlobReader:
    """A blob open for reading: at most its declared size, hashed as it goes.

    `read` raises ImageError as soon as the content is known to be longer
    than declared, and at the end when it is shorter or its hash differs; a
    caller that reads to the end has therefore read exactly the blob.
    """

    def __init__(self, fd: int, digest: str, size: int, what: str) -> None:
        self._f = os.fdopen(fd, "rb")
        self.digest, self.size, self.what = digest, size, what
        algorithm, self._hex = digest.split(":", 1)
        self._hash = hashlib.new(algorithm)
        self._read = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        if self._done or n == 0:
            return b""
        left = self.size - self._read
        want = left + 1 if n is None or n < 0 else min(n, left + 1)
        data = self._f.read(want) if want > 0 else b""
        if len(data) > left:
            raise ImageError(f"{self.what} does not match its digest: it is longer than the {self.size} bytes "
                             "its descriptor declares; the layout is corrupt or hostile, copy the image again")
        self._hash.update(data)
        self._read += len(data)
        if not data or (n is not None and n < 0):
            self._finish()
        return data

    def _finish(self) -> None:
        if self._read < self.size:  # buffered reads come back short only at the end
            raise ImageError(f"{self.what} does not match its digest: it has {self._read} bytes but its "
                             f"descriptor declares {self.size} (truncated or replaced); copy the image again")
        if self._f.read(1):
            raise ImageError(f"{self.what} does not match its digest: it is longer than the {self.size} bytes "
                             "its descriptor declares; the layout is corrupt or hostile, copy the image again")
        if self._hash.hexdigest() != self._hex:
            raise ImageError(f"{self.what} does not match its digest: the layout is corrupt; "
                             "copy the image again")
        self._done = True

    def read_all(self) -> bytes:
        """The whole verified content."""
        out = bytearray()
        while chunk := self.read(_CHUNK):
            out += chunk
        return bytes(out)

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "BlobReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Blobs:
    """The blobs of the directory `path` (an OCI layout, or a store's blob cache):
    `path/blobs/<algorithm>/<hex>`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def _what(self, digest: str) -> str:
        return f"blob {digest} of {self.path}"

    @contextlib.contextmanager
    def _open_dir(self, digest: str) -> Iterator[int | None]:
        """An fd of `blobs/<algorithm>` (None when the layout has none), reached without symlinks."""
        algorithm = digest.split(":", 1)[0]
        fds: list[int] = []
        try:
            try:
                fds.append(os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                fds.append(os.open("blobs", _DIR_FLAGS, dir_fd=fds[-1]))
                fds.append(os.open(algorithm, _DIR_FLAGS, dir_fd=fds[-1]))
            except FileNotFoundError:
                yield None
                return
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ImageError(f"{self.path}/blobs/{algorithm} is not a directory (a symlink or a file): "
                                     "the layout is hostile or broken; copy the image again") from e
                raise ImageError(f"cannot open the blobs of {self.path} ({e.strerror}): "
                                 "check the layout's permissions") from e
            yield fds[-1]
        finally:
            for fd in reversed(fds):
                os.close(fd)

    def _open_fd(self, digest: str, what: str | None = None) -> int | None:
        """An fd of the regular file of blob `digest`, or None when it is absent."""
        what = what or self._what(digest)
        with self._open_dir(digest) as dir_fd:
            if dir_fd is None:
                return None
            try:
                fd = os.open(digest.split(":", 1)[1], _FILE_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ImageError(f"{what} is a symlink, not a file: the layout is hostile "
                                     "or broken; copy the image again") from e
                raise ImageError(f"cannot open {what} ({e.strerror}): "
                                 "check the layout's permissions") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ImageError(f"{what} is not a regular file: the layout is hostile or broken; "
                             "copy the image again")
        os.set_blocking(fd, True)
        return fd

    def has(self, digest: str, what: str | None = None) -> bool:
        """Whether blob `digest` is present (as a regular file; its content is not checked)."""
        check_digest(digest, f"layout {self.path}")
        fd = self._open_fd(digest, what)
        if fd is None:
            return False
        os.close(fd)
        return True

    def _open_declared(self, digest: str, size: Any, what: str | None) -> tuple[int, int, str]:
        """(fd, size, what) of blob `digest` once digest and size are well-formed;
        ImageError when it is missing."""
        check_digest(digest, f"layout {self.path}")
        what = what or self._what(digest)
        size = check_size(size, what)
        fd = self._open_fd(digest, what)
        if fd is None:
            raise ImageError(f"{what} is missing: copy the image again (skopeo copy or umoci)")
        return fd, size, what

    def check(self, digest: str, size: Any, what: str | None = None) -> None:
        """ImageError unless blob `digest` is a regular file of `size` bytes (its hash is
        not read: for a reader that verifies it itself, such as skopeo)."""
        fd, size, what = self._open_declared(digest, size, what)
        try:
            actual = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if actual != size:
            raise ImageError(f"{what} does not match its digest: it has {actual} bytes but its descriptor "
                             f"declares {size} (truncated or replaced); copy the image again")

    def open(self, digest: str, size: Any, what: str | None = None) -> BlobReader:
        """Blob `digest` open for verified reading of `size` bytes; ImageError when it is missing.

        `what` names the blob in messages (default: `blob DIGEST of LAYOUT`).
        """
        fd, size, what = self._open_declared(digest, size, what)
        return BlobReader(fd, digest, size, what)

    def read(self, digest: str, size: Any, what: str | None = None, limit: int = MAX_JSON) -> bytes:
        """The verified content of blob `digest` (at most `limit` bytes are accepted)."""
        what = what or self._what(digest)
        if check_size(size, what) > limit:
            raise ImageError(f"{what} claims {size} bytes, too large for a manifest or config: "
                             "the layout is broken; copy the image again")
        with self.open(digest, size, what) as r:
            return r.read_all()

    def read_json(self, digest: str, size: Any, what: str | None = None) -> dict[str, Any]:
        """The verified blob `digest` parsed as a JSON object."""
        what = what or self._what(digest)
        try:
            data = json.loads(self.read(digest, size, what))
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ImageError(f"{what} is not a JSON object: the layout is broken; copy the image again")
        return data

    def read_file(self, name: str, limit: int = MAX_JSON) -> bytes:
        """A small top-level file of the layout (oci-layout, index.json), read without
        following a symlink; FileNotFoundError when absent."""
        dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ImageError(f"{self.path}/{name} is not a regular file: the layout is hostile or broken; "
                                 "copy the image again")
            os.set_blocking(fd, True)
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"{self.path}/{name} is larger than {limit} bytes: the layout is broken; "
                             "re-create it")
        return data


def copy_blob(src: Blobs, dst: str | os.PathLike, digest: str, size: Any, what: str | None = None) -> Path:
    """Make blob `digest` present under `dst` (`dst/blobs/<alg>/<hex>`), copied from
    `src` and verified while copied; its path. A blob already in `dst` is kept.

    The copy lands atomically (temp file renamed to its digest), so a failed
    or interrupted copy leaves nothing under the digest's name.
    """
    check_digest(digest, f"layout {src.path}")
    out = Blobs(dst)
    if out.has(digest):
        return out.path / "blobs" / digest.replace(":", "/", 1)
    algorithm, hexdigest = digest.split(":", 1)
    directory = Path(dst) / "blobs" / algorithm
    directory.mkdir(parents=True, exist_ok=True)
    import tempfile  # here: reading a layout (a cached build) needs none of it

    with src.open(digest, size, what) as reader:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                if not _reflink(reader, f.fileno(), tmp):
                    while chunk := reader.read(_CHUNK):
                        f.write(chunk)
            os.chmod(tmp, 0o644)
            os.replace(tmp, directory / hexdigest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return directory / hexdigest


def _reflink(reader: BlobReader, out_fd: int, out_path: str) -> bool:
    """Share the source's extents with `out_fd` (btrfs, same filesystem: no data is
    copied) and verify the clone, which no one else can change; False when the
    filesystem cannot clone, and nothing was written."""
    try:
        fcntl.ioctl(out_fd, FICLONE, reader.fileno())
    except OSError:
        return False
    with BlobReader(os.open(out_path, os.O_RDONLY | os.O_CLOEXEC), reader.digest, reader.size,
                    reader.what) as clone:
        while clone.read(_CHUNK):
            pass
    return True
