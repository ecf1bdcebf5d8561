"""Reading an OCI image layout: tags, manifests, configs and layers.

Every byte is read through oci/cas.py, which checks digests before they
become paths, never follows a symlink inside the layout and verifies size and
hash while reading. Writing layouts belongs to the export side
(oci/layout_write.py, oci/export.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stacker_kernel.errors import ImageError
from stacker_kernel.oci import cas
from stacker_kernel.oci.cas import check_digest

REF_NAME = "org.opencontainers.image.ref.name"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (MT_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_INDEX, MT_DOCKER_LIST)
#: layer media types apply_layer can unpack (it detects the compression itself)
TAR_LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
#: stacker's squashfs/erofs layers (oci/layer_types.py), with any `+compression`
FS_LAYER_TYPES = ("application/vnd.stacker.image.layer.squashfs", "application/vnd.stacker.image.layer.erofs")


@dataclass(frozen=True)
class LayerRef:
    """One layer of a manifest: where its blob is and what it claims to be."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class ImageRef:
    """A tag resolved to one image manifest, its config and its layers (base first)."""

    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    layers: list[LayerRef]


def parse_oci_ref(ref: str) -> tuple[str, str]:
    """Split stacker's `LAYOUT_DIR:TAG` (the url of `from: type: oci`) into (dir, tag).

    The split is at the first colon, as stacker and containers/image do, so a
    tag may itself hold colons: `dest:busybox:0.1.1` is layout `dest`, tag
    `busybox:0.1.1`, and `oci:base` is the layout dir `oci`, tag `base`.
    """
    layout, sep, tag = ref.partition(":")
    if not sep or not layout or not tag:
        raise ImageError(f"OCI reference {ref!r} has no tag: write it as LAYOUT_DIR:TAG (e.g. oci:base)")
    return layout, tag


def host_platform() -> tuple[str, str]:
    """(os, architecture) of this machine in OCI's words (linux, amd64/arm64/...)."""
    machine = os.uname().machine.lower()  # platform.machine(), without loading platform
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
            "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(machine, machine)
    return "linux", arch


class OCILayout:
    """A read-only view of an OCI image layout directory (all reads verified, see oci/cas.py)."""

    def __init__(self, path: str | os.PathLike) -> None:
        """Open the layout at `path`; ImageError unless it has `oci-layout` and `index.json`."""
        self.path = Path(path)
        self.blobs = cas.Blobs(self.path)
        try:
            version = json.loads(self.blobs.read_file("oci-layout")).get("imageLayoutVersion")
        except (OSError, ValueError, AttributeError) as e:
            raise ImageError(f"{self.path} is not an OCI image layout (no readable oci-layout file): "
                             "give the directory made by umoci, skopeo or stacker") from e
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageError(f"{self.path} is an OCI layout of unknown version {version!r}: "
                             "re-create it with umoci or skopeo (version 1.0.0)")
        try:
            self.index = json.loads(self.blobs.read_file("index.json"))
        except (OSError, ValueError) as e:
            raise ImageError(f"{self.path} is not an OCI image layout (index.json is missing or not JSON): "
                             "give the directory made by umoci, skopeo or stacker") from e
        if not isinstance(self.index, dict) or not isinstance(self.index.get("manifests", []), list):
            raise ImageError(f"{self.path}/index.json is not an image index: re-create the layout")

    def __str__(self) -> str:
        return str(self.path)

    def _descriptors(self) -> list[dict[str, Any]]:
        return [d for d in self.index.get("manifests") or [] if isinstance(d, dict)]

    def tags(self) -> list[str]:
        """Tags of the layout (ref.name annotations on index.json), in index order."""
        out = []
        for d in self._descriptors():
            name = (d.get("annotations") or {}).get(REF_NAME)
            if isinstance(name, str) and name not in out:
                out.append(name)
        return out

    def blob_path(self, digest: str) -> Path:
        """Path of the blob `digest` (which must be well-formed; the file may be missing).

        For messages and tests: read blobs with `self.blobs`, which does not follow symlinks.
        """
        check_digest(digest, f"layout {self.path}")
        algorithm, encoded = digest.split(":", 1)
        return self.path / "blobs" / algorithm / encoded

    def read_json(self, digest: str, size: Any) -> dict[str, Any]:
        """The verified blob `digest` (of `size` bytes) parsed as a JSON object."""
        return self.blobs.read_json(digest, size)

    def _pick(self, descriptors: list[dict[str, Any]], what: str) -> dict[str, Any]:
        """The descriptor for this host's platform, or the only one."""
        if len(descriptors) == 1:
            return descriptors[0]
        want_os, want_arch = host_platform()
        for d in descriptors:
            plat = d.get("platform") or {}
            if plat.get("os") == want_os and plat.get("architecture") == want_arch:
                return d
        raise ImageError(f"{what} in {self.path} has no manifest for {want_os}/{want_arch}: "
                         "copy an image built for this platform")

    def resolve(self, tag: str) -> ImageRef:
        """The image tagged `tag`: its manifest (following one level of image index), config and layers.

        Manifest, index and config blobs are verified; layer blobs are read
        later, through `self.blobs` (which verifies them then).
        """
        matches = [d for d in self._descriptors() if (d.get("annotations") or {}).get(REF_NAME) == tag]
        if not matches:
            known = ", ".join(self.tags()) or "none"
            raise ImageError(f"tag {tag!r} is not in OCI layout {self.path} (tags: {known}): "
                             "use one of those tags or copy the image into the layout")
        desc = self._pick(matches, f"tag {tag!r}")
        if desc.get("mediaType") in INDEX_TYPES:
            inner = self.read_json(check_digest(desc.get("digest"), f"tag {tag!r} of {self.path}"),
                                   desc.get("size"))
            children = [d for d in inner.get("manifests") or [] if isinstance(d, dict)
                        and d.get("mediaType", MT_MANIFEST) in MANIFEST_TYPES]
            if not children:
                raise ImageError(f"the image index of tag {tag!r} in {self.path} lists no image manifest: "
                                 "copy a complete image")
            desc = self._pick(children, f"the image index of tag {tag!r}")
        elif desc.get("mediaType", MT_MANIFEST) not in MANIFEST_TYPES:
            raise ImageError(f"tag {tag!r} of {self.path} points at a {desc.get('mediaType')!r}, "
                             "not an image manifest: tag an image instead")
        digest = check_digest(desc.get("digest"), f"tag {tag!r} of {self.path}")
        manifest = self.read_json(digest, desc.get("size"))
        cfg_desc = manifest.get("config")
        if not isinstance(cfg_desc, dict):
            raise ImageError(f"manifest {digest} of {self.path} has no config: the image is broken; copy it again")
        config = self.read_json(check_digest(cfg_desc.get("digest"), f"manifest {digest}"), cfg_desc.get("size"))
        layers = []
        for ld in manifest.get("layers") or []:
            ldigest = check_digest(ld.get("digest") if isinstance(ld, dict) else None, f"manifest {digest}")
            media_type = ld.get("mediaType", "")
            if media_type not in TAR_LAYER_TYPES and not media_type.startswith(FS_LAYER_TYPES):
                raise ImageError(f"layer {ldigest} of {self.path}:{tag} has media type {media_type!r}, "
                                 "which is neither a tar nor a squashfs/erofs layer: use an image with such layers")
            size = cas.check_size(ld.get("size"), f"layer {ldigest} of {self.path}:{tag}")
            layers.append(LayerRef(ldigest, media_type, size))
        return ImageRef(digest, manifest, config, layers)

    def check_image(self, tag: str) -> ImageRef:
        """The image `tag` (see resolve) after checking that each of its layer blobs is
        a regular file of the declared size: what to do before handing the layout to
        a tool that follows symlinks (skopeo reads a blob linked to /dev/zero forever).
        Layer hashes are left to that tool, which verifies them while it copies."""
        image = self.resolve(tag)
        for layer in image.layers:
            self.blobs.check(layer.digest, layer.size, f"layer {layer.digest} of {self.path}:{tag}")
        return image
