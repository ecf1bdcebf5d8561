"""The program of the pushing thread's layer maker (engine/remote_cache.py
`_LayerMaker`): a fresh interpreter for a session's pushes, fed a JSON line
(parent, new, out_dir) per layer and answering a JSON line, the layer blob or
the one-line reason it could not be made.

It enters one user namespace for its whole life (a fresh interpreter has one
thread, as unshare requires) instead of forking a helper per layer, so what it
learnt stays: a step's snapshot is the next step's parent, and the walk of its
tree made for one layer is lent to the next (oci/diff.py `walks`), so a chain
of pushed steps is walked once per snapshot, as an export walks it.
Only the modules a layer needs are loaded here (not the engine's).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import IO, Any


def _enter_namespace() -> str | None:
    """Become the container's root (real root works on the snapshots as it is); the
    reason it failed, else None."""
    if os.geteuid() == 0:
        return None
    from stacker_kernel.container.userns import CLONE_NEWNS, IdMap, enter_new_userns
    from stacker_kernel.errors import StackerKernelError

    try:
        enter_new_userns(IdMap.for_current_user(), CLONE_NEWNS)
    except (StackerKernelError, OSError) as e:
        return str(e)
    return None


def make_layer(parent: str, new: str, out_dir: str, walks: dict[str, Any], views: bool):
    """The tar layer of `parent` -> `new` as the export's tar writer makes it (no
    SOURCE_DATE_EPOCH: a hit must give back the mtimes too). `walks` lends the
    walk of `parent` when it was the last layer's `new`, and keeps `new`'s."""
    from stacker_kernel.oci.diff import diff_snapshots
    from stacker_kernel.oci.tarwriter import write_layer

    if views:  # trees of the overlay driver, shown as the trees they stand for (run_in_userns does it too)
        from stacker_kernel.storage.overlay import mount_views

        mount_views([parent, new])
    for path in [p for p in walks if p != parent or _STAMPS.get(p) != _stamp(p)]:
        del walks[path]  # not this layer's parent (a push was skipped), or another tree at its path
    diff = diff_snapshots(parent, new, walks)
    for path in [p for p in walks if p != new]:
        del walks[path]  # only the walk the next layer may share is kept (a rootfs's entries each)
    _STAMPS.clear()
    _STAMPS[new] = _stamp(new)
    return write_layer(new, diff, out_dir, source_date_epoch=None)


# What the tree walked last was when walked: a snapshot deleted and made again at its
# path (a cache hit keeps the id it had where it was built) is walked again.
_STAMPS: dict[str, tuple[int, int, int] | None] = {}


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns  # a btrfs subvolume: its own device number, its creation


def serve(requests: Iterable[str], answers: IO[str]) -> None:
    """Answer each request line until the input ends."""
    views = os.geteuid() != 0
    refused = _enter_namespace()
    walks: dict[str, Any] = {}
    for line in requests:
        try:
            if refused is not None:
                raise OSError(refused)
            blob = make_layer(*json.loads(line), walks, views)
            answer: dict[str, Any] = {"ok": dataclasses.asdict(blob)}
        except Exception as e:  # noqa: BLE001 (the pushing thread makes it one warning line)
            answer = {"error": (str(e).strip().splitlines() or [type(e).__name__])[-1]}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
