"""A step's own mounts (a cell's `%mount`, a Dockerfile's `RUN --mount`), on the host side.

BuildKit's mount types (frontend/dockerfile/docs/reference.md, "RUN --mount"):
- cache: a directory kept between builds by `id` (default: the target), here in
  the user's storage (cache/run-mounts), never in a layer and not in the cache
  key (as BuildKit); `uid`, `gid`, `mode` apply when it is created.
- bind: a path of the build context (the directory the recipe is in) or, with
  `from=LAYER`, of a built layer; read-only unless `rw`, and then what the step
  writes is discarded (it gets a fresh copy; a layer's copy keeps its owners).
  What it shows is in the step's cache key (the tree's digest, or the layer's
  snapshot).
- secret: the file or environment variable given at build time for `id`
  (`--secret id=ID,src=FILE|env=VAR`), at `target` (default /run/secrets/ID),
  mode 0400 unless `mode`. Its content is in no layer, no cache key and no
  provenance: only the mount's spec (`id`, `target`) is in the step's text.
  A secret that is not given is skipped unless `required`.
- tmpfs: an empty tmpfs for the step.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from stacker_kernel.errors import RecipeError, StepError
from stacker_kernel.recipe.model import parse_mount

if TYPE_CHECKING:  # loaded by `plan` (a step without mounts needs no container module)
    from stacker_kernel.container.runtime import Mount


@dataclass
class MountPlan:
    """What the container must stage (`mounts`), what the step asks for (`requests`,
    see runtime.Container.run_step) and the digest that joins the step's cache key."""
    mounts: list[Mount] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    digest: str = ""


def _key(*parts: str) -> str:
    return "m-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _copy_in_ns(root: str | None, path: str, scratch: str, name: str) -> str:
    """Copy `path` (container path of rootfs `root`, or a host path when `root` is None) as
    it is (owners, modes, links) to SCRATCH/NAME-dir or -file; returns that path. Run as root
    of the user namespace, where a layer's ids are ours. A copy made before keeps its inode:
    the container staged it, and the step's bind sees the fresh content through it."""
    import subprocess

    from stacker_kernel.engine.inspect import resolve_in_root

    src = resolve_in_root(root, path) if root is not None else os.path.realpath(path)
    is_dir = os.path.isdir(src)
    dest = os.path.join(scratch, f"{name}-{'dir' if is_dir else 'file'}")
    if is_dir and os.path.isdir(dest):
        for entry in os.scandir(dest):
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
    done = subprocess.run(["cp", "-a", "--reflink=auto", "--no-target-directory", src, dest],
                          capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["cp failed"])[-1].rsplit(": ", 1)[-1]
        raise StepError(f"cannot copy {path} for the step: {why}")  # (cp's line names our copy)
    return dest


def plan(specs: list[str], *, storage: Path, scratch: Path, base_dir: str,
         secrets: dict[str, tuple[str, str]], built_path: Callable[[str], str]) -> MountPlan:
    """The plan for mount `specs` (parse_mount's syntax). `storage` is the user's store
    root (cache dirs), `scratch` a private directory of the session (secrets, rw
    copies), `secrets` maps an id to ("src", FILE) or ("env", VALUE-NAME), and
    `built_path(LAYER)` is the rootfs of a built layer. Raises StepError."""
    from stacker_kernel.container.runtime import Mount
    from stacker_kernel.container.userns import run_in_userns
    from stacker_kernel.engine.imports import _file_digest, tree_digest
    from stacker_kernel.engine.inspect import GrabError, resolve_in_root
    from stacker_kernel.storage.overlay import read_stack

    out = MountPlan()
    digests = []
    for spec in specs:
        try:
            m = parse_mount(spec)
        except RecipeError as e:
            raise StepError(f"%mount {spec}: {e}") from None
        kind, target = m["type"], m.get("target", "")
        request: dict = {"dest": target}
        if kind == "tmpfs":
            out.requests.append({"tmpfs": target, **({"size": m["size"]} if "size" in m else {})})
            continue
        if kind == "cache":
            source = storage / "cache" / "run-mounts" / hashlib.sha256(
                (m.get("id") or target).encode()).hexdigest()[:32]
            source.mkdir(parents=True, exist_ok=True)
            request["readonly"] = m.get("ro", m.get("readonly", "false")) == "true"
            request.update({k: m[k] for k in ("uid", "gid", "mode") if k in m})
        elif kind == "secret":
            given = secrets.get(m["id"])
            if given is None:
                if m.get("required", "false") == "true":
                    raise StepError(f"%mount {spec}: secret {m['id']} is required and not given: "
                                    f"build with --secret id={m['id']},src=FILE (or env=VARIABLE)")
                continue
            how, where = given
            if how == "env":
                if where not in os.environ:
                    raise StepError(f"secret {m['id']}: the environment variable {where} is not set")
                data = os.environ[where].encode()
            else:
                try:
                    data = Path(where).read_bytes()
                except OSError as e:
                    raise StepError(f"secret {m['id']}: cannot read {where} ({e.strerror})") from None
            scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
            source = scratch / f"secret-{_key(m['id'])}"
            if source.exists():
                source.chmod(0o600)
            fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            source.chmod(int(m.get("mode", "0400"), 8))
            request["readonly"] = True
            request.update({k: m[k] for k in ("uid", "gid") if k in m})
        else:  # bind
            inner = m.get("source", ".")
            rw = m.get("rw", m.get("readwrite", "false")) == "true"
            if "from" in m:
                try:
                    root = built_path(m["from"])
                    if read_stack(root) is None and not rw:
                        source = Path(resolve_in_root(root, inner))
                    else:
                        # The step writes into a fresh copy (rw: writes are discarded), and an
                        # overlay snapshot is a stack of layer directories, which the container
                        # does not mount. The copy keeps the layer's owners and modes. A snapshot
                        # never changes: a read-only copy of it is made once per session.
                        made = scratch / f"{_key(spec)}.from"
                        held = made.read_text().split("\0") if made.exists() else []
                        if not rw and held[:2] == [root, inner] and os.path.lexists(held[2]):
                            source = Path(held[2])
                        else:
                            made.unlink(missing_ok=True)
                            source = Path(run_in_userns(_copy_in_ns, root, inner, str(scratch), _key(spec)))
                            made.write_text(f"{root}\0{inner}\0{source}")
                except (GrabError, StepError, RecipeError) as e:
                    raise StepError(f"%mount {spec}: {e}") from None
                digests.append(f"{spec}\0{root}")
            else:
                source = Path(inner if os.path.isabs(inner) else os.path.join(base_dir, inner))
                if not source.exists():
                    raise StepError(f"%mount {spec}: {source} does not exist")
                digests.append(f"{spec}\0" + (tree_digest(source) if source.is_dir() else _file_digest(source)))
                if rw:  # writes are discarded: the step writes into a fresh copy
                    source = Path(run_in_userns(_copy_in_ns, None, str(source), str(scratch), _key(spec)))
            request["readonly"] = not rw
        key = _key(kind, str(source))
        if key not in {mt.key for mt in out.mounts}:
            out.mounts.append(Mount(str(source), target or "/", readonly=False, key=key))
        request["key"] = key
        out.requests.append(request)
    out.digest = hashlib.sha256("\0".join(digests).encode()).hexdigest() if digests else ""
    return out
