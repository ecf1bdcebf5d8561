"""Documents attached to an image the OCI 1.1 way: artifact manifests whose
`subject` is the image manifest (image-spec 1.1, "Guidelines for Artifact Usage").

An attached document is a manifest with `artifactType` (the document's media
type), the empty config (`application/vnd.oci.empty.v1+json`, the blob `{}`)
and one layer: the document. In a layout, those manifests are listed untagged
in index.json (so garbage collectors keep them and `oras discover`-style
lookups find them); `referrers` is that lookup. Pushing them to a registry
(with the referrers tag fallback) is oci/publish.py's job.
"""
from __future__ import annotations

import hashlib
from typing import Any

from stacker_kernel.errors import ImageError
from stacker_kernel.oci import cas
from stacker_kernel.oci import layout_write as lw
from stacker_kernel.oci.layout import OCILayout

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_BLOB).hexdigest()
CREATED = "org.opencontainers.image.created"


def artifact_manifest(subject: dict[str, Any], artifact_type: str, document: lw.Descriptor,
                      created: str | None = None) -> dict[str, Any]:
    """The artifact manifest of `document` (a stored blob) about `subject` (a descriptor)."""
    empty = {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_BLOB)}
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": lw.MEDIA_TYPE_MANIFEST,
                                "artifactType": artifact_type, "config": empty,
                                "layers": [document.to_json()],
                                "subject": {k: subject[k] for k in ("mediaType", "digest", "size")}}
    if created:
        manifest["annotations"] = {CREATED: created}
    return manifest


def tagged_manifest(layout_dir: str, tag: str) -> dict[str, Any]:
    """The index descriptor of the image manifest tagged `tag` (read from index.json,
    whatever its layers are); ImageError when the tag is missing or not a manifest."""
    for d in _descriptors(layout_dir):
        if (d.get("annotations") or {}).get(lw.REF_NAME) == tag:
            if d.get("mediaType") != lw.MEDIA_TYPE_MANIFEST:
                raise ImageError(f"tag {tag} of {layout_dir} is a {d.get('mediaType')}, not an image "
                                 "manifest: documents attach to image manifests only")
            cas.check_digest(d.get("digest"), f"tag {tag} of {layout_dir}")
            cas.check_size(d.get("size"), f"tag {tag} of {layout_dir}")
            return {k: d[k] for k in ("mediaType", "digest", "size")}
    raise ImageError(f"tag {tag} is not in {layout_dir}: export the image first")


def _descriptors(layout_dir: str) -> list[dict[str, Any]]:
    return [d for d in OCILayout(layout_dir).index.get("manifests") or [] if isinstance(d, dict)]


def _subject_of(layout: str, desc: dict[str, Any]) -> str | None:
    """The subject digest of the artifact manifest `desc` lists (None if it has none)."""
    if not desc.get("artifactType"):
        return None
    try:
        manifest = cas.Blobs(layout).read_json(desc.get("digest"), desc.get("size"))
    except ImageError:
        return None
    subject = manifest.get("subject")
    return subject.get("digest") if isinstance(subject, dict) else None


def attach(layout_dir: str, tag: str, documents: list[tuple[str, bytes]], *,
           created: str | None = None) -> list[dict[str, Any]]:
    """Attach `documents` ((artifact type, bytes) pairs) to the image tagged `tag`
    in `layout_dir`; the index descriptors of their manifests.

    A document of the same type attached to that image before is replaced, and
    artifacts about images no tag points at any more are dropped from the index
    (a re-export replaces its images).
    """
    subject = tagged_manifest(layout_dir, tag)
    lw.put_blob(layout_dir, EMPTY_BLOB, EMPTY_MEDIA_TYPE)
    added: list[dict[str, Any]] = []
    for artifact_type, data in documents:
        doc = lw.put_blob(layout_dir, data, artifact_type)
        desc = lw.put_json(layout_dir, artifact_manifest(subject, artifact_type, doc, created), lw.MEDIA_TYPE_MANIFEST)
        added.append({**desc.to_json(), "artifactType": artifact_type})
    types = {t for t, _ in documents}

    def change(index: dict[str, Any]) -> None:
        manifests = [d for d in index.get("manifests") or [] if isinstance(d, dict)]
        tagged = {d.get("digest") for d in manifests if (d.get("annotations") or {}).get(lw.REF_NAME)}
        kept = []
        for d in manifests:
            about = _subject_of(layout_dir, d)
            if about is not None and (about not in tagged or (about == subject["digest"]
                                                              and d.get("artifactType") in types)):
                continue
            kept.append(d)
        index["manifests"] = kept + [d for d in added if d["digest"] not in {k.get("digest") for k in kept}]

    lw.update_index(layout_dir, change)
    return added


def referrers(layout_dir: str, manifest_digest: str, artifact_type: str | None = None) -> list[dict[str, Any]]:
    """The index descriptors of the artifact manifests in `layout_dir` whose subject is
    `manifest_digest` (and of `artifact_type`, if given): what `oras discover` finds."""
    out = []
    for d in _descriptors(layout_dir):
        if artifact_type is not None and d.get("artifactType") != artifact_type:
            continue
        if _subject_of(layout_dir, d) == manifest_digest:
            out.append(d)
    return out


def read_document(layout_dir: str, desc: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """(the artifact manifest, its document's bytes) of the index descriptor `desc`, verified."""
    blobs = cas.Blobs(layout_dir)
    manifest = blobs.read_json(desc.get("digest"), desc.get("size"))
    layers = manifest.get("layers") or []
    if len(layers) != 1 or not isinstance(layers[0], dict):
        raise ImageError(f"artifact {desc.get('digest')} of {layout_dir} has no single document layer: re-export it")
    return manifest, blobs.read(layers[0].get("digest"), layers[0].get("size"))
