"""Pushing an image's attached documents (oci/attach.py) along with the image.

To a registry: each artifact manifest is put by digest after its blobs (the
empty config and the document). A registry with the referrers API says so with
an `OCI-Subject` header on that put; for one without (Debian's docker-registry,
distribution 2.8), the referrers tag schema of distribution-spec 1.1 is kept
up to date as well: the tag `sha256-<hex of the image digest>` points at an
image index listing the artifacts. To another OCI layout: the manifests and
their blobs are copied and listed in its index.json, as in ours.

When the copy of the image got another digest than the layout's (a registry
that converted it), the artifacts are rewritten to refer to the digest pushed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from stacker_kernel.errors import ImageError
from stacker_kernel.oci import attach, cas
from stacker_kernel.oci import layout_write as lw
from stacker_kernel.oci.registry import RegistryCache

FALLBACK_ACCEPT = lw.MEDIA_TYPE_INDEX


def fallback_tag(digest: str) -> str:
    """The referrers tag of manifest `digest` (distribution-spec 1.1): sha256-<hex>."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}-{hexdigest}"


def _artifacts(layout_dir: str, manifest_digest: str, types: set[str]) -> list[tuple[dict, bytes, bytes]]:
    """(index descriptor, raw manifest bytes, document bytes) of each artifact about
    `manifest_digest` whose type is in `types`."""
    blobs = cas.Blobs(layout_dir)
    out = []
    for desc in attach.referrers(layout_dir, manifest_digest):
        if desc.get("artifactType") not in types:
            continue
        raw = blobs.read(desc["digest"], desc["size"])
        _, document = attach.read_document(layout_dir, desc)
        out.append((desc, raw, document))
    return out


def _retarget(raw: bytes, subject: dict[str, Any]) -> bytes:
    """The artifact manifest `raw`, about `subject` instead (unchanged when it already is)."""
    manifest = json.loads(raw)
    if manifest["subject"]["digest"] == subject["digest"]:
        return raw
    manifest["subject"] = subject
    return lw.canonical_json(manifest)


def _descriptor(raw: bytes, artifact_type: str) -> dict[str, Any]:
    return {"mediaType": lw.MEDIA_TYPE_MANIFEST, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
            "size": len(raw), "artifactType": artifact_type}


def push_to_registry(layout_dir: str, manifest_digest: str, destination: str, pushed_digest: str,
                     types: set[str], authfile: str | None) -> list[str]:
    """Push the artifacts about `manifest_digest` (of `types`) to the repository of
    `destination` (docker://HOST/REPO:TAG), about the image pushed as `pushed_digest`;
    the digests of the artifact manifests pushed. ImageError naming the registry."""
    artifacts = _artifacts(layout_dir, manifest_digest, types)
    if not artifacts:
        return []
    rest = destination[len("docker://"):]
    host, _, path = rest.partition("/")
    repo = path.rsplit("@", 1)[0]
    if ":" in repo.rsplit("/", 1)[-1]:
        repo = repo.rsplit(":", 1)[0]
    registry = RegistryCache(destination, host, repo, insecure=False, authfile=authfile, timeout=30.0)
    subject = {"mediaType": lw.MEDIA_TYPE_MANIFEST, "digest": pushed_digest,
               "size": _manifest_size(registry, pushed_digest)}
    pushed: list[dict[str, Any]] = []
    has_api = False
    with tempfile.TemporaryDirectory() as tmp:
        for desc, raw, document in artifacts:
            raw = _retarget(raw, subject)
            manifest = json.loads(raw)
            for blob_desc, data in ((manifest["config"], attach.EMPTY_BLOB), (manifest["layers"][0], document)):
                blob_path = os.path.join(tmp, blob_desc["digest"].split(":", 1)[1])
                with open(blob_path, "wb") as f:
                    f.write(data)
                registry._upload(blob_desc["digest"], blob_desc["size"], blob_path)
            entry = _descriptor(raw, desc["artifactType"])
            resp = registry._open("PUT", registry._path("manifests", entry["digest"]), data=raw,
                                  headers={"Content-Type": lw.MEDIA_TYPE_MANIFEST}, ok=(201, 200))
            if resp is None:
                raise ImageError(f"{destination}: the registry refused the {desc['artifactType']} "
                                 "artifact: publish with --no-sbom/--no-provenance to leave it out")
            has_api = has_api or bool(resp.headers.get("OCI-Subject"))
            resp.close()
            pushed.append(entry)
    if not has_api:
        _update_fallback_tag(registry, pushed_digest, pushed)
    return [p["digest"] for p in pushed]


def _manifest_size(registry: RegistryCache, digest: str) -> int:
    resp = registry._open("HEAD", registry._path("manifests", digest),
                          headers={"Accept": lw.MEDIA_TYPE_MANIFEST})
    if resp is None:
        raise ImageError(f"{registry.url}: the image {digest} just pushed is not there: publish again")
    size = int(resp.headers.get("Content-Length") or 0)
    resp.close()
    return size


def _update_fallback_tag(registry: RegistryCache, subject_digest: str, pushed: list[dict[str, Any]]) -> None:
    """Point the referrers tag of `subject_digest` at an index holding `pushed`
    besides the referrers listed there before (other tools' artifacts are kept)."""
    tag = fallback_tag(subject_digest)
    listed: list[dict[str, Any]] = []
    resp = registry._open("GET", registry._path("manifests", tag), headers={"Accept": FALLBACK_ACCEPT})
    if resp is not None:
        try:
            old = json.loads(registry._read_small(resp, None, None, "the referrers index"))
            listed = [d for d in old.get("manifests") or [] if isinstance(d, dict)]
        except ValueError:
            listed = []
    new_types = {p["artifactType"] for p in pushed}
    digests = {p["digest"] for p in pushed}
    # Ours of the same type are replaced (a re-publish of a rebuilt document).
    kept = [d for d in listed if d.get("digest") not in digests
            and not (d.get("artifactType") in new_types and d.get("annotations", {}).get(_BY) == "stacker-kernel")]
    index = {"schemaVersion": 2, "mediaType": lw.MEDIA_TYPE_INDEX,
             "manifests": kept + [{**p, "annotations": {_BY: "stacker-kernel"}} for p in pushed]}
    body = lw.canonical_json(index)
    resp = registry._open("PUT", registry._path("manifests", tag), data=body,
                          headers={"Content-Type": lw.MEDIA_TYPE_INDEX}, ok=(201, 200))
    if resp is None:
        raise ImageError(f"{registry.url} refused the referrers tag {tag}: publish with --no-sbom --no-provenance")
    resp.close()


_BY = "dev.stacker-kernel.referrer"


def copy_to_layout(layout_dir: str, manifest_digest: str, dest_layout: str, pushed_digest: str,
                   types: set[str]) -> list[str]:
    """Copy the artifacts about `manifest_digest` (of `types`) into the OCI layout
    `dest_layout`, about its copy `pushed_digest` of the image; their digests."""
    done = []
    src = cas.Blobs(layout_dir)
    for desc, raw, document in _artifacts(layout_dir, manifest_digest, types):
        manifest = json.loads(raw)
        layer = manifest["layers"][0]
        cas.copy_blob(src, dest_layout, layer["digest"], layer["size"])
        lw.put_blob(dest_layout, attach.EMPTY_BLOB, attach.EMPTY_MEDIA_TYPE)
        if manifest["subject"]["digest"] != pushed_digest:
            subject_size = os.path.getsize(lw.blob_path(dest_layout, pushed_digest))
            raw = _retarget(raw, {"mediaType": lw.MEDIA_TYPE_MANIFEST, "digest": pushed_digest, "size": subject_size})
        entry = _descriptor(raw, desc["artifactType"])
        lw.put_blob(dest_layout, raw, lw.MEDIA_TYPE_MANIFEST)

        def add(index: dict[str, Any], entry=entry) -> None:
            manifests = [d for d in index.get("manifests") or [] if d.get("digest") != entry["digest"]]
            index["manifests"] = manifests + [entry]

        lw.update_index(dest_layout, add)
        done.append(entry["digest"])
    return done


def attachment_types(sbom: bool, provenance: bool) -> set[str]:
    """The artifact types `publish` pushes with the images."""
    from stacker_kernel.oci import provenance as prov

    return ({"application/spdx+json"} if sbom else set()) | ({prov.MEDIA_TYPE} if provenance else set())


def push_attachments(layout_dir: str, manifest_digest: str, destination: str, pushed_digest: str,
                     types: set[str], authfile: str | None) -> list[str]:
    """The artifacts of an image to where `publish` copied it (a registry or `oci:DIR:TAG`)."""
    if not types:
        return []
    if destination.startswith("docker://"):
        return push_to_registry(layout_dir, manifest_digest, destination, pushed_digest, types, authfile)
    if destination.startswith("oci:"):
        dest_layout = destination[len("oci:"):].split(":", 1)[0]
        return copy_to_layout(layout_dir, manifest_digest, dest_layout, pushed_digest, types)
    return []
