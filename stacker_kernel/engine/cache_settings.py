"""Which shared caches a build or kernel uses: flags, `%cache`, or the config file.

Apart from engine/remote_cache.py, which imports the registry client: a build
that names no cache (most) reads these settings and never loads it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stacker_kernel.errors import StorageError


@dataclass
class CacheSettings:
    """The cache URLs of a build or a kernel: flags, `%cache`, or the config file."""
    cache_from: list[str] = field(default_factory=list)
    cache_to: str | None = None
    insecure: bool = False
    authfile: str | None = None

    @property
    def any(self) -> bool:
        """Whether a cache is named at all."""
        return bool(self.cache_from or self.cache_to)


def configured(home: str | os.PathLike | None = None) -> CacheSettings:
    """The defaults of ~/.config/stacker-kernel/config.json: "cache_from" (a URL or a
    list), "cache_to" (a URL) and "cache_insecure" (true: as --insecure). Empty
    settings when the file has none."""
    from stacker_kernel.storage.location import config_file

    path = config_file(home or Path.home())
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return CacheSettings()
    except (OSError, ValueError) as e:
        raise StorageError(f"{path} is not valid JSON ({e}): fix it") from None
    sources = data.get("cache_from") or []
    sources = [sources] if isinstance(sources, str) else list(sources)
    target = data.get("cache_to") or None
    if not all(isinstance(s, str) for s in sources) or not isinstance(target, (str, type(None))):
        raise StorageError(f"{path}: cache_from must be a URL or a list of URLs and cache_to a URL")
    return CacheSettings(sources, target, bool(data.get("cache_insecure", False)))
