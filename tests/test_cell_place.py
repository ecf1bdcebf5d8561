"""A cell keeps its place (issue 22, point 4): a cell run while steps of cells below it
are committed (a failed cell being fixed, a new cell inserted above) goes back to its
slot first, and the later steps are undone and named, never appended after them.

A real kernel over the Jupyter protocol on real btrfs; the front-end follows the
step marks by display id as JupyterLab does (test_undone.Lab).
"""
from __future__ import annotations

import uuid

import pytest

from kernel_support import BASE, kernels, nbdir, start_kernel, write_notebook  # noqa: F401 (fixtures)
from test_undone import Lab, mark_of, text


@pytest.fixture
def lab_on(nbdir, kernels):
    opened = []

    def open_lab(name: str) -> Lab:
        front = Lab(start_kernel(nbdir / name, kernels))
        opened.append(front)
        return front
    yield open_lab
    for front in opened:
        if front.kernel.km.is_alive():  # not closed by the test (a restart)
            front.kernel.close()


def test_a_fixed_failed_cell_goes_back_to_its_place_and_undoes_the_cells_below(lab_on, nbdir):
    token = uuid.uuid4().hex
    lab = lab_on("fix.ipynb")  # not saved: the order cells were first run in is their place
    lab.ok(BASE, "base")  # [1]
    lab.ok(f"echo {token} > /a", "A")  # [2]
    reply, _ = lab.run("test -e /b", "B")  # [3] fails
    assert reply["status"] == "error"
    later = mark_of(lab.ok("echo c > /c", "C"))  # [4]
    fixed = lab.ok("echo b > /b", "B")  # [5] the fix, in the same cell
    said = text(fixed)
    assert ("this cell stands above cell [4] echo c > /c in the notebook (as the cells were first run:"
            " the notebook is not saved yet): its step is undone (back to step 1); run it again to"
            " rebuild") in said
    assert "[step 2, layer fix: ran in " in said
    assert lab.displays[later]["text/plain"].startswith("undone by ")
    check = lab.ok("test -e /b && test ! -e /c && echo has-b-not-c", "check")
    assert "has-b-not-c" in text(check)
    lab.ok("%rollback 2", "rb")
    exported = text(lab.ok("%export", "x"))
    yaml_text = (nbdir / "fix.stacker.yaml").read_text()
    assert f"echo {token} > /a" in yaml_text and "echo b > /b" in yaml_text and "echo c > /c" not in yaml_text
    assert "[4] echo c > /c" in exported  # named among the executed cells the export leaves out
    lab.ok("echo c > /c", "C")  # C run again: it is in the export again
    lab.ok("%export", "x")
    assert "echo c > /c" in (nbdir / "fix.stacker.yaml").read_text()


def test_a_new_cell_inserted_above_steps_goes_to_its_place_in_the_saved_notebook(lab_on, nbdir):
    token = uuid.uuid4().hex
    cells = [("base", BASE), ("one", f"echo {token} > /one"), ("new", "echo new > /new"), ("two", "echo two > /two")]
    write_notebook(nbdir / "insert.ipynb", cells)  # saved with the new cell between one and two
    lab = lab_on("insert.ipynb")
    lab.ok(BASE, "base")
    lab.ok(f"echo {token} > /one", "one")
    lab.ok("echo two > /two", "two")  # [3]
    said = text(lab.ok("echo new > /new", "new"))
    assert ("this cell stands above cell [3] echo two > /two in the notebook: its step is undone"
            " (back to step 1); run it again to rebuild") in said
    assert "not saved" not in said
    assert "[step 2, layer insert: ran in " in said


def test_a_restart_keeps_the_order_cells_were_first_run_in(lab_on, nbdir):
    token = uuid.uuid4().hex
    first = lab_on("order.ipynb")
    first.ok(BASE, "base")
    first.ok(f"echo {token} > /a", "A")
    reply, _ = first.run("test -e /b", "B")
    assert reply["status"] == "error"
    first.ok("echo c > /c", "C")
    first.kernel.close()
    # Saved as JupyterLab saves it: the cells in the order they stand.
    write_notebook(nbdir / "order.ipynb", [("base", BASE), ("A", f"echo {token} > /a"),
                                           ("B", "test -e /b"), ("C", "echo c > /c")])
    again = lab_on("order.ipynb")
    said = text(again.ok("echo b > /b", "B"))
    assert "found by its cells" in said
    assert "this cell stands above cell " in said and "echo c > /c in the notebook: its step is undone" in said
    assert "[step 2, layer order: ran in " in said


def test_the_status_line_layers_and_export_say_where_the_notebook_and_the_image_differ(lab_on, nbdir):
    token = uuid.uuid4().hex[:12]  # cells are named by their first 40 characters
    cells = [("base", BASE), ("A", f"echo {token} > /a"), ("B", "echo b > /b"), ("C", "echo c > /c"),
             ("D", "echo d > /d")]
    path = write_notebook(nbdir / "differ.ipynb", cells)
    lab = lab_on("differ.ipynb")
    lab.ok(BASE, "base")
    lab.ok(f"echo {token} > /a", "A")
    said = text(lab.ok("echo c > /c", "C"))  # B never ran
    assert ("[the notebook and the image differ: cell #3 echo b > /b above the last step is not in the"
            " image (never run, failed or undone: run it)]") in said
    cells[1] = ("A", f"echo {token} changed > /a")  # edited and saved, not run again
    write_notebook(path, cells)
    layers = text(lab.ok("%layers", "l"))
    assert f"cell [2] echo {token} changed > /a changed since it ran (the image has what ran: run it again)" in layers
    exported = text(lab.ok("%export", "x"))
    assert "warning: the notebook and the image differ: cell [2] echo" in exported
    assert "note: not in this export: cell #5 echo d > /d below the last step (it has not run)" in exported
    assert f"wrote {nbdir / 'differ.stacker.yaml'}: 2 steps of layer differ" in exported
