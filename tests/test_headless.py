"""Headless fixed costs and progress (issue 14, points 4 and 17): a cached notebook
build imports no nbformat, an unchanged re-export writes nothing new and keeps its
digests, gc reports the space btrfs really gives back, long work says how far it is."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

from kernel_support import kernels, nbdir, start_kernel, write_notebook  # noqa: F401 (fixtures)
from stacker_kernel import cli
from stacker_kernel.engine import session as session_mod
from stacker_kernel.engine.build import load_recipes
from stacker_kernel.engine.session import BuildSession
from stacker_kernel.errors import RecipeError
from stacker_kernel.oci.export import ImageSpec, export_image
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Store
from test_export import Cfg, busybox_base, index, manifest, step  # noqa: F401 (fixture)
from conftest import in_tree


def _plain_notebook(path: Path, sources: list[str]) -> Path:
    """An nbformat 4.5 notebook written as JupyterLab writes it (plain JSON)."""
    cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
              "outputs": [], "source": src.splitlines(keepends=True)} for i, src in enumerate(sources)]
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "cells": cells, "metadata": {
        "kernelspec": {"name": "stacker", "display_name": "Stacker", "language": "stacker"}}}))
    return path


_HEAVY = ("nbformat", "jsonschema", "jupyter_client")
_BUILD = ("import sys\nfrom stacker_kernel.cli import main\n"
          "rc = main(sys.argv[1:])\n"
          f"print('heavy:', sorted(m for m in sys.modules if m.split('.')[0] in {_HEAVY!r}))\n"
          "sys.exit(rc)\n")


def test_a_cached_notebook_build_imports_neither_nbformat_nor_jupyter_client(storage, busybox_tar, tmp_path):
    (tmp_path / "busybox.tar").write_bytes(busybox_tar.read_bytes())
    nb = _plain_notebook(tmp_path / "app.ipynb", ["%layer app\n%from tar busybox.tar\necho one > /one",
                                                  "echo two > /two"])
    args = [sys.executable, "-c", _BUILD, "--storage", str(storage), "build", "-f", str(nb),
            "--oci-dir", str(tmp_path / "oci")]
    first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 step(s) ran, 2 cached" in again.stdout
    assert "heavy: []" in again.stdout, again.stdout


_HEAVY_FOR_DOCKERFILE = ("nbformat", "jsonschema", "lark", "jupyter_client", "spdx_tools")
_BUILD_DOCKERFILE = _BUILD.replace(repr(_HEAVY), repr(_HEAVY_FOR_DOCKERFILE))


def test_a_cached_dockerfile_build_imports_no_nbformat_lark_or_spdx_tools(storage, busybox_tar, tmp_path):
    (tmp_path / "busybox.tar").write_bytes(busybox_tar.read_bytes())
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN echo one > /one\nRUN echo two > /two\n")
    args = [sys.executable, "-c", _BUILD_DOCKERFILE, "--storage", str(storage), "build", "-f", "Dockerfile",
            "--base", "busybox=tar:busybox.tar", "--oci-dir", str(tmp_path / "oci")]
    first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "spdx_tools" in first.stdout  # the first build writes the SBOM: the check sees imports
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 step(s) ran, 3 cached" in again.stdout, again.stdout
    assert "heavy: []" in again.stdout, again.stdout


def test_cache_hits_make_no_rootfs_snapshot_until_a_step_runs(storage, busybox_tar, tmp_path, monkeypatch):
    from stacker_kernel.engine.build import build
    from stacker_kernel.storage import driver as drivers

    (tmp_path / "busybox.tar").write_bytes(busybox_tar.read_bytes())
    sources = ["%layer app\n%from tar busybox.tar\necho one > /one", "echo two > /two", "echo three > /three"]
    nb = _plain_notebook(tmp_path / "app.ipynb", sources)
    with Store.open(storage) as store:
        build(store, str(nb), out=lambda line: None, stream=lambda text: None)
    made = []
    for cls in (drivers.BtrfsDriver, drivers.OverlayDriver):
        def writable_copy(self, src, dest, real=cls.writable_copy):  # a writable rootfs of a snapshot
            made.append(src)
            return real(self, src, dest)
        monkeypatch.setattr(cls, "writable_copy", writable_copy)
    with Store.open(storage) as store:
        assert build(store, str(nb), out=lambda line: None, stream=lambda text: None).steps_cached == 3
    assert made == []  # three hits, no writable snapshot of any of them
    nb = _plain_notebook(tmp_path / "app.ipynb", sources + ["cat /one /two /three > /all"])
    out: list[str] = []
    with Store.open(storage) as store:
        result = build(store, str(nb), out=out.append, stream=out.append)
        assert (result.steps_cached, result.steps_run) == (3, 1)
        tip = store.get(result.tags["app"])
        assert in_tree(tip.path, "all").read_text() == "one\ntwo\nthree\n"  # the step ran on the last hit
    assert len(made) == 1, out


def test_a_notebook_that_is_not_plain_nbformat_4_is_still_checked_by_nbformat(tmp_path):
    nb = _plain_notebook(tmp_path / "bad.ipynb", ["%from tar busybox.tar\ntrue"])
    data = json.loads(nb.read_text())
    data["cells"][0]["source"] = 5
    nb.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="is not a valid notebook"):
        load_recipes(str(nb))
    nb.write_text("{not json")
    with pytest.raises(RecipeError, match="is not a readable notebook"):
        load_recipes(str(nb))


def test_a_plain_notebook_gives_the_recipe_nbformat_gives(tmp_path):
    import nbformat

    from stacker_kernel.recipe.notebook import recipe_from_notebook

    nb = _plain_notebook(tmp_path / "app.ipynb", ["%layer app\n%from tar b.tar\necho one", "echo two"])
    plain = load_recipes(str(nb))[0]
    checked = recipe_from_notebook(nbformat.read(str(nb), as_version=4), "app", {})
    assert plain.layers == checked.layers


def _files(layout: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of a layout: path -> (inode, mtime ns, size)."""
    out = {}
    for dirpath, _, names in os.walk(layout):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), layout)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


@pytest.mark.parametrize("cached", [True, False], ids=["layer-cache", "re-tarred"])
def test_an_unchanged_re_export_writes_nothing_new_and_keeps_its_digests(storage, busybox_base, cached):
    c, base = busybox_base
    steps = [step(c, "echo a > a"), step(c, "true"), step(c, "mkdir b")]
    specs = [ImageSpec("r", Cfg(environment={"A": "1"}), steps, base_rootfs=base),
             ImageSpec("child", Cfg(), [step(c, "echo c > c")], parent="r")]
    layout = storage / "oci"
    cache = str(storage / "layer-cache") if cached else None
    export_image(str(layout), specs, layer_cache=cache)  # no SOURCE_DATE_EPOCH: times are "now"
    before, first = _files(layout), index(layout)
    time.sleep(1.1)  # a later "now"
    export_image(str(layout), specs, layer_cache=cache)
    assert index(layout) == first
    assert _files(layout) == before  # no new blob, and no file written again


@pytest.mark.btrfs_only  # the store keeps a layout's blobs as reflinks only on btrfs
def test_a_fresh_layout_gets_the_stores_layers_without_compressing_them_again(storage, busybox_base, monkeypatch):
    from stacker_kernel.oci import export as export_mod

    c, base = busybox_base
    steps = [step(c, "echo a > a"), step(c, "mkdir b")]
    specs = [ImageSpec("r", Cfg(), steps, base_rootfs=base)]
    cache = str(storage / "cache" / "layers")
    export_image(str(storage / "first"), specs, layer_cache=cache)
    layers = manifest(storage / "first", "r")["layers"]

    def no_new_layers(*args, **kwargs):
        raise AssertionError("a layer was made again")
    monkeypatch.setattr(export_mod, "_made_in_userns", no_new_layers)
    export_image(str(storage / "second"), specs, layer_cache=cache)  # a fresh layout
    assert manifest(storage / "second", "r")["layers"] == layers
    for d in layers:  # each blob is there whole, as its digest says
        data = (storage / "second" / "blobs" / "sha256" / d["digest"].split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]

    # A kept blob that was damaged is not used: the layer is made again.
    kept = Path(export_mod.kept_blobs(cache)) / "blobs" / "sha256" / layers[-1]["digest"].split(":")[1]
    kept.write_bytes(b"x" * kept.stat().st_size)
    monkeypatch.undo()
    export_image(str(storage / "third"), specs, layer_cache=cache)
    assert manifest(storage / "third", "r")["layers"] == layers
    assert "sha256:" + hashlib.sha256(kept.read_bytes()).hexdigest() == layers[-1]["digest"]  # kept anew

    # gc: the layers of a deleted snapshot are forgotten and their kept blobs deleted.
    from stacker_kernel.storage import btrfs
    btrfs.delete_subvolume(Path(steps[-1].path))
    assert export_mod.prune_layer_cache(cache) > 0
    names = set(os.listdir(kept.parent))
    assert layers[-1]["digest"].split(":")[1] not in names
    assert {d["digest"].split(":")[1] for d in layers[:-1]} <= names


def test_a_layout_off_the_stores_filesystem_lends_its_layers_to_the_next_one(storage, busybox_base, tmp_path,
                                                                            monkeypatch):
    from stacker_kernel.oci import export as export_mod
    from stacker_kernel.storage import btrfs

    assert not btrfs.is_btrfs(tmp_path)  # no reflink into the store: the layout is remembered instead
    c, base = busybox_base
    specs = [ImageSpec("r", Cfg(), [step(c, "echo a > a")], base_rootfs=base)]
    cache = str(storage / "cache" / "layers")
    export_image(str(tmp_path / "first"), specs, layer_cache=cache)
    layers = manifest(tmp_path / "first", "r")["layers"]
    made = []
    real = export_mod._made_in_userns
    monkeypatch.setattr(export_mod, "_made_in_userns", lambda *a, **k: made.append(1) or real(*a, **k))
    export_image(str(tmp_path / "second"), specs, layer_cache=cache)
    assert made == [] and manifest(tmp_path / "second", "r")["layers"] == layers
    for layout in ("first", "second"):
        shutil.rmtree(tmp_path / layout)
    export_image(str(tmp_path / "third"), specs, layer_cache=cache)  # no copy left: made again
    assert made == [1] and manifest(tmp_path / "third", "r")["layers"] == layers


def test_a_changed_image_config_is_written_anew(storage, busybox_base):
    c, base = busybox_base
    steps = [step(c, "echo a > a")]
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("r", Cfg(environment={"A": "1"}), steps, base_rootfs=base)])
    first = manifest(layout, "r")
    export_image(str(layout), [ImageSpec("r", Cfg(environment={"A": "2"}), steps, base_rootfs=base)])
    assert manifest(layout, "r")["config"] != first["config"]
    assert manifest(layout, "r")["layers"] == first["layers"]


def test_export_says_each_layer_it_makes_and_each_image(storage, busybox_base):
    c, base = busybox_base
    steps = [step(c, "echo a > a"), step(c, "true")]
    layout, lines = storage / "oci", []
    export_image(str(layout), [ImageSpec("r", Cfg(), steps, base_rootfs=base)], progress=lines.append,
                 layer_cache=str(storage / "layer-cache"))
    assert [ln.split(":")[0] + ":" + ln.split(":")[1].split("(")[0] for ln in lines[:3]] == [
        "image r: layer 1/3 ", "image r: layer 2/3 ", "image r: layer 3/3 "]
    assert "no change" in lines[2] and re.match(r"image r: 2 layer\(s\), .*, manifest sha256:", lines[3])
    again: list[str] = []
    export_image(str(layout), [ImageSpec("r", Cfg(), steps, base_rootfs=base)], progress=again.append,
                 layer_cache=str(storage / "layer-cache"))
    assert again == [lines[3]]  # nothing made again: one line for the image


def test_a_base_import_that_takes_a_while_says_so(storage, busybox_tar, monkeypatch):
    monkeypatch.setattr(session_mod, "IMPORT_NOTICE_AFTER", 0.0)
    out: list[str] = []
    with Store.open(storage) as store:
        s = BuildSession.open(store, "/progress/base.ipynb", resume=False)
        try:
            s.begin_layer(Layer(name="p", from_=ImageSource(type="tar", url=str(busybox_tar))))
            assert s.run_step("true", on_output=out.append, on_progress=out.append).ok
        finally:
            s.close()
    text = "".join(out)
    assert f"importing base tar {busybox_tar} ...\n" in text
    assert re.search(rf"imported base tar {re.escape(str(busybox_tar))} in [0-9.]+s\n", text), text


def test_export_oci_in_the_kernel_shows_its_layers_as_it_makes_them(kernels, nbdir, storage):
    cells = [("base", "%layer app\n%from tar busybox.tar\necho one > /one"), ("c1", "echo two > /two")]
    nb = write_notebook(nbdir / "app.ipynb", cells)
    k = start_kernel(nb, kernels, STACKER_KERNEL_STORAGE=str(storage))
    try:
        assert all(k.execute(src, cid, timeout=120).status == "ok" for cid, src in cells)
        run = k.execute("%export oci", "exp", timeout=120)
    finally:
        k.close()
    assert run.status == "ok", run.error
    text = run.text()
    assert "image app: layer 1/3 (" in text and "image app: layer 3/3 (" in text, text
    assert text.index("image app: 3 layer(s)") < text.index("wrote OCI layout")


# --- gc and layers ----------------------------------------------------------------------

def _cli(*args: str) -> str:
    out = StringIO()
    with redirect_stdout(out):
        assert cli.main(list(args)) == 0
    return out.getvalue()


def test_cli_layers_and_gc_show_the_storage_total(storage):
    Store.open(storage).close()
    out = _cli("--storage", str(storage), "layers")
    assert re.search(r"storage .*: [0-9.]+ \w?i?B used, [0-9.]+ \w?i?B free", out), out
    out = _cli("--storage", str(storage), "gc")
    assert "removed 0 snapshot(s); storage " in out and " used, " in out
    out = _cli("--storage", str(storage), "gc", "--wait")
    assert "removed 0 snapshot(s), freed" in out and " used, " in out


@pytest.mark.rootful
def test_gc_reports_the_space_btrfs_gives_back_after_a_reader_lets_go(small_btrfs, busybox_tar):
    """A process still reading a file of a removed snapshot holds its space: btrfs frees
    it only when the file is closed, and gc --wait waits for that instead of printing ~0."""
    root = small_btrfs / "storage"
    root.mkdir()
    size = 48 << 20
    with Store.open(root) as store:
        s = BuildSession.open(store, "/gc/big.ipynb", resume=False)
        s.use_cache = False
        s.begin_layer(Layer(name="big", from_=ImageSource(type="tar", url=str(busybox_tar))))
        done = s.run_step(f"head -c {size} /dev/urandom > /big")
        assert done.ok, done.message
        sid = s.session.id
        snap = store.get(done.snapshot_id)
        s.close()
        store.forget_session(sid)
    reader = open(snap.path / "big", "rb")
    threading.Timer(2.0, reader.close).start()
    out = _cli("--storage", str(root), "gc", "--wait")
    freed = re.search(r"freed ([0-9.]+) MiB", out)
    assert freed, out
    assert 0.9 * size <= float(freed.group(1)) * (1 << 20) <= 1.2 * size, out
    assert "deleting 2 snapshot(s)" in out and f"removed {snap.id[:12]}  layer big" in out
