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


def _source_path(imp, base_dir: str, download_dir: Path, fetch_layer_path=None) -> Path:
    path = imp.path
    if path.startswith("stacker://"):
        layer, _, inner = path[len("stacker://"):].partition("/")
        if not layer or not inner:
            raise RecipeError(f"import {path}: a stacker:// import is stacker://LAYER/path")
        if fetch_layer_path is None:
            raise RecipeError(f"import {path}: stacker:// imports need a build of layer {layer}")
        download_dir.mkdir(parents=True, exist_ok=True)
        dest = download_dir / (os.path.basename(inner.rstrip("/")) or layer)
        if dest.exists():
            btrfs.remove_tree(dest)
        return Path(fetch_layer_path(layer, "/" + inner, str(dest)))
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


def stage(layer, dest_dir: Path, base_dir: str, fetch_layer_path=None) -> str:
    """Copy `layer.imports` into `dest_dir` (emptied first); check hashes; return a
    digest of the staged tree ("" when there are no imports).

    `fetch_layer_path(layer, path, dest)` copies a path out of another layer's
    snapshot for `stacker://LAYER/path` imports and returns where it put it.
    """
    if dest_dir.exists():
        btrfs.remove_tree(dest_dir)
    dest_dir.mkdir(parents=True)
    if not layer.imports:
        return ""
    for imp in layer.imports:
        src = _source_path(imp, base_dir, dest_dir.parent / (dest_dir.name + ".downloads"), fetch_layer_path)
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


def staged_name(imp) -> str:
    """The name an import has in the staging dir (and at /stacker/imports)."""
    return os.path.basename(imp.path.rstrip("/")) or "import"


def land_in_rootfs(staged: str, rootfs: str, items: list[tuple[str, str, int | None, int | None, int | None]]) -> None:
    """Copy staged imports into the rootfs, stacker's way (run inside the user namespace).

    items: (staged name, dest, mode, uid, gid). A directory's contents go into
    dest; a file goes to dest, or into it when dest ends with '/'. Owners
    default to root of the container.
    """
    for name, dest, mode, uid, gid in items:
        src = os.path.join(staged, name)
        uid = 0 if uid is None else uid
        gid = 0 if gid is None else gid
        if os.path.isdir(src) and not os.path.islink(src):
            target = _dest_in_root(rootfs, dest)
            os.makedirs(target, exist_ok=True)
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
            for dirpath, dirnames, filenames in os.walk(target):
                for n in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, n), uid, gid)
        else:
            target = _dest_in_root(rootfs, dest.rstrip("/") + "/" + name if dest.endswith("/") else dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.lexists(target) and os.path.isdir(target) and not os.path.islink(target):
                target = os.path.join(target, name)
            shutil.copy2(src, target, follow_symlinks=False)
            os.lchown(target, uid, gid)
            if mode is not None and not os.path.islink(target):
                os.chmod(target, mode)


def _dest_in_root(rootfs: str, dest: str) -> str:
    """Host path of container path `dest`; symlinks resolve inside the rootfs."""
    from stacker_kernel.engine.inspect import GrabError, resolve_in_root

    try:
        return resolve_in_root(rootfs, dest, missing_ok=True)
    except GrabError as e:
        raise RecipeError(f"import dest {dest}: {e}") from None
