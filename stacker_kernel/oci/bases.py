"""`from` sources -> read-only base subvolumes, content-addressed.

    scratch            -> bases/scratch (empty)
    tar PATH|URL       -> bases/tar-sha256-<hex of the file>
    oci LAYOUT:TAG     -> bases/oci-<hex of the manifest digest>, its layer blobs
                          kept in <root>/cache/base-layers for the export
    docker URL         -> skopeo copy into <root>/cache/images, then as oci
    built NAME         -> the other layer's snapshot, through the engine's resolver

The id is computed before anything is extracted, so importing the same tar
content or the same image digest again costs one hash (tar) or nothing
(oci). Extraction happens inside the user namespace, so owners land in the
caller's subordinate range. The image config of OCI bases is kept beside
the store (cache/base-images/<id>.json), outside bases/ which the store
keeps for subvolumes only.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from stacker_kernel.errors import ImageError
from stacker_kernel.storage.store import Snapshot, Store

if TYPE_CHECKING:  # the layer readers load where a base is imported: a cached build's base is there
    from stacker_kernel.oci.layout import ImageRef, OCILayout
    from stacker_kernel.oci.tarlayer import ApplyReport


STACKER_URL = "stacker://"
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT = 60


class SourceLike(Protocol):
    """What import_base reads from a `from`: recipe.model.ImageSource fits."""

    type: str
    url: str | None
    tag: str | None
    insecure: bool


@dataclass(frozen=True)
class BaseImage:
    """Where an OCI base came from: the manifest and config the export side starts from."""

    source: str
    layout: str
    tag: str
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]


Warn = Callable[[str], None]


def cache_root(store: Store) -> Path:
    """<root>/cache: downloads, the skopeo image cache and base image records."""
    path = store.root / "cache"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def base_layers(store: Store) -> Path:
    """<root>/cache/base-layers: verified copies of the layer blobs of every OCI base
    imported (`blobs/<alg>/<hex>`), so an export needs neither the source layout
    nor its tag, which may have moved or lost the blobs since."""
    return cache_root(store) / "base-layers"


def _record_path(store: Store, base_id: str) -> Path:
    return cache_root(store) / "base-images" / f"{base_id}.json"


def base_image(store: Store, snapshot: Snapshot) -> BaseImage | None:
    """The OCI origin of a base imported from an oci/docker source; None for other bases."""
    try:
        data = json.loads(_record_path(store, snapshot.id).read_text())
    except (OSError, ValueError):
        return None
    return BaseImage(**data)


def base_config(store: Store, snapshot: Snapshot) -> dict[str, Any] | None:
    """The OCI image config (architecture, os, config{Env, Cmd, Entrypoint…}, history…)
    of a base imported from an oci/docker source; None for scratch, tar and built bases."""
    image = base_image(store, snapshot)
    return image.config if image else None


def _write_record(store: Store, base_id: str, image: BaseImage) -> None:
    path = _record_path(store, base_id)
    import tempfile  # here, as the other modules a base import alone needs: not on a cached build's path

    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(image.__dict__, f)
    os.replace(tmp, path)  # atomic: readers see the old record or the new one


def _in_container_ids(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run file work on a rootfs as the container's root.

    Real root runs it in-process: ids already map one to one, and only the
    initial user namespace may create device nodes.
    """
    if os.geteuid() == 0:
        return fn(*args, **kwargs)
    from stacker_kernel.container.userns import run_in_userns

    return run_in_userns(fn, *args, **kwargs)


def _report(reports: list[ApplyReport], warn: Warn | None) -> None:
    for rep in reports:
        for line in rep.warnings:
            (warn or _log().warning)(line)


def _log():
    import logging

    return logging.getLogger(__name__)


# --- scratch ---------------------------------------------------------------------

def _import_scratch(store: Store) -> Snapshot:
    return store.add_base("scratch", lambda path: None, "scratch")


# --- tar ----------------------------------------------------------------------------

def _sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest_dir: Path) -> Path:
    """Download `url` into dest_dir (streamed); one clear ImageError on any failure."""
    import urllib.error  # here: http.client, ssl and email take a cached build's start otherwise
    import urllib.request
    import tempfile

    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT) as resp:
            shutil.copyfileobj(resp, out, _CHUNK)
    except (urllib.error.URLError, OSError, ValueError) as e:
        os.unlink(tmp)
        why = getattr(e, "reason", None) or e
        raise ImageError(f"cannot download the base tar {url} ({why}): check the URL and the network") from None
    return Path(tmp)


def _apply_tar_in_root(tar: str, rootfs: str) -> ApplyReport:
    from stacker_kernel.oci.tarlayer import apply_layer

    return apply_layer(tar, rootfs)


def _remembered_sha256(store: Store, path: Path) -> str:
    """sha256 of the local tar at `path`, remembered in the store by the file's
    identity (device, inode, size, mtime, ctime; any write changes the ctime), so
    a cached build does not read a whole base again."""
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    memo = store.root / "cache" / "tar-digests" / hashlib.sha256(ident.encode()).hexdigest()
    try:
        known = memo.read_text()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            return known
    except OSError:
        pass
    digest = _sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # only a cache: the next build hashes the file again
    return digest


def _import_tar_file(store: Store, path: Path, source: str, warn: Warn | None,
                     remember: bool = False) -> Snapshot:
    try:
        digest = _remembered_sha256(store, path) if remember else _sha256_file(path)
    except FileNotFoundError:
        raise ImageError(f"base tar {path} does not exist: fix the path in 'from'") from None
    except OSError as e:
        raise ImageError(f"cannot read base tar {path} ({e.strerror}): fix its permissions") from None

    def populate(rootfs: Path) -> None:
        _report([_in_container_ids(_apply_tar_in_root, str(path), str(rootfs))], warn)

    return store.add_base(f"tar-sha256-{digest}", populate, source)


def _import_tar(store: Store, url: str, resolve_built: Callable[[str], Snapshot] | None,
                downloads: Path, warn: Warn | None) -> Snapshot:
    if url.startswith(("http://", "https://")):
        tmp = _download(url, downloads)
        try:
            return _import_tar_file(store, tmp, url, warn)
        finally:
            tmp.unlink(missing_ok=True)
    if url.startswith(STACKER_URL):
        return _import_stacker_tar(store, url, resolve_built, warn)
    return _import_tar_file(store, Path(url), url, warn, remember=True)


def _hash_in_rootfs(rootfs: str, rel: str) -> str:
    """sha256 of the file `rel` inside `rootfs`, read as the container's root."""
    from stacker_kernel.oci.tarlayer import open_in_root

    h = hashlib.sha256()
    with os.fdopen(open_in_root(rootfs, rel), "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _apply_tar_from_rootfs(rootfs: str, rel: str, dest: str, name: str) -> ApplyReport:
    """Apply the tar at `rel` inside another (read-only) rootfs onto `dest`."""
    from stacker_kernel.oci.tarlayer import apply_layer, open_in_root

    fd = open_in_root(rootfs, rel)
    try:
        # the same file the hash was taken of, reached without re-resolving the path
        return apply_layer(f"/proc/self/fd/{fd}", dest, name=name)
    finally:
        os.close(fd)


def _import_stacker_tar(store: Store, url: str, resolve_built: Callable[[str], Snapshot] | None,
                        warn: Warn | None) -> Snapshot:
    """`stacker://LAYER/path/to.tar`: a tarball another layer of this build produced."""
    layer, _, rel = url[len(STACKER_URL):].partition("/")
    if not layer or not rel:
        raise ImageError(f"tar URL {url} is not stacker://LAYER/PATH: name the layer and the file in it")
    snap = _resolve_built(layer, resolve_built, url)
    try:
        digest = _in_container_ids(_hash_in_rootfs, str(snap.path), rel)
    except FileNotFoundError:
        raise ImageError(f"{url}: layer {layer} has no file /{rel}: fix the path or make the file in that layer") from None

    def populate(rootfs: Path) -> None:
        _report([_in_container_ids(_apply_tar_from_rootfs, str(snap.path), rel, str(rootfs), url)], warn)

    return store.add_base(f"tar-sha256-{digest}", populate, url)


# --- oci and docker -------------------------------------------------------------------

def _apply_layers(layers: list[str], rootfs: str, media_types: list[str] | None = None) -> list[ApplyReport]:
    """Apply layer blobs base-first, whiteouts hiding lower layers (one namespace for all).

    squashfs/erofs layers (stacker's layer types) are first turned into their
    OCI tar form beside the blob, then applied by the same rules as any tar.
    """
    from stacker_kernel.oci.layer_types import EROFS, SQUASHFS, fs_layer_to_tar, kind_of
    import tempfile

    from stacker_kernel.oci.tarlayer import apply_layer

    reports = []
    for blob, media_type in zip(layers, media_types or [""] * len(layers)):
        if kind_of(media_type) in (SQUASHFS, EROFS):
            fd, tmp = tempfile.mkstemp(prefix=".fs-layer-", suffix=".tar", dir=os.path.dirname(blob))
            os.close(fd)
            try:
                fs_layer_to_tar(blob, media_type, tmp, os.path.dirname(blob))
                reports.append(apply_layer(tmp, rootfs, name=f"{kind_of(media_type)} layer {os.path.basename(blob)}"))
            finally:
                os.unlink(tmp)
        else:
            reports.append(apply_layer(blob, rootfs))
    return reports


def _import_layout(store: Store, layout: OCILayout, tag: str, source: str, warn: Warn | None) -> Snapshot:
    from stacker_kernel.oci import cas

    image: ImageRef = layout.resolve(tag)
    base_id = "oci-" + image.manifest_digest.split(":", 1)[1]

    def keep_layers() -> list[str]:
        # Verified (size, digest, no symlinks) while copied into the store's own
        # cache; extraction then reads the private copy, which no one else can change.
        return [str(cas.copy_blob(layout.blobs, base_layers(store), ly.digest, ly.size,
                                  f"layer {ly.digest} of {layout.path}:{tag}")) for ly in image.layers]

    def populate(rootfs: Path) -> None:
        _report(_in_container_ids(_apply_layers, keep_layers(), str(rootfs),
                                  [ly.media_type for ly in image.layers]), warn)

    snap = store.add_base(base_id, populate, source)
    keep_layers()  # a base stored before this cache existed gets its copies now
    # rewritten on every import: it says where the image was found last
    _write_record(store, base_id, BaseImage(source, str(layout.path), tag, image.manifest_digest,
                                            image.manifest, image.config))
    return snap


def _import_oci(store: Store, ref: str, warn: Warn | None) -> Snapshot:
    from stacker_kernel.oci.layout import OCILayout, parse_oci_ref

    layout_dir, tag = parse_oci_ref(ref)
    return _import_layout(store, OCILayout(layout_dir), tag, ref, warn)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive flock on `path`: two importers never write one cache layout at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# What skopeo's last error line means, in the order checked: (words in it, the cause
# in plain words, the fix). {host} is the registry, {url} the image reference, {detail}
# the end of skopeo's message.
_INSECURE = ("write %from docker {url} --insecure in the cell (insecure: true in a stacker.yaml)"
             " if you trust it")
_SKOPEO_CAUSES: list[tuple[tuple[str, ...], str, str]] = [
    (("getting username and password",), "the registry credentials could not be read",
     "fix or remove the auth file skopeo names here: {detail}"),
    (("no such host", "server misbehaving", "temporary failure in name resolution"),
     "the DNS lookup of {host} failed", "check the host name and this machine's DNS"),
    (("connection refused",), "{host} refused the connection", "check the host and port"),
    (("http response to https client",), "{host} speaks plain HTTP, not HTTPS", _INSECURE),
    (("x509:", "certificate", "tls:"), "{host}'s TLS certificate is not trusted", _INSECURE),
    (("unauthorized", "authentication required", "access to the resource is denied"), "the registry refused access"
     " (unauthorized)", "check the repository name, or log in with 'skopeo login {host}'"),
    (("manifest unknown", "name unknown", "not found"), "the registry has no such image or tag"
     " (manifest unknown)", "check the repository and the tag"),
    (("toomanyrequests",), "the registry limits the rate of pulls", "wait, or log in with"
     " 'skopeo login {host}'"),
    (("network is unreachable", "no route to host"), "{host} is unreachable (no network route)",
     "check this machine's network"),
    (("i/o timeout", "timeout", "deadline exceeded"), "the connection to {host} timed out",
     "check the host and this machine's network"),
]


def registry_host(url: str) -> str:
    """The registry a `docker://REF` is pulled from, as docker resolves REF: its first
    component when that has a '.' or ':' or is localhost and more follows, else Docker
    Hub (`debian:bookworm`, `library/debian`: docker.io, served by registry-1.docker.io)."""
    ref = url.removeprefix("docker://")
    first, slash, _ = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io (registry-1.docker.io)"


def skopeo_failure(url: str, stderr: str, status: int) -> str:
    """One line from what a failed `skopeo copy` of `url` wrote: the cause in plain words
    and the fix (with the cell syntax where a flag helps), not skopeo's log."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    # skopeo logs as `time="..." level=fatal msg="..."`: the message is what counts
    msg = last.split(' msg="', 1)[1].rstrip('"') if ' msg="' in last else last
    msg = " ".join(msg.replace("\\n", " ").replace("\\t", " ").replace('\\"', '"').split())
    host = registry_host(url) if url.startswith("docker://") else url
    lowered = msg.lower()
    for words, cause, fix in _SKOPEO_CAUSES:
        if any(w in lowered for w in words):
            detail = msg.rsplit("* ", 1)[-1][:200]
            return (f"cannot pull {url}: {cause.format(host=host, url=url)}: "
                    f"{fix.format(host=host, url=url, detail=detail)}")
    why = msg.rsplit(": ", 1)[-1][:200] if msg else f"skopeo exited with status {status}"
    return (f"cannot pull {url} ({why}): check the URL and that the registry is reachable"
            f" (a plain-HTTP registry needs %from docker {url} --insecure)")


def _skopeo_copy(url: str, layout: Path, tag: str, insecure: bool) -> None:
    import subprocess

    exe = shutil.which("skopeo")
    if exe is None:
        raise ImageError(f"cannot import {url}: skopeo is missing; install Debian's skopeo package "
                         "(apt-get install skopeo)")
    # stacker accepts any image too (it copies with an accept-anything policy)
    cmd = [exe, "--insecure-policy", "copy", "--quiet"]
    if insecure:
        cmd.append("--src-tls-verify=false")
    cmd += [url, f"oci:{layout}:{tag}"]
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        # skopeo's own words stay in the kernel's log for whoever debugs
        _log().info("skopeo copy %s failed: %s", url, res.stderr.strip())
        raise ImageError(skopeo_failure(url, res.stderr, res.returncode))


def _import_docker(store: Store, url: str, insecure: bool, warn: Warn | None) -> Snapshot:
    if not url.startswith(("docker://", "oci:", "docker-archive:", "oci-archive:", "dir:")):
        raise ImageError(f"docker base {url!r} is not an image reference: write docker://HOST/REPO:TAG "
                         "or oci:LAYOUT_DIR:TAG")
    images = cache_root(store) / "images"
    # the tag is derived from the URL only: ref names allow few characters
    tag = "u-" + hashlib.sha256(url.encode()).hexdigest()[:40]
    # one lock around copy and extraction: the tag and its blobs stay put meanwhile
    with _locked(cache_root(store) / "images.lock"):
        # copied again every time, as stacker does: the registry's tag may have moved
        _skopeo_copy(url, images, tag, insecure)
        from stacker_kernel.oci.layout import OCILayout

        return _import_layout(store, OCILayout(images), tag, url, warn)


# --- built ----------------------------------------------------------------------------

def _resolve_built(name: str | None, resolve_built: Callable[[str], Snapshot] | None, what: str) -> Snapshot:
    if not name:
        raise ImageError(f"'from: built' needs the name of a layer ({what}): add 'tag: LAYER'")
    snap = resolve_built(name) if resolve_built is not None else None
    if snap is None:
        raise ImageError(f"layer {name} is not built yet: build it before a layer that uses it ({what})")
    return snap


# --- the entry point -----------------------------------------------------------------------

def import_base(store: Store, source: SourceLike, *,
                resolve_built: Callable[[str], Snapshot] | None = None,
                cache_dir: Path | None = None, warn: Warn | None = None) -> Snapshot:
    """The read-only snapshot a layer starts from, importing `source` if it is new.

    Guarantees: the result is a read-only subvolume recorded in `store`
    (for `built`, the other layer's snapshot as `resolve_built` returns it);
    an identical tar or image digest imported before is reused without
    extracting; failures are ImageError naming the source. Downloads go to
    `cache_dir` (default <root>/cache/downloads). Extraction warnings (device
    nodes made as empty files, owners that could not be set) go to `warn`,
    else to this module's logger.
    """
    kind = source.type
    url = source.url
    if kind == "scratch":
        return _import_scratch(store)
    if kind == "built":
        return _resolve_built(source.tag or url, resolve_built, "from: built")
    if not url:
        raise ImageError(f"'from: {kind}' needs a url: add 'url: ...' to the layer's from")
    if kind == "tar":
        downloads = cache_dir if cache_dir is not None else cache_root(store) / "downloads"
        return _import_tar(store, url, resolve_built, downloads, warn)
    if kind == "oci":
        return _import_oci(store, url, warn)
    if kind == "docker":
        return _import_docker(store, url, bool(getattr(source, "insecure", False)), warn)
    raise ImageError(f"unknown base type {kind!r}: use scratch, tar, oci, docker or built")

