"""stacker's behaviours a stacker user relies on (issue 26): no layer for a step
that changes nothing, `chroot` fed by a pipe, quiet cached builds, and the
command-line flags stacker users have in their Makefiles."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.cli import main


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def cli(storage, *args):
    return main(["--storage", str(storage), *args])


def skopeo_layers(ref: str) -> list[str]:
    out = subprocess.run(["skopeo", "inspect", "--raw", ref], check=True, capture_output=True, text=True).stdout
    return [layer["digest"] for layer in json.loads(out)["layers"]]


@pytest.mark.parametrize("layer_type", ["tar", "squashfs"])
def test_a_step_that_changes_nothing_adds_no_layer(storage, busybox_oci, tmp_path, layer_type):
    # stacker emits no layer for it; the container's bind of resolv.conf (busybox has
    # none) must leave no trace, not even /etc's mtime.
    yaml = write(tmp_path / "stacker.yaml", """
        quiet:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          run: echo hello world
        touched:
          from:
            type: built
            tag: quiet
          run: touch /etc/new
        """)
    oci = tmp_path / "oci"
    assert cli(storage, "build", "-f", str(yaml), "--oci-dir", str(oci), "--layer-type", layer_type,
               "--substitute", f"BUSYBOX_OCI={busybox_oci}") == 0
    suffix = "" if layer_type == "tar" else f"-{layer_type}"
    base = skopeo_layers(f"oci:{busybox_oci}")
    quiet = skopeo_layers(f"oci:{oci}:quiet{suffix}")
    assert len(quiet) == len(base) == 1
    touched = skopeo_layers(f"oci:{oci}:touched{suffix}")
    assert len(touched) == 2 and touched[0] == quiet[0]  # a real change still is a layer
    unpacked = tmp_path / "unpacked"
    if layer_type == "tar":
        subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{oci}:touched", str(unpacked)],
                       check=True, capture_output=True)
        assert (unpacked / "rootfs/etc/new").is_file()
        assert not (unpacked / "rootfs/etc/resolv.conf").exists()


def _stacker_kernel(storage, *args, stdin_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stacker_kernel", "--storage", str(storage), *args],
                          input=stdin_text, capture_output=True, text=True, timeout=120)


def test_chroot_runs_piped_commands_and_exits_with_their_status(storage, busybox_oci, tmp_path):
    # As stacker's own tests: `echo "[ -f /test ]" | stacker chroot LAYER`.
    yaml = write(tmp_path / "stacker.yaml", """
        c:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          run: echo inside > /marker
        """)
    sub = ("--substitute", f"BUSYBOX_OCI={busybox_oci}")
    assert cli(storage, "build", "-f", str(yaml), "--no-oci", *sub) == 0
    for command, status in (("[ -f /test ]", 1), ("[ -f /marker ]", 0)):
        proc = _stacker_kernel(storage, "chroot", "-f", str(yaml), *sub, "c", stdin_text=command + "\n")
        assert proc.returncode == status, proc.stdout + proc.stderr
    proc = _stacker_kernel(storage, "chroot", "-f", str(yaml), *sub, "c",
                           stdin_text="cat /marker\necho $((6*7))\nexit 5\n")
    assert proc.returncode == 5
    assert proc.stdout == "inside\n42\n"  # no prompt, no echo of the commands


def test_shell_fail_runs_piped_commands_in_the_failed_state(storage, busybox_oci, tmp_path):
    (tmp_path / "out").mkdir()
    yaml = write(tmp_path / "stacker.yaml", """
        broken:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          binds:
            - out -> /out
          run: |
            echo half-done > /made
            false
        """)
    proc = _stacker_kernel(storage, "build", "-f", str(yaml), "--no-oci", "--shell-fail",
                           "--substitute", f"BUSYBOX_OCI={busybox_oci}",
                           stdin_text="cp /made /out/copied\n")
    assert proc.returncode == 1  # the build failed all the same, and ended: no prompt waited
    assert "/ #" not in proc.stdout
    assert (tmp_path / "out" / "copied").read_text() == "half-done\n"


def test_a_cached_build_prints_one_line_per_step_not_the_old_output(storage, busybox_oci, tmp_path):
    yaml = write(tmp_path / "stacker.yaml", """
        chatty:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          run: |
            for i in $(seq 1 200); do echo "line $i"; done
            touch /made
        quiet:
          from:
            type: built
            tag: chatty
          run: echo second layer output
        """)
    args = ("build", "-f", str(yaml), "--no-oci", "--substitute", f"BUSYBOX_OCI={busybox_oci}")
    first = _stacker_kernel(storage, *args)
    assert first.returncode == 0 and "line 200" in first.stdout
    again = _stacker_kernel(storage, *args)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    # per layer "building layer NAME" and one "found cached layer" line; then the summary
    assert len(lines) == 5, again.stdout
    assert [line.split(" cached in")[0].strip() for line in lines if "found cached layer" in line] == \
        ["found cached layer chatty: step 1/1", "found cached layer quiet: step 1/1"]
    assert "line 1" not in lines and "second layer output" not in lines
    replayed = _stacker_kernel(storage, *args, "--replay-cached")
    assert replayed.returncode == 0
    assert {"line 200", "second layer output"} <= set(replayed.stdout.splitlines())
    assert len(replayed.stdout.splitlines()) == 5 + 201


def test_chroot_runs_the_command_given_after_the_layer(storage, busybox_oci, tmp_path):
    # stacker chroot [tag] [cmd]
    yaml = write(tmp_path / "stacker.yaml", f"""
        c:
          from:
            type: oci
            url: {busybox_oci}
          run: printf '#!/bin/sh\\necho from-tool\\nexit 3\\n' > /bin/tool && chmod 755 /bin/tool
        """)
    assert cli(storage, "build", "-f", str(yaml), "--no-oci") == 0
    for command in ("/bin/tool", "tool"):
        proc = _stacker_kernel(storage, "chroot", "-f", str(yaml), "c", command, stdin_text="")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "from-tool" in proc.stdout


def test_an_empty_import_beside_imports_is_accepted_as_stacker_does():
    # stacker's basic.bats has `import:` (empty) above `imports:`; only both filled is an error.
    from stacker_kernel.errors import RecipeError
    from stacker_kernel.recipe.stacker_yaml import load

    recipe = load("l:\n  from:\n    type: scratch\n  import:\n  imports:\n    - a.txt\n")
    assert [i.path for i in recipe.layers["l"].imports] == ["a.txt"]
    assert recipe.layers["l"].warnings == []
    with pytest.raises(RecipeError, match="cannot be used together"):
        load("l:\n  from:\n    type: scratch\n  import:\n    - b.txt\n  imports:\n    - a.txt\n")


def test_a_step_with_imports_and_binds_that_changes_nothing_adds_no_layer(storage, busybox_oci, tmp_path):
    # /stacker/imports and a bind's mount point are made for the step and gone after it.
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "shared").mkdir()
    yaml = write(tmp_path / "stacker.yaml", f"""
        l:
          from:
            type: oci
            url: {busybox_oci}
          imports:
            - x.txt
          binds:
            - shared -> /mnt/deep/shared
          run: cat /stacker/imports/x.txt && ls /mnt/deep/shared
        """)
    oci = tmp_path / "oci"
    assert cli(storage, "build", "-f", str(yaml), "--oci-dir", str(oci)) == 0
    assert len(skopeo_layers(f"oci:{oci}:l")) == len(skopeo_layers(f"oci:{busybox_oci}")) == 1
