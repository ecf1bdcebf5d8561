"""stacker's layer types: tar, squashfs and erofs (with dm-verity).

What stacker does, and this module follows (stacker 52efa05 with atomfs v1.2.0):

- `--layer-type tar|squashfs|erofs` (repeatable) and `--no-verity`
  (cmd/stacker/build.go); one image per layer type, tagged `NAME` for tar and
  `NAME-squashfs` / `NAME-erofs` otherwise (pkg/types/layer_type.go LayerName).
- A squashfs/erofs layer is one stacker layer's overlay upper dir made into a
  filesystem image (pkg/overlay/pack.go generateBlob -> atomfs Make): a
  per-layer diff, with overlayfs whiteouts: a removed path is a character
  device 0:0 of the same name, a replaced directory carries the xattr
  `user.overlay.opaque=y` (stacker's overlay runs with user xattrs).
- `mksquashfs DIR IMG -comp zstd` (atomfs pkg/squashfs/squashfs.go) with media
  type `application/vnd.stacker.image.layer.squashfs+zstd`; `mkfs.erofs IMG
  DIR` (atomfs pkg/erofs/erofs.go: no compression flag, media type
  `application/vnd.stacker.image.layer.erofs+lz4hc`). The blob is not
  compressed further, so its DiffID is its digest.
- dm-verity (atomfs pkg/verity/verity.go AppendVerityData): sha256, 4 KiB data
  and hash blocks, format 1, hash tree appended to the image at its end
  (hash offset = image size), root hash in the layer descriptor's annotation
  `io.stackeroci.stacker.atomfs_verity_root_hash`. We run `veritysetup format`
  on the plain file (no device, no privilege). Unlike atomfs, the salt and the
  superblock UUID come from the image's sha256, so the same layer gives the
  same blob (and root hash) every time.

Reading such layers (bases): the image is turned into an OCI tar stream
(squashfs: `sqfs2tar`; erofs: `fsck.erofs --extract` into a scratch directory
inside the user namespace, then a walk that never follows a link), overlay
whiteouts become OCI whiteouts, and the result goes through the same hostile-
entry rules as any tar layer (oci/tarlayer.py apply_layer).
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from typing import Iterable

from stacker_kernel.container.userns import isolate, isolated_id
from stacker_kernel.errors import ImageError, RecipeError
from stacker_kernel.oci.diff import Diff, diff_snapshots, scan_nested, walk
from stacker_kernel.oci.tarwriter import LayerBlob
from stacker_kernel.storage.btrfs import copy_data

TAR, SQUASHFS, EROFS = "tar", "squashfs", "erofs"
LAYER_TYPES = (TAR, SQUASHFS, EROFS)
MEDIA_TYPE_SQUASHFS = "application/vnd.stacker.image.layer.squashfs"  # atomfs pkg/squashfs/mediatype.go
MEDIA_TYPE_EROFS = "application/vnd.stacker.image.layer.erofs"        # atomfs pkg/erofs/mediatype.go
VERITY_ROOT_HASH_ANNOTATION = "io.stackeroci.stacker.atomfs_verity_root_hash"  # atomfs pkg/verity/verity.go
# stacker before atomfs (v0.x/v1.0) wrote this key; read it too
OLD_VERITY_ROOT_HASH_ANNOTATION = "io.stackeroci.stacker.squashfs_verity_root_hash"
OVERLAY_OPAQUE_XATTRS = ("user.overlay.opaque", "trusted.overlay.opaque")
VERITY_BLOCK = 4096  # atomfs: os.Getpagesize() for data and hash blocks

_SKIPPED_XATTRS = ("security.selinux", "system.nfs4_acl")
_SKIPPED_XATTR_PREFIXES = ("trusted.", "user.overlay.")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LayerType:
    """One output layer type; `verity` only for squashfs/erofs (pkg/types/layer_type.go);
    `compression` (gzip or zstd) only for tar: squashfs/erofs images carry their own."""
    type: str = TAR
    verity: bool = False
    compression: str = "gzip"

    def tag(self, name: str) -> str:
        """The tag stacker gives layer `name` in this type (LayerName)."""
        return name if self.type == TAR else f"{name}-{self.type}"

    def matches(self, media_type: str, annotations: dict[str, str] | None) -> bool:
        """Whether a layer of `media_type` can be reused as-is in an image of this type."""
        kind = kind_of(media_type)
        if kind != self.type:
            return False
        return kind == TAR or self.verity == bool(root_hash_of(annotations))

    def __str__(self) -> str:
        if self.type == TAR:
            return TAR if self.compression == "gzip" else f"{TAR}+{self.compression}"
        return f"{self.type}+verity" if self.verity else self.type


TAR_TYPE = LayerType()


def parse_layer_types(values: Iterable[str] | None, no_verity: bool = False,
                      compression: str | None = None) -> tuple[LayerType, ...]:
    """`--layer-type` values (default tar; duplicates dropped) with `--no-verity`
    and `--compression` (gzip, the default, or zstd: tar layers only)."""
    compression = compression or "gzip"
    if compression not in ("gzip", "zstd"):
        raise RecipeError(f"invalid compression {compression!r}: use --compression gzip or zstd")
    out: list[LayerType] = []
    for value in values or [TAR]:
        if value not in LAYER_TYPES:
            raise RecipeError(f"invalid layer type {value!r}: use --layer-type tar, squashfs or erofs")
        lt = LayerType(value, verity=value != TAR and not no_verity,
                       compression=compression if value == TAR else "gzip")
        if lt not in out:
            out.append(lt)
    return tuple(out)


def kind_of(media_type: str) -> str | None:
    """tar, squashfs or erofs for a layer media type (with or without `+compression`); None if unknown."""
    if media_type.startswith(MEDIA_TYPE_SQUASHFS):
        return SQUASHFS
    if media_type.startswith(MEDIA_TYPE_EROFS):
        return EROFS
    if ".tar" in media_type or media_type.endswith(("tar", "tar.gzip")):
        return TAR
    return None


def root_hash_of(annotations: dict[str, str] | None) -> str:
    a = annotations or {}
    return a.get(VERITY_ROOT_HASH_ANNOTATION) or a.get(OLD_VERITY_ROOT_HASH_ANNOTATION) or ""


@dataclass(frozen=True)
class FsLayerBlob(LayerBlob):
    """A squashfs/erofs layer blob; `root_hash` is its dm-verity root hash ("" without verity)."""
    root_hash: str = ""

    @property
    def annotations(self) -> dict[str, str]:
        return {VERITY_ROOT_HASH_ANNOTATION: self.root_hash} if self.root_hash else {}


# --- writing ----------------------------------------------------------------

def write_fs_layer(new_root: str, diff: Diff, out_dir: str, layer_type: LayerType, *,
                   source_date_epoch: int | None = None, scratch_dir: str | None = None) -> FsLayerBlob:
    """Write the squashfs/erofs layer of `diff` (new side `new_root`) into
    `out_dir/blobs/sha256/`, named by its digest, with verity data appended when
    `layer_type.verity`.

    The diff is first laid out as stacker's overlay upper dir in a scratch
    directory (under `scratch_dir`, else `out_dir`; files are reflinked where
    the filesystem allows), then packed. Run inside the user namespace.
    """
    blob_dir = os.path.join(out_dir, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".layer-dir-", dir=scratch_dir or out_dir)
    fd, img = tempfile.mkstemp(prefix=".layer-", dir=blob_dir)
    os.close(fd)
    os.unlink(img)  # the packers want to create it
    try:
        if diff.old is None and source_date_epoch is None and new_root != "/" and not diff.nested_subvolumes:
            # a whole rootfs has no whiteouts and no times to clamp: pack the
            # read-only snapshot as it is (what `mksquashfs rootfs` alone costs)
            upper = new_root
        else:
            upper = os.path.join(scratch, "upper")
            os.mkdir(upper)
            _materialize(new_root, diff, upper, source_date_epoch)
        media_type = _pack(upper, img, layer_type, source_date_epoch)
        digest, size, root_hash = _seal(img, blob_dir, layer_type)
    finally:
        if os.path.exists(img):
            os.unlink(img)
        shutil.rmtree(scratch, ignore_errors=True)
    return FsLayerBlob(digest=digest, diff_id=digest, size=size, media_type=media_type,
                       empty=diff.empty, root_hash=root_hash)


def write_whole_fs_layer(root: str, out_dir: str, layer_type: LayerType, *,
                         scratch_dir: str | None = None,
                         walks: dict[str, tuple[dict, list[str]]] | None = None) -> FsLayerBlob | None:
    """The layer of the whole read-only snapshot `root` (no older side, no
    SOURCE_DATE_EPOCH) as write_fs_layer makes it; None for an empty rootfs.
    The packer starts at once on the snapshot while its directories are scanned
    beside it (diff.scan_nested: all that can change the layer is a snapshot
    holding nested subvolumes, which is then walked and laid out as
    write_fs_layer does). With `walks` (diff_snapshots's), the snapshot is
    walked in full beside the packer instead and its walk kept there, for a
    next layer's diff."""
    from concurrent.futures import ThreadPoolExecutor

    if os.path.realpath(root) == "/":  # never the host's root: only snapshots are packed whole
        raise ImageError("the whole-rootfs layer of / is not made: export a snapshot")
    blob_dir = os.path.join(out_dir, "blobs", "sha256")
    os.makedirs(blob_dir, exist_ok=True)
    fd, img = tempfile.mkstemp(prefix=".layer-", dir=blob_dir)
    os.close(fd)
    os.unlink(img)  # the packers want to create it

    def look() -> tuple[bool, list[str]]:
        if walks is None:
            return scan_nested(root)
        walks[root] = walk(root)
        return bool(walks[root][0]), walks[root][1]
    try:
        with ThreadPoolExecutor(1) as pool:
            scan = pool.submit(look)
            try:
                media_type = _pack(root, img, layer_type, None)
            finally:
                anything, nested = scan.result()
        if not anything:
            return None
        if nested:
            os.unlink(img)
            return write_fs_layer(root, diff_snapshots(None, root, walks), out_dir, layer_type,
                                  scratch_dir=scratch_dir)
        digest, size, root_hash = _seal(img, blob_dir, layer_type)
    finally:
        if os.path.exists(img):
            os.unlink(img)
    return FsLayerBlob(digest=digest, diff_id=digest, size=size, media_type=media_type,
                       empty=False, root_hash=root_hash)


def _pack(upper: str, img: str, layer_type: LayerType, epoch: int | None) -> str:
    """Pack the directory `upper` into `img`; the media type."""
    if layer_type.type == SQUASHFS:
        return _mksquashfs(upper, img, epoch)
    if layer_type.type == EROFS:
        return _mkfs_erofs(upper, img, epoch)
    raise ImageError(f"layer type {layer_type.type!r} is not a filesystem layer type")


def _seal(img: str, blob_dir: str, layer_type: LayerType) -> tuple[str, int, str]:
    """Verity data appended (when asked), the image hashed and moved to its name in
    `blob_dir`: (digest, size, root hash or ""). The image is read once for the
    verity salt and only the appended hash tree again for the digest."""
    if layer_type.verity:
        h = _sha256_of(img)
        before = os.path.getsize(img)
        root_hash = append_verity(img, h.hexdigest())
        with open(img, "rb") as f:
            f.seek(before)
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    else:
        h, root_hash = _sha256_of(img), ""
    digest = "sha256:" + h.hexdigest()
    size = os.path.getsize(img)
    os.chmod(img, 0o644)
    os.replace(img, os.path.join(blob_dir, digest.split(":", 1)[1]))
    return digest, size, root_hash


def _clamp(mtime_ns: int, epoch: int | None) -> int:
    return mtime_ns if epoch is None or mtime_ns <= epoch * 10**9 else epoch * 10**9


def _materialize(root: str, diff: Diff, dest: str, epoch: int | None) -> None:
    """Lay `diff` out under `dest` as an overlay upper dir (stacker's layer content)."""
    # stacker's upper dir is made by stacker (MkdirAll 0755) as the namespace's root
    os.chmod(dest, 0o755)
    os.chown(dest, 0, 0)
    first_path_of_inode: dict[int, str] = {}
    dirs: list[tuple[str, int]] = []  # directory mtimes are set last, after their children
    made: set[str] = set()

    def ensure_parents(rel: str) -> None:
        parent = rel.rpartition("/")[0]
        if not parent or parent in made:
            return
        ensure_parents(parent)
        st = os.lstat(os.path.join(root, parent))
        os.mkdir(os.path.join(dest, parent))
        _copy_meta(os.path.join(root, parent), os.path.join(dest, parent), st)
        dirs.append((parent, _clamp(st.st_mtime_ns, epoch)))
        made.add(parent)

    for c in diff.changes:
        ensure_parents(c.path)
        dst = os.path.join(dest, c.path)
        if c.kind == "removed":
            # overlayfs whiteout: a 0:0 character device (mknod allows it in a user namespace)
            os.mknod(dst, stat.S_IFCHR, os.makedev(0, 0))
            if epoch is not None:
                os.utime(dst, ns=(epoch * 10**9, epoch * 10**9), follow_symlinks=False)
            continue
        src = os.path.join(root, c.path)
        st = os.lstat(src)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            if c.path not in made:
                os.mkdir(dst)
                made.add(c.path)
            _copy_meta(src, dst, st)
            if c.opaque:
                os.setxattr(dst, "user.overlay.opaque", b"y", follow_symlinks=False)
            dirs.append((c.path, _clamp(st.st_mtime_ns, epoch)))
            continue
        if fmt == stat.S_IFREG:
            if st.st_nlink > 1 and st.st_ino in first_path_of_inode:
                os.link(os.path.join(dest, first_path_of_inode[st.st_ino]), dst, follow_symlinks=False)
                continue
            if st.st_nlink > 1:
                first_path_of_inode[st.st_ino] = c.path
            _copy_file(src, dst)
        elif fmt == stat.S_IFLNK:
            os.symlink(os.readlink(src), dst)
        elif fmt == stat.S_IFIFO:
            os.mkfifo(dst)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            raise ImageError(f"/{c.path} is a device node ({os.major(st.st_rdev)}:{os.minor(st.st_rdev)}), "
                             "which a layer made without privilege cannot hold: remove it in the step")
        else:  # sockets are runtime state, as in tar layers
            continue
        _copy_meta(src, dst, st)
        t = _clamp(st.st_mtime_ns, epoch)
        os.utime(dst, ns=(t, t), follow_symlinks=False)
    for rel, t in reversed(dirs):
        os.utime(os.path.join(dest, rel), ns=(t, t), follow_symlinks=False)


def _copy_file(src: str, dst: str) -> None:
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copy_data(sfd, dfd, os.fstat(sfd).st_size)  # btrfs: a reflink, nothing copied
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_meta(src: str, dst: str, st: os.stat_result) -> None:
    """Owner, mode and xattrs of `src` onto `dst` (not its times)."""
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in sorted(names):
        if name in _SKIPPED_XATTRS or name.startswith(_SKIPPED_XATTR_PREFIXES):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


def _which(program: str) -> str | None:
    # veritysetup lives in /usr/sbin, which a user's PATH often lacks
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, as_nobody: int | None = None,
         cwd: str | None = None) -> str:
    """Run a tool; with `as_nobody` (userns.isolated_id()), isolated as that id (userns.isolate)."""
    exe = _which(cmd[0])
    if exe is None:
        package = {"mksquashfs": "squashfs-tools", "mkfs.erofs": "erofs-utils", "fsck.erofs": "erofs-utils",
                   "veritysetup": "cryptsetup-bin", "sqfs2tar": "squashfs-tools-ng"}.get(cmd[0], cmd[0])
        raise ImageError(f"{what} needs the {cmd[0]} program, which is missing: "
                         f"install Debian's {package} package (apt-get install {package})")
    proc = subprocess.run([exe, *cmd[1:]], stdin=subprocess.DEVNULL, capture_output=True, env=env,
                          cwd=cwd,
                          preexec_fn=None if as_nobody is None else functools.partial(isolate, outside=as_nobody))
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
        raise ImageError(f"{what} failed ({cmd[0]}: {detail[-1] if detail else proc.returncode}): "
                         "check free space and the layer's files")
    return proc.stdout.decode(errors="replace")


def _mksquashfs(upper: str, img: str, epoch: int | None) -> str:
    # SOURCE_DATE_EPOCH would make mksquashfs stamp every file; mtimes are clamped
    # already, so only the filesystem's own time is pinned.
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    args = ["mksquashfs", upper, img, "-comp", "zstd", "-noappend", "-no-progress"]
    if epoch is not None:
        args += ["-mkfs-time", str(epoch)]
    _run(args, "making a squashfs layer", env)
    return MEDIA_TYPE_SQUASHFS + "+zstd"


def _mkfs_erofs(upper: str, img: str, epoch: int | None) -> str:
    args = ["mkfs.erofs", "--quiet"]
    if epoch is not None:  # a fixed UUID and build time: the same layer gives the same bytes
        args += ["-U", str(uuid.UUID(int=epoch)), "-T", str(epoch)]
    _run(args + [img, upper], "making an erofs layer")
    return MEDIA_TYPE_EROFS + "+lz4hc"


def append_verity(img: str, digest: str | None = None) -> str:
    """Append the dm-verity hash tree of `img` to `img` (atomfs AppendVerityData); its
    root hash (hex). `digest`: the image's sha256 (hex), when the caller has it."""
    size = os.path.getsize(img)
    if size % 512:
        raise ImageError(f"layer image {img} is {size} bytes, not a multiple of 512: dm-verity cannot cover it")
    digest = digest or _sha256(img)
    out = _run(["veritysetup", "format", img, img, f"--hash-offset={size}", f"--data-blocks={size // VERITY_BLOCK}",
                f"--data-block-size={VERITY_BLOCK}", f"--hash-block-size={VERITY_BLOCK}", "--hash=sha256",
                "--format=1", f"--salt={digest}", f"--uuid={uuid.UUID(digest[:32])}"],
               "adding dm-verity data to a layer")
    m = re.search(r"Root hash:\s*([0-9a-f]+)", out)
    if m is None:
        raise ImageError(f"veritysetup printed no root hash for {img}: check the cryptsetup-bin version (>= 2.3)")
    return m.group(1)


def verity_data_offset(img: str, kind: str) -> int:
    """Where the verity data starts in a squashfs/erofs blob: the filesystem's
    size rounded up to 4 KiB (atomfs pkg/squashfs/verity.go, pkg/erofs/verity.go)."""
    with open(img, "rb") as f:
        if kind == SQUASHFS:
            f.seek(40)  # superblock bytes_used (u64 LE)
            used = int.from_bytes(f.read(8), "little")
        else:
            f.seek(1024)  # erofs superblock: blkszbits at +12, blocks (u32) at +36
            sb = f.read(128)
            used = int.from_bytes(sb[36:40], "little") << sb[12]
    return -(-used // VERITY_BLOCK) * VERITY_BLOCK


def _sha256_of(path: str):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h


def _sha256(path: str) -> str:
    return _sha256_of(path).hexdigest()


# --- reading ----------------------------------------------------------------

def fs_layer_to_tar(blob: str, media_type: str, out_tar: str, scratch_dir: str) -> None:
    """Write the OCI tar form of the squashfs/erofs layer `blob` to `out_tar`:
    overlay whiteouts (0:0 devices, opaque xattrs) become `.wh.` entries. The
    tar still needs oci/tarlayer.py's checks (this only converts). Run inside the
    user namespace (erofs extraction keeps owners)."""
    kind = kind_of(media_type)
    if kind == SQUASHFS:
        exe = _which("sqfs2tar")
        if exe is None:
            _run(["sqfs2tar"], "reading a squashfs layer")  # raises the install hint
        proc = subprocess.Popen([exe, "--no-skip", blob], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as src:
                _convert(((m, src.extractfile(m) if m.isreg() else None) for m in src), out_tar)
        except tarfile.TarError as e:
            proc.kill()
            raise ImageError(f"squashfs layer {blob} is not readable ({e}): it is corrupt or hostile; "
                             "do not use it") from e
        finally:
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stdout.close()
            proc.stderr.close()
            code = proc.wait()
        if code != 0:
            raise ImageError(f"squashfs layer {blob} is not readable (sqfs2tar: "
                             f"{err.splitlines()[-1] if err else code}): it is corrupt or hostile; do not use it")
    elif kind == EROFS:
        # fsck.erofs (1.5) neither restores xattrs nor keeps hard links, and would
        # follow whatever names the image holds: read the metadata ourselves first,
        # refuse hostile names, then take the file data from its extraction.
        meta = erofs_metadata(blob)
        # fsck.erofs parses the image again, and an image it reads otherwise than we
        # do must not make it write anywhere else: it runs as a nobody the host does
        # not use, in a pid namespace of its own (userns.isolate), and may write only
        # `tmp` (owners and modes come from `meta`, not from it). In single-id mode
        # there is no such id (isolated_id() is 0): isolate confines it otherwise.
        tmp = tempfile.mkdtemp(prefix=".erofs-", dir=scratch_dir)
        nobody = isolated_id()
        try:
            os.chown(tmp, nobody, nobody)
            image = os.path.join(tmp, "layer.erofs")  # nobody may not reach the blob's folder
            _copy_file(blob, image)  # a reflink on btrfs
            os.chown(image, nobody, nobody)
            tree = os.path.join(tmp, "tree")
            # relative paths from inside `tmp`: nobody may not pass through its parents
            _run(["fsck.erofs", "--extract=tree", "layer.erofs"], f"reading erofs layer {blob}",
                 as_nobody=nobody, cwd=tmp)
            _convert(_walk_tree(tree, meta), out_tar)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        raise ImageError(f"media type {media_type!r} is not a squashfs or erofs layer")


def _walk_tree(tree: str, meta: dict[str, ErofsEntry]):
    """(TarInfo, file) for every entry under `tree`, parents first, links never
    followed; mode, owner, xattrs and hard links from `meta` (erofs_metadata of
    the image): fsck.erofs restores no xattrs and sets the mode before the owner,
    which drops setuid/setgid."""
    seen: dict[int, str] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(tree, rel_dir) if rel_dir else tree) as it:
            entries = sorted(it, key=lambda d: d.name)
        for de in entries:
            rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
            st = de.stat(follow_symlinks=False)
            info = tarfile.TarInfo(rel)
            info.mode, info.uid, info.gid, info.mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)
            if rel not in meta:
                raise ImageError(f"erofs extraction produced {rel!r}, which the image does not hold: "
                                 "the layer is hostile or corrupt; do not use it")
            entry = meta[rel]
            if stat.S_IFMT(entry.mode) != stat.S_IFMT(st.st_mode):
                raise ImageError(f"erofs extraction produced a different file type at {rel!r} than the image "
                                 "holds: the layer is hostile or corrupt; do not use it")
            nid, xattrs = entry.nid, entry.xattrs
            info.mode, info.uid, info.gid = stat.S_IMODE(entry.mode), entry.uid, entry.gid
            info.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                                for k, v in sorted(xattrs.items())}
            fileobj = None
            if de.is_dir(follow_symlinks=False):
                info.type = tarfile.DIRTYPE
                stack.append(rel)
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(de.path)
            elif stat.S_ISREG(st.st_mode):
                if nid in seen:
                    info.type, info.linkname = tarfile.LNKTYPE, seen[nid]
                else:
                    seen[nid] = rel
                    info.type, info.size = tarfile.REGTYPE, st.st_size
                    fileobj = open(de.path, "rb")
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue
            yield info, fileobj
        # depth-first keeps a directory before its contents; order within is by name


_XATTR_PREFIXES = {1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default",
                   4: "trusted.", 6: "security."}


@dataclass(frozen=True)
class ErofsEntry:
    """One path of an erofs image as its inode says: nid (inode number), mode with type bits, owner, xattrs."""
    nid: int
    mode: int
    uid: int
    gid: int
    xattrs: dict[str, bytes]


def erofs_metadata(img: str) -> dict[str, ErofsEntry]:
    """Every path of the erofs image `img` (relative, no leading '/') with its
    inode's number, mode, owner and xattrs, read from the image itself (kernel
    include/uapi erofs_fs.h layout). ImageError for a name that is not a plain
    file name ('', '.', '..', or one holding '/' or NUL) or a broken layout."""
    with open(img, "rb") as f:
        data = f.read()

    def u(off: int, n: int) -> int:
        if off < 0 or off + n > len(data):
            raise ImageError(f"erofs layer {img} is truncated or corrupt (offset {off}): rebuild it")
        return int.from_bytes(data[off:off + n], "little")

    if u(1024, 4) != 0xE0F5E1E2:
        raise ImageError(f"erofs layer {img} has no erofs superblock: it is corrupt or not erofs")
    blkbits = u(1024 + 12, 1)
    blksz = 1 << blkbits
    root_nid, meta_blk, xattr_blk = u(1024 + 14, 2), u(1024 + 40, 4), u(1024 + 44, 4)

    def entries(off: int, end: int) -> Iterable[tuple[int, dict[str, bytes]]]:
        while off + 4 <= end:
            name_len, index, value_size = u(off, 1), u(off + 1, 1), u(off + 2, 2)
            name = data[off + 4:off + 4 + name_len]
            value = data[off + 4 + name_len:off + 4 + name_len + value_size]
            yield off, {_XATTR_PREFIXES.get(index, f"unknown{index}.") + name.decode("utf-8", "surrogateescape"): value}
            off += (4 + name_len + value_size + 3) & ~3

    def inode(nid: int) -> tuple[int, int, int, int, int, dict[str, bytes], int, int]:
        off = (meta_blk << blkbits) + nid * 32
        fmt, icount, mode = u(off, 2), u(off + 2, 2), u(off + 4, 2)
        extended = fmt & 1
        core = 64 if extended else 32
        size = u(off + 8, 8) if extended else u(off + 8, 4)
        uid, gid = (u(off + 24, 4), u(off + 28, 4)) if extended else (u(off + 24, 2), u(off + 26, 2))
        layout = (fmt >> 1) & 7
        # Uncompressed layouts keep every byte in the image: a larger size is a lie
        # (2^62 once made the directory walk below spin for ever).
        if layout in (0, 2) and size > len(data):
            raise ImageError(f"erofs layer {img} has an inode whose size ({size} bytes) exceeds the image's "
                             f"own ({len(data)} bytes): it is hostile or corrupt; do not use it")
        xsize = 12 + (icount - 1) * 4 if icount else 0
        xattrs: dict[str, bytes] = {}
        if xsize:
            shared = u(off + core + 4, 1)
            for i in range(shared):
                sid = u(off + core + 12 + 4 * i, 4)
                start = (xattr_blk << blkbits) + sid * 4
                for _, kv in entries(start, start + 4):
                    xattrs.update(kv)
                    break
            for _, kv in entries(off + core + 12 + 4 * shared, off + core + xsize):
                xattrs.update(kv)
        return mode, layout, size, u(off + 16, 4), off + core + xsize, xattrs, uid, gid

    dir_bytes = 0

    def dir_blocks(nid: int) -> Iterable[bytes]:
        nonlocal dir_bytes
        mode, layout, size, blkaddr, tail, *_ = inode(nid)
        if layout not in (0, 2):
            raise ImageError(f"erofs layer {img} has a directory in layout {layout}, which is not read: rebuild it with mkfs.erofs")
        # Directories hold distinct blocks of the image: together no more than it,
        # however many inodes point at the same blocks.
        dir_bytes += size
        if dir_bytes > len(data):
            raise ImageError(f"erofs layer {img} has more directory data than the image holds: "
                             "it is hostile or corrupt; do not use it")
        full = size // blksz if layout == 2 else -(-size // blksz)
        for i in range(full):
            yield data[(blkaddr + i) << blkbits:((blkaddr + i) << blkbits) + min(blksz, size - i * blksz)]
        if layout == 2 and size % blksz:
            yield data[tail:tail + size % blksz]

    out: dict[str, ErofsEntry] = {}
    stack, seen_dirs = [("", root_nid)], {root_nid}
    while stack:
        rel, nid = stack.pop()
        for block in dir_blocks(nid):
            count = int.from_bytes(block[8:10], "little") // 12 if len(block) >= 12 else 0
            for i in range(count):
                child = int.from_bytes(block[i * 12:i * 12 + 8], "little")
                start = int.from_bytes(block[i * 12 + 8:i * 12 + 10], "little")
                end = int.from_bytes(block[(i + 1) * 12 + 8:(i + 1) * 12 + 10], "little") if i + 1 < count else len(block)
                raw = block[start:end]
                name = raw.split(b"\0", 1)[0] if i + 1 == count else raw
                if name in (b".", b".."):
                    continue
                text = name.decode("utf-8", "surrogateescape")
                if not name or b"/" in name or b"\0" in name:
                    raise ImageError(f"erofs layer {img} holds an entry named {text!r} in /{rel}: "
                                     "the layer is hostile or corrupt; do not use it")
                path = f"{rel}/{text}" if rel else text
                mode, _, _, _, _, xattrs, uid, gid = inode(child)
                out[path] = ErofsEntry(child, mode, uid, gid, xattrs)
                if stat.S_ISDIR(mode):
                    if child in seen_dirs:
                        raise ImageError(f"erofs layer {img} links directory /{path} twice: it is hostile or corrupt")
                    seen_dirs.add(child)
                    stack.append((path, child))
    return out


def _convert(members, out_tar: str) -> None:
    """Copy tar entries to `out_tar`, turning overlay whiteouts into OCI whiteouts."""
    with tarfile.open(out_tar, "w", format=tarfile.PAX_FORMAT) as out:
        for info, fileobj in members:
            try:
                parent, _, name = info.name.rstrip("/").rpartition("/")
                if info.ischr() and info.devmajor == 0 and info.devminor == 0:
                    wh = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
                    wh.mode, wh.mtime = 0o644, info.mtime
                    out.addfile(wh)
                    continue
                headers = dict(info.pax_headers)
                opaque = any(headers.pop("SCHILY.xattr." + x, "") == "y" for x in OVERLAY_OPAQUE_XATTRS)
                for key in [k for k in headers if k.startswith("SCHILY.xattr.") and
                            k[len("SCHILY.xattr."):].startswith(_SKIPPED_XATTR_PREFIXES)]:
                    del headers[key]
                info.pax_headers = headers
                out.addfile(info, fileobj)
                if opaque and info.isdir():
                    opq = tarfile.TarInfo(f"{info.name.rstrip('/')}/.wh..wh..opq")
                    opq.mode, opq.mtime = 0o644, info.mtime
                    out.addfile(opq)
            finally:
                if fileobj is not None:
                    fileobj.close()
