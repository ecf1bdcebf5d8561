"""`stacker-kernel clean` (as `stacker clean`: all of a recipe's or a folder's state) and
gc's choices: builds of deleted recipes, builds older than an age, the cache (issue 26)."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from stacker_kernel.cli import main
from stacker_kernel.storage.store import Store


def _project(folder: Path, busybox_oci: str, name: str = "stacker.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    yaml = folder / name
    yaml.write_text(textwrap.dedent(f"""
        l-{folder.name}:
          from:
            type: oci
            url: {busybox_oci}
          run: echo {folder.name} > /{folder.name}
        """))
    return yaml


def _build(storage, yaml: Path, *extra: str) -> None:
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--oci-dir",
                 str(yaml.parent / "oci"), *extra]) == 0


def _step_snapshots(storage) -> set[str]:
    with Store.open(storage) as store:
        return {s.id for s in store.snapshots() if s.kind == "step"}


def _sessions(storage) -> list[str]:
    with Store.open(storage) as store:
        return sorted(s.name for s in store.find_sessions())


def test_clean_a_folder_forgets_its_builds_and_deletes_what_they_left(storage, busybox_oci, tmp_path, capsys):
    a, b = _project(tmp_path / "a", busybox_oci), _project(tmp_path / "b", busybox_oci)
    _build(storage, a)
    _build(storage, b)
    (tmp_path / "a" / "stacker-logs").mkdir()
    (tmp_path / "a" / "stacker-logs" / "nb-step1-x.log").write_text("log")
    (tmp_path / "a" / "stacker-downloads").mkdir()
    steps = _step_snapshots(storage)
    assert len(steps) == 2
    assert main(["--storage", str(storage), "clean", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert _sessions(storage) == [str(b)]
    assert len(_step_snapshots(storage)) == 1  # a's step is deleted, b's stays
    for gone in ("oci", "stacker-logs", "stacker-downloads"):
        assert not (tmp_path / "a" / gone).exists(), gone
    assert a.exists() and (tmp_path / "b" / "oci").is_dir()
    assert "removed 1 snapshot(s)" in out


def test_clean_of_one_recipe_keeps_its_neighbours(storage, busybox_oci, tmp_path):
    a = _project(tmp_path / "p", busybox_oci, "a.yaml")
    b = _project(tmp_path / "p", busybox_oci, "b.yaml")
    b.write_text(b.read_text().replace("echo p", "echo other"))
    _build(storage, a)
    _build(storage, b, "--no-oci")
    assert main(["--storage", str(storage), "clean", str(a), "--keep-oci"]) == 0
    assert _sessions(storage) == [str(b)]
    assert (tmp_path / "p" / "oci").is_dir()


def test_gc_drops_builds_of_deleted_recipes_only_when_asked(storage, busybox_oci, tmp_path, capsys):
    a, b = _project(tmp_path / "a", busybox_oci), _project(tmp_path / "b", busybox_oci)
    _build(storage, a, "--no-oci")
    _build(storage, b, "--no-oci")
    shutil.rmtree(tmp_path / "a")
    assert main(["--storage", str(storage), "gc"]) == 0
    assert "removed 0 snapshot(s)" in capsys.readouterr().out  # plain gc keeps the cache
    assert main(["--storage", str(storage), "gc", "--recipe-gone"]) == 0
    out = capsys.readouterr().out
    assert f"forgot build" in out and str(a) in out
    assert "removed 1 snapshot(s)" in out
    assert _sessions(storage) == [str(b)]


def test_gc_older_than_drops_builds_not_used_since(storage, busybox_oci, tmp_path, capsys):
    a = _project(tmp_path / "a", busybox_oci)
    _build(storage, a, "--no-oci")
    assert main(["--storage", str(storage), "gc", "--older-than", "1h"]) == 0
    assert _sessions(storage) == [str(a)]  # used just now
    time.sleep(1.1)
    assert main(["--storage", str(storage), "gc", "--older-than", "1s"]) == 0
    assert _sessions(storage) == []
    assert main(["--storage", str(storage), "gc", "--older-than", "soon"]) == 1
    assert "--older-than 'soon' is not an age" in capsys.readouterr().err


def test_gc_never_drops_a_running_kernels_session(storage, tmp_path, capsys):
    with Store.open(storage) as store:
        store.new_session("kernel", str(tmp_path / "deleted.ipynb"))  # owned by this (running) process
    assert main(["--storage", str(storage), "gc", "--recipe-gone", "--older-than", "0s"]) == 0
    assert "it is running" in capsys.readouterr().out
    assert _sessions(storage) == [str(tmp_path / "deleted.ipynb")]


def test_gc_cache_empties_the_download_caches_and_drops_records_of_removed_bases(storage, busybox_oci, tmp_path,
                                                                                   capsys):
    a = _project(tmp_path / "a", busybox_oci)
    _build(storage, a)
    cache = storage / "cache"
    assert (cache / "base-images").is_dir() and any((cache / "base-layers" / "blobs").glob("*/*"))
    (cache / "downloads").mkdir(exist_ok=True)
    (cache / "downloads" / "x.tar").write_bytes(b"x" * 1000)
    # The base stays referenced (by a's build): its record and layer copies stay.
    assert main(["--storage", str(storage), "gc", "--cache"]) == 0
    assert "cache: removed" in capsys.readouterr().out
    assert not (cache / "downloads").exists()
    assert any((cache / "base-images").glob("*.json"))
    # Once the build is gone, gc deletes the base and its record too.
    assert main(["--storage", str(storage), "clean", str(tmp_path / "a")]) == 0
    assert not any((cache / "base-images").glob("*.json"))
