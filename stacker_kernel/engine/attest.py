"""SBOM and provenance for the images an export wrote (issue 18).

After oci/export.py has written and tagged the images, each tagged image gets
(unless turned off) an SPDX document of its rootfs (engine/sbom.py read from
the snapshot its last layer came from, oci/sbom.py the format) and an in-toto
provenance statement (oci/provenance.py), attached to its manifest as OCI 1.1
artifacts (oci/attach.py).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the image writers load where an image is written: not for --no-oci (cli.py makes Attestations)
    from stacker_kernel.oci import provenance
    from stacker_kernel.oci.export import ImageSpec


@dataclass(frozen=True)
class Attestations:
    """Which documents an export attaches (`--no-sbom`, `--no-provenance` turn them off)."""
    sbom: bool = True
    provenance: bool = True

    @property
    def any(self) -> bool:
        return self.sbom or self.provenance


@dataclass(frozen=True)
class BuildContext:
    """What the provenance says an export was built from, besides the specs.

    `snapshots` maps a step snapshot's path to its store record (cell id, times);
    `base_dir` is where the recipe's relative import paths start; `sbom_cache` is
    where SBOMs keep what their packages give (oci/sbom.spdx_document)."""
    recipe: str
    stacker_yaml: str | None = None
    snapshots: dict[str, Any] | None = None
    base_dir: str | None = None
    substitutions: dict[str, str] | None = None
    sbom_cache: str | None = None


def _chain(spec: ImageSpec, by_name: dict[str, ImageSpec]) -> list[ImageSpec]:
    """The specs an image is made of, its first ancestor first (`built` parents)."""
    out = [spec]
    while out[0].parent is not None and out[0].parent in by_name:
        out.insert(0, by_name[out[0].parent])
    return out


def image_rootfs(spec: ImageSpec, by_name: dict[str, ImageSpec]) -> str | None:
    """The snapshot an image's rootfs equals: its last step, else its base's."""
    for s in reversed(_chain(spec, by_name)):
        if s.steps:
            return s.steps[-1].path
        if s.base_rootfs:
            return s.base_rootfs
    return None


def _sha256_file(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:  # a directory, or gone: named without a digest
        return None
    return h.hexdigest()


def _dependencies(chain: list[ImageSpec], ctx: BuildContext) -> list[provenance.Dependency]:
    from stacker_kernel.oci import provenance

    deps: list[provenance.Dependency] = []
    first = chain[0]
    if first.base_oci is not None:
        deps.append(provenance.Dependency(first.base_oci.name, first.base_oci.manifest_digest.split(":", 1)[1],
                                          f"base image of layer {first.name}"))
    elif first.base_rootfs:
        # Base snapshots are content-addressed: tar-sha256-<hex> is the tar's digest.
        base_id = os.path.basename(first.base_rootfs)
        digest = base_id[len("tar-sha256-"):] if base_id.startswith("tar-sha256-") else None
        deps.append(provenance.Dependency(first.base_created_by or base_id, digest, f"base of layer {first.name}"))
    for spec in chain:
        for imp in getattr(spec.config, "imports", None) or []:
            # As written in the recipe (not made absolute): the same recipe gives the same
            # provenance wherever it is checked out.
            path = imp.path
            digest = imp.hash.lower() if imp.hash else None
            if "://" not in path and digest is None:
                digest = _sha256_file(path if os.path.isabs(path) else os.path.join(ctx.base_dir or os.getcwd(), path))
            deps.append(provenance.Dependency(path, digest, f"import of layer {spec.name}"))
    return deps


def _record(chain: list[ImageSpec], ctx: BuildContext) -> provenance.BuildRecord:
    from stacker_kernel.oci import provenance

    steps: list[provenance.Step] = []
    started: list[float] = []
    finished: list[float] = []
    for spec in chain:
        for step in spec.steps:
            snap = (ctx.snapshots or {}).get(step.path)
            steps.append(provenance.Step(spec.name, step.source, getattr(snap, "cell_id", None)))
            if snap is not None and snap.started:
                started.append(snap.started)
                finished.append(snap.started + snap.duration)
    recipe_sha = _sha256_file(ctx.recipe) if ctx.recipe else None
    recipe = os.path.basename(ctx.recipe)  # its name and digest say which; where it was is no input
    yaml_sha = hashlib.sha256(ctx.stacker_yaml.encode()).hexdigest() if ctx.stacker_yaml else None
    return provenance.BuildRecord(recipe, recipe_sha, tuple(steps), tuple(_dependencies(chain, ctx)),
                                  min(started) if started else None, max(finished) if finished else None,
                                  yaml_sha, dict(ctx.substitutions or {}))


def _spec_of(tag: str, by_name: dict[str, ImageSpec]) -> ImageSpec | None:
    """The spec an exported tag was made from: NAME, or NAME-squashfs / NAME-erofs (the
    same image in another layer type, oci/export.py)."""
    if tag in by_name:
        return by_name[tag]
    name, _, kind = tag.rpartition("-")
    return by_name.get(name) if kind in ("squashfs", "erofs") else None


def _attached(layout_dir: str, digest: str, which: Attestations) -> bool:
    """Whether the image `digest` already has every document `which` asks for."""
    from stacker_kernel.oci import attach, provenance, sbom

    have = {d.get("artifactType") for d in attach.referrers(layout_dir, digest)}
    return ((not which.sbom or sbom.MEDIA_TYPE in have)
            and (not which.provenance or provenance.MEDIA_TYPE in have))


def attest_images(layout_dir: str, specs: list[ImageSpec], tags: list[str], ctx: BuildContext,
                  which: Attestations, *, source_date_epoch: int | None = None) -> None:
    """Attach the documents `which` asks for to each image of `tags` (made from
    `specs`) in `layout_dir`. ImageError when spdx-tools is missing for an SBOM."""
    if not which.any or not tags:
        return
    from stacker_kernel.oci import attach, provenance

    by_name = {s.name: s for s in specs}
    created = provenance.timestamp(source_date_epoch)
    inventories: dict[str, Any] = {}  # rootfs -> its packages: NAME and NAME-squashfs share one
    for tag in tags:
        spec = _spec_of(tag, by_name)
        if spec is None:
            continue
        digest = attach.tagged_manifest(layout_dir, tag)["digest"]
        if _attached(layout_dir, digest, which):
            continue  # an unchanged image keeps its documents: its rootfs and steps are the same
        documents: list[tuple[str, bytes]] = []
        if which.sbom:
            from stacker_kernel.engine.sbom import inventory  # only for an image that changed
            from stacker_kernel.oci import sbom

            rootfs = image_rootfs(spec, by_name)
            if rootfs is not None:
                if rootfs not in inventories:
                    inventories[rootfs] = inventory(rootfs, cache_dir=ctx.sbom_cache)
                doc = sbom.spdx_document(inventories[rootfs], tag, subject_digest=digest,
                                         source_date_epoch=source_date_epoch, cache_dir=ctx.sbom_cache)
                documents.append((sbom.MEDIA_TYPE, sbom.document_bytes(doc)))
        if which.provenance:
            statement = provenance.statement(tag, digest, _record(_chain(spec, by_name), ctx),
                                             source_date_epoch=source_date_epoch)
            documents.append((provenance.MEDIA_TYPE, provenance.statement_bytes(statement)))
        attach.attach(layout_dir, tag, documents, created=created)
