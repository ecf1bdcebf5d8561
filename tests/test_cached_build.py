"""A build that changes nothing writes nothing to the store (issue 25): its session is
recorded only once it does more than take steps from the cache, or its record differs
from the file's last one. What a build records must still be what it built."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from stacker_kernel.storage.store import DB_NAME, Store

from kernel_support import write_notebook


def _cli(storage, cwd: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "stacker_kernel", "--storage", str(storage), *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _db(storage) -> str:
    """The records as the disk holds them (no -wal left: everything is in the file)."""
    assert not (Path(storage) / (DB_NAME + "-wal")).exists()
    return hashlib.sha256((Path(storage) / DB_NAME).read_bytes()).hexdigest()


def _builds(storage, name: Path) -> list:
    with Store.open(storage) as store:
        return store.find_sessions(name=str(name), kind="build")


def _dockerfile(tmp_path: Path, busybox_tar, text: str) -> list[str]:
    (tmp_path / "Dockerfile").write_text(f"FROM busybox\nRUN echo {text} > /hi\n")
    return ["build", "-f", "Dockerfile", "--base", f"busybox=tar:{busybox_tar}"]


def test_a_build_that_changes_nothing_writes_nothing(storage, busybox_tar, tmp_path):
    build = _dockerfile(tmp_path, busybox_tar, "one")
    _cli(storage, tmp_path, *build)
    _cli(storage, tmp_path, *build)  # the first cached build checks the layout in full
    [recorded] = _builds(storage, tmp_path / "Dockerfile")
    before = _db(storage)
    out = _cli(storage, tmp_path, *build)
    assert "0 step(s) ran, 2 cached" in out and "wrote image to oci" in out
    assert _db(storage) == before
    assert [s.id for s in _builds(storage, tmp_path / "Dockerfile")] == [recorded.id]
    _cli(storage, tmp_path, "grab", "-f", "Dockerfile", "image:/hi", str(tmp_path / "got"))
    assert (tmp_path / "got").read_text() == "one\n"

    # A notebook's build alike
    write_notebook(tmp_path / "app.ipynb", [("c1", f"%layer app\n%from tar {busybox_tar}"), ("c2", "echo hi > /hi")])
    _cli(storage, tmp_path, "build", "-f", "app.ipynb")
    _cli(storage, tmp_path, "build", "-f", "app.ipynb")
    before = _db(storage)
    assert "0 step(s) ran, 1 cached" in _cli(storage, tmp_path, "build", "-f", "app.ipynb")
    assert _db(storage) == before


def test_a_cached_build_of_an_earlier_version_records_that_version(storage, busybox_tar, tmp_path):
    """Every step of the earlier Dockerfile is still in the cache, but the file's last
    build was another: the build is recorded, and gc keeps what it built."""
    build = _dockerfile(tmp_path, busybox_tar, "one") + ["--no-oci"]
    _cli(storage, tmp_path, *build)
    _dockerfile(tmp_path, busybox_tar, "two")
    assert "1 step(s) ran" in _cli(storage, tmp_path, *build)
    _dockerfile(tmp_path, busybox_tar, "one")
    assert "0 step(s) ran, 2 cached" in _cli(storage, tmp_path, *build)
    _cli(storage, tmp_path, "gc")  # what only the build of "two" holds goes
    _cli(storage, tmp_path, "grab", "-f", "Dockerfile", "image:/hi", str(tmp_path / "got"))
    assert (tmp_path / "got").read_text() == "one\n"
    assert "0 step(s) ran, 2 cached" in _cli(storage, tmp_path, *build)  # nothing of "one" collected


def test_a_cached_build_whose_layout_changed_records_its_session(storage, busybox_tar, tmp_path):
    """Writing the layout reads the snapshots: the build is recorded first (gc keeps them)."""
    build = _dockerfile(tmp_path, busybox_tar, "one")
    _cli(storage, tmp_path, *build)
    [first] = _builds(storage, tmp_path / "Dockerfile")
    index = tmp_path / "oci" / "index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "manifests": []}))  # the tag dropped
    assert "0 step(s) ran, 2 cached" in _cli(storage, tmp_path, *build)
    [now] = _builds(storage, tmp_path / "Dockerfile")
    assert now.id != first.id and now.same_position(first)
    assert json.loads(index.read_text())["manifests"]


def test_a_cached_build_refreshes_a_record_older_than_ten_minutes(storage, busybox_tar, tmp_path):
    """gc --older-than counts from the record's time: a build that changes nothing
    leaves it only while it is recent."""
    build = _dockerfile(tmp_path, busybox_tar, "one") + ["--no-oci"]
    _cli(storage, tmp_path, *build)
    [first] = _builds(storage, tmp_path / "Dockerfile")
    with sqlite3.connect(Path(storage) / DB_NAME) as db:
        db.execute("UPDATE sessions SET updated = updated - 3600 WHERE id = ?", (first.id,))
    db.close()
    _cli(storage, tmp_path, *build)
    [now] = _builds(storage, tmp_path / "Dockerfile")
    assert now.id != first.id and time.time() - now.updated < 60
    _cli(storage, tmp_path, "gc", "--older-than", "30m")
    assert [s.id for s in _builds(storage, tmp_path / "Dockerfile")] == [now.id]


def test_a_dockerfile_translation_is_kept_until_one_of_its_inputs_changes(tmp_path, monkeypatch):
    """engine/build.py keeps a Dockerfile's notebook in the store's cache: the same text,
    options and build context give it back without translating (nor loading the Go
    parser); any change that the translation depends on translates again, and what
    is given back is always what a translation now gives."""
    from stacker_kernel.engine import build
    from stacker_kernel.recipe import dockerfile
    from stacker_kernel.recipe.dockerfile_options import DockerfileOptions

    translations = []
    real = dockerfile.dockerfile_notebook
    monkeypatch.setattr(dockerfile, "dockerfile_notebook", lambda *a, **k: translations.append(1) or real(*a, **k))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("a")
    path = ctx / "Dockerfile"
    path.write_text("FROM busybox AS base\nARG X=1\nRUN echo $X\nCOPY *.txt /d/\nHEALTHCHECK CMD true\n"
                    "FROM base AS two\nRUN true\n")
    cache = tmp_path / "cache"

    def translated(options=DockerfileOptions()) -> bool:
        """Whether the cached load translated; its recipe and warnings are a fresh translation's."""
        before = len(translations)
        warned, fresh_warned = [], []
        recipe = build.load_dockerfile(str(path), options, warn=warned.append, cache=cache)
        assert recipe == build.load_dockerfile(str(path), options, warn=fresh_warned.append)
        assert warned == fresh_warned and any("HEALTHCHECK" in w for w in warned)
        return len(translations) - before == 2

    assert translated()
    assert not translated()
    path.write_text(path.read_text().replace("RUN true", "RUN false"))
    assert translated() and not translated()
    assert translated(DockerfileOptions(build_args={"X": "2"}))
    assert not translated(DockerfileOptions(build_args={"X": "2"}))
    assert translated(DockerfileOptions(bases={"busybox": f"tar:{tmp_path}/b.tar"}))
    assert translated(DockerfileOptions(target="base"))
    assert translated(DockerfileOptions(all_stages=True))
    assert translated()
    (ctx / "b.txt").write_text("b")  # the wildcard COPY matches one more file
    assert translated() and not translated()
    (ctx / ".dockerignore").write_text("b.txt\n")
    assert translated() and not translated()
    (ctx / ".dockerignore").write_text("a.txt\n")  # other matches, the same Dockerfile and options
    assert translated() and not translated()
    assert list((cache / "dockerfiles").iterdir()) == [build._translation_record(cache, str(path))]  # one per file
