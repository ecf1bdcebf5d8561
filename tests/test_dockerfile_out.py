"""Notebook -> Dockerfile (recipe/dockerfile_out.py): `export --to dockerfile`, nbconvert,
and the real test: `buildah bud` of the exported Dockerfile gives the image the notebook
exports itself (files and config compared as in test_dockerfile.py, with its helpers)."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

from stacker_kernel.cli import main
from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.dockerfile_out import notebook_to_dockerfile
from test_dockerfile import _unpack, buildah, tree_differences  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent


def notebook(*cells: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def cells_for(base: str) -> list[str]:
    """A two-stage notebook: a build_only stage, then an image with every config key,
    shell state carried between cells, an import from the context and one from the stage."""
    return [
        f"%layer build\n%from oci {base}\n%build_only\nmkdir -p /out && echo compiled > /out/tool",
        f"%layer app\n%from oci {base}\n%import greeting.txt --dest /opt/greeting.txt\n"
        "%import stacker://build/out/tool --dest /opt/app/bin/tool\n"
        "%build_env GREETING=hey\n%environment APP_HOME=/opt/app\n%labels org.example.kind=demo\n"
        "%entrypoint /bin/sh -c\n%cmd echo hi\n%working_dir /opt/app\n%volumes /opt/app/data\n"
        "%runtime_user 1000\n"
        "mkdir -p /opt/app/data && cd /opt/app",
        'VAL="$GREETING world"\nexport VAL\nPLAIN=kept\necho "$VAL" > data/out.txt\n'
        "chown 1000:1000 data/out.txt && chmod 640 data/out.txt",
        'echo "$VAL|$PLAIN|$PWD|$APP_HOME|$STACKER_LAYER_NAME|${HOME-unset}" > /etc/marker\n'
        "ln -s /etc/marker /opt/app/link\nmkdir -m 0700 /opt/app/private",
    ]


def test_each_layer_is_a_stage_and_its_cells_one_run_with_the_step_environment():
    text = notebook_to_dockerfile(notebook(*cells_for("./oci:busybox")), "nb")
    lines = text.splitlines()
    assert "FROM oci:./oci:busybox AS build" in lines and "FROM oci:./oci:busybox AS app" in lines
    assert lines.index("FROM oci:./oci:busybox AS build") < lines.index("FROM oci:./oci:busybox AS app")
    assert 'COPY ["greeting.txt", "/opt/greeting.txt"]' in lines
    assert 'COPY --from=build ["/out/tool", "/opt/app/bin/tool"]' in lines
    runs = [json.loads(line[4:]) for line in lines if line.startswith("RUN ")]
    assert len(runs) == 2
    argv = runs[1]
    assert argv[:2] == ["/bin/sh", "-c"] and "env -i" in argv[2] and argv[2].startswith("cd / ")
    assert "GREETING=hey" in argv and "STACKER_LAYER_NAME=app" in argv
    assert argv[-3:-1] == ["/bin/sh", "-ec"] and 'export VAL' in argv[-1] and "cd /opt/app" in argv[-1]
    after = lines[lines.index(next(x for x in lines if x.startswith("RUN ") and "app" in x)):]
    assert 'ENV APP_HOME="/opt/app"' in after and 'LABEL "org.example.kind"="demo"' in after
    assert 'ENTRYPOINT ["/bin/sh", "-c"]' in after and 'CMD ["echo", "hi"]' in after
    assert 'WORKDIR "/opt/app"' in after and 'VOLUME ["/opt/app/data"]' in after and "USER 1000" in after


def test_a_base_and_values_map_to_their_dockerfile_forms():
    text = notebook_to_dockerfile(notebook(
        "%from docker docker://debian:12\n%environment 'A=x$y\"z'\n%full_command /app --flag\necho",
        "%layer two\n%from built nb\n%from tar rootfs.tar\ntrue"), "nb")
    assert "FROM debian:12 AS nb" in text
    assert 'ENV A="x\\$y\\"z"' in text  # no substitution, quotes kept
    assert 'ENTRYPOINT ["/app", "--flag"]\nCMD []' in text
    assert 'FROM scratch AS two\nADD ["rootfs.tar", "/"]' in text


@pytest.mark.parametrize("cells,message", [
    (["%from docker docker://x\n%import a.txt\ntrue"], "layer nb: import a.txt has no dest"),
    (["%from docker docker://x\n%import /etc/passwd --dest /p\ntrue"],
     "layer nb: import /etc/passwd is not a file of the build context"),
    (["%from docker docker://x\n%binds /srv -> /srv\ntrue"], "layer nb: binds .* has no Dockerfile form"),
    (["%from docker docker://x\n%annotations a.b=c\ntrue"], "layer nb: annotation a.b has no Dockerfile form"),
    (["%from docker docker://x\ntrue", "#!/usr/bin/python3\nprint(1)"], "layer nb: step 2 starts with #!"),
    (["%from built elsewhere\ntrue"], "dependencies for nb: base layer elsewhere"),
])
def test_what_a_dockerfile_cannot_say_is_one_line_naming_the_layer(cells, message):
    with pytest.raises(RecipeError, match=message):
        notebook_to_dockerfile(notebook(*cells), "nb")


def test_cli_export_to_dockerfile_and_nbconvert(tmp_path, capsys):
    nbformat.write(notebook(*cells_for("./oci:busybox")), tmp_path / "nb.ipynb")
    assert main(["export", str(tmp_path / "nb.ipynb"), "--to", "dockerfile",
                 "-o", str(tmp_path / "Containerfile")]) == 0
    want = notebook_to_dockerfile(nbformat.read(tmp_path / "nb.ipynb", as_version=4), "nb")
    assert (tmp_path / "Containerfile").read_text() == want
    assert main(["export", str(tmp_path / "nb.ipynb"), "--to", "dockerfile", "--per-cell"]) == 1
    assert "--to dockerfile takes neither --per-cell nor --oci" in capsys.readouterr().err
    # the class `--to dockerfile` names (pyproject's entry point, registered at install)
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    target = entry["nbconvert.exporters"]["dockerfile"]
    assert target == "stacker_kernel.recipe.nbconvert:DockerfileExporter"
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", target.replace(":", "."),
                    str(tmp_path / "nb.ipynb")], check=True, capture_output=True, cwd=tmp_path)
    assert (tmp_path / "nb.Dockerfile").read_text() == want


@pytest.mark.rootful
def test_buildah_builds_the_exported_dockerfile_into_the_notebooks_own_image(
        storage, busybox_oci, buildah, tmp_path):
    (tmp_path / "greeting.txt").write_text("hello from the context\n")
    (tmp_path / "greeting.txt").chmod(0o604)
    nbformat.write(notebook(*cells_for(busybox_oci)), tmp_path / "nb.ipynb")
    assert main(["export", str(tmp_path / "nb.ipynb"), "--to", "dockerfile",
                 "-o", str(tmp_path / "Dockerfile")]) == 0
    r = subprocess.run(buildah + ["bud", "--isolation", "chroot", "-q", "-f", str(tmp_path / "Dockerfile"),
                                  "-t", "want", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    subprocess.run(buildah + ["push", "-q", "want", f"oci:{tmp_path}/want:want"], check=True,
                   capture_output=True)
    assert main(["--storage", str(storage), "build", "-f", str(tmp_path / "nb.ipynb"),
                 "--oci-dir", str(tmp_path / "got")]) == 0
    want_tree, want_config = _unpack(f"{tmp_path}/want", "want", tmp_path / "want-bundle")
    got_tree, got_config = _unpack(str(tmp_path / "got"), "app", tmp_path / "got-bundle")
    differ = tree_differences(got_tree, want_tree)
    assert differ == {}
    marker = (tmp_path / "got-bundle" / "rootfs" / "etc" / "marker").read_text()
    assert marker == "hey world|kept|/opt/app||app|/root\n"  # the state and environment of a step
    assert got_tree["/opt/app/data/out.txt"][:3] == ("0o100640", 1000, 1000)
    assert json.dumps(got_config, sort_keys=True, indent=1) == json.dumps(want_config, sort_keys=True, indent=1)
