"""Build provenance: an in-toto Statement v1 with a SLSA provenance v1 predicate.

Pure formatting: the caller (engine/attest.py) says what was built from what.
Reproducible: with SOURCE_DATE_EPOCH the start and finish times are that
epoch, and nothing else depends on the clock, ids of snapshots or dict order.
See https://slsa.dev/spec/v1.0/provenance and
https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

MEDIA_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
VERSION = "0.1.0"
BUILD_TYPE = "https://stacker-kernel.invalid/build/v1"
BUILDER_ID = f"https://stacker-kernel.invalid/builder/stacker-kernel@{VERSION}"


@dataclass(frozen=True)
class Step:
    """One step of a layer the image is made of: its cell (notebooks) and script."""
    layer: str
    script: str
    cell_id: str | None = None


@dataclass(frozen=True)
class Dependency:
    """An input: a base image (`sha256` of its manifest), a tar base or an import
    (`sha256` of its content); `sha256` is None when it is not known (a URL import
    without a hash)."""
    uri: str
    sha256: str | None
    name: str


@dataclass(frozen=True)
class BuildRecord:
    """What an image was built from and when (times in seconds since the epoch)."""
    recipe: str  # the stacker.yaml or notebook path
    recipe_sha256: str | None
    steps: tuple[Step, ...]
    dependencies: tuple[Dependency, ...] = ()
    started: float | None = None
    finished: float | None = None
    stacker_yaml_sha256: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)  # e.g. substitutions


def timestamp(epoch: int | None) -> str:
    """Now (or SOURCE_DATE_EPOCH `epoch`) as RFC 3339 UTC, to the second."""
    return _time(datetime.datetime.now(datetime.timezone.utc).timestamp(), epoch) or ""


def _time(seconds: float | None, epoch: int | None) -> str | None:
    value = epoch if epoch is not None else seconds
    if value is None:
        return None
    when = datetime.datetime.fromtimestamp(int(value), datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def statement(name: str, manifest_digest: str, record: BuildRecord, *,
              source_date_epoch: int | None = None) -> dict[str, Any]:
    """The in-toto statement whose subject is image `name` (manifest `manifest_digest`)."""
    algorithm, _, hexdigest = manifest_digest.partition(":")
    recipe: dict[str, Any] = {"path": record.recipe}
    if record.recipe_sha256:
        recipe["digest"] = {"sha256": record.recipe_sha256}
    external: dict[str, Any] = {"recipe": recipe, "layers": []}
    if record.stacker_yaml_sha256:
        external["stackerYaml"] = {"digest": {"sha256": record.stacker_yaml_sha256}}
    if record.parameters:
        external["substitutions"] = dict(sorted(record.parameters.items()))
    for step in record.steps:
        if not external["layers"] or external["layers"][-1]["name"] != step.layer:
            external["layers"].append({"name": step.layer, "steps": []})
        entry = {"script": step.script}
        if step.cell_id:
            entry["cell"] = step.cell_id
        external["layers"][-1]["steps"].append(entry)
    deps = []
    for d in record.dependencies:
        dep: dict[str, Any] = {"uri": d.uri, "name": d.name}
        if d.sha256:
            dep["digest"] = {"sha256": d.sha256}
        deps.append(dep)
    metadata: dict[str, Any] = {}
    for key, value in (("startedOn", _time(record.started, source_date_epoch)),
                       ("finishedOn", _time(record.finished, source_date_epoch))):
        if value is not None:
            metadata[key] = value
    predicate = {
        "buildDefinition": {"buildType": BUILD_TYPE, "externalParameters": external,
                            "resolvedDependencies": deps},
        "runDetails": {"builder": {"id": BUILDER_ID, "version": {"stacker-kernel": VERSION}},
                       "metadata": metadata},
    }
    return {"_type": STATEMENT_TYPE, "subject": [{"name": name, "digest": {algorithm: hexdigest}}],
            "predicateType": PREDICATE_TYPE, "predicate": predicate}


def statement_bytes(document: dict[str, Any]) -> bytes:
    """The bytes stored for a statement: sorted keys, indented, one final newline."""
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
