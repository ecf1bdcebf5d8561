"""Interactive magics in a notebook built or exported without a kernel (`build -f`,
`export`): each has a defined headless meaning, or is refused naming its cell."""
import nbformat
import pytest

from stacker_kernel.cli import main
from stacker_kernel.recipe.cells import HEADLESS_REFUSED, MAGICS
from stacker_kernel.recipe.notebook import recipe_from_notebook
from stacker_kernel.errors import RecipeError

# Magics whose headless meaning is "no effect on the image" (see cells.HEADLESS_REFUSED).
NO_EFFECT = {
    "keep_failed": "%keep_failed on",
    "network": "%network none",
    "cache": "%cache off",
    "layers": "%layers",
    "diff": "%diff",
    "browse": "%browse",
    "grab": "%grab /etc/passwd",
    "export": "%export",
    "sbom": "%sbom",
    "log": "%log",
    "help": "%help",
    "shell": "%shell",
}


def nb_of(*sources):
    nb = nbformat.v4.new_notebook()
    for i, text in enumerate(sources):
        cell = nbformat.v4.new_code_cell(text)
        cell["id"] = f"c{i}"
        nb.cells.append(cell)
    return nb


def test_every_interactive_magic_has_a_headless_meaning():
    interactive = {name for name, spec in MAGICS.items() if spec.interactive}
    assert interactive == set(NO_EFFECT) | set(HEADLESS_REFUSED)
    assert not set(NO_EFFECT) & set(HEADLESS_REFUSED)


@pytest.mark.parametrize("magic", sorted(NO_EFFECT))
def test_magics_without_effect_leave_the_recipe_as_without_them(magic):
    plain = recipe_from_notebook(nb_of("%from scratch", "echo a", "echo b"), "n")
    with_magic = recipe_from_notebook(nb_of("%from scratch", "echo a", NO_EFFECT[magic] + "\necho b"), "n")
    assert [s.source for s in with_magic.layers["n"].steps] == ["echo a", "echo b"]
    assert with_magic.layers["n"] == plain.layers["n"]


def test_rollback_is_refused_naming_the_cell():
    nb = nb_of("%from scratch", "echo a", "%rollback 1\necho b")
    with pytest.raises(RecipeError, match=r"code cell 3 \(id c2\) uses %rollback, which only means "
                                          r"something in a live kernel.*delete the cells it undoes"):
        recipe_from_notebook(nb, "n")


def test_rollback_alone_in_a_cell_is_refused_too():
    with pytest.raises(RecipeError, match="code cell 2 .*%rollback"):
        recipe_from_notebook(nb_of("%from scratch", "%rollback"), "n")


def test_a_rollback_cell_tagged_raises_exception_is_no_step_and_no_refusal():
    nb = nb_of("%from scratch", "%rollback 1", "echo a")
    nb.cells[1].metadata["tags"] = ["raises-exception"]
    assert recipe_from_notebook(nb, "n").layers["n"].run_script() == "echo a"


@pytest.mark.parametrize("command", [["build", "--no-oci", "-f"], ["export"]])
def test_build_and_export_refuse_rollback_in_one_line(tmp_path, capsys, command, storage):
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb_of("%from scratch", "echo a", "%rollback 1\necho b"), path)
    assert main(["--storage", str(storage), *command, str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "code cell 3 (id c2) uses %rollback" in err
