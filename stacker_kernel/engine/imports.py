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
        if ".." in inner.split("/"):  # the recipe checks refuse it; never act on it
            raise RecipeError(f"import {path} has a '..': name the path in the layer without it")
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


def _in_context(imp, src: Path) -> Path:
    """Host path `src` of a Dockerfile COPY source resolved inside the build context
    `imp.within`, as Docker resolves it: a symlink on the way (`etc -> /etc`, `leak ->
    /etc/shadow`) is followed within the context, never to the host's file; links
    inside a copied directory are copied as links."""
    from stacker_kernel.engine.inspect import GrabError, resolve_in_root

    rel = os.path.relpath(src, imp.within)
    if rel == ".." or rel.startswith("../"):
        raise RecipeError(f"import {imp.path} is outside the build context {imp.within}")
    try:
        return Path(resolve_in_root(imp.within, rel, clamp=True))
    except GrabError:
        raise RecipeError(f"COPY source {imp.path.rstrip('/')} does not exist in the build context "
                          f"{imp.within} (its symbolic links resolve inside it, as in Docker)") from None


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
        name = os.path.basename(str(src).rstrip("/"))
        if imp.within is not None:
            src = _in_context(imp, src)
        if imp.hash:
            if not src.is_file():
                raise RecipeError(f"import {imp.path} has a hash but is not a file: remove the hash "
                                  "(only a file's content can be checked)")
            got = _file_digest(src)
            if got.lower() != imp.hash.lower().removeprefix("sha256:"):
                raise RecipeError(f"import {imp.path} has sha256 {got}, not the {imp.hash} the recipe says")
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


def land_in_rootfs(staged: str, rootfs: str, items: list[tuple[str, bool, str, int | None, int | None, int | None]]) -> None:
    """Copy staged imports with a `dest` into the rootfs, stacker's way (run inside the user namespace).

    items: (staged name, contents, dest, mode, uid, gid); `contents` says the
    import's path ended with '/'. The rules, from stacker's pkg/stacker/import.go
    (commit 52efa05, `Import` and `importFile`) and test/import.bats ("dir path
    behavior", "import with dir contents", "different import types with perms"):

    | source            | dest      | lands at                | stacker                      |
    |-------------------|-----------|-------------------------|------------------------------|
    | file F            | /d        | /d (the file itself)    | import.go:110-111, 385-386   |
    | file F            | /d/       | /d/F                    | import.go:109, 383           |
    | dir D             | /d        | /d/<D's contents>       | import.go:138-139, 180-182   |
    | dir D             | /d/       | /d/D/<D's contents>     | import.go:183-184, 187       |
    | dir D/ (path '/') | /d or /d/ | /d/<D's contents>       | import.go:143-144, 190, 385  |

    - Whatever already is where an imported entry lands is replaced, except that a
      directory onto a directory merges: stacker lays each dest import as an
      overlay layer above the rootfs, where the upper entry hides the lower one.
      So a file with dest /d replaces an existing directory /d (not `cp`'s
      "into it"); a directory replaces an existing file.
    - Missing parent directories are created (import.go:147, 217, 222), mode
      0755, owned by the container's root; so are the directories of a
      directory import.
    - `mode` is set on every regular file the import lands, a directory
      import's files included (lib.FileCopy, import.go:126, 226; pkg/lib/file.go:58-62);
      without it a file keeps its source mode. Symlinks are copied as links.
    - `uid`/`gid` own every file and symlink the import lands (pkg/lib/file.go:34, 67);
      unset they are the container's root (stacker's -1, "unchanged", as root).
      (stacker itself then loses them when it copies the overlay dir with
      FileCopyNoPerms, pkg/lib/dir.go; we keep what the recipe asks for.)
    - `hash` is checked for a file (import.go:104, at staging here). stacker
      ignores a hash on a directory; we refuse it (see `stage`).
    - Symlinks in dest's parent directories resolve inside the rootfs, as
      stacker's validateOverlayDirs does (pkg/overlay/overlay-dirs.go:99-150).
    """
    for name, contents, dest, mode, uid, gid in items:
        if ".." in dest.split("/") or name in ("", ".."):  # the recipe checks refuse it; never act on it
            raise RecipeError(f"import dest {dest}: has a '..': write it without")
        src = os.path.join(staged, name)
        owner = (0 if uid is None else uid, 0 if gid is None else gid)
        is_dir = os.path.isdir(src) and not os.path.islink(src)
        # A directory's contents into dest is the directory put at dest (merged or replacing).
        if dest.endswith("/") and not (is_dir and contents):
            parent, entry = dest, name
        else:
            parent, entry = os.path.dirname(dest.rstrip("/")) or "/", os.path.basename(dest.rstrip("/"))
        host_parent = _dest_in_root(rootfs, parent)
        _make_dirs(rootfs, host_parent, dest)
        if not entry:  # dest is /
            _merge_dir(src, host_parent, mode, owner)
        else:
            _put(src, os.path.join(host_parent, entry), mode, owner)


def _make_dirs(rootfs: str, host_dir: str, dest: str) -> None:
    """Create host_dir (inside rootfs) and its missing parents: mode 0755, owned by root."""
    missing = []
    d = host_dir
    while not os.path.lexists(d) and d != rootfs:
        missing.append(d)
        d = os.path.dirname(d)
    if os.path.lexists(d) and not os.path.isdir(d):
        raise RecipeError(f"import dest {dest}: {os.path.relpath(d, rootfs)} is a file in the rootfs, "
                          "not a directory: choose another dest")
    for d in reversed(missing):
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)  # umask must not decide
        os.lchown(d, 0, 0)


def _put(src: str, target: str, mode: int | None, owner: tuple[int, int]) -> None:
    """Land src at target: a directory merges into a directory, anything else replaces."""
    src_is_dir = os.path.isdir(src) and not os.path.islink(src)
    target_is_dir = os.path.isdir(target) and not os.path.islink(target)
    if os.path.lexists(target) and not (src_is_dir and target_is_dir):
        if target_is_dir:
            btrfs.remove_tree(Path(target))
        else:
            os.unlink(target)
    if src_is_dir:
        if not target_is_dir:
            os.mkdir(target, 0o755)
            os.chmod(target, 0o755)
            os.lchown(target, 0, 0)
        _merge_dir(src, target, mode, owner)
        return
    shutil.copy2(src, target, follow_symlinks=False)
    os.lchown(target, *owner)
    if mode is not None and not os.path.islink(target):
        os.chmod(target, mode)


def _merge_dir(src: str, target: str, mode: int | None, owner: tuple[int, int]) -> None:
    for name in sorted(os.listdir(src)):
        _put(os.path.join(src, name), os.path.join(target, name), mode, owner)


def _dest_in_root(rootfs: str, dest: str) -> str:
    """Host path of container path `dest`; symlinks resolve inside the rootfs."""
    from stacker_kernel.engine.inspect import GrabError, resolve_in_root

    try:
        return resolve_in_root(rootfs, dest, missing_ok=True)
    except NotADirectoryError:
        raise RecipeError(f"import dest {dest}: a part of it is a file in the rootfs, not a directory: "
                          "choose another dest") from None
    except GrabError as e:
        raise RecipeError(f"import dest {dest}: {e}") from None
