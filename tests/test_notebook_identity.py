"""A build belongs to a notebook by its cells, not by its file name (issue 22, points 1-2).

Real kernels over the Jupyter protocol on real btrfs. The test plays JupyterLab: it
saves the notebook (cell ids and all), renames it with the kernel still running (as
JupyterLab does, without telling the kernel: JPY_SESSION_NAME keeps the old name),
makes a new Untitled.ipynb, duplicates a notebook.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pexpect

from kernel_support import BASE, kernels, nbdir, start_kernel, write_notebook  # noqa: F401 (fixtures)


def _ok(k, source: str, cell_id: str, timeout: float = 120):
    run = k.execute(source, cell_id, timeout=timeout)
    assert run.status == "ok", (cell_id, run.error, run.text())
    return run


def _ids() -> tuple[str, str, str]:
    """Cell ids as JupyterLab makes them: uuids, unique to one notebook."""
    return tuple(str(uuid.uuid4()) for _ in range(3))


def _built_notebook(nbdir, kernels, name: str = "Untitled.ipynb"):
    """A saved notebook of a base cell and a step, run in a kernel that is still running."""
    base, step, later = _ids()
    token = uuid.uuid4().hex
    nb = write_notebook(nbdir / name, [(base, BASE), (step, f"echo {token} > /one"), (later, "cat /one")])
    k = start_kernel(nb, kernels)
    _ok(k, BASE, base)
    _ok(k, f"echo {token} > /one", step)
    return k, nb, (base, step, later), token


def test_a_rename_while_the_kernel_runs_names_exports_and_logs_after_the_new_name(nbdir, kernels):
    k, nb, (base, step, later), token = _built_notebook(nbdir, kernels)
    try:
        os.rename(nb, nbdir / "debbuild.ipynb")  # JupyterLab's rename: the kernel is not told
        exported = _ok(k, "%export", "export-cell")
        assert f"wrote {nbdir / 'debbuild.stacker.yaml'}" in exported.text()
        assert not (nbdir / "Untitled.stacker.yaml").exists()
        failed = k.execute("false", str(uuid.uuid4()))
        assert failed.status == "error"
        logs = os.listdir(nbdir / "stacker-logs")
        assert any(name.startswith("debbuild-step") and name.endswith("-failed.log") for name in logs), logs
        assert not any(name.startswith("Untitled") for name in logs), logs
    finally:
        k.close()
    # A restart after the rename (JupyterLab keeps the old JPY_SESSION_NAME) goes on with it.
    again = start_kernel(nbdir / "Untitled.ipynb", kernels)
    try:
        run = _ok(again, "cat /one", later)
        assert "this notebook's build goes on where it stopped, at step 1" in run.text()
        assert "found by its cells" in run.text()
        assert token in run.text()
        _ok(again, "%export", "export-again")
        assert (nbdir / "debbuild.stacker.yaml").exists() and not (nbdir / "Untitled.stacker.yaml").exists()
    finally:
        again.close()


def test_a_new_notebook_under_a_used_name_starts_empty_and_the_renamed_one_keeps_its_build(nbdir, kernels):
    k, nb, (base, step, later), token = _built_notebook(nbdir, kernels)
    os.rename(nb, nbdir / "debbuild.ipynb")  # the kernel never learns of it before it ends
    k.close()
    fresh_base, fresh_step, _ = _ids()
    write_notebook(nbdir / "Untitled.ipynb", [(fresh_base, BASE), (fresh_step, "echo hi")])
    new = start_kernel(nbdir / "Untitled.ipynb", kernels)
    try:
        first = _ok(new, BASE, fresh_base)
        assert "goes on where it stopped" not in first.text()
        assert ("[a new build: the earlier build named Untitled.ipynb has none of this notebook's cells,"
                " so it stays the build of the notebook it belongs to]") in first.text()
        run = _ok(new, "echo hi; test ! -e /one && echo no-other-build", fresh_step)
        assert "step 1," in run.text() and "no-other-build" in run.text()
        exported = _ok(new, "%export", "x")
        assert f"wrote {nbdir / 'Untitled.stacker.yaml'}" in exported.text()
        assert token not in (nbdir / "Untitled.stacker.yaml").read_text()
        assert not (nbdir / "debbuild.stacker.yaml").exists()
    finally:
        new.close()
    # The renamed notebook's build was not touched: its kernel goes on with it.
    renamed = start_kernel(nbdir / "debbuild.ipynb", kernels)
    try:
        run = _ok(renamed, "cat /one", later)
        assert ("[this notebook's build goes on where it stopped, at step 1 (layer Untitled: echo "
                f"{token} > /one), found by its cells; it was Untitled.ipynb.") in run.text()
        assert token in run.text()
    finally:
        renamed.close()
    # The CLI finds it by the cells of the saved notebook too.
    storage = os.environ["STACKER_KERNEL_STORAGE"]
    child = pexpect.spawn(sys.executable, ["-m", "stacker_kernel", "--storage", storage, "chroot",
                                           "-f", str(nbdir / "debbuild.ipynb")], timeout=60, encoding="utf-8")
    child.sendline("cat /one; exit 0")
    child.expect(token)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_copy_of_a_notebook_starts_its_own_build(nbdir, kernels):
    k, nb, (base, step, later), token = _built_notebook(nbdir, kernels, "orig.ipynb")
    k.close()
    copy = nbdir / "orig-Copy1.ipynb"
    shutil.copyfile(nb, copy)  # JupyterLab's Duplicate: the same cell ids
    dup = start_kernel(copy, kernels)
    try:
        first = _ok(dup, BASE, base)
        assert ("[a new build for this notebook: its cells are also those of orig.ipynb, whose build"
                " stays its own]") in first.text()
        run = _ok(dup, f"echo {token} > /one", step)
        assert "[step 1, layer orig-Copy1: " in run.text()
        assert "goes on where it stopped" not in first.text() + run.text()
    finally:
        dup.close()
    again = start_kernel(nb, kernels)  # the original still goes on with its own build
    try:
        run = _ok(again, "cat /one", later)
        assert "the kernel restarted: this notebook's build goes on where it stopped, at step 1" in run.text()
    finally:
        again.close()


def test_an_unsaved_notebook_never_takes_another_build_by_its_name(nbdir, kernels):
    k, nb, ids, token = _built_notebook(nbdir, kernels, "same.ipynb")
    k.close()
    nb.unlink()  # the file is gone; a new notebook of that name runs a cell of its own
    new = start_kernel(nb, kernels)
    try:
        run = _ok(new, "%layers", str(uuid.uuid4()))
        assert "no steps yet" in run.text()
    finally:
        new.close()
