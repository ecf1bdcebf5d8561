"""stacker's `${{NAME:default}}` placeholders survive `import`: they stay in the cells,
come back in `export`, and are resolved when the notebook runs (kernel: defaults;
`build --substitute`: the given values)."""
import textwrap

import nbformat
import pytest

from kernel_support import BASE, kernels, nbdir, start_kernel, write_notebook  # noqa: F401 (fixtures)
from stacker_kernel.cli import main
from stacker_kernel.engine.build import layer_snapshot
from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.notebook import recipe_from_notebook
from stacker_kernel.recipe.stacker_yaml import load
from stacker_kernel.storage.store import Store
from conftest import in_tree

YAML = """\
hello:
  from:
    type: oci
    url: ${{BUSYBOX_OCI}}
  environment:
    WHO: ${{NAME:world}}
  run: |
    echo "hello ${{NAME:world}}" > /greeting
"""


def _code(nb_path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_import_keeps_placeholders_and_export_gives_the_same_yaml(tmp_path, capsys):
    (tmp_path / "stacker.yaml").write_text(YAML)
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "nb.ipynb")]) == 0
    code = _code(tmp_path / "nb.ipynb")
    assert "${{NAME:world}}" in code and "${{BUSYBOX_OCI}}" in code and "hello world" not in code
    assert main(["export", str(tmp_path / "nb.ipynb"), "-o", str(tmp_path / "back.yaml")]) == 0
    back = (tmp_path / "back.yaml").read_text()
    assert back.count("${{NAME:world}}") == 2
    assert load(back, keep_placeholders=True) == load(YAML, keep_placeholders=True)
    for subs in ({"BUSYBOX_OCI": "a:b"}, {"BUSYBOX_OCI": "a:b", "NAME": "x"}):
        assert load(back, subs) == load(YAML, subs)


def test_import_with_substitute_applies_only_the_given_values(tmp_path):
    (tmp_path / "stacker.yaml").write_text(YAML)
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "nb.ipynb"),
                 "--substitute", "BUSYBOX_OCI=lay:tag"]) == 0
    code = _code(tmp_path / "nb.ipynb")
    assert "lay:tag" in code and "${{BUSYBOX_OCI}}" not in code and "${{NAME:world}}" in code


def test_a_placeholder_where_a_yes_no_must_be_is_resolved_with_a_note(tmp_path, capsys):
    (tmp_path / "stacker.yaml").write_text(YAML + "  build_only: ${{ONLY:true}}\n")
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "nb.ipynb")]) == 0
    assert "resolved values" in capsys.readouterr().err
    assert "%build_only" in _code(tmp_path / "nb.ipynb")


def _notebook(*sources: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    return nb


def test_recipe_from_notebook_resolves_only_when_asked():
    nb = _notebook("%layer l\n%from oci ${{BASE:lay:tag}}", "echo ${{NAME:world}}")
    kept = recipe_from_notebook(nb, "n")
    assert kept.layers["l"].from_.url == "${{BASE:lay:tag}}"
    assert "${{NAME:world}}" in kept.layers["l"].steps[0].source
    default = recipe_from_notebook(nb, "n", {})
    assert default.layers["l"].from_.url == "lay:tag" and default.layers["l"].steps[0].source == "echo world"
    given = recipe_from_notebook(nb, "n", {"NAME": "x"})
    assert given.layers["l"].steps[0].source == "echo x"


def test_a_placeholder_without_default_and_without_value_names_the_cell():
    nb = _notebook("%layer l\n%from oci lay:tag", "echo ${{NAME}}")
    with pytest.raises(RecipeError, match=r"code cell 2.*NAME.*--substitute NAME=VALUE"):
        recipe_from_notebook(nb, "n", {})


def test_build_of_a_notebook_uses_substitute_values_and_defaults(storage, busybox_tar, tmp_path):
    nb = _notebook(f"%layer app\n%from tar {busybox_tar}", 'echo "hello ${{NAME:world}}" > /greeting')
    nb_path = tmp_path / "nb.ipynb"
    nbformat.write(nb, nb_path)
    assert main(["--storage", str(storage), "build", "-f", str(nb_path), "--no-oci",
                 "--substitute", "NAME=x"]) == 0
    with Store.open(storage) as store:
        assert in_tree(layer_snapshot(store, str(nb_path), "app").path, "greeting").read_text() == "hello x\n"
    assert main(["--storage", str(storage), "build", "-f", str(nb_path), "--no-oci"]) == 0
    with Store.open(storage) as store:
        assert in_tree(layer_snapshot(store, str(nb_path), "app").path, "greeting").read_text() == "hello world\n"


def test_the_kernel_runs_a_placeholder_with_its_default(nbdir, kernels, storage):
    k = start_kernel(write_notebook(nbdir / "sub.ipynb", []), kernels, STACKER_KERNEL_STORAGE=str(storage))
    try:
        base = k.execute(BASE, "base", timeout=120)
        assert base.status == "ok", base.error
        run = k.execute('echo "hello ${{NAME:world}}"', "c1", timeout=120)
        assert run.status == "ok", run.error
        assert "hello world" in run.text()
        missing = k.execute("echo ${{NOVALUE}}", "c2", timeout=120)
        assert missing.status == "error" and "write ${{NOVALUE:default}}" in (missing.error or "")
    finally:
        k.close()
