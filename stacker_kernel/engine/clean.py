"""Cleaning up like `stacker clean` and a choosier `gc`: which ended sessions to forget,
what beside a recipe to delete, and the parts of the store's cache/ nothing needs.

A session whose owner runs (a kernel, a build) is never dropped: only ended ones.
Dropping a session only forgets it; `storage.store.collect_garbage` then deletes the
snapshots nothing references any more (a step another session reached stays).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from stacker_kernel.errors import RecipeError
from stacker_kernel.storage.store import Session, Store

# Beside a notebook: copies of step logs (kernel/magics.LOG_DIR) and large
# downloads of the file browser (kernel/widgets.DOWNLOADS_DIR).
BESIDE_RECIPES = ("stacker-logs", "stacker-downloads")
RECIPE_SUFFIXES = (".yaml", ".yml", ".ipynb")

FRESH_SECONDS = 600  # base layer copies younger than this are never pruned
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'30m', '12h', '7d', '2w' (or plain seconds) -> seconds; RecipeError otherwise."""
    value, unit = text.strip(), "s"
    if value and value[-1].lower() in _UNITS:
        value, unit = value[:-1], value[-1].lower()
    try:
        seconds = float(value) * _UNITS[unit]
    except ValueError:
        raise RecipeError(f"--older-than {text!r} is not an age: write e.g. 30m, 12h, 7d or 2w") from None
    if seconds < 0:
        raise RecipeError(f"--older-than {text!r} is negative: give an age such as 7d")
    return seconds


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass
class Selection:
    """The ended sessions to forget, and the running ones that were spared."""

    drop: list[Session] = field(default_factory=list)
    running: list[Session] = field(default_factory=list)


def select_sessions(store: Store, *, recipe: str | None = None, folder: str | None = None,
                    recipe_gone: bool = False, older_than: float | None = None,
                    now: float | None = None) -> Selection:
    """The sessions of `recipe` (a file) or of every recipe under `folder`, or those whose
    recipe file no longer exists (`recipe_gone`), or not used for `older_than` seconds;
    a session matching any given rule is chosen, if it has ended."""
    now = time.time() if now is None else now
    chosen = Selection()
    for sess in store.find_sessions():
        match = ((recipe is not None and sess.name == recipe)
                 or (folder is not None and _under(sess.name, folder))
                 or (recipe_gone and not os.path.exists(sess.name))
                 or (older_than is not None and now - sess.updated > older_than))
        if not match:
            continue
        (chosen.running if store.session_alive(sess) else chosen.drop).append(sess)
    return chosen


def remove_beside(folder: Path, recipe: Path | None = None) -> list[str]:
    """What stacker-kernel leaves beside recipes in `folder`: stacker-logs/ and
    stacker-downloads/, or (for one `recipe`) only that notebook's logs. Returns
    the paths removed."""
    removed = []
    if recipe is not None:
        logs = folder / BESIDE_RECIPES[0]
        for log in sorted(logs.glob(f"{recipe.stem}-step*.log")) if logs.is_dir() else []:
            log.unlink()
            removed.append(str(log))
        return removed
    for name in BESIDE_RECIPES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(str(path))
    return removed


def remove_oci_layout(path: Path) -> bool:
    """Delete `path` if it is an OCI layout (what `build` wrote: it has oci-layout),
    as `stacker clean` deletes its oci dir; True if it was one."""
    if path.is_dir() and not path.is_symlink() and (path / "oci-layout").is_file():
        shutil.rmtree(path)
        return True
    return False


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return total


def prune_cache(store: Store, everything: bool = False) -> tuple[int, int]:
    """Delete from <root>/cache what nothing needs: the records and layer blobs of
    bases gc removed; with `everything`, also the download caches (registry images,
    downloaded tars), the export layer cache and the SBOM parts, which builds fill
    again on demand. Returns (entries removed, bytes)."""
    from stacker_kernel.oci.bases import _locked, base_layers, cache_root

    cache = cache_root(store)
    removed, freed = 0, 0

    def drop(path: Path) -> None:
        nonlocal removed, freed
        freed += _size(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed += 1

    with store.write_lock():
        present = {s.id for s in store.snapshots()}
        records = cache / "base-images"
        needed: set[str] = set()
        for record in sorted(records.glob("*.json")) if records.is_dir() else []:
            if record.stem not in present:
                drop(record)
                continue
            try:
                manifest = json.loads(record.read_text()).get("manifest") or {}
                needed.update(layer.get("digest", "") for layer in manifest.get("layers") or [])
            except (OSError, ValueError, AttributeError):
                continue
        blobs = base_layers(store) / "blobs"
        recent = time.time() - FRESH_SECONDS
        for blob in sorted(blobs.glob("*/*")) if blobs.is_dir() else []:
            # A fresh blob may be of a base being imported now, whose record comes last.
            if f"{blob.parent.name}:{blob.name}" not in needed and blob.lstat().st_ctime < recent:
                drop(blob)
        if everything:
            with _locked(cache / "images.lock"):
                for name in ("images", "downloads", "layers", "sbom"):
                    if (cache / name).exists():
                        drop(cache / name)
    return removed, freed
