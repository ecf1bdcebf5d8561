"""Snapshot chains -> an OCI image layout, tagged as stacker tags its output.

One image per stacker layer, tag = layer name, manifests in build order;
build_only layers get no tag and their diffs are carried into their children
as layers (stacker's pkg/stacker/build.go). By default every step (cell) that
changed something is one OCI layer, and a step that changed nothing is a
history entry with `empty_layer`; `squash=True` makes one layer per stacker
layer, as stacker emits. The image config follows stacker's rules:
environment appended, labels and volumes merged, `cmd`/`entrypoint` assigned
(never inherited), `full_command` sets Entrypoint and clears Cmd.

Same inputs and the same SOURCE_DATE_EPOCH give byte-identical manifests:
timestamps come from the epoch, tar mtimes are clamped to it, JSON is
canonical, and nothing depends on dict or directory order.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import getpass
import hashlib
import json
import os
import platform
import shlex
import socket
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.errors import ImageError, RecipeError
from stacker_kernel.oci import cas
from stacker_kernel.oci import layout_write as lw
from stacker_kernel.oci.diff import Diff, diff_snapshots
from stacker_kernel.oci.layer_types import (TAR_TYPE, FsLayerBlob, LayerType, write_fs_layer,
                                            write_whole_fs_layer)
from stacker_kernel.oci.layout import OCILayout
from stacker_kernel.oci.tarwriter import LayerBlob, write_layer
from stacker_kernel.recipe.model import first_line, human_size

STACKER_VERSION = "stacker-kernel 0.1.0"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: annotations `io.stacker-kernel.config.ExposedPorts` ("80/tcp 53/udp") and `...StopSignal`
#: also set those image config fields, which stacker has no key for
CONFIG_ANNOTATION = "io.stacker-kernel.config."
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class StepSnapshot:
    """The read-only snapshot after one step, with the step's script.

    `created_by` overrides the history text (default: `stacker-kernel step N of
    layer NAME: <first line of source>`).
    """
    path: str
    source: str = ""
    created_by: str | None = None


@dataclass(frozen=True)
class OciBase:
    """An OCI base image as it was imported: its layers are copied as-is.

    `manifest` (whose digest is `manifest_digest`) and `config` are the ones
    the base rootfs was unpacked from, never what a tag says now: a moved tag
    must not put another image's layers under diffs made against this
    rootfs. The layer blobs are taken from the first of `blob_dirs` (the
    store's copies, then the source layout) that holds them, verified while
    copied. `name` says which base it is in messages (its `from`).
    """
    name: str
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    blob_dirs: tuple[str, ...]

    @classmethod
    def from_layout(cls, layout: str, tag: str) -> "OciBase":
        """The image `tag` of the OCI layout `layout` as it is now (read verified)."""
        image = OCILayout(layout).resolve(tag)
        return cls(f"{layout}:{tag}", image.manifest_digest, image.manifest, image.config, (layout,))


@dataclass
class ImageSpec:
    """One stacker layer to export.

    `config` is any object with the stacker directives as attributes
    (`environment`, `labels`, `cmd`, `entrypoint`, `full_command`,
    `working_dir`, `volumes`, `runtime_user`, `annotations`, `os`, `arch`,
    `build_only`), e.g. recipe.model.Layer. The image starts from:
    `parent` (the name of an earlier ImageSpec in the same export, a `built`
    base), else `base_oci` (whose unpacked rootfs is the snapshot
    `base_rootfs`), else empty; a `base_rootfs` without `base_oci` (a tar
    base) becomes a layer of its own, described by `base_created_by`.
    `steps` run from that rootfs, in order.
    """
    name: str
    config: Any
    steps: list[StepSnapshot] = field(default_factory=list)
    base_rootfs: str | None = None
    base_oci: OciBase | None = None
    base_created_by: str | None = None
    parent: str | None = None

    @property
    def build_only(self) -> bool:
        return bool(getattr(self.config, "build_only", False))


@dataclass
class _Image:
    """An image under construction: config JSON, layer descriptors, manifest annotations."""
    config: dict[str, Any]
    layers: list[lw.Descriptor]
    annotations: dict[str, str]
    tip: str | None  # the rootfs the image's layers produce


@dataclass(frozen=True)
class _Job:
    """One layer to make: diff `old` -> `new`; history text for it."""
    old: str | None
    new: str
    created_by: str


def source_date_epoch_from_env(environ: dict[str, str] | None = None) -> int | None:
    """SOURCE_DATE_EPOCH from the environment, None when unset."""
    value = (environ if environ is not None else os.environ).get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise RecipeError(f"invalid SOURCE_DATE_EPOCH {value!r}: set it to a whole number of seconds since 1970")
    return int(value)


def export_image(layout_dir: str, images: list[ImageSpec], *, source_date_epoch: int | None = None,
                 annotations_namespace: str = "io.stackeroci", stacker_yaml: str | None = None,
                 squash: bool = False, layer_cache: str | None = None,
                 progress: Callable[[str], None] | None = None,
                 layer_types: tuple[LayerType, ...] = (TAR_TYPE,)) -> list[str]:
    """Write `images` (in build order) into the OCI layout `layout_dir` and
    return the tags written (the names of the non-build_only images).

    One image per layer type (oci/layer_types.py): tagged NAME for tar,
    NAME-squashfs / NAME-erofs otherwise, as stacker tags them.

    Creates the layout when absent; an existing tag is replaced. Diffs and
    tars of one image run in one user-namespace helper. With `layer_cache` (a
    directory), layers made before from the same snapshots are reused when the
    layout still holds their blobs. `progress` gets a line per layer made (in
    the calling thread) and per image written. Raises ImageError when
    a base or parent is missing or a snapshot cannot be read.
    """
    lw.init_layout(layout_dir)
    tags: list[str] = []
    for layer_type in layer_types:
        tags += _export_type(layout_dir, images, layer_type, source_date_epoch, annotations_namespace,
                             stacker_yaml, squash, layer_cache, progress)
    return tags


def _export_type(layout_dir: str, images: list[ImageSpec], layer_type: LayerType, source_date_epoch: int | None,
                 annotations_namespace: str, stacker_yaml: str | None, squash: bool,
                 layer_cache: str | None, progress: Callable[[str], None] | None) -> list[str]:
    created = _timestamp(source_date_epoch)
    author = "stacker" if source_date_epoch is not None else f"{getpass.getuser()}@{socket.gethostname()}"
    built: dict[str, _Image] = {}
    tagged: list[tuple[str, lw.Descriptor]] = []
    for spec in images:
        image = _start(layout_dir, spec, built, layer_type)
        jobs = _jobs(spec, image.tip, squash, layer_type)
        blobs = _run_jobs(layout_dir, jobs, source_date_epoch, layer_cache,
                          _layer_progress(progress, layer_type.tag(spec.name), jobs), layer_type)
        for job, blob in zip(jobs, blobs):
            entry: dict[str, Any] = {"created": created, "created_by": job.created_by}
            if blob is None:
                entry["empty_layer"] = True
            else:
                image.layers.append(_descriptor(blob))
                image.config["rootfs"]["diff_ids"].append(blob.diff_id)
            image.config["history"].append(entry)
        if jobs:
            image.tip = jobs[-1].new
        if not spec.build_only:
            _apply_directives(image, spec.config)
            image.config["history"].append({"created": created, "created_by": f"stacker build of {spec.name}: image config",
                                            "author": author, "empty_layer": True})
            image.config["created"], image.config["author"] = created, author
            _ensure_a_layer(layout_dir, image, spec.name, created, layer_type)
            manifest = _write_manifest(layout_dir, image, spec, annotations_namespace, stacker_yaml)
            tagged.append((layer_type.tag(spec.name), manifest))
            if progress is not None:
                total = sum(d.size for d in image.layers)
                progress(f"image {layer_type.tag(spec.name)}: {len(image.layers)} layer(s), {human_size(total)}, "
                         f"manifest {manifest.digest[:19]}")
        built[spec.name] = image
    lw.set_tags(layout_dir, tagged)
    return [tag for tag, _ in tagged]


# --- start of an image -------------------------------------------------------

def _descriptor(blob: LayerBlob) -> lw.Descriptor:
    annotations = blob.annotations if isinstance(blob, FsLayerBlob) else {}
    return lw.Descriptor(blob.media_type, blob.digest, blob.size, annotations)


def _converts_base(spec: ImageSpec, layer_type: LayerType) -> bool:
    """Whether the OCI base's layers are of another type than the output: then,
    as stacker converts them (pkg/overlay/pack.go ConvertAndOutput), the base's
    rootfs becomes one layer of the output type."""
    if spec.parent is not None or spec.base_oci is None:
        return False
    layers = spec.base_oci.manifest.get("layers") or []
    return not all(isinstance(d, dict) and layer_type.matches(str(d.get("mediaType", "")), d.get("annotations"))
                   for d in layers)


def _start(layout_dir: str, spec: ImageSpec, built: dict[str, _Image],
           layer_type: LayerType = TAR_TYPE) -> _Image:
    if spec.parent is not None:
        if spec.parent not in built:
            raise ImageError(f"layer {spec.name} is built from {spec.parent}, which is not exported before it: export {spec.parent} first")
        return copy.deepcopy(built[spec.parent])
    if spec.base_oci is not None:
        if spec.base_rootfs is None:
            raise ImageError(f"layer {spec.name}: the OCI base {spec.base_oci.name} has no unpacked rootfs to diff against: import the base first")
        if _converts_base(spec, layer_type):
            config = copy.deepcopy(spec.base_oci.config)
            config.setdefault("config", {})
            config["rootfs"] = {"type": "layers", "diff_ids": []}
            config["history"] = []  # one converted layer stands for the base's layers
            annotations = {k: v for k, v in (spec.base_oci.manifest.get("annotations") or {}).items() if k != lw.REF_NAME}
            return _Image(config, [], annotations, None)
        return _from_oci(layout_dir, spec.name, spec.base_oci, spec.base_rootfs)
    config = {"architecture": _host_arch(), "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": []}, "history": []}
    return _Image(config, [], {}, None)


def _from_oci(layout_dir: str, name: str, base: OciBase, rootfs: str) -> _Image:
    config = copy.deepcopy(base.config)
    config.setdefault("config", {})
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    config.setdefault("history", [])
    where = f"manifest {base.manifest_digest} of base {base.name}"
    layers = [lw.Descriptor.from_json(d, where) for d in base.manifest.get("layers") or []]
    for d in layers:
        _copy_base_layer(layout_dir, name, base, d)
    annotations = {k: v for k, v in (base.manifest.get("annotations") or {}).items() if k != lw.REF_NAME}
    return _Image(config, layers, annotations, rootfs)


def _copy_base_layer(layout_dir: str, name: str, base: OciBase, desc: lw.Descriptor) -> None:
    """Copy one layer of the base into the output, verified; never another image's layer."""
    for directory in base.blob_dirs:
        blobs = cas.Blobs(directory)
        what = f"layer {desc.digest} of base {base.name} of layer {name} (in {directory})"
        if blobs.has(desc.digest, what):
            lw.copy_blob(blobs, layout_dir, desc, what)
            return
    raise ImageError(f"layer {name}: base {base.name} layer {desc.digest} is gone from "
                     f"{' and '.join(base.blob_dirs)}: rebuild the layer to import its base again")


def _host_arch() -> str:
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


# --- layers ----------------------------------------------------------------------

def _jobs(spec: ImageSpec, start: str | None, squash: bool, layer_type: LayerType = TAR_TYPE) -> list[_Job]:
    """The diffs that make this image's own layers, base first."""
    jobs: list[_Job] = []
    if spec.parent is None and spec.base_oci is None and spec.base_rootfs is not None:
        jobs.append(_Job(None, spec.base_rootfs, spec.base_created_by or f"stacker-kernel base of layer {spec.name}"))
        start = spec.base_rootfs
    elif _converts_base(spec, layer_type):
        assert spec.base_oci is not None and spec.base_rootfs is not None
        jobs.append(_Job(None, spec.base_rootfs, f"stacker-kernel base {spec.base_oci.name} as {layer_type.type}"))
        start = spec.base_rootfs
    if not spec.steps:
        return jobs
    if squash:
        jobs.append(_Job(start, spec.steps[-1].path, f"stacker build of {spec.name}"))
        return jobs
    prev = start
    for i, step in enumerate(spec.steps, 1):
        text = step.created_by or f"stacker-kernel step {i} of layer {spec.name}: {first_line(step.source, width=200, empty='(empty)')}"
        jobs.append(_Job(prev, step.path, text))
        prev = step.path
    return jobs


def _layers_in_userns(jobs: list[_Job], layout_dir: str, epoch: int | None,
                      layer_type: LayerType = TAR_TYPE, progress_fd: int | None = None) -> list[LayerBlob | None]:
    """Diff and tar (or pack, for squashfs/erofs) each job (inside the user
    namespace); None for an empty diff. With `progress_fd`, a line `INDEX SIZE`
    per job (-1: empty) as each is done."""
    out: list[LayerBlob | None] = []
    walks: dict = {}  # a step's snapshot is the next step's older side: walked once for both
    for i, job in enumerate(jobs):
        for path in [p for p in walks if p != job.old]:
            del walks[path]  # only the walk this job shares is kept (a rootfs's entries each)
        if layer_type.type != "tar" and job.old is None and epoch is None:
            # a whole rootfs: packed from the snapshot while its directories are scanned (walked
            # in full when the next layer's diff needs its walk)
            shared = walks if any(later.old == job.new for later in jobs[i + 1:]) else None
            out.append(write_whole_fs_layer(job.new, layout_dir, layer_type,
                                            scratch_dir=_scratch_beside(job.new), walks=shared))
        elif (diff := diff_snapshots(job.old, job.new, walks)).empty:
            out.append(None)
        elif layer_type.type == "tar":
            out.append(write_layer(job.new, diff, layout_dir, source_date_epoch=epoch,
                                   compression=layer_type.compression))
        else:
            out.append(write_fs_layer(job.new, diff, layout_dir, layer_type, source_date_epoch=epoch,
                                      scratch_dir=_scratch_beside(job.new)))
        if progress_fd is not None:
            os.write(progress_fd, f"{i} {out[-1].size if out[-1] else -1}\n".encode())
    return out


def _layer_progress(progress: Callable[[str], None] | None, name: str, jobs: list[_Job]):
    """The callback for _run_jobs: (job index, blob or None, seconds, reused) -> one line."""
    if progress is None:
        return None

    def done(i: int, blob: LayerBlob | None, seconds: float, reused: bool) -> None:
        if reused:
            return  # a re-export says nothing per unchanged layer: the image line sums them
        what = "no change" if blob is None else human_size(blob.size)
        progress(f"image {name}: layer {i + 1}/{len(jobs)} ({first_line(jobs[i].created_by, width=60)}): "
                 f"{what} in {seconds:.1f}s")
    return done


def _made_in_userns(jobs: list[_Job], layout_dir: str, epoch: int | None, layer_type: LayerType,
                    done) -> list[LayerBlob | None]:
    """_layers_in_userns, calling `done(i, blob, seconds, False)` here (the calling
    thread) as each layer is finished in the helper, which runs from a worker thread."""
    if done is None:
        return run_in_userns(_layers_in_userns, jobs, layout_dir, epoch, layer_type)
    r, w = os.pipe2(os.O_CLOEXEC)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["ok"] = run_in_userns(_layers_in_userns, jobs, layout_dir, epoch, layer_type, w)
        except BaseException as e:  # raised again in the calling thread
            result["err"] = e
        finally:
            os.close(w)  # the helper has exited: the reader below sees the end

    worker = threading.Thread(target=work, name="export-layers", daemon=True)
    last = time.monotonic()
    worker.start()
    with os.fdopen(r, "r") as lines:
        for line in lines:
            i, size = (int(x) for x in line.split())
            now = time.monotonic()
            done(i, None if size < 0 else LayerBlob("", "", size, "", False), now - last, False)
            last = now
    worker.join()
    if "err" in result:
        raise result["err"]
    return result["ok"]


def _scratch_beside(snapshot: str) -> str | None:
    # <root>/snapshots/<id> -> <root>/cache: the same btrfs, so files are reflinked, not copied
    cache = os.path.join(os.path.dirname(os.path.dirname(snapshot)), "cache")
    return cache if os.path.isdir(cache) and os.access(cache, os.W_OK) else None


_MISS = object()


def _cache_file(cache_dir: str, job: _Job, epoch: int | None, layer_type: LayerType = TAR_TYPE) -> str:
    # Snapshots are read-only and their paths never reused, so (old, new, epoch) fixes the layer.
    kind = "" if layer_type == TAR_TYPE else f"|{layer_type}"
    key = hashlib.sha256(f"v1|{job.old}|{job.new}|{epoch}{kind}".encode()).hexdigest()
    return os.path.join(cache_dir, key + ".json")


def kept_blobs(cache_dir: str) -> str:
    """Where the blobs of the layers `cache_dir` remembers are kept (an OCI-style
    `blobs/sha256/` tree beside it, in the store): a layer made once is copied
    into any later layout, never compressed again."""
    return os.path.join(os.path.dirname(os.path.abspath(cache_dir)), "layer-blobs")


_PLACES = 4  # other layouts remembered as holding a layer's blob (when the store cannot keep a reflink)


def _read_entry(cache_dir: str, job: _Job, epoch: int | None, layer_type: LayerType) -> dict[str, Any] | None:
    try:
        with open(_cache_file(cache_dir, job, epoch, layer_type)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cached_layer(cache_dir: str | None, layout_dir: str, job: _Job, epoch: int | None,
                  layer_type: LayerType = TAR_TYPE):
    """The layer made before for `job` if its blob is in `layout_dir` or can be
    copied there (verified while copied) from the store's kept blobs or another
    layout that holds it (None: an empty diff), else _MISS."""
    data = _read_entry(cache_dir, job, epoch, layer_type) if cache_dir is not None else None
    if data is None:
        return _MISS
    if data.get("empty"):
        return None
    places = [kept_blobs(cache_dir)] + [p for p in data.pop("places", []) if isinstance(p, str)]
    data.pop("snapshots", None)
    try:
        blob = LayerBlob(**data) if layer_type.type == "tar" else FsLayerBlob(**data)
        if os.path.getsize(lw.blob_path(layout_dir, blob.digest)) == blob.size:
            return blob
        return _MISS  # a damaged blob under that name: made again
    except FileNotFoundError:
        pass
    except (OSError, TypeError, ValueError, ImageError):
        return _MISS
    for place in places:
        if os.path.abspath(place) == os.path.abspath(layout_dir):
            continue
        try:
            cas.copy_blob(cas.Blobs(place), layout_dir, blob.digest, blob.size)
            return blob
        except ImageError:  # damaged: not used again
            if place == places[0]:
                with contextlib.suppress(OSError, ImageError):
                    os.unlink(lw.blob_path(place, blob.digest))
        except OSError:
            pass  # gone
    return _MISS


def _reflink_into(src: str, dest: str, or_copy: bool = False) -> bool:
    """`src` reflinked to `dest` (atomically; True), when both are on one btrfs; with
    `or_copy`, copied where no reflink can be made."""
    from stacker_kernel.storage.btrfs import FICLONE

    if os.path.exists(dest):
        return True
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        with open(src, "rb") as s, open(tmp, "wb") as d:
            try:
                fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            except OSError:
                if not or_copy:
                    raise
                shutil.copyfileobj(s, d, 1 << 20)
        os.replace(tmp, dest)
        return True
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return False


def _remember_layer(cache_dir: str | None, layout_dir: str, job: _Job, epoch: int | None,
                    blob: LayerBlob | None, layer_type: LayerType = TAR_TYPE, keep: bool = False) -> None:
    """Remember the layer made for `job` (its blob in `layout_dir`): kept in the store
    as a reflink when the layout is on the store's btrfs (no data copied), else
    the layout is remembered as a place to copy it from; with `keep` (a layout about
    to be deleted) copied into the store instead."""
    if cache_dir is None:
        return
    os.makedirs(cache_dir, exist_ok=True)
    data: dict[str, Any] = {"empty": True} if blob is None else asdict(blob)
    if blob is not None:
        kept = lw.blob_path(kept_blobs(cache_dir), blob.digest)
        if not _reflink_into(lw.blob_path(layout_dir, blob.digest), kept, or_copy=keep):
            before = (_read_entry(cache_dir, job, epoch, layer_type) or {}).get("places") or []
            data["places"] = ([os.path.abspath(layout_dir)]
                              + [p for p in before if p != os.path.abspath(layout_dir)])[:_PLACES]
    data["snapshots"] = [p for p in (job.old, job.new) if p]  # what gc checks (prune_layer_cache)
    tmp = _cache_file(cache_dir, job, epoch, layer_type) + f".tmp{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, _cache_file(cache_dir, job, epoch, layer_type))


def layer_made_before(cache_dir: str, old: str, new: str, dest_dir: str) -> LayerBlob | None:
    """The tar layer of `old` -> `new` (no SOURCE_DATE_EPOCH) copied into `dest_dir`
    when it was made before (by an export or a push), else None."""
    hit = _cached_layer(cache_dir, dest_dir, _Job(old, new, ""), None)
    return hit if isinstance(hit, LayerBlob) else None


def remember_made_layer(cache_dir: str, old: str, new: str, dest_dir: str, blob: LayerBlob) -> None:
    """Remember the tar layer of `old` -> `new` (no SOURCE_DATE_EPOCH) made into
    `dest_dir`: an export of that step copies it instead of making it again."""
    with contextlib.suppress(OSError):  # an empty diff is no layer in an export (an empty_layer entry)
        _remember_layer(cache_dir, dest_dir, _Job(old, new, ""), None, None if blob.empty else blob, keep=True)


def prune_layer_cache(cache_dir: str) -> int:
    """Forget the layers of snapshots that are gone and delete the kept blobs no
    remembered layer names; the bytes deleted. For `gc`, after it removed snapshots."""
    if not os.path.isdir(cache_dir):
        return 0
    wanted: set[str] = set()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or not all(os.path.isdir(p) for p in data.get("snapshots") or [""]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a layer of a deleted snapshot (or a torn or old-format entry)
            continue
        if isinstance(data.get("digest"), str):
            wanted.add(data["digest"].partition(":")[2])
    freed = 0
    blob_dir = os.path.join(kept_blobs(cache_dir), "blobs", "sha256")
    for name in os.listdir(blob_dir) if os.path.isdir(blob_dir) else []:
        if name not in wanted:
            path = os.path.join(blob_dir, name)
            with contextlib.suppress(FileNotFoundError):
                freed += os.lstat(path).st_size
                os.unlink(path)
    return freed


def _run_jobs(layout_dir: str, jobs: list[_Job], epoch: int | None,
              cache_dir: str | None = None, done=None,
              layer_type: LayerType = TAR_TYPE) -> list[LayerBlob | None]:
    """The layer of each job: from `cache_dir` when this layout already holds it (a
    re-export after a cached build costs no diff and no gzip), else made now.
    `done(index, blob, seconds, reused)` follows each job."""
    results: list[LayerBlob | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        hit = _cached_layer(cache_dir, layout_dir, job, epoch, layer_type)
        if hit is _MISS:
            todo.append(i)
        else:
            results[i] = hit
            if done is not None:
                done(i, hit, 0.0, True)
    if todo:
        report = None if done is None else (lambda k, blob, secs, reused: done(todo[k], blob, secs, reused))
        made = _made_in_userns([jobs[i] for i in todo], os.path.abspath(layout_dir), epoch, layer_type, report)
        for i, blob in zip(todo, made):
            results[i] = blob
            _remember_layer(cache_dir, layout_dir, jobs[i], epoch, blob, layer_type)
    return results


def _ensure_a_layer(layout_dir: str, image: _Image, name: str, created: str,
                    layer_type: LayerType = TAR_TYPE) -> None:
    # The manifest schema requires at least one layer: an image of nothing
    # (scratch, no changes) gets one empty tar layer (or empty filesystem).
    if image.layers:
        return
    if layer_type.type == "tar":
        blob: LayerBlob = write_layer("/", Diff(old=None, new="/"), layout_dir, compression=layer_type.compression)
    else:
        blob = run_in_userns(write_fs_layer, "/", Diff(old=None, new="/"), os.path.abspath(layout_dir), layer_type)
    image.layers.append(_descriptor(blob))
    image.config["rootfs"]["diff_ids"].append(blob.diff_id)
    image.config["history"].append({"created": created, "created_by": f"stacker-kernel empty rootfs of layer {name}"})


# --- config and manifest -----------------------------------------------------------

def _command(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _apply_directives(image: _Image, layer: Any) -> None:
    """stacker's updateOCIConfigForOutput on `image` (stacker's pkg/stacker/build.go)."""
    cfg = image.config.setdefault("config", {})
    env: list[str] = list(cfg.get("Env") or [])
    for key, value in (getattr(layer, "environment", None) or {}).items():
        # stacker appends; replacing an inherited KEY= in place gives the
        # same effective value without duplicate keys.
        entry = f"{key}={value}"
        at = next((i for i, e in enumerate(env) if e.split("=", 1)[0] == key), None)
        if at is None:
            env.append(entry)
        else:
            env[at] = entry
    if not any(e.startswith("PATH=") for e in env):
        env.append(DEFAULT_PATH)
    cfg["Env"] = env
    labels = getattr(layer, "labels", None) or {}
    if labels:
        cfg["Labels"] = {**(cfg.get("Labels") or {}), **{k: str(v) for k, v in labels.items()}}
    volumes = getattr(layer, "volumes", None) or []
    if volumes:
        cfg["Volumes"] = {**(cfg.get("Volumes") or {}), **{v: {} for v in volumes}}
    full_command = _command(getattr(layer, "full_command", None))
    if full_command is not None:
        cmd, entrypoint = None, full_command
    else:  # assigned, never inherited (stacker since bb555f0)
        cmd, entrypoint = _command(getattr(layer, "cmd", None)), _command(getattr(layer, "entrypoint", None))
    for key, value in (("Cmd", cmd), ("Entrypoint", entrypoint)):
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    if getattr(layer, "working_dir", None):
        cfg["WorkingDir"] = layer.working_dir
    if getattr(layer, "runtime_user", None):
        cfg["User"] = str(layer.runtime_user)
    # stacker has no keys for these config fields; an annotation of ours names them
    # (a Dockerfile's EXPOSE and STOPSIGNAL), as a stacker.yaml can carry it.
    annotations = getattr(layer, "annotations", None) or {}
    ports = annotations.get(CONFIG_ANNOTATION + "ExposedPorts")
    if ports is not None:
        cfg["ExposedPorts"] = {**(cfg.get("ExposedPorts") or {}), **{p: {} for p in ports.split()}}
    if annotations.get(CONFIG_ANNOTATION + "StopSignal"):
        cfg["StopSignal"] = annotations[CONFIG_ANNOTATION + "StopSignal"]
    if annotations.get(CONFIG_ANNOTATION + "OnBuild"):  # a Dockerfile's ONBUILD (a JSON list)
        cfg["OnBuild"] = json.loads(annotations[CONFIG_ANNOTATION + "OnBuild"])
    if getattr(layer, "os", None):
        image.config["os"] = layer.os
    if getattr(layer, "arch", None):
        image.config["architecture"] = layer.arch


def _without_times(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in ("created", "history")}
    out["history"] = [{k: v for k, v in h.items() if k != "created"} if isinstance(h, dict) else h
                      for h in config.get("history") or []]
    return out


def _write_manifest(layout_dir: str, image: _Image, spec: ImageSpec, ns: str, stacker_yaml: str | None) -> lw.Descriptor:
    # Without SOURCE_DATE_EPOCH the times are "now": an image that differs from the
    # one its tag points at only in them keeps that config, so a re-export of
    # unchanged snapshots writes nothing new and keeps its digests.
    previous = lw.tagged_config(layout_dir, spec.name)
    if previous is not None and _without_times(previous) == _without_times(image.config):
        image.config = previous
    config_desc = lw.put_json(layout_dir, image.config, lw.MEDIA_TYPE_CONFIG)
    annotations = dict(image.annotations)
    if stacker_yaml is not None:
        annotations[f"{ns}.stacker.stacker_yaml"] = stacker_yaml
    annotations[f"{ns}.stacker.stacker_version"] = STACKER_VERSION
    annotations.update({k: str(v) for k, v in (getattr(spec.config, "annotations", None) or {}).items()})
    image.annotations = annotations
    manifest = {"schemaVersion": 2, "mediaType": lw.MEDIA_TYPE_MANIFEST, "config": config_desc.to_json(),
                "layers": [d.to_json() for d in image.layers], "annotations": annotations}
    return lw.put_json(layout_dir, manifest, lw.MEDIA_TYPE_MANIFEST)


def _timestamp(epoch: int | None) -> str:
    when = (datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc) if epoch is not None
            else datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0))
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
