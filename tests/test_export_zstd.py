"""zstd layers as an option (issue 25): `build --compression zstd` and
`%export oci --compression zstd` write tar layers of media type
`application/vnd.oci.image.layer.v1.tar+zstd` (compressed by `zstd -T0`),
which skopeo reads and copies and which this project imports as a base; gzip
stays the default and a base's layers are kept as they are."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from stacker_kernel.cli import main
from stacker_kernel.errors import RecipeError
from stacker_kernel.oci.layer_types import parse_layer_types
from stacker_kernel.recipe.cells import ExportArgs, parse_cell

from kernel_support import kernel, kernels, nbdir  # noqa: F401 (fixtures)
from test_layer_types import _image, _unpacked_by_us

ZSTD_MT = "application/vnd.oci.image.layer.v1.tar+zstd"
GZIP_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

RECIPE = """\
app:
  from:
    type: {type}
    url: {url}
  run: |
    mkdir -p /data
    echo hello > /data/a
    ln -s a /data/link
    rm -f /bin/true
"""


def _build(storage: Path, tmp_path: Path, name: str, base_type: str, base_url: str, *flags: str) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(type=base_type, url=base_url))
    out = tmp_path / name
    assert main(["--storage", str(storage), "build", "-f", str(recipe), "--oci-dir", str(out), *flags]) == 0
    return out


def _blob(oci: Path, desc: dict) -> bytes:
    return (oci / "blobs/sha256" / desc["digest"][7:]).read_bytes()


def test_zstd_layers_are_tar_zstd_read_by_skopeo_and_unpack_as_the_gzip_ones(storage, tmp_path, busybox_tar):
    gz = _build(storage, tmp_path, "gz", "tar", busybox_tar)
    zs = _build(storage, tmp_path, "zs", "tar", busybox_tar, "--compression", "zstd")
    manifest, config = _image(zs, "app")
    assert [d["mediaType"] for d in manifest["layers"]] == [ZSTD_MT, ZSTD_MT]
    assert [d["mediaType"] for d in _image(gz, "app")[0]["layers"]] == [GZIP_MT, GZIP_MT]
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
        blob = _blob(zs, desc)
        assert blob.startswith(ZSTD_MAGIC) and "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
        tar = subprocess.run(["zstd", "-dcq"], input=blob, capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id  # DiffID: the uncompressed tar
    # the same tars as the gzip build: only the compression differs
    assert config["rootfs"]["diff_ids"] == _image(gz, "app")[1]["rootfs"]["diff_ids"]
    raw = json.loads(subprocess.run(["skopeo", "inspect", "--raw", f"oci:{zs}:app"], capture_output=True,
                                    text=True, check=True).stdout)
    assert [d["mediaType"] for d in raw["layers"]] == [ZSTD_MT, ZSTD_MT]
    copy = tmp_path / "copy"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{zs}:app", f"oci:{copy}:app"], capture_output=True,
                   check=True)
    copied = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{copy}:app"], capture_output=True,
                                       text=True, check=True).stdout)
    assert copied["Layers"] == [d["digest"] for d in manifest["layers"]]  # copied as they are
    tree = _unpacked_by_us(storage, zs, "app")
    assert tree == _unpacked_by_us(storage, gz, "app")
    assert "data/a" in tree and "bin/true" not in tree


def test_a_bases_gzip_layers_are_kept_as_they_are_in_a_zstd_image(storage, tmp_path, busybox_oci):
    base_layers = [d["digest"] for d in _image(Path(busybox_oci.rsplit(":", 1)[0]),
                                               busybox_oci.rsplit(":", 1)[1])[0]["layers"]]
    zs = _build(storage, tmp_path, "zs", "oci", busybox_oci, "--compression", "zstd")
    layers = _image(zs, "app")[0]["layers"]
    assert [d["digest"] for d in layers[:-1]] == base_layers  # never compressed again
    assert layers[-1]["mediaType"] == ZSTD_MT


def test_the_same_zstd_layer_twice_is_the_same_blob(storage, tmp_path, busybox_tar, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one = _build(storage, tmp_path, "one", "tar", busybox_tar, "--compression", "zstd")
    two = _build(storage, tmp_path, "two", "tar", busybox_tar, "--compression", "zstd", "--no-cache")
    assert _image(one, "app")[0]["layers"] == _image(two, "app")[0]["layers"]


def test_compression_flags_and_the_export_magic_parse():
    assert [str(t) for t in parse_layer_types(None, compression="zstd")] == ["tar+zstd"]
    # squashfs/erofs carry their own compression: --compression is for tar layers
    assert [str(t) for t in parse_layer_types(["tar", "erofs"], True, "zstd")] == ["tar+zstd", "erofs"]
    assert parse_layer_types(None) == parse_layer_types(None, compression="gzip")
    args = parse_cell("%export oci out --compression zstd\n").directives[0].args
    assert args == ExportArgs("oci", ["out"], None, False, "zstd")
    assert parse_cell("%export oci --compression=gzip\n").directives[0].args.compression == "gzip"
    with pytest.raises(RecipeError, match=r"%export on line 1: invalid compression 'lz4': use --compression gzip or zstd"):
        parse_cell("%export oci --compression lz4\n")
    with pytest.raises(SystemExit):
        main(["build", "--compression", "lz4"])


def test_export_magic_writes_zstd_layers_in_the_kernel(kernel, nbdir):  # noqa: F811
    assert kernel.execute("echo z > /z", "z", timeout=60).status == "ok"
    oci = nbdir / "zoci"
    run = kernel.execute(f"%export oci {oci} --compression zstd --no-sbom --no-provenance", "exp", timeout=120)
    assert run.status == "ok", run.error
    index = json.loads((oci / "index.json").read_text())
    manifest = json.loads((oci / "blobs/sha256" / index["manifests"][-1]["digest"][7:]).read_text())
    assert {d["mediaType"] for d in manifest["layers"]} == {ZSTD_MT}
    assert all(_blob(oci, d).startswith(ZSTD_MAGIC) for d in manifest["layers"])
