"""The step cache: what a step's cache key is made of, where a key is looked up, and
how a hit shows the output of the run it stands for.

A step whose key was built before does not run: the session's rootfs becomes
a writable snapshot of the cached one and its stored output is replayed.

Every lookup and every commit of a step goes through `StepCache`: it is the
seam for a cache elsewhere (a registry shared by a team). A key missed
locally would be asked for there (outside the store's write lock: a slow
fetch must not stop other processes; what it fetches is committed into the
store, so the local lookup finds it), and a step committed here would be
offered to it after `commit`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
import os
from pathlib import Path
from typing import Callable

from stacker_kernel.storage.store import Snapshot, Store

REPLAY_CAP = 2_000_000
# Part of every cache key: raise it when what a step means changes (how it runs,
# what its snapshot holds), so that keys made before never hit again.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class StepInputs:
    """Everything a step's result depends on."""
    parent: str  # the snapshot it runs on ("" for none)
    state: str | None  # the shell state before it (JSON), None at a layer's start
    script: str
    imports: str  # digest of the staged imports
    env: dict[str, str]
    network: str


def cache_key(inputs: StepInputs) -> str:
    """The key of a step with `inputs`, under this version's CACHE_FORMAT."""
    blob = json.dumps({
        "format": CACHE_FORMAT,
        "parent": inputs.parent,
        "state": inputs.state,
        "script": inputs.script,
        "imports": inputs.imports,
        "env": inputs.env,
        "network": inputs.network,
    }, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


class StepCache:
    """The cache of one store."""

    def __init__(self, store: Store):
        self.store = store

    def lookup(self, key: str) -> Snapshot | None:
        """The snapshot stored for `key`, or None. The caller holds the store's write
        lock, so a concurrent gc cannot delete it before the session points at it.
        An entry whose record cannot be used (engine/cache_record.py) is dropped: a miss,
        and the step's new snapshot becomes the entry."""
        from stacker_kernel.engine.cache_record import usable_entry

        snap = self.store.find_cache(key)
        if snap is not None and not usable_entry(snap.state, snap.duration):
            self.store.forget_cache(key)
            return None
        return snap

    def commit(self, live: os.PathLike | str, snap: Snapshot, log: Path | None, *,
               reuse_cached: bool) -> Snapshot:
        """Commit step `snap` (with its cache key) from subvolume `live`, its output
        `log` becoming the snapshot's. The first snapshot committed for a key is its
        entry; with `reuse_cached`, a key that has one already (another session
        built the same step meanwhile) commits nothing and returns that entry, for
        the session to go on from (`log` is dropped: the entry has its own)."""
        stored = self.store.commit(live, snap, reuse_cached=reuse_cached)
        if log is not None:
            if stored.id == snap.id:
                os.replace(log, self.store.log_path(stored.id))
            else:
                log.unlink(missing_ok=True)
        return stored


def replay_output(log: Path, on_output: Callable[[str], None] | None) -> None:
    """Send a hit's stored output to `on_output` (the first REPLAY_CAP bytes), without
    terminal control but colours (engine/terminal.py): it may come from a shared cache."""
    from stacker_kernel.engine.terminal import safe_text

    if on_output is None or not log.exists():
        return
    with open(log, "rb") as f:
        data = f.read(REPLAY_CAP + 1)
    text = data[:REPLAY_CAP].decode("utf-8", errors="replace")
    if len(data) > REPLAY_CAP:
        text += f"\n[output truncated: full log in {log}]\n"
    if text:
        on_output(safe_text(text))
