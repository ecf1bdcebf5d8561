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
        import urllib.request  # here: http.client, ssl and email take a cached build's start otherwise

        try:
            with urllib.request.urlopen(path, timeout=60) as r, open(dest, "wb") as f:
                shutil.copyfileobj(r, f)
                modified = r.headers.get("Last-Modified")
        except OSError as e:
            raise RecipeError(f"cannot download import {path}: {e}") from None
        if modified:  # the file's time is the server's, as Docker's ADD of a URL sets it
            from email.utils import parsedate_to_datetime
            try:
                t = parsedate_to_datetime(modified).timestamp()
                os.utime(dest, (t, t))
            except (TypeError, ValueError, OverflowError):
                pass
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


CONTEXT_KEY = "context"  # metadata.stacker.context of a notebook made from a Dockerfile


def confine(layers, context: str) -> None:
    """Have the relative local imports of `layers` resolve inside directory `context`
    (a Dockerfile's build context), symlinks included, as Docker's COPY does."""
    for layer in layers:
        for imp in layer.imports:
            if "://" not in imp.path and not os.path.isabs(imp.path):
                imp.within = context


def notebook_context(nb: dict, path: str) -> str | None:
    """The build context of a notebook made from a Dockerfile (`stacker-kernel import`,
    Open as stacker notebook), from its metadata.stacker.context (relative to the
    notebook's folder), or None for any other notebook: its COPY cells stay confined
    to the context, so a symlink in a cloned repository cannot copy ~/.ssh into the image."""
    meta = ((nb.get("metadata") or {}).get("stacker") or {}) if isinstance(nb, dict) else {}
    context = meta.get(CONTEXT_KEY) if isinstance(meta, dict) else None
    if context is None:
        return None
    if not isinstance(context, str) or os.path.isabs(context):
        raise RecipeError(f"{path}: the notebook's metadata \"stacker\" has a \"context\" that is not a "
                          "folder relative to the notebook: fix it in the notebook's metadata")
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), context))


def saved_notebook_context(path: str) -> str | None:
    """notebook_context of the notebook saved at `path` (None when there is none or it is
    not JSON: an unsaved notebook has no context)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            nb = json.load(f)
    except (OSError, ValueError):
        return None
    return notebook_context(nb, path)


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
    ignore = _dockerignore(layer, base_dir)
    for imp in layer.imports:
        src = _source_path(imp, base_dir, dest_dir.parent / (dest_dir.name + ".downloads"), fetch_layer_path)
        if imp.within is not None:
            src = _in_context(imp, src)
        if imp.hash:
            if not src.is_file():
                raise RecipeError(f"import {imp.path} has a hash but is not a file: remove the hash "
                                  "(only a file's content can be checked)")
            got = _file_digest(src)
            if got.lower() != imp.hash.lower().removeprefix("sha256:"):
                raise RecipeError(f"import {imp.path} has sha256 {got}, not the {imp.hash} the recipe says")
        name = staged_name(imp)
        target = dest_dir / name
        skip = ignore(imp, src) if ignore is not None else None
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True, ignore=skip)
        else:
            shutil.copy2(src, target)
        if imp.mode is not None and target.is_file():
            os.chmod(target, imp.mode)
    return tree_digest(dest_dir)


def _dockerignore(layer, base_dir: str):
    """For a layer with `dockerignore`: a function giving, per import from that file's
    directory (the build context), the copytree `ignore` of what it excludes; it raises
    RecipeError for an import that is excluded whole (as Docker's COPY fails)."""
    from stacker_kernel.recipe import dockerignore as di

    if not layer.dockerignore:
        return None
    path = os.path.join(base_dir, layer.dockerignore)
    try:
        patterns = di.parse(Path(path).read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        raise RecipeError(f"%dockerignore {layer.dockerignore}: cannot read it ({e.strerror})") from None
    context = os.path.realpath(os.path.dirname(path))

    def rel(p: str) -> str | None:
        r = os.path.relpath(os.path.realpath(os.path.dirname(p)), context)
        r = os.path.normpath(os.path.join(r, os.path.basename(p)))
        return None if r == ".." or r.startswith("../") else r.replace(os.sep, "/")

    def kept_below(host_dir: str, r: str) -> bool:  # an exception includes something inside
        if not di.may_include_below(patterns, r):
            return False
        for dirpath, dirs, files in os.walk(host_dir):
            for n in files + dirs:
                sub = os.path.relpath(os.path.join(dirpath, n), context).replace(os.sep, "/")
                if not di.excluded(patterns, sub):
                    return True
        return False

    def for_import(imp, src: Path):
        r = rel(str(src).rstrip("/")) if str(src) != context else "."
        if r is None:
            return None  # not from the context (another layer, a download)
        if r != "." and di.excluded(patterns, r) and not (src.is_dir() and kept_below(str(src), r)):
            raise RecipeError(f"import {imp.path} is excluded by {layer.dockerignore}: change the "
                              "pattern that excludes it or do not copy it")

        def skip(directory: str, names: list[str]) -> set[str]:
            out = set()
            for n in names:
                sub = rel(os.path.join(directory, n))
                full = os.path.join(directory, n)
                if sub is not None and di.excluded(patterns, sub) and not (
                        os.path.isdir(full) and not os.path.islink(full) and kept_below(full, sub)):
                    out.add(n)
            return out
        return skip
    return for_import


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
    """The name an import has in the staging dir (and at /stacker/imports); `import`
    for a path without a name of its own (`.`, the directory the recipe is in)."""
    name = os.path.basename(os.path.normpath(imp.path.rstrip("/") or "/"))
    return name if name not in ("", ".", "..", "/") else "import"


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
        owner = _owner(rootfs, uid, gid, dest)
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


def _id_entries(rootfs: str, path: str) -> list[list[str]]:
    """The entries of the rootfs's /etc/passwd or /etc/group (symlinks resolve inside it)."""
    try:
        with open(_dest_in_root(rootfs, path), encoding="utf-8", errors="replace") as f:
            return [ln.rstrip("\n").split(":") for ln in f if ln.strip() and not ln.startswith("#")]
    except (OSError, RecipeError):
        return []


def _owner(rootfs: str, uid, gid, dest: str) -> tuple[int, int]:
    """Numeric owner of an import: names from the image's /etc/passwd and /etc/group;
    a named uid without gid takes the gid of the same number (as Docker's --chown)."""
    if isinstance(uid, str):
        entry = next((e for e in _id_entries(rootfs, "/etc/passwd") if len(e) > 2 and e[0] == uid), None)
        if entry is None or not entry[2].isdigit():
            raise RecipeError(f"import dest {dest}: there is no user {uid} in the image's /etc/passwd: "
                              "add it before, or give a numeric uid")
        uid = int(entry[2])
        if gid is None:
            gid = uid
    if isinstance(gid, str):
        entry = next((e for e in _id_entries(rootfs, "/etc/group") if len(e) > 2 and e[0] == gid), None)
        if entry is None or not entry[2].isdigit():
            raise RecipeError(f"import dest {dest}: there is no group {gid} in the image's /etc/group: "
                              "add it before, or give a numeric gid")
        gid = int(entry[2])
    return (0 if uid is None else uid, 0 if gid is None else gid)


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
