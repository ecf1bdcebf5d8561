"""notebook <-> stacker.yaml through the CLI and nbconvert: import, export, round trips."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat

from stacker_kernel.cli import main
from stacker_kernel.recipe.stacker_yaml import load

YAML = """\
build:
  from:
    type: oci
    url: ${{BUSYBOX_OCI}}
  environment:
    GREETING: hi
  run: |
    # make a work dir
    mkdir -p /work
    cd /work

    # write the program
    echo 'echo "$GREETING"' > hello.sh
    chmod +x hello.sh
app:
  from:
    type: built
    tag: build
  cmd: /work/hello.sh
  run: |
    test -x /work/hello.sh
"""
SUBS = ["--substitute", "BUSYBOX_OCI=x:y"]


def test_import_gives_a_heading_a_directive_cell_and_script_cells(tmp_path, capsys):
    (tmp_path / "stacker.yaml").write_text(YAML)
    nb_path = tmp_path / "nb.ipynb"
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(nb_path), *SUBS]) == 0
    nb = nbformat.read(nb_path, as_version=4)
    kinds = [(c.cell_type, c.source.splitlines()[0]) for c in nb.cells]
    assert kinds[0] == ("markdown", "## Layer build")
    assert kinds[1][0] == "code" and kinds[1][1] == "%layer build"
    assert "%environment GREETING=hi" in nb.cells[1].source
    scripts = [c.source for c in nb.cells[2:4]]
    assert scripts[0].startswith("# make a work dir") and scripts[1].startswith("# write the program")
    assert nb.metadata.kernelspec.name == "stacker" and nb.metadata.language_info.name == "stacker"


def test_yaml_notebook_yaml_round_trip_is_equal(tmp_path):
    (tmp_path / "stacker.yaml").write_text(YAML)
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "nb.ipynb"), *SUBS]) == 0
    assert main(["export", str(tmp_path / "nb.ipynb"), "-o", str(tmp_path / "back.yaml")]) == 0
    subs = {"BUSYBOX_OCI": "x:y"}
    assert load((tmp_path / "back.yaml").read_text(), subs) == load(YAML, subs)


def test_per_cell_export_is_a_build_only_chain(tmp_path, capsys):
    (tmp_path / "stacker.yaml").write_text(YAML)
    main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "nb.ipynb"), *SUBS])
    capsys.readouterr()
    assert main(["export", str(tmp_path / "nb.ipynb"), "--per-cell"]) == 0
    recipe = load(capsys.readouterr().out, {"BUSYBOX_OCI": "x:y"})
    names = list(recipe.layers)
    assert names[-1] == "app" and len(names) > 2
    assert all(recipe.layers[n].build_only for n in names if n not in ("build", "app"))


def test_jupyter_nbconvert_to_stacker(tmp_path):
    (tmp_path / "stacker.yaml").write_text(YAML)
    main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "nb.ipynb"), *SUBS])
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "stacker", str(tmp_path / "nb.ipynb")],
                   check=True, capture_output=True, cwd=tmp_path)
    out = tmp_path / "nb.stacker.yaml"
    assert load(out.read_text(), {"BUSYBOX_OCI": "x:y"}) == load(YAML, {"BUSYBOX_OCI": "x:y"})


def test_export_oci_from_the_notebooks_last_build(storage, busybox_tar, tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"%layer app\n%from tar {busybox_tar}\n%cmd /bin/true"),
                nbformat.v4.new_code_cell("echo built > /built")]
    nb_path = tmp_path / "nb.ipynb"
    nbformat.write(nb, nb_path)
    assert main(["--storage", str(storage), "build", "-f", str(nb_path), "--no-oci"]) == 0
    oci = tmp_path / "oci"
    assert main(["--storage", str(storage), "export", str(nb_path), "--oci", "--oci-dir", str(oci),
                 "-o", str(tmp_path / "stacker.yaml")]) == 0
    index = json.loads((oci / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
            if "artifactType" not in m] == ["app"]  # the images, not their SBOM and provenance
    out = tmp_path / "unpacked"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{oci}:app", str(out)], check=True,
                   capture_output=True)
    assert (out / "rootfs" / "built").read_text() == "built\n"
    assert json.loads((out / "config.json").read_text())["process"]["args"] == ["/bin/true"]


def test_import_to_a_missing_directory_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "stacker.yaml").write_text(YAML)
    out = tmp_path / "no-such-dir" / "nb.ipynb"
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(out), *SUBS]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stacker-kernel: ") and str(out) in err and len(err.strip().splitlines()) == 1


def test_export_to_a_missing_directory_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "stacker.yaml").write_text(YAML)
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "nb.ipynb"), *SUBS]) == 0
    capsys.readouterr()
    out = tmp_path / "no-such-dir" / "back.yaml"
    assert main(["export", str(tmp_path / "nb.ipynb"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stacker-kernel: ") and str(out) in err and len(err.strip().splitlines()) == 1


# Eight lines, ~600 bytes: each line merges the previous mapping ten times, so a
# walk that expands merge keys visits 10^8 mappings.
MERGE_BOMB = "a: &a {from: {type: scratch}, run: x}\n" + "".join(
    f"{n}: &{n} {{<<: [{', '.join(['*' + p] * 10)}]}}\n" for p, n in zip("abcdefg", "bcdefgh"))


def _limited_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_build_refuses_a_merge_key_bomb_naming_the_file(storage, tmp_path):
    bomb = tmp_path / "stacker.yaml"
    bomb.write_text(MERGE_BOMB)
    assert len(MERGE_BOMB) < 700
    # Memory-limited and with a timeout far above the expected instant error, so a
    # regression fails instead of eating the machine or hanging the suite.
    res = subprocess.run([sys.executable, "-m", "stacker_kernel", "--storage", str(storage), "build",
                          "-f", str(bomb), "--no-oci"], capture_output=True, text=True, timeout=120,
                         preexec_fn=_limited_memory)
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.startswith(f"stacker-kernel: {bomb} expands too much"), res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1


def test_build_refuses_a_layer_name_that_is_no_image_tag_naming_the_line(storage, tmp_path, capsys):
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text("ok:\n  from: {type: scratch}\n'..':\n  from: {type: scratch}\n")
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci"]) == 1
    err = capsys.readouterr().err
    assert "layer name '..' (line 3) cannot be an image tag" in err and len(err.strip().splitlines()) == 1


def test_build_refuses_a_notebook_layer_that_is_no_image_tag_naming_the_cell(storage, tmp_path, capsys):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%layer ok\n%from scratch"),
                nbformat.v4.new_code_cell("%layer 'a b'\n%from built ok")]
    nb_path = tmp_path / "nb.ipynb"
    nbformat.write(nb, nb_path)
    assert main(["--storage", str(storage), "build", "-f", str(nb_path), "--no-oci"]) == 1
    err = capsys.readouterr().err
    assert "code cell 2" in err and "layer name 'a b' cannot be an image tag" in err


def test_kernel_export_refuses_a_first_layer_named_after_a_notebook_that_is_no_tag(storage, busybox_tar, tmp_path):
    """A kernel's first layer takes the notebook's name; `%export` must not write it as a ref."""
    import pytest

    from stacker_kernel.engine.session import BuildSession
    from stacker_kernel.errors import RecipeError
    from stacker_kernel.recipe.cells import parse_cell
    from stacker_kernel.storage.store import Store

    nb_path = tmp_path / "my notebook.ipynb"
    with Store.open(storage) as store:
        s = BuildSession.open(store, str(nb_path), kind="kernel", resume=False,
                              default_layer=nb_path.stem, base_dir=str(tmp_path))
        try:
            s.apply_directives(parse_cell(f"%from tar {busybox_tar}").directives, "c1")
            assert s.run_step("touch /x", "c2").ok
            with pytest.raises(RecipeError, match="layer name 'my notebook' .*%layer NAME"):
                s.export_oci(str(tmp_path / "oci"))
        finally:
            s.close()
    assert not (tmp_path / "oci" / "index.json").exists()
