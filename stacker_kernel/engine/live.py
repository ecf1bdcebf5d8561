"""The live rootfs of a session: its writable subvolume, its container, its imports.

A session builds in one writable subvolume (live/<session id>), a snapshot of
its head. The container runs on it and is started again whenever what it was
started with changes (the layer, its binds, `%network`). The layer's imports
are staged beside it (imports/<session id>) and shown read-only in the
container; imports with a `dest` are landed in the rootfs itself.

Nothing here knows about history or cache: the session says which snapshot
the rootfs must be, and when.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from stacker_kernel.container.step import ROOT_HOME
from stacker_kernel.engine import imports as imports_mod
from stacker_kernel.errors import ContainerError, StepError
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Snapshot, Store, process_tmp_name

if TYPE_CHECKING:  # loaded where a container starts: a build that takes every step from the cache starts none
    from stacker_kernel.container.runtime import Container, Mount

BUILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# stacker's default build_env_passthrough (pkg/types/layer.go)
DEFAULT_PASSTHROUGH = ["ftp_proxy", "http_proxy", "https_proxy", "no_proxy", "FTP_PROXY",
                       "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "TERM", "SOURCE_DATE_EPOCH"]


def build_environment(layer: Layer, host_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `run` step, as stacker builds it (not `environment:`)."""
    host_env = os.environ if host_env is None else host_env
    # HOME as a login shell of the steps' user (root) has it, as in stacker's containers
    env = {"PATH": BUILD_PATH, "HOME": ROOT_HOME}
    patterns = DEFAULT_PASSTHROUGH if layer.build_env_passthrough is None else layer.build_env_passthrough
    for key, value in host_env.items():
        if value and any(re.fullmatch(p, key) for p in patterns):
            env[key] = value
    env.update({k: str(v) for k, v in layer.build_env.items() if str(v) != ""})
    env["STACKER_LAYER_NAME"] = layer.name
    return env


def absolute_source(src: ImageSource, base_dir: str) -> ImageSource:
    """Local tar/oci paths are relative to the notebook's (or stacker.yaml's) directory."""
    url = src.url
    if not url or src.type not in ("tar", "oci") or "://" in url or os.path.isabs(url):
        return src
    return replace(src, url=os.path.join(base_dir, url))


class LiveRootfs:
    """The writable rootfs of session `session_id`, the container on it and its staged imports.

    `ready` is True while the subvolume is a usable snapshot of the session's
    head; whoever changes the head clears it or calls `replace`.
    """

    def __init__(self, store: Store, session_id: str):
        self.store = store
        self.session_id = session_id
        self.container: Container | None = None
        self.ready = False
        self.imports_digest = ""  # of the staged imports: part of every step's cache key
        self._imports_name = process_tmp_name("") + session_id  # this process's, not a fork's
        self._pending: Snapshot | None = None  # what the rootfs is to be a snapshot of (see replace)
        self.before_making: Callable[[], None] | None = None  # called before the rootfs is made

    @property
    def path(self) -> Path:
        """The rootfs, made now if `replace` left it to be made."""
        live = self.store.live_path(self.session_id)
        if self._pending is not None:
            if self.before_making is not None:
                self.before_making()
            live.parent.mkdir(parents=True, exist_ok=True)
            self.store.driver.writable_copy(self._pending.path, live)
            self._pending = None  # only once made: a failure (a full disk) is tried again
        return live

    @property
    def imports_dir(self) -> Path:
        """The layer's imports, staged (named after this process: collected once it is gone)."""
        return self.store.root / "imports" / self._imports_name

    def replace(self, snap: Snapshot) -> None:
        """The rootfs becomes a writable snapshot of `snap` (the container stops).

        The old rootfs goes now; the snapshot is made when the rootfs is next used
        (`path`): a run of cache hits, each the session's new head, makes one at the
        end, not one per step. `snap` is the session's head by then, which gc keeps."""
        self.stop_container()
        live = self.store.live_path(self.session_id)
        if live.exists():  # now: its space is freed while the next steps hit the cache
            self.store.driver.remove(live)
        self._pending = snap

    def before_commit(self) -> None:
        """Called before the rootfs is committed or written from outside the container:
        a driver whose rootfs is a mount of the container's (overlay) needs that mount
        gone. The container is parked, not stopped: `after_commit` builds its root again."""
        if self.store.driver.stop_before_commit and self.container is not None:
            try:
                self.container.park()
            except ContainerError:
                self.stop_container()

    def after_commit(self) -> None:
        """Called once the rootfs is committed: a parked container builds its root again
        on the new stack while the engine finishes the cell (the next step finds it
        ready: see ensure_container)."""
        container = self.container
        if container is not None and container.parked:
            try:
                container.resume(str(self.path))
            except (OSError, ContainerError):
                self.stop_container()

    def has(self, rel: str) -> bool:
        """Whether `rel` exists in the rootfs (symlinks not followed), read from the host."""
        return self.store.driver.lexists(self.path, rel)

    def stage_imports(self, layer: Layer, base_dir: str, fetch_layer_path: Callable[[str, str, str], str]) -> None:
        """Copy the layer's imports to the staging dir the container shows read-only at
        /stacker/imports (stale files gone); `imports_digest` says what they are."""
        self.imports_digest = imports_mod.stage(layer, self.imports_dir, base_dir,
                                                fetch_layer_path=fetch_layer_path)

    def drop_imports(self) -> None:
        """Delete the staged imports and their downloads (the session ends)."""
        from stacker_kernel.storage import btrfs

        for staged in (self.imports_dir, self.imports_dir.parent / (self.imports_dir.name + ".downloads")):
            try:
                btrfs.remove_tree(staged)
            except OSError:
                pass  # e.g. a full disk: the folder stays, as it did before sessions dropped it

    def land_dest_imports(self, layer: Layer) -> None:
        """Copy the staged imports with a `dest` into the rootfs, as the container's root."""
        from stacker_kernel.container.userns import run_in_userns

        items = [(imports_mod.staged_name(i), i.path.endswith("/"), i.dest, i.mode, i.uid, i.gid)
                 for i in layer.imports if i.dest]
        self.before_commit()
        run_in_userns(imports_mod.land_in_rootfs, str(self.imports_dir), str(self.path), items)

    def ensure_container(self, layer: Layer, base_dir: str, network: str,
                         step_mounts: list[Mount] = ()) -> Container:
        """The container on the rootfs, started for `layer` (its imports and binds) if needed,
        with `step_mounts` (the mounts a step asks for by key) staged in it."""
        self.after_commit()  # parked (e.g. a commit left it so): its root again
        mounts = self._layer_mounts(layer, base_dir)
        if self.container is not None:
            try:
                self.container.settle()
            except ContainerError:
                self.stop_container()  # started afresh below, which says what is wrong
        if self.container is not None and self.container.alive:
            have = {(m.key, m.source) for m in self.container.config.mounts if m.key}
            if self.container.config.network == network and \
                    [m for m in self.container.config.mounts if not m.key] == mounts and \
                    all((m.key, m.source) in have for m in step_mounts):
                return self.container
            # `%network` changed, the layer's imports or binds did, or a step needs a mount the
            # container lacks: the mode and the mounts are the container's, so start it again
            # (the live rootfs and the shell state carry over, as between any two steps); the
            # mounts staged before stay.
            step_mounts = [m for m in self.container.config.mounts if m.key
                           and m.key not in {s.key for s in step_mounts}] + list(step_mounts)
            self.stop_container()
        from stacker_kernel.container.runtime import Container, ContainerConfig

        mounts += step_mounts
        self.container = Container.start(ContainerConfig(rootfs=str(self.path), mounts=mounts,
                                                         network=network))
        return self.container

    def _layer_mounts(self, layer: Layer, base_dir: str) -> list[Mount]:
        """The mounts every step of `layer` has: its imports (only when it has some: a mount
        point made and removed at every step would change `/` in every snapshot) and its binds."""
        from stacker_kernel.container.runtime import Mount

        mounts = []
        if layer.imports:
            # The legacy `import:` key put files at /stacker/ (stacker < 1.0); `imports:` at /stacker/imports.
            where = "/stacker" if layer.uses_legacy_import() else "/stacker/imports"
            mounts.append(Mount(str(self.imports_dir), where, readonly=True))
        for b in layer.binds:
            src = b.source if os.path.isabs(b.source) else os.path.join(base_dir, b.source)
            if not os.path.exists(src):
                raise StepError(f"bind source {src} does not exist: fix the binds of layer {layer.name}")
            mounts.append(Mount(src, b.dest or b.source, readonly=False))
        return mounts

    def stop_container(self) -> None:
        if self.container is not None:
            try:
                self.container.stop()
            finally:
                self.container = None

    def interrupt(self) -> None:
        """Interrupt the step running in the container, if any (thread-safe)."""
        container = self.container
        if container is not None:
            container.interrupt()
