"""Checks of cache records: a record fetched from a shared cache, and a step entry of
the local store, are used only when every field has the type and shape its use needs.

Whoever can push to a cache writes these records, and an entry committed before
this check existed may be malformed: anything wrong makes the entry a miss (one
warning line for a fetched one, and the step runs), never an exception later
in a build.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

_HEX32 = re.compile(r"[0-9a-f]{32}")
_STR_MAPS = ("exported", "plain", "aliases", "sh_functions")
_STRS = ("cwd", "options", "umask", "traps", "functions")


class BadRecord(ValueError):
    """A record field that cannot be used; the message names the field, never its value."""


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def check_state(text: Any) -> None:
    """Raise BadRecord unless `text` is a shell state as ShellState.of_snapshot reads
    it: "null", or a JSON object whose variables, aliases and functions are strings."""
    if not isinstance(text, str):
        raise BadRecord("its shell state is not text")
    if text == "null":
        return
    try:
        d = json.loads(text)
    except ValueError:
        raise BadRecord("its shell state is not JSON") from None
    if not isinstance(d, dict):
        raise BadRecord("its shell state is not an object")
    for key in _STR_MAPS:
        if key in d and not _str_map(d[key]):
            raise BadRecord(f"its shell state's {key} are not all strings")
    for key in _STRS:
        if key in d and not isinstance(d[key], str):
            raise BadRecord(f"its shell state's {key} is not a string")


def check_duration(value: Any) -> float:
    """A step's duration: a finite number of seconds >= 0 (not a bool, not text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRecord("its duration is not a number of seconds")
    return float(value)


def check_fetched(record: Any) -> dict[str, Any]:
    """The record of a fetched cache entry, every field the hit uses checked (format,
    keys, parent, snapshot id, layer, source, state, duration, log, diff id)."""
    if not isinstance(record, dict):
        raise BadRecord("its record is not an object")
    if isinstance(record.get("format"), bool) or not isinstance(record.get("format"), int):
        raise BadRecord("its format is not a number")
    for key in ("key", "parent_key", "parent"):
        if not isinstance(record.get(key), str):
            raise BadRecord(f"its {key} is not text")
    for key in ("layer", "source", "log", "diff_id"):
        if key in record and not isinstance(record[key], str):
            raise BadRecord(f"its {key} is not text")
    snapshot = record.get("snapshot")
    if snapshot is not None and not (isinstance(snapshot, str) and _HEX32.fullmatch(snapshot)):
        raise BadRecord("its snapshot id is not 32 hex digits")
    check_state(record.get("state"))
    check_duration(record.get("duration", 0.0) if record.get("duration") is not None else 0.0)
    env_refs = record.get("env_refs", {})
    if not (isinstance(env_refs, dict) and set(env_refs) <= {"exported", "plain"}
            and all(_str_map(v) for v in env_refs.values())):
        raise BadRecord("its build environment references are not names")
    return record


def usable_entry(state: Any, duration: Any) -> bool:
    """Whether a local cache entry (a step snapshot's recorded state and duration) can be
    used: one committed by an older version from a bad fetched record cannot."""
    try:
        check_state(state)
        check_duration(duration)
    except BadRecord:
        return False
    return True


# --- build environment values stay on the machine -------------------------------------------
# A step's shell state records its exported variables, the build environment's among
# them (`build_env`, and host variables it passes through, e.g. a proxy with a
# password). A pushed record names those variables instead of carrying their values;
# the hit takes them from its own build environment (equal, as the cache key holds it).

NOT_SECRET = ("PATH", "STACKER_LAYER_NAME", "TERM", "SOURCE_DATE_EPOCH")
_LOG_MIN = 4  # characters: shorter values ("1", "yes") are not looked for in a log


def secret_env(env: dict[str, str]) -> dict[str, str]:
    """The entries of a step's build environment whose values must not leave the machine."""
    return {k: v for k, v in env.items() if k not in NOT_SECRET and v}


def redact_state(state: str, secrets: dict[str, str]) -> tuple[str, dict[str, dict[str, str]]]:
    """`state` (a ShellState's JSON) without the values of `secrets`, and for each variable
    emptied, the build environment variable that held its value."""
    if not secrets or state == "null":
        return state, {}
    d = json.loads(state)
    refs: dict[str, dict[str, str]] = {}
    for kind in ("exported", "plain"):
        for name, value in (d.get(kind) or {}).items():
            source = name if secrets.get(name) == value else next(
                (k for k, v in secrets.items() if v == value), None)
            if source is not None:
                d[kind][name] = ""
                refs.setdefault(kind, {})[name] = source
    return (json.dumps(d, sort_keys=True), refs) if refs else (state, {})


def restore_state(state: str, refs: dict[str, dict[str, str]], env: dict[str, str]) -> str:
    """The state `redact_state` emptied, its values taken from this build's `env`; exactly
    the state that was recorded (ShellState.to_json sorts its keys too)."""
    if not refs:
        return state
    d = json.loads(state)
    for kind, names in refs.items():
        for name, source in names.items():
            if source not in env or not isinstance(d.get(kind), dict):
                raise BadRecord(f"its state names the build environment variable {source}, "
                                "which this build does not set")
            d[kind][name] = env[source]
    return json.dumps(d, sort_keys=True)


def redact_log(log: str, secrets: dict[str, str]) -> str:
    """A step's output with every value of `secrets` replaced by its variable's name."""
    for name, value in sorted(secrets.items(), key=lambda kv: -len(kv[1])):
        if len(value) >= _LOG_MIN:
            log = log.replace(value, f"[build_env {name}]")
    return log
