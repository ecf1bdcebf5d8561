"""Notebook <-> recipe, and the nbconvert-style exporter (pure)."""
import nbformat
import pytest

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import ImageSource, Step
from stacker_kernel.recipe.nbconvert import notebook_to_stacker_yaml, recipe_per_cell
from stacker_kernel.recipe.notebook import (
    KERNELSPEC, LANGUAGE_INFO, notebook_from_recipe, recipe_from_notebook,
)
from stacker_kernel.recipe.stacker_yaml import dump, load

from test_recipe_yaml import ALL_CASES, BUSYBOX, EVERY_KEY


def nb_of(*cells):
    """A notebook from cell texts; texts starting with '## ' are markdown."""
    nb = nbformat.v4.new_notebook()
    for i, text in enumerate(cells):
        cell = (nbformat.v4.new_markdown_cell(text) if text.startswith("## ")
                else nbformat.v4.new_code_cell(text))
        cell["id"] = f"c{i}"
        nb.cells.append(cell)
    return nb


def code_texts(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_first_layer_is_named_after_the_notebook():
    r = recipe_from_notebook(nb_of("%from oci ./oci:busybox", "touch /a"), "hello")
    assert list(r.layers) == ["hello"]


def test_first_cell_layer_magic_names_the_first_layer():
    r = recipe_from_notebook(nb_of("%layer base\n%from scratch"), "hello")
    assert list(r.layers) == ["base"]


def test_each_code_cell_script_is_a_step_with_its_cell_id():
    r = recipe_from_notebook(nb_of("%from scratch\necho 1", "## notes", "echo 2", "  \n"), "n")
    assert r.layers["n"].steps == [Step("echo 1", "c0"), Step("echo 2", "c2")]
    assert [s.cell_id for s in r.layers["n"].steps] == ["c0", "c2"]


def test_layer_magic_starts_a_new_layer():
    r = recipe_from_notebook(nb_of("%from oci ./oci:b", "echo a",
                                   "%layer two\n%from built n", "echo b"), "n")
    assert list(r.layers) == ["n", "two"]
    assert r.layers["two"].from_ == ImageSource("built", tag="n")
    assert r.layers["two"].run_script() == "echo b"


def test_interactive_magics_are_ignored_by_the_recipe():
    r = recipe_from_notebook(nb_of("%from scratch", "%layers", "%keep_failed on\n%cache off"), "n")
    assert r.layers["n"].steps == []


def test_generate_labels_cell_is_not_a_step():
    r = recipe_from_notebook(nb_of("%from scratch", "%generate_labels\necho x > /stacker/"
                                   "oci-labels/a"), "n")
    assert r.layers["n"].steps == []
    assert r.layers["n"].generate_labels == "echo x > /stacker/oci-labels/a"


def test_raw_json_list_sources_are_accepted():
    nb = {"cells": [{"cell_type": "code", "source": ["%from scratch\n", "echo hi"]}]}
    assert recipe_from_notebook(nb, "n").layers["n"].run_script() == "echo hi"


def test_layer_without_from_is_an_error():
    with pytest.raises(RecipeError, match="layer n .*has no %from"):
        recipe_from_notebook(nb_of("echo hi"), "n")


def test_bad_magic_error_names_the_cell():
    with pytest.raises(RecipeError, match=r"code cell 2 \(id c1\): unknown magic %lyer"):
        recipe_from_notebook(nb_of("%from scratch", "%lyer x"), "n")


def test_layer_started_twice_is_an_error():
    with pytest.raises(RecipeError, match="layer a is already started in code cell 1"):
        recipe_from_notebook(nb_of("%layer a\n%from scratch", "%layer a\n%from scratch"), "n")


def test_built_base_missing_from_notebook_is_an_error():
    with pytest.raises(RecipeError, match="base layer nowhere"):
        recipe_from_notebook(nb_of("%from built nowhere"), "n")


def test_notebook_name_with_colon_is_rejected():
    with pytest.raises(RecipeError, match="forbidden"):
        recipe_from_notebook(nb_of("%from scratch"), "a:b")


def test_late_shebang_cell_warns():
    r = recipe_from_notebook(nb_of("%from scratch\necho", "#!/bin/bash\necho"), "n")
    assert any("#!" in w for w in r.layers["n"].warnings)


def test_imported_notebook_has_kernelspec_and_language_info():
    nb = notebook_from_recipe(load(ALL_CASES["SC-01"], BUSYBOX))
    assert nb.metadata["kernelspec"] == KERNELSPEC
    assert nb.metadata["language_info"] == LANGUAGE_INFO
    nbformat.validate(nb)


def test_imported_notebook_has_heading_directive_cell_and_script_cells():
    r = load("a:\n  from: {type: scratch}\n  run: |\n    one\n\n    # c\n    two\n")
    nb = notebook_from_recipe(r)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code", "code"]
    assert nb.cells[0].source == "## Layer a"
    assert code_texts(nb) == ["%layer a\n%from scratch", "one", "# c\ntwo"]


def test_imported_cell_ids_are_unique_and_stable():
    r = load(ALL_CASES["SC-13"])
    ids = [c.id for c in notebook_from_recipe(r).cells]
    assert len(set(ids)) == len(ids)
    assert ids == [c.id for c in notebook_from_recipe(r).cells]


@pytest.mark.parametrize("case", sorted(ALL_CASES) + ["EVERY_KEY"])
def test_yaml_notebook_yaml_gives_an_equal_model(case):
    text = EVERY_KEY if case == "EVERY_KEY" else ALL_CASES[case]
    r = load(text, BUSYBOX)
    nb = notebook_from_recipe(r)
    back = recipe_from_notebook(nbformat.reads(nbformat.writes(nb), as_version=4), "ignored")
    assert back == r
    assert list(back.layers) == list(r.layers)
    assert load(dump(back)) == r


def _authored():
    return nb_of("## Build", "%layer build\n%from oci ./oci:busybox\n%environment A=1",
                 "mkdir /src\ncd /src", "x=1\n\necho $x", "#!/bin/sh\necho late",
                 "%layer app\n%from built build\n%cmd /app", "touch /app")


def test_notebook_yaml_notebook_keeps_the_cells_text():
    nb = _authored()
    text = notebook_to_stacker_yaml(nb, "demo")
    again = notebook_from_recipe(load(text))
    scripts = [t for t in code_texts(again) if not t.startswith("%layer")]
    assert scripts == ["mkdir /src\ncd /src", "x=1\n\necho $x", "#!/bin/sh\necho late",
                       "touch /app"]


def test_notebook_recipe_notebook_keeps_cell_ids():
    nb = _authored()
    again = notebook_from_recipe(recipe_from_notebook(nb, "demo"))
    assert {"c2", "c3", "c4", "c6"} <= {c.id for c in again.cells}


def test_exported_run_concatenates_cells():
    nb = nb_of("%from oci ./oci:busybox", "mkdir /a", "touch /a/b")
    assert "run: |\n    mkdir /a\n\n    touch /a/b\n" in notebook_to_stacker_yaml(nb, "x")


def test_prerequisites_travel_in_notebook_metadata():
    r = load("config: {prerequisites: [base.yaml]}\na:\n  from: {type: built, tag: base}\n")
    nb = notebook_from_recipe(r)
    assert nb.metadata["stacker"] == {"prerequisites": ["base.yaml"]}
    assert recipe_from_notebook(nb, "x").prerequisites == ["base.yaml"]


@pytest.mark.parametrize("meta", ["base.yaml", ["base.yaml"], {"prerequisites": "base.yaml"},
                                  {"prerequisites": [1]}])
def test_malformed_stacker_metadata_is_one_line(meta):
    nb = nb_of("%from scratch")
    nb.metadata["stacker"] = meta
    with pytest.raises(RecipeError, match=r"^the notebook's metadata \"stacker\" must be an object") as e:
        recipe_from_notebook(nb, "x")
    assert "\n" not in str(e.value)


# --- per-cell -------------------------------------------------------------------------


def _per_cell():
    nb = nb_of("%layer build\n%from oci ./oci:busybox\n%cmd /app\n%import tool.sh\n"
               "%import conf --dest /etc/conf\n%build_env CC=gcc",
               "echo 1", "echo 2", "echo 3",
               "%layer app\n%from built build", "echo app")
    return recipe_per_cell(recipe_from_notebook(nb, "demo"))


def test_per_cell_chain_names_and_bases():
    r = _per_cell()
    assert list(r.layers) == ["build-cell-1", "build-cell-2", "build", "app"]
    assert r.layers["build-cell-1"].from_ == ImageSource("oci", url="./oci:busybox")
    assert r.layers["build-cell-2"].from_ == ImageSource("built", tag="build-cell-1")
    assert r.layers["build"].from_ == ImageSource("built", tag="build-cell-2")


def test_per_cell_intermediate_layers_are_build_only_without_image_config():
    mid = _per_cell().layers["build-cell-2"]
    assert mid.build_only and mid.cmd is None
    assert mid.build_env == {"CC": "gcc"}


def test_per_cell_last_layer_carries_image_config_and_keeps_its_name():
    last = _per_cell().layers["build"]
    assert last.cmd == ["/app"] and not last.build_only
    assert last.run_script() == "echo 3"


def test_per_cell_dest_imports_only_in_the_first_layer():
    r = _per_cell()
    assert [i.path for i in r.layers["build-cell-1"].imports] == ["tool.sh", "conf"]
    assert [i.path for i in r.layers["build-cell-2"].imports] == ["tool.sh"]
    assert [i.path for i in r.layers["build"].imports] == ["tool.sh"]


def test_per_cell_single_step_layers_are_unchanged():
    assert _per_cell().layers["app"].from_ == ImageSource("built", tag="build")


def test_per_cell_export_loads_back_in_dependency_order():
    text = dump(_per_cell())
    assert load(text).dependency_order() == ["build-cell-1", "build-cell-2", "build", "app"]


def test_per_cell_name_clash_is_an_error():
    nb = nb_of("%layer a\n%from scratch", "x", "y", "%layer a-cell-1\n%from scratch")
    with pytest.raises(RecipeError, match="a-cell-1 already exists"):
        recipe_per_cell(recipe_from_notebook(nb, "n"))
