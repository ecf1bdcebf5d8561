"""stacker's own acceptance cases (its test/*.bats), built with
`stacker-kernel build` and checked as stacker's tests check them."""
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from acceptance_cases import SC03, SC06, SC13
from stacker_kernel.cli import main


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def build(storage, yaml, *args, env=None):
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        return main(["--storage", str(storage), "build", "-f", str(yaml), *args])
    finally:
        os.environ.clear()
        os.environ.update(old)


def manifest_and_config(oci: Path, tag: str):
    index = json.loads((oci / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    blob = lambda d: json.loads((oci / "blobs" / "sha256" / d.split(":")[1]).read_text())  # noqa: E731
    manifest = blob(desc["digest"])
    return desc["digest"], manifest, blob(manifest["config"]["digest"])


def unpack(oci: Path, tag: str, dest: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{oci}:{tag}", str(dest)],
                   check=True, capture_output=True)
    return dest / "rootfs"


def test_sc03_cmd_entrypoint_full_command(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", SC03)
    oci = tmp_path / "oci"
    assert build(storage, yaml, "--oci-dir", str(oci), "--substitute", f"BUSYBOX_OCI={busybox_oci}") == 0
    index = json.loads((oci / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
            if "artifactType" not in m] == \
        ["base", "layer1", "layer2"]
    assert manifest_and_config(oci, "base")[2]["config"]["Cmd"] == ["foo"]
    assert manifest_and_config(oci, "layer1")[2]["config"]["Entrypoint"] == ["bar"]
    cfg2 = manifest_and_config(oci, "layer2")[2]["config"]
    assert cfg2.get("Cmd") is None and cfg2["Entrypoint"] == ["baz"]


def test_sc06_whiteouts_across_a_chain_of_built_layers(storage, busybox_tar, tmp_path):
    base = tmp_path / ".stacker" / "layer-bases"
    base.mkdir(parents=True)
    (base / "busybox.tar").write_bytes(busybox_tar.read_bytes())
    yaml = write(tmp_path / "stacker.yaml", SC06)
    oci = tmp_path / "oci"
    assert build(storage, yaml, "--oci-dir", str(oci)) == 0
    root = unpack(oci, "l3", tmp_path / "l3")
    assert not (root / "aaa/111").exists() and (root / "aaa/222/ab").is_dir()
    assert not (root / "bbb").exists()
    assert (root / "ccc/222").is_dir() and not (root / "ccc/111").exists()
    assert (root / "ddd/333").is_dir() and (root / "ddd/222").is_dir() and not (root / "ddd/111").exists()


@pytest.mark.slow
def test_sc13_dependency_order_and_stacker_urls_with_bash(storage, tmp_path):
    debian = subprocess.run([str(Path(__file__).parent.parent / "scripts/debian-rootfs.sh")],
                            check=True, capture_output=True, text=True).stdout.strip()
    # stacker's test uses an Ubuntu OCI image for the bash; a Debian minbase tar serves the same.
    base = "type: oci\n    url: /srv/oci:ubuntu"
    assert base in SC13
    yaml = write(tmp_path / "stacker.yaml", SC13.replace(base, f"type: tar\n    url: {debian}"))
    oci = tmp_path / "oci"
    assert build(storage, yaml, "--oci-dir", str(oci)) == 0
    root = unpack(oci, "atomix-installer-iso", tmp_path / "iso")
    assert sorted(os.listdir(root)) == ["installer-initrd-base.cpio", "installer-initrd-modules.cpio"]


def test_sc16_reproducible_with_source_date_epoch(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", """
        test:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: |
                touch /etc/reproducible.conf
                mkdir -p /var/data
                echo "build artifact" > /var/data/output.txt
                echo "epoch=$SOURCE_DATE_EPOCH" > /var/data/epoch
        """)
    subs = ["--substitute", f"BUSYBOX_OCI={busybox_oci}"]
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}
    a, b = tmp_path / "a", tmp_path / "b"
    assert build(storage, yaml, "--oci-dir", str(a), *subs, env=epoch) == 0
    assert build(storage, yaml, "--oci-dir", str(b), "--no-cache", *subs, env=epoch) == 0
    da, _, cfg = manifest_and_config(a, "test")
    db, _, _ = manifest_and_config(b, "test")
    assert da == db
    assert cfg["created"] == "2023-11-14T22:13:20Z" and cfg["author"] == "stacker"
    assert cfg["history"][-1]["created"] == "2023-11-14T22:13:20Z"
    assert "stacker build" in cfg["history"][-1]["created_by"]
    root = unpack(a, "test", tmp_path / "u")
    assert (root / "var/data/epoch").read_text() == "epoch=1700000000\n"
    assert build(storage, yaml, "--oci-dir", str(a), *subs, env={"SOURCE_DATE_EPOCH": "nope"}) == 1
