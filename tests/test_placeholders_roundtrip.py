"""stacker.yaml files of public projects (tests/data/stacker-yaml/, each naming its
upstream) survive `import` (stacker.yaml -> notebook) and `export` (notebook ->
stacker.yaml) with every `${{NAME}}`, `${{NAME:default}}` and `${{EXT:}}` exactly
as written, placeholder layer names included; and such a recipe builds with
--substitute values (issue 26)."""
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stacker_kernel.cli import main
from stacker_kernel.recipe.stacker_yaml import load

DATA = Path(__file__).parent / "data" / "stacker-yaml"
FIXTURES = sorted(DATA.glob("*.yaml"))
PLACEHOLDER = re.compile(r"\$\{\{[^}]*\}\}")


def _round_trip(src: Path, tmp_path: Path) -> str:
    nb, out = tmp_path / f"{src.stem}.ipynb", tmp_path / f"{src.stem}.yaml"
    assert main(["import", str(src), "-o", str(nb)]) == 0
    assert main(["export", str(nb), "-o", str(out)]) == 0
    return out.read_text()


def _runs(recipe) -> dict:
    """Per layer: its whole run script (cells joined) and every other field."""
    shape = {}
    for name, layer in recipe.layers.items():
        fields = {k: v for k, v in vars(layer).items() if k not in ("steps", "warnings")}
        run = "\n".join(s.source.strip("\n") for s in layer.steps)
        shape[name] = (re.sub(r"\n\s*\n", "\n", run), fields)
    return shape


def test_every_fixture_names_its_upstream():
    assert len(FIXTURES) >= 5
    for f in FIXTURES:
        assert f.read_text().startswith("# upstream: github:"), f


@pytest.mark.parametrize("src", FIXTURES, ids=lambda p: p.stem)
def test_a_public_stacker_yaml_round_trips_with_its_placeholders(src, tmp_path, capsys):
    original = src.read_text()
    exported = _round_trip(src, tmp_path)
    assert "note:" not in capsys.readouterr().err  # nothing was resolved on the way
    assert collections.Counter(PLACEHOLDER.findall(exported)) == \
        collections.Counter(PLACEHOLDER.findall(original))
    before = load(original, keep_placeholders=True)
    after = load(exported, keep_placeholders=True)
    assert list(after.layers) == list(before.layers)  # "${{REPO_NAME:zot}}" stays the name
    assert _runs(after) == _runs(before)


def test_placeholder_layer_names_are_checked_once_substituted(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text('"${{NAME:has space}}":\n  from:\n    type: scratch\n')
    assert main(["import", str(bad), "-o", str(tmp_path / "bad.ipynb")]) == 1
    err = capsys.readouterr().err
    assert "'has space' (line 1) cannot be an image tag" in err


# zot's stacker.yaml with what an offline build can run: its placeholders where zot
# has them (the layer name, ${{EXT:}} in a make target, an import and a run), its
# docker bases replaced by a local busybox layout.
ZOT_OFFLINE = """\
build:
  from:
    type: oci
    url: ${{BUSYBOX_OCI}}
  run: |
    mkdir -p /src/bin
    echo "make COMMIT=${{COMMIT}} binary${{EXT:}}" > /src/bin/zot-${{OS}}-${{ARCH}}${{EXT:}}
  build_only: true

"${{REPO_NAME:zot}}":
  from:
    type: oci
    url: ${{BUSYBOX_OCI}}
  import:
    - stacker://build/src/bin/zot-${{OS}}-${{ARCH}}${{EXT:}}
  run: |
    cp /stacker/zot-${{OS}}-${{ARCH}}${{EXT:}} /usr/bin/zot
  annotations:
    org.opencontainers.image.title: ${{REPO_NAME:zot}}
"""


def _tags(oci: Path) -> list[str]:
    index = json.loads((oci / "index.json").read_text())
    return [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
            if "artifactType" not in m]


@pytest.mark.parametrize("via_notebook", [False, True], ids=["stacker.yaml", "imported notebook"])
def test_a_recipe_with_placeholder_names_builds_with_substitute_values(storage, busybox_oci, tmp_path,
                                                                       via_notebook):
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(ZOT_OFFLINE)
    recipe = yaml
    if via_notebook:
        recipe = tmp_path / "zot.ipynb"
        assert main(["import", str(yaml), "-o", str(recipe)]) == 0
        assert "${{REPO_NAME:zot}}" in recipe.read_text() and "${{EXT:}}" in recipe.read_text()
    subs = ["--substitute", f"BUSYBOX_OCI={busybox_oci}", "--substitute", "COMMIT=abc",
            "--substitute", "OS=linux", "--substitute", "ARCH=amd64"]
    oci = tmp_path / "oci"
    assert main(["--storage", str(storage), "build", "-f", str(recipe), "--oci-dir", str(oci), *subs,
                 "--substitute", "REPO_NAME=myzot", "--substitute", "EXT=.bin"]) == 0
    assert _tags(oci) == ["myzot"]
    unpacked = tmp_path / "unpacked"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{oci}:myzot", str(unpacked)],
                   check=True, capture_output=True)
    assert (unpacked / "rootfs/usr/bin/zot").read_text() == "make COMMIT=abc binary.bin\n"
    # The defaults: the layer is "zot", ${{EXT:}} is empty.
    oci2 = tmp_path / "oci2"
    assert main(["--storage", str(storage), "build", "-f", str(recipe), "--oci-dir", str(oci2), *subs]) == 0
    assert _tags(oci2) == ["zot"]
    manifest = json.loads(subprocess.run(["skopeo", "inspect", "--raw", f"oci:{oci2}:zot"], check=True,
                                         capture_output=True, text=True).stdout)
    assert manifest["annotations"]["org.opencontainers.image.title"] == "zot"
