"""The flags stacker users have in their Makefiles (stacker's cmd/stacker/build.go,
recursive-build.go, publish.go): --substitute-file, --require-hash, --order-only,
several -f, recursive-build --search-dir/-p, publish --layer-type (issue 26)."""
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.cli import main
from stacker_kernel.engine.build import layer_snapshot
from stacker_kernel.storage.store import Store
from conftest import in_tree

from net_support import serve_registry


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def cli(storage, *args):
    return main(["--storage", str(storage), *args])


def test_substitute_file_sets_values_and_substitute_wins(storage, busybox_oci, tmp_path):
    # stacker's basic.bats "substitutions from a file": 'FOO: bar' YAML lines.
    subs = write(tmp_path / "subs.yaml", f"""
        BUSYBOX_OCI: {busybox_oci}
        GREETING: from-file
        WHO: file
        """)
    yaml = write(tmp_path / "stacker.yaml", """
        l:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          run: echo ${{GREETING}} ${{WHO}} > /out
        """)
    assert cli(storage, "build", "-f", str(yaml), "--no-oci", "--substitute-file", str(subs),
               "--substitute", "WHO=flag") == 0
    with Store.open(storage) as store:
        assert in_tree(layer_snapshot(store, str(yaml), "l").path, "out").read_text() == "from-file flag\n"


def test_a_bad_substitute_file_is_one_line(storage, tmp_path, capsys):
    bad = write(tmp_path / "subs.yaml", "- a\n- b\n")
    assert cli(storage, "build", "--no-oci", "--substitute-file", str(bad)) == 1
    assert "must be a mapping of names to values" in capsys.readouterr().err
    assert cli(storage, "build", "--no-oci", "--substitute-file", str(tmp_path / "none.yaml")) == 1
    assert "cannot read --substitute-file" in capsys.readouterr().err


def test_require_hash_refuses_a_remote_import_without_hash(storage, busybox_oci, tmp_path, capsys):
    import hashlib

    (tmp_path / "local").write_text("x")
    yaml = write(tmp_path / "stacker.yaml", f"""
        thing:
          from:
            type: oci
            url: {busybox_oci}
          imports:
            - path: https://example.invalid/favicon.ico
            - path: local
        """)
    assert cli(storage, "build", "-f", str(yaml), "--no-oci", "--require-hash") == 1
    err = capsys.readouterr().err
    assert "layer thing: remote import needs a hash in yaml for path: https://example.invalid/favicon.ico" in err
    with Store.open(storage) as store:
        assert not store.find_sessions(name=str(yaml))  # refused before anything ran
    # A local import needs no hash (stacker's import.bats): this one builds.
    write(tmp_path / "stacker.yaml", f"""
        thing:
          from:
            type: oci
            url: {busybox_oci}
          imports:
            - path: local
              hash: {hashlib.sha256(b"x").hexdigest()}
            - path: local
              dest: /other
          run: cat /stacker/imports/local
        """)
    assert cli(storage, "build", "-f", str(yaml), "--no-oci", "--require-hash") == 0


def _prerequisite_tree(tmp_path: Path, busybox_oci: str) -> Path:
    """stacker's prerequisites.bats: sub3 needs sub1 and sub2, sub2 needs sub1."""
    top = tmp_path / "ocibuilds"
    write(top / "sub1/stacker.yaml", """
        layer1:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          run: touch /1
        """)
    write(top / "sub2/stacker.yaml", """
        config:
          prerequisites:
            - ../sub1/stacker.yaml
        layer2:
          from:
            type: built
            tag: layer1
          run: touch /2
        """)
    write(top / "sub3/stacker.yaml", """
        config:
          prerequisites:
            - ../sub1/stacker.yaml
            - ../sub2/stacker.yaml
        layer3:
          from:
            type: built
            tag: layer2
          run: touch /3
        """)
    return top


def test_order_only_prints_stackers_build_order_and_builds_nothing(storage, busybox_oci, tmp_path, capsys):
    top = _prerequisite_tree(tmp_path, busybox_oci)
    sub = ("--substitute", f"BUSYBOX_OCI={busybox_oci}")
    assert cli(storage, "build", "-f", str(top / "sub3/stacker.yaml"), "--order-only", *sub) == 0
    lines = capsys.readouterr().out.splitlines()
    s1, s2, s3 = (str(top / f"sub{i}/stacker.yaml") for i in (1, 2, 3))
    assert lines == [f"0 build {s1}: requires: []", f"1 build {s2}: requires: [{s1}]",
                     f"2 build {s3}: requires: [{s1} {s2}]"]
    with Store.open(storage) as store:
        assert store.find_sessions() == []


def test_recursive_build_finds_the_files_under_search_dir(storage, busybox_oci, tmp_path, capsys):
    top = _prerequisite_tree(tmp_path, busybox_oci)
    write(tmp_path / "elsewhere/stacker.yaml", "x:\n  from:\n    type: scratch\n")
    sub = ("--substitute", f"BUSYBOX_OCI={busybox_oci}")
    assert cli(storage, "recursive-build", "--search-dir", str(top), "--order-only", *sub) == 0
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()] == \
        [str(top / f"sub{i}/stacker.yaml:") for i in (1, 2, 3)]
    # -p: only sub2 and what it needs
    assert cli(storage, "recursive-build", "-d", str(top), "-p", "sub2/stacker.yaml", "--order-only", *sub) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    oci = tmp_path / "oci"
    assert cli(storage, "recursive-build", "-d", str(top), "--oci-dir", str(oci), *sub) == 0
    tags = [m["annotations"]["org.opencontainers.image.ref.name"]
            for m in json.loads((oci / "index.json").read_text())["manifests"] if "artifactType" not in m]
    assert sorted(tags) == ["layer1", "layer2", "layer3"]
    with Store.open(storage) as store:
        done = layer_snapshot(store, str(top / "sub3/stacker.yaml"), "layer3").path
        assert all(in_tree(done, n).exists() for n in ("1", "2", "3"))


def test_several_stacker_files_build_in_order(storage, busybox_oci, tmp_path, capsys):
    a = write(tmp_path / "a/stacker.yaml", f"a:\n  from:\n    type: oci\n    url: {busybox_oci}\n  run: touch /a\n")
    b = write(tmp_path / "b/stacker.yaml", f"b:\n  from:\n    type: oci\n    url: {busybox_oci}\n  run: touch /b\n")
    assert cli(storage, "build", "-f", str(a), "--stacker-file", str(b), "--no-oci") == 0
    out = capsys.readouterr().out
    assert out.index("building layer a") < out.index("building layer b")
    with Store.open(storage) as store:
        assert in_tree(layer_snapshot(store, str(a), "a").path, "a").exists()
        assert in_tree(layer_snapshot(store, str(b), "b").path, "b").exists()


@pytest.fixture
def registry(tmp_path):
    """A docker-registry on 127.0.0.1; yields HOST:PORT."""
    yield from serve_registry(tmp_path)


def test_publish_layer_type_pushes_the_squashfs_tags(storage, busybox_oci, tmp_path, capsys, registry):
    yaml = write(tmp_path / "stacker.yaml", f"app:\n  from:\n    type: oci\n    url: {busybox_oci}\n  run: touch /app\n")
    oci = tmp_path / "oci"
    assert cli(storage, "build", "-f", str(yaml), "--oci-dir", str(oci), "--layer-type", "tar",
               "--layer-type", "squashfs") == 0
    dest = tmp_path / "published"
    assert main(["publish", "--oci-dir", str(oci), "--url", f"oci:{dest}", "--tag", "v1",
                 "--layer-type", "squashfs"]) == 0
    refs = [d["annotations"]["org.opencontainers.image.ref.name"]
            for d in json.loads((dest / "index.json").read_text())["manifests"] if "artifactType" not in d]
    assert refs == ["app_v1-squashfs"]  # stacker: NAME_TAG-squashfs in an oci: destination
    layers = json.loads(subprocess.run(["skopeo", "inspect", "--raw", f"oci:{dest}:app_v1-squashfs"],
                                       check=True, capture_output=True, text=True).stdout)["layers"]
    assert all("squashfs" in layer["mediaType"] for layer in layers)
    # Both types, to a registry: NAME:TAG and NAME:TAG-squashfs.
    capsys.readouterr()
    assert main(["publish", "--oci-dir", str(oci), "--url", f"docker://{registry}/team", "--tag", "v2",
                 "--layer-type", "tar", "--layer-type", "squashfs", "--no-sbom", "--no-provenance"]) == 0
    out = capsys.readouterr().out
    assert f"published app to docker://{registry}/team/app:v2" in out
    assert f"published app-squashfs to docker://{registry}/team/app:v2-squashfs" in out
    # A type that was not built is refused in one line.
    assert main(["publish", "--oci-dir", str(oci), "--url", f"oci:{dest}", "--layer-type", "erofs"]) == 1
    assert "has no image of type erofs: build with --layer-type erofs" in capsys.readouterr().err


def test_publish_show_only_says_what_would_go_where_and_copies_nothing(storage, busybox_oci, tmp_path, capsys):
    yaml = write(tmp_path / "stacker.yaml", f"app:\n  from:\n    type: oci\n    url: {busybox_oci}\n  run: touch /app\n")
    oci = tmp_path / "oci"
    assert cli(storage, "build", "-f", str(yaml), "--oci-dir", str(oci)) == 0
    capsys.readouterr()
    dest = tmp_path / "published"
    assert main(["publish", "--oci-dir", str(oci), "--url", f"oci:{dest}", "--tag", "v1", "--show-only"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"would publish app to oci:{dest}:app_v1"]
    assert not dest.exists()
