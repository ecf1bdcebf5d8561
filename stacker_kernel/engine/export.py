"""A session's snapshot chains -> OCI images (one per stacker layer), via oci/export.py.

What is exported is what was built: each layer's steps are the snapshots in
the session's history, and its base is the parent of its first step.

A build whose images the layout already holds, as this code wrote them, writes
nothing: a record of the last export of each (layout, recipe) pair says which
inputs made the layout's index.json (`_held`), and the image writers are not
even loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stacker_kernel.engine.attest import Attestations, BuildContext, attest_images
from stacker_kernel.recipe.model import ImageSource, Layer, check_layer_name
from stacker_kernel.storage.store import Session, Snapshot, Store

if TYPE_CHECKING:  # the image writers (tarfile, the layer diff) load only when an image is written
    from stacker_kernel.oci.export import ImageSpec
    from stacker_kernel.oci.layer_types import LayerType


def image_specs(store: Store, history: list[Snapshot], tags: dict[str, str],
                layers: dict[str, Any]) -> list[ImageSpec]:
    """One ImageSpec per layer, in build order. `layers` gives each layer's image
    config (recipe.model.Layer); a layer missing from it gets an empty config."""
    from stacker_kernel.oci.bases import base_image, base_layers
    from stacker_kernel.oci.export import ImageSpec, OciBase, StepSnapshot

    order: list[str] = [name for name in layers]
    for snap in history:
        if snap.layer not in order:
            order.append(snap.layer)
    steps_of: dict[str, list[Snapshot]] = {name: [] for name in order}
    for snap in history:
        steps_of[snap.layer].append(snap)
    specs: list[ImageSpec] = []
    exported: set[str] = set()
    for name in order:
        # Parsed names are checked already; a kernel's first layer is named after
        # its notebook, which may be no valid tag ("my notebook").
        check_layer_name(name, " (named after the notebook: start its first cell with %layer NAME)")
        config = layers.get(name) or Layer(name=name, from_=ImageSource(type="scratch"))
        steps = steps_of.get(name, [])
        if steps:
            base = store.get(steps[0].parent) if steps[0].parent else None
        else:
            tip = tags.get(name)
            base = store.get(tip) if tip else None
            if base is None:
                continue  # declared but never built: nothing to export
        spec = ImageSpec(name=name, config=config,
                         steps=[StepSnapshot(str(s.path), s.source) for s in steps])
        if base is not None:
            if base.kind == "step" and base.layer in exported:
                spec.parent = base.layer
            elif base.kind == "step":
                spec.base_rootfs, spec.base_created_by = str(base.path), f"built layer {base.layer}"
            else:
                origin = base_image(store, base)
                if origin is not None:
                    # what was imported, not what the tag says now (it may have moved)
                    spec.base_oci = OciBase(origin.source, origin.manifest_digest, origin.manifest,
                                            origin.config, (str(base_layers(store)), origin.layout))
                    spec.base_rootfs = str(base.path)
                elif base.id != "scratch":
                    spec.base_rootfs, spec.base_created_by = str(base.path), base.source
        specs.append(spec)
        exported.add(name)
    return specs


def carried_yaml(text: str | None) -> str | None:
    """The stacker.yaml an image carries (its annotation, and what its provenance
    digests): `text` with each build_env value replaced by a `${{NAME}}` placeholder,
    so the values stay on the build machine and the recipe still builds with
    `--substitute NAME=...`. None when the text cannot be read back (then no recipe
    travels rather than one with values)."""
    if not text or "build_env" not in text:
        return text
    from stacker_kernel.errors import RecipeError
    from stacker_kernel.recipe.stacker_yaml import dump, load

    try:
        recipe = load(text, keep_placeholders=True, keep_missing=True)
    except RecipeError:
        return None
    for layer in recipe.layers.values():
        layer.build_env = {k: "${{" + k + "}}" for k in layer.build_env}
    return dump(recipe)


def images_to_write(specs: list[ImageSpec]) -> list[ImageSpec]:
    """The specs whose layers reach the layout: every image (not build_only) and the
    layers it is built on. A build_only layer nothing is built on (a Dockerfile stage
    only copied from) gets no tag, so its blobs would be garbage in the layout."""
    by_name = {s.name: s for s in specs}
    needed: set[str] = set()
    for spec in specs:
        if not spec.build_only:
            s: ImageSpec | None = spec
            while s is not None and s.name not in needed:
                needed.add(s.name)
                s = by_name.get(s.parent) if s.parent else None
    return [s for s in specs if s.name in needed]


def export_session_oci(session, oci_dir: str, *, squash: bool = False,
                       stacker_yaml: str | None = None, annotations_namespace: str = "io.stackeroci",
                       progress=None,
                       layer_types: tuple[LayerType, ...] | None = None,
                       attestations: Attestations = Attestations()) -> list[str]:
    """Write the images of a live BuildSession to the OCI layout `oci_dir`, with their
    SBOM and provenance (as `attestations` says); returns the tags. `layer_types`
    default to tar."""
    key = _export_key(session, oci_dir, stacker_yaml, squash, annotations_namespace, layer_types, attestations)
    record = _record_path(session, oci_dir)
    held = _held(oci_dir, record, key) if key else None
    if held is not None:
        for line in held["lines"]:
            if progress:
                progress(line)
        return held["tags"]
    session.keep()  # the images are read from its snapshots: gc must keep them meanwhile
    from stacker_kernel.oci.export import export_image, source_date_epoch_from_env
    from stacker_kernel.oci.layer_types import TAR_TYPE

    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if progress:
            progress(line)
    history = session.built_steps()
    if stacker_yaml is None:
        stacker_yaml = session.export_yaml()
    stacker_yaml = carried_yaml(stacker_yaml)
    # generate_labels scripts run now, on each layer's last snapshot (as stacker runs them
    # after the layer's run); their labels join the image config, not the recipe.
    layers = {name: replace(layer, labels={**layer.labels, **session.generated_labels(name)})
              if layer.generate_labels else layer for name, layer in session.recipe.layers.items()}
    specs = images_to_write(image_specs(session.store, history, session.session.tags, layers))
    epoch = source_date_epoch_from_env()
    tags = export_image(oci_dir, specs, source_date_epoch=epoch,
                        annotations_namespace=annotations_namespace, stacker_yaml=stacker_yaml,
                        squash=squash, layer_cache=layer_cache(session.store), progress=say,
                        layer_types=layer_types or (TAR_TYPE,))
    context = BuildContext(session.session.name, stacker_yaml, {str(s.path): s for s in history}, session.base_dir,
                           sbom_cache=sbom_cache(session.store))
    attest_images(oci_dir, specs, tags, context, attestations, source_date_epoch=epoch)
    if key:
        _remember(oci_dir, record, key, tags, lines)
    return tags


# --- a layout that already holds the build ---------------------------------------

# The code whose output the record stands for: a record made by other code (an
# upgrade, an edited checkout) is not trusted.
_WRITERS = ("oci", "engine/export.py", "engine/attest.py", "engine/sbom.py", "recipe/stacker_yaml.py",
            "recipe/model.py")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _code_stamp() -> list[tuple[str, int, int]]:
    top = Path(__file__).resolve().parent.parent
    files: list[Path] = []
    for rel in _WRITERS:
        path = top / rel
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return [(f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]


def _export_key(session, oci_dir: str, stacker_yaml, squash, namespace, layer_types, attestations) -> str | None:
    """A digest of everything the images written to `oci_dir` are made of; None when
    some of it is known only by writing them (generate_labels scripts run then)."""
    if any(layer.generate_labels for layer in session.recipe.layers.values()):
        return None
    inputs = {"code": _code_stamp(), "layout": os.path.realpath(oci_dir),
              "steps": [(s.id, s.parent) for s in session.built_steps()], "tags": session.session.tags,
              "recipe": repr(session.export_recipe()), "layers": repr(session.recipe.layers),
              "stacker_yaml": stacker_yaml, "squash": squash, "namespace": namespace,
              "layer_types": repr(layer_types), "attestations": repr(attestations),
              "epoch": os.environ.get("SOURCE_DATE_EPOCH"), "name": session.session.name,
              "base_dir": session.base_dir,
              # the image config's author (user@host, getpass's sources) and architecture
              "host": [os.uname().nodename, os.uname().machine, os.getuid()],
              "user": [os.environ.get(k) for k in ("LOGNAME", "USER", "LNAME", "USERNAME")]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _record_path(session, oci_dir: str) -> Path:
    """Where the last export of this recipe to `oci_dir` is remembered (one file per pair)."""
    pair = f"{os.path.realpath(oci_dir)}\0{session.session.name}".encode()
    return session.store.root / "cache" / "exports" / f"{hashlib.sha256(pair).hexdigest()[:32]}.json"


def _read_file(path: str) -> bytes | None:
    """A regular file's bytes (never through a link), None if it is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _held(oci_dir: str, record: Path, key: str) -> dict | None:
    """The record, if the layout's index.json is the one the export with inputs `key`
    left and every blob it names is there; None: write the images."""
    try:
        rec = json.loads(record.read_text())
        index = _read_file(os.path.join(oci_dir, "index.json"))
        if rec.get("key") != key or index is None or hashlib.sha256(index).hexdigest() != rec.get("index"):
            return None
        blobs = os.path.join(oci_dir, "blobs", "sha256")
        for d in json.loads(index).get("manifests") or []:
            digests = [d["digest"]]
            if (d.get("annotations") or {}).get("org.opencontainers.image.ref.name") in rec["tags"]:
                raw = _read_file(os.path.join(blobs, d["digest"][len("sha256:"):])) if _DIGEST.fullmatch(
                    d["digest"]) else None
                if raw is None:
                    return None
                manifest = json.loads(raw)
                digests += [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
            for digest in digests:
                if not _DIGEST.fullmatch(digest) or not os.path.isfile(os.path.join(blobs, digest[7:])) \
                        or os.path.islink(os.path.join(blobs, digest[7:])):
                    return None
        return rec
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no record, or one from another layout state: the export checks everything


def _remember(oci_dir: str, record: Path, key: str, tags: list[str], lines: list[str]) -> None:
    index = _read_file(os.path.join(oci_dir, "index.json"))
    if index is None:
        return
    text = json.dumps({"key": key, "index": hashlib.sha256(index).hexdigest(), "tags": tags, "lines": lines})
    try:
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, record)  # a lost record only means the next build checks the layout in full
    except OSError:
        pass


def export_stored_session(store: Store, sess: Session, oci_dir: str, *, layers: dict[str, Any] | None = None,
                          stacker_yaml: str | None = None, squash: bool = False, progress=None,
                          layer_types: tuple[LayerType, ...] | None = None,
                          attestations: Attestations = Attestations()) -> list[str]:
    """Write the images of a stored (ended) session to `oci_dir`, with their SBOM and
    provenance (as `attestations` says); returns the tags. `layer_types` default to tar."""
    from stacker_kernel.oci.export import export_image, source_date_epoch_from_env
    from stacker_kernel.oci.layer_types import TAR_TYPE

    history = [s for s in (store.get(i) for i in sess.history) if s is not None]
    stacker_yaml = carried_yaml(stacker_yaml)
    specs = images_to_write(image_specs(store, history, sess.tags, layers or {}))
    epoch = source_date_epoch_from_env()
    tags = export_image(oci_dir, specs, source_date_epoch=epoch,
                        stacker_yaml=stacker_yaml, squash=squash, layer_cache=layer_cache(store),
                        progress=progress, layer_types=layer_types or (TAR_TYPE,))
    context = BuildContext(sess.name, stacker_yaml, {str(s.path): s for s in history}, os.path.dirname(sess.name),
                           sbom_cache=sbom_cache(store))
    attest_images(oci_dir, specs, tags, context, attestations, source_date_epoch=epoch)
    return tags


def prune_layer_cache(root) -> int:
    """For gc: forget the layers of deleted snapshots and delete their kept blobs; the bytes."""
    from stacker_kernel.oci.export import prune_layer_cache as prune

    return prune(str(Path(root) / "cache" / "layers"))


def layer_cache(store: Store) -> str:
    """Where the layers made from this store's snapshots are remembered."""
    return str(store.root / "cache" / "layers")


def sbom_cache(store: Store) -> str:
    """Where the SBOMs of this store's images keep what their packages give (oci/sbom.py)."""
    return str(store.root / "cache" / "sbom")
