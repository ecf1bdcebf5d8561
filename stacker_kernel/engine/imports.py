"""A layer's `imports`, staged on the host for the container.

The staging directory is shown read-only at /stacker/imports inside the
container and is never part of the rootfs, so imports never land in a layer
(stacker's rule). It is rebuilt for each layer, so stale files are gone. The
digest of what was staged (names, modes, contents) enters the cache key, so a
changed import invalidates the cache while mtimes do not.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import urllib.request
from pathlib import Path

from stacker_kernel.errors import RecipeError
from stacker_kernel.storage import btrfs


def _source_path(imp, base_dir: str, download_dir: Path) -> Path:
    path = imp.path
    if path.startswith(("http://", "https://")):
        download_dir.mkdir(parents=True, exist_ok=True)
        dest = download_dir / (os.path.basename(path.rstrip("/")) or "download")
        try:
            with urllib.request.urlopen(path, timeout=60) as r, open(dest, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise RecipeError(f"cannot download import {path}: {e}") from None
        return dest
    if "://" in path:
        raise RecipeError(f"import {path}: only local paths and http(s) URLs can be imported here")
    src = Path(path if os.path.isabs(path) else os.path.join(base_dir, path))
    if not src.exists():
        raise RecipeError(f"import {path} does not exist (looked at {src})")
    return src


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage(layer, dest_dir: Path, base_dir: str) -> str:
    """Copy `layer.imports` into `dest_dir` (emptied first); check hashes; return a
    digest of the staged tree ("" when there are no imports)."""
    if dest_dir.exists():
        btrfs.remove_tree(dest_dir)
    dest_dir.mkdir(parents=True)
    if not layer.imports:
        return ""
    for imp in layer.imports:
        src = _source_path(imp, base_dir, dest_dir.parent / (dest_dir.name + ".downloads"))
        if imp.hash:
            if not src.is_file():
                raise RecipeError(f"import {imp.path} has a hash but is not a file")
            got = _file_digest(src)
            if got.lower() != imp.hash.lower().removeprefix("sha256:"):
                raise RecipeError(f"import {imp.path} has sha256 {got}, not the {imp.hash} the recipe says")
        name = os.path.basename(str(src).rstrip("/"))
        target = dest_dir / name
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
        if imp.mode is not None and target.is_file():
            os.chmod(target, imp.mode)
    return tree_digest(dest_dir)


def tree_digest(root: Path) -> str:
    """sha256 over relative names, types, permission bits and contents (not mtimes)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            h.update(f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{stat.S_IMODE(st.st_mode)}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(_file_digest(Path(p)).encode())
        for d in dirnames:
            h.update(f"{os.path.relpath(os.path.join(dirpath, d), root)}/\0".encode())
    return "sha256:" + h.hexdigest()
