"""A stacker.yaml exported from a notebook builds from the notebook's snapshots
(issue 15): a layer whose `run` joins cells built before, in the kernel, runs
nothing, and `grab` finds every file the cells made."""
import io
from contextlib import redirect_stdout

from kernel_support import kernels, nbdir, start_kernel, write_notebook  # noqa: F401 (fixtures)
from stacker_kernel.cli import main

CELLS = [("base", "%layer app\n%from tar busybox.tar\necho one > /app1"),
         ("c1", "cd /tmp\nX=two"),
         ("c2", "echo $X > /app2\npwd > /where")]


def _sk(storage, *args) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["--storage", str(storage), *args])
    return rc, out.getvalue()


def test_exported_recipe_builds_from_the_kernels_snapshots_and_grabs_their_files(kernels, nbdir, storage):
    nb = write_notebook(nbdir / "app.ipynb", CELLS)
    k = start_kernel(nb, kernels, STACKER_KERNEL_STORAGE=str(storage))
    try:
        runs = [k.execute(src, cell_id, timeout=120) for cell_id, src in CELLS]
        assert all(r.status == "ok" for r in runs), [r.error for r in runs]
    finally:
        k.close()
    yaml = nbdir / "stacker.yaml"
    assert _sk(storage, "export", str(nb), "-o", str(yaml))[0] == 0

    rc, out = _sk(storage, "build", "-f", str(yaml), "--no-oci")
    assert rc == 0, out
    assert "0 step(s) ran, 1 cached" in out, out
    for path, content in (("/app1", "one\n"), ("/app2", "two\n"), ("/where", "/tmp\n")):
        dest = nbdir / path.strip("/")
        rc, _ = _sk(storage, "grab", "-f", str(yaml), f"app:{path}", str(dest))
        assert rc == 0 and dest.read_text() == content


def test_a_changed_cell_in_the_exported_recipe_runs_the_layer(kernels, nbdir, storage):
    nb = write_notebook(nbdir / "app.ipynb", CELLS)
    k = start_kernel(nb, kernels, STACKER_KERNEL_STORAGE=str(storage))
    try:
        assert all(k.execute(src, cell_id, timeout=120).status == "ok" for cell_id, src in CELLS)
    finally:
        k.close()
    yaml = nbdir / "stacker.yaml"
    assert _sk(storage, "export", str(nb), "-o", str(yaml))[0] == 0
    yaml.write_text(yaml.read_text().replace("X=two", "X=three"))
    rc, out = _sk(storage, "build", "-f", str(yaml), "--no-oci")
    assert rc == 0 and "1 step(s) ran, 0 cached" in out, out
    dest = nbdir / "app2"
    assert _sk(storage, "grab", "-f", str(yaml), "app:/app2", str(dest))[0] == 0
    assert dest.read_text() == "three\n"
