"""`stacker-kernel build`, `grab` and friends on stacker.yaml files (stacker's acceptance cases)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from acceptance_cases import SC01, SC02, SC09
from stacker_kernel.cli import main
from stacker_kernel.engine.build import build, layer_snapshot
from stacker_kernel.errors import StackerKernelError
from stacker_kernel.storage.store import Store
from conftest import in_tree


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def cli(storage, *args):
    return main(["--storage", str(storage), *args])


def test_sc01_minimal_build_with_a_run_step(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", SC01)
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, out=lambda s: None,
              stream=lambda s: None)
        snap = layer_snapshot(store, str(yaml), "busybox")
        assert in_tree(snap.path, "foo").is_file()


def test_sc02_built_type_chaining(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", SC02)
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, out=lambda s: None,
              stream=lambda s: None)
        parent = layer_snapshot(store, str(yaml), "parent")
        child = layer_snapshot(store, str(yaml), "child")
        assert in_tree(parent.path, "root/parent").exists() and not in_tree(parent.path, "root/child").exists()
        assert in_tree(child.path, "root/parent").exists() and in_tree(child.path, "root/child").exists()


def test_layers_build_in_dependency_order_not_file_order(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", """
        second:
            from:
                type: built
                tag: first
            run: test -e /first && touch /second
        first:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: touch /first
        """)
    lines = []
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, out=lines.append,
              stream=lambda s: None)
    assert [l for l in lines if l.startswith("building")] == ["building layer first", "building layer second"]


def test_second_build_is_served_from_the_cache(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", """
        l:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: cat /proc/sys/kernel/random/uuid > /stamp
        """)
    subs = {"BUSYBOX_OCI": busybox_oci}
    with Store.open(storage) as store:
        first = build(store, str(yaml), substitutions=subs, out=lambda s: None, stream=lambda s: None)
        stamp1 = in_tree(layer_snapshot(store, str(yaml), "l").path, "stamp").read_text()
        second = build(store, str(yaml), substitutions=subs, out=lambda s: None, stream=lambda s: None)
        stamp2 = in_tree(layer_snapshot(store, str(yaml), "l").path, "stamp").read_text()
        third = build(store, str(yaml), substitutions=subs, no_cache=True, out=lambda s: None,
                      stream=lambda s: None)
        stamp3 = in_tree(layer_snapshot(store, str(yaml), "l").path, "stamp").read_text()
    assert (first.steps_run, second.steps_cached, third.steps_run) == (1, 1, 1)
    assert stamp1 == stamp2 != stamp3


def test_failing_run_names_the_layer_and_command(storage, busybox_oci, tmp_path, capsys):
    yaml = write(tmp_path / "stacker.yaml", """
        broken:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: |
                echo before
                ls /does-not-exist
                echo after
        """)
    rc = cli(storage, "build", "-f", str(yaml), "--no-oci", "--substitute", f"BUSYBOX_OCI={busybox_oci}")
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken" in err and "ls /does-not-exist" in err


def test_grab_copies_a_file_from_a_layer(storage, busybox_oci, tmp_path, capsys):
    yaml = write(tmp_path / "stacker.yaml", """
        g:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: |
                mkdir -p /out && echo payload > /out/file.txt && chown 1000:1000 /out/file.txt
                ln -s /out/file.txt /link
                ln -s ../../../../etc/passwd /escape
        """)
    assert cli(storage, "build", "-f", str(yaml), "--no-oci", "--substitute", f"BUSYBOX_OCI={busybox_oci}") == 0
    dest = tmp_path / "grabbed"
    dest.mkdir()
    assert cli(storage, "grab", "-f", str(yaml), "g:/out/file.txt", str(dest)) == 0
    assert (dest / "file.txt").read_text() == "payload\n"
    assert (dest / "file.txt").stat().st_uid == os.getuid()
    assert cli(storage, "grab", "-f", str(yaml), "g:/link", str(dest / "via-link")) == 0
    assert (dest / "via-link").read_text() == "payload\n"
    capsys.readouterr()
    assert cli(storage, "grab", "-f", str(yaml), "g:/escape", str(dest)) == 1
    assert "escapes the rootfs" in capsys.readouterr().err
    assert cli(storage, "grab", "-f", str(yaml), "g:/../../etc/passwd", str(dest)) == 1
    assert "escapes the rootfs" in capsys.readouterr().err


def test_unknown_layer_for_grab_is_a_clear_error(storage, busybox_oci, tmp_path, capsys):
    yaml = write(tmp_path / "stacker.yaml", """
        a:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: true
        """)
    assert cli(storage, "build", "-f", str(yaml), "--no-oci", "--substitute", f"BUSYBOX_OCI={busybox_oci}") == 0
    capsys.readouterr()
    assert cli(storage, "grab", "-f", str(yaml), "nope:/etc/passwd") == 1
    assert "layer nope is not built" in capsys.readouterr().err


def test_missing_substitution_is_a_clear_error(storage, tmp_path, capsys):
    yaml = write(tmp_path / "stacker.yaml", """
        a:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: true
        """)
    assert cli(storage, "build", "-f", str(yaml), "--no-oci") == 1
    assert "BUSYBOX_OCI" in capsys.readouterr().err


def test_the_btrfs_driver_on_storage_not_on_btrfs_is_refused_with_one_line(tmp_path, capsys):
    assert main(["--storage", str(tmp_path), "--storage-driver", "btrfs", "layers"]) == 1
    err = capsys.readouterr().err.strip()
    assert "btrfs" in err and len(err.splitlines()) == 1


def test_sc09_imports_with_dest_and_stacker_urls(storage, busybox_oci, tmp_path):
    (tmp_path / "folder1" / "subfolder2").mkdir(parents=True)
    (tmp_path / "folder1" / "file1").write_text("1")
    (tmp_path / "folder1" / "subfolder2" / "subfile1").write_text("s")
    yaml = write(tmp_path / "stacker.yaml", SC09)
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, out=lambda s: None,
              stream=lambda s: None)
        first = layer_snapshot(store, str(yaml), "first")
        # dest imports are part of the image; plain imports never are
        assert in_tree(first.path, "folder1/file1").read_text() == "1"
        assert not in_tree(first.path, "stacker").exists()


def test_a_layer_with_dest_imports_runs_in_the_build_environment(storage, busybox_oci, tmp_path):
    # The landing of dest imports is a snapshot before any step: the first step
    # must still start from the build environment (PATH, STACKER_LAYER_NAME).
    (tmp_path / "tool").write_text("#!/bin/sh\necho tool-ran\n")
    yaml = write(tmp_path / "stacker.yaml", """
        l:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          imports:
            - path: tool
              dest: /usr/local/bin/tool
              mode: 0755
          run: |
            echo "$PATH:$STACKER_LAYER_NAME" > /env
            tool > /ran
        """)
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, out=lambda s: None,
              stream=lambda s: None)
        snap = layer_snapshot(store, str(yaml), "l")
        assert in_tree(snap.path, "env").read_text() == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:l\n"
        assert in_tree(snap.path, "ran").read_text() == "tool-ran\n"


def test_changed_import_content_invalidates_the_cache(storage, busybox_oci, tmp_path):
    (tmp_path / "conf").write_text("one")
    yaml = write(tmp_path / "stacker.yaml", """
        l:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          imports:
            - conf
          run: cp /stacker/imports/conf /conf
        """)
    subs = {"BUSYBOX_OCI": busybox_oci}
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions=subs, out=lambda s: None, stream=lambda s: None)
        os.utime(tmp_path / "conf", (1, 1))
        again = build(store, str(yaml), substitutions=subs, out=lambda s: None, stream=lambda s: None)
        assert again.steps_cached == 1  # an mtime alone changes nothing
        (tmp_path / "conf").write_text("two")
        changed = build(store, str(yaml), substitutions=subs, out=lambda s: None, stream=lambda s: None)
        assert changed.steps_run == 1
        assert in_tree(layer_snapshot(store, str(yaml), "l").path, "conf").read_text() == "two"


def test_generate_labels_become_image_labels(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", """
        l:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          run: echo 1.2.3 > /version
          generate_labels: |
            cat /version > /stacker/oci-labels/version
            touch /should-not-persist
        """)
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, oci_dir=str(oci),
              out=lambda s: None, stream=lambda s: None)
        assert not in_tree(layer_snapshot(store, str(yaml), "l").path, "should-not-persist").exists()
    import json

    index = json.loads((oci / "index.json").read_text())
    blob = lambda d: json.loads((oci / "blobs/sha256" / d.split(":")[1]).read_text())  # noqa: E731
    config = blob(blob(index["manifests"][0]["digest"])["config"]["digest"])
    assert config["config"]["Labels"] == {"version": "1.2.3"}


def test_build_writes_an_oci_layout_umoci_unpacks(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", """
        base:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: |
                echo hello > /hello
            environment:
                GREETING: hi
            cmd: /bin/sh -c "cat /hello"
        tmp:
            from:
                type: built
                tag: base
            build_only: true
            run: touch /from-build-only
        app:
            from:
                type: built
                tag: tmp
            run: rm /hello && touch /app
        """)
    oci = tmp_path / "oci"
    assert cli(storage, "build", "-f", str(yaml), "--oci-dir", str(oci),
               "--substitute", f"BUSYBOX_OCI={busybox_oci}") == 0
    import json

    index = json.loads((oci / "index.json").read_text())
    tags = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
            if "artifactType" not in m]  # the images, not their SBOM and provenance
    assert tags == ["base", "app"]  # build order; build_only untagged
    for tag, present, absent in (("base", ["hello"], ["app"]), ("app", ["app", "from-build-only"], ["hello"])):
        out = tmp_path / f"unpacked-{tag}"
        subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{oci}:{tag}", str(out)],
                       check=True, capture_output=True)
        for name in present:
            assert (out / "rootfs" / name).exists(), (tag, name)
        for name in absent:
            assert not (out / "rootfs" / name).exists(), (tag, name)
    config = json.loads((tmp_path / "unpacked-base" / "config.json").read_text())
    assert "GREETING=hi" in config["process"]["env"]
    assert config["process"]["args"] == ["/bin/sh", "-c", "cat /hello"]


def test_legacy_import_key_lands_at_slash_stacker(storage, busybox_oci, tmp_path):
    (tmp_path / "old.txt").write_text("legacy")
    (tmp_path / "f.sha").write_text("x")
    yaml = write(tmp_path / "stacker.yaml", """
        l:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          import:
            - old.txt
          run: cp /stacker/old.txt /copied
        """)
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, out=lambda s: None,
              stream=lambda s: None)
        snap = layer_snapshot(store, str(yaml), "l")
        assert in_tree(snap.path, "copied").read_text() == "legacy"
        assert not in_tree(snap.path, "stacker").exists()


def test_import_hash_is_checked_case_insensitively(storage, busybox_oci, tmp_path, capsys):
    import hashlib

    (tmp_path / "blob").write_bytes(b"content")
    digest = hashlib.sha256(b"content").hexdigest()
    for given, rc in ((digest.upper(), 0), ("0" * 64, 1)):
        yaml = write(tmp_path / "stacker.yaml", f"""
            l:
              from:
                type: oci
                url: ${{{{BUSYBOX_OCI}}}}
              imports:
                - path: blob
                  hash: {given}
              run: cat /stacker/imports/blob
            """)
        assert cli(storage, "build", "-f", str(yaml), "--no-oci",
                   "--substitute", f"BUSYBOX_OCI={busybox_oci}") == rc
    assert "sha256" in capsys.readouterr().err


def test_chroot_gives_a_shell_in_a_throwaway_copy(storage, busybox_oci, tmp_path):
    import pexpect

    yaml = write(tmp_path / "stacker.yaml", """
        c:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          run: echo inside > /marker
        """)
    assert cli(storage, "build", "-f", str(yaml), "--no-oci", "--substitute", f"BUSYBOX_OCI={busybox_oci}") == 0
    child = pexpect.spawn(sys.executable, ["-m", "stacker_kernel", "--storage", str(storage), "chroot",
                                           "-f", str(yaml), "c"], timeout=30, encoding="utf-8")
    child.sendline("cat /marker; touch /scribble; echo done-$((6*7))")
    child.expect("inside")  # the layer's file, printed by the shell in the container
    child.expect("done-42")
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3
    with Store.open(storage) as store:
        snap = layer_snapshot(store, str(yaml), "c")
        assert not in_tree(snap.path, "scribble").exists()
        assert list((storage / "live").iterdir()) == []
