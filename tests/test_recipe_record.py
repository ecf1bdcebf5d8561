"""The recipe lives with the image: a session records its layer definitions and each
step the definition of its layer, so a kernel restart (or a crash) changes nothing in
what %export writes (issue 22, point 3).

A real kernel over the Jupyter protocol on real btrfs; the notebook is saved, as
JupyterLab saves it, so the restarted kernel finds its build by its cells.
"""
from __future__ import annotations

import json
import uuid

from kernel_support import kernels, nbdir, start_kernel, write_notebook  # noqa: F401 (fixtures)
from stacker_kernel.storage.store import Store


def _tags(oci) -> set[str]:
    index = json.loads((oci / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
            if "artifactType" not in m}  # not the SBOM and provenance


def _cells(token: str) -> list[tuple[str, str]]:
    return [("b", "%layer build\n%from tar busybox.tar\n%build_only"),
            ("b1", f"echo {token} > /tool"),
            ("a", "%layer app\n%from built build\n%environment GREETING=hello\n%labels team=infra"),
            ("a1", "cat /tool > /copied"),
            ("a2", "echo two > /two")]


def _ok(k, source: str, cell_id: str, timeout: float = 120):
    run = k.execute(source, cell_id, timeout=timeout)
    assert run.status == "ok", (cell_id, run.error, run.text())
    return run


def test_export_after_a_restart_and_some_reruns_is_the_recipe_that_was_built(nbdir, kernels):
    cells = _cells(uuid.uuid4().hex)
    nb = write_notebook(nbdir / "rec.ipynb", cells)
    k = start_kernel(nb, kernels)
    try:
        for cell_id, source in cells:
            _ok(k, source, cell_id)
        _ok(k, "%export", "x")
        before = (nbdir / "rec.stacker.yaml").read_text()
    finally:
        k.close()
    assert "type: tar" in before and "build_only: true" in before and "GREETING: hello" in before
    (nbdir / "rec.stacker.yaml").unlink()
    k = start_kernel(nb, kernels)  # the restart banner's advice: run some later cells again
    try:
        for cell_id, source in cells[3:]:
            _ok(k, source, cell_id)
        _ok(k, "%export", "x")
        assert (nbdir / "rec.stacker.yaml").read_text() == before
        _ok(k, "%export oci out", "o", timeout=300)
        assert _tags(nbdir / "out") == {"app"}  # the build_only layer emits no image
    finally:
        k.close()


def test_each_step_records_the_definition_of_its_layer(nbdir, kernels, tmp_path):
    cells = _cells(uuid.uuid4().hex)
    nb = write_notebook(nbdir / "steps.ipynb", cells)
    k = start_kernel(nb, kernels)
    try:
        for cell_id, source in cells:
            _ok(k, source, cell_id)
    finally:
        k.close()
    from stacker_kernel.storage.location import resolve_storage

    with Store.open(resolve_storage()) as store:
        sess = next(s for s in store.find_sessions(name=str(nb)))
        recorded = [entry["layer"]["name"] for entry in json.loads(sess.recipe)]
        assert recorded == ["build", "app"]
        snaps = [store.get(sid) for sid in sess.history]
        defs = {s.layer: json.loads(s.layer_def)["layer"] for s in snaps}
        assert defs["build"]["build_only"] is True and defs["build"]["from_"]["type"] == "tar"
        assert defs["app"]["environment"] == {"GREETING": "hello"}
        assert defs["app"]["from_"] == {"type": "built", "url": None, "tag": "build", "insecure": False}


def test_the_cli_exports_the_images_as_they_were_built_not_as_the_notebook_says_now(nbdir, kernels):
    import subprocess
    import sys

    cells = _cells(uuid.uuid4().hex)
    nb = write_notebook(nbdir / "cli.ipynb", cells)
    k = start_kernel(nb, kernels)
    try:
        for cell_id, source in cells:
            _ok(k, source, cell_id)
    finally:
        k.close()
    cells[0] = ("b", "%layer build\n%from tar busybox.tar")  # %build_only removed, not run again
    write_notebook(nb, cells)
    done = subprocess.run([sys.executable, "-m", "stacker_kernel", "export", str(nb), "--oci",
                           "--oci-dir", str(nbdir / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _tags(nbdir / "out") == {"app"}  # the build layer was built build_only
