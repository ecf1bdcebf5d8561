"""The step cache: what a step's cache key is made of, where a key is looked up, and
how a hit shows the output of the run it stands for.

A step whose key was built before does not run: the session's rootfs becomes
a writable snapshot of the cached one and its stored output is replayed.

`StepCache` is the seam for other caches (a registry shared by a team): `lookup`
is where a key missed locally can be asked for elsewhere, `published` is where
a step just committed can be offered to them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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
        lock, so a concurrent gc cannot delete it before the session points at it."""
        return self.store.find_cache(key)

    def published(self, snap: Snapshot) -> None:
        """`snap` was just committed with its cache key (nothing to do for the local
        store: the commit recorded it)."""


def replay_output(log: Path, on_output: Callable[[str], None] | None) -> None:
    """Send a hit's stored output to `on_output` (the first REPLAY_CAP bytes)."""
    if on_output is None or not log.exists():
        return
    with open(log, "rb") as f:
        data = f.read(REPLAY_CAP + 1)
    text = data[:REPLAY_CAP].decode("utf-8", errors="replace")
    if len(data) > REPLAY_CAP:
        text += f"\n[output truncated: full log in {log}]\n"
    if text:
        on_output(text)
