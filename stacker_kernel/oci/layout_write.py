"""Write side of an OCI image layout: blobs, the layout header, tags.

Every file lands atomically (temp file + rename), JSON is canonical (sorted
keys, no spaces) so equal content gives equal digests, and index.json is
updated under a lock so two exports into one layout never lose a tag.
(Reading layouts is oci/layout.py's job.)
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from stacker_kernel.errors import ImageError
from stacker_kernel.oci import cas

MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Descriptor":
        """The descriptor `d` read from `where`; ImageError unless its digest and size are well-formed."""
        if not isinstance(d, dict):
            raise ImageError(f"{where} has a descriptor that is not an object: the image is broken; re-create it")
        annotations = d.get("annotations") or {}
        media_type = d.get("mediaType")
        if not isinstance(media_type, str) or not isinstance(annotations, dict):
            raise ImageError(f"{where} has a descriptor without a media type: the image is broken; re-create it")
        return cls(media_type, cas.check_digest(d.get("digest"), where), cas.check_size(d.get("size"), where),
                   {str(k): str(v) for k, v in annotations.items()})


def canonical_json(obj: Any) -> bytes:
    """The bytes we store for a JSON document: sorted keys, compact, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def blob_path(layout: str, digest: str) -> str:
    """Where blob `digest` goes in `layout`; ImageError for a malformed digest."""
    alg, _, hexdigest = cas.check_digest(digest, f"layout {layout}").partition(":")
    return os.path.join(layout, "blobs", alg, hexdigest)


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def init_layout(layout: str) -> None:
    """Make `layout` an OCI image layout if it is absent or an empty directory.

    An existing layout is kept as is. A non-empty directory without index.json
    is refused (as stacker does): it is probably not meant to be overwritten.
    """
    index = os.path.join(layout, "index.json")
    if os.path.exists(index):
        return
    if os.path.isdir(layout) and os.listdir(layout):
        raise ImageError(f"{layout} exists but is not an OCI layout (no index.json): choose another --oci-dir or remove it")
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    _atomic_write(os.path.join(layout, "oci-layout"), canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
    _atomic_write(index, canonical_json({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": []}))


def put_blob(layout: str, data: bytes, media_type: str) -> Descriptor:
    """Store `data` as a blob (no-op when present); its descriptor."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _atomic_write(path, data)
    return Descriptor(media_type, digest, len(data))


def put_json(layout: str, obj: Any, media_type: str) -> Descriptor:
    """Store a JSON document canonically; its descriptor."""
    return put_blob(layout, canonical_json(obj), media_type)


def copy_blob(src: cas.Blobs, dst_layout: str, desc: Descriptor, what: str | None = None) -> None:
    """Make the blob of `desc` present in `dst_layout`, copied from `src` and
    verified (digest and size) while copied; see cas.copy_blob."""
    cas.copy_blob(src, dst_layout, desc.digest, desc.size, what)


@contextlib.contextmanager
def _locked(layout: str) -> Iterator[None]:
    fd = os.open(os.path.join(layout, "oci-layout"), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def tagged_config(layout: str, tag: str) -> dict[str, Any] | None:
    """The image config `tag` points at in `layout` now; None when there is no such
    tag or any part of it is unreadable (then it is written anew)."""
    try:
        with open(os.path.join(layout, "index.json"), "rb") as f:
            index = json.load(f)
        found = [m for m in index.get("manifests") or []
                 if (m.get("annotations") or {}).get(REF_NAME) == tag]
        if len(found) != 1:
            return None
        with open(blob_path(layout, found[0]["digest"]), "rb") as f:
            manifest = json.load(f)
        with open(blob_path(layout, manifest["config"]["digest"]), "rb") as f:
            config = json.load(f)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImageError):
        return None
    return config if isinstance(config, dict) else None


def set_tags(layout: str, tagged: list[tuple[str, Descriptor]]) -> None:
    """Point each tag at its manifest in index.json.

    A tag that existed is replaced; the new descriptors are appended in the
    given (build) order after the untouched ones. An index that would not
    change is not rewritten.
    """
    new_tags = {tag for tag, _ in tagged}
    with _locked(layout):
        index_path = os.path.join(layout, "index.json")
        with open(index_path, "rb") as f:
            index = json.load(f)
        before = canonical_json(index)
        descs = []
        for tag, desc in tagged:
            d = desc.to_json()
            d["annotations"] = {**d.get("annotations", {}), REF_NAME: tag}
            descs.append(d)
        if all(d in (index.get("manifests") or []) for d in descs):
            return  # every tag points where it did: nothing moves (its attached documents stay after it)
        kept = [m for m in index.get("manifests") or []
                if (m.get("annotations") or {}).get(REF_NAME) not in new_tags]
        kept.extend(descs)
        index["manifests"] = kept
        index.setdefault("schemaVersion", 2)
        index.setdefault("mediaType", MEDIA_TYPE_INDEX)
        if canonical_json(index) != before:
            _atomic_write(index_path, canonical_json(index))


def update_index(layout: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Change index.json in place under the layout's lock: `change` edits the parsed
    index (e.g. adds untagged descriptors of artifact manifests)."""
    with _locked(layout):
        index_path = os.path.join(layout, "index.json")
        with open(index_path, "rb") as f:
            index = json.load(f)
        change(index)
        _atomic_write(index_path, canonical_json(index))
