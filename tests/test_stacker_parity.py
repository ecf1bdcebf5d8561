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
