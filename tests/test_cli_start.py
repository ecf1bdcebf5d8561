"""The CLI imports only what the command needs (issue 25: a cached build starts fast).

Each check runs a fresh interpreter and looks at sys.modules, as a user's command
starts: nothing here times anything."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stacker_kernel.cli import COMMANDS, build_parser, command_of

# What a cached build of a Dockerfile or a plain notebook never needs: notebook
# validation, the kernel and its widgets, SBOM and signing libraries (an SBOM is made
# only for an image that changed), a container (none starts), an HTTP client (it
# downloads nothing, and names no shared cache), python-btrfs (its ioctl numbers are
# storage/btrfs.py's own; it only syncs and reads the space usage), a thread pool (no
# step's size is measured), ctypes.util (whose find_library runs ldconfig).
NEVER_PACKAGES = {"nbformat", "jsonschema", "ipykernel", "ipywidgets", "spdx_tools", "cryptography", "pexpect",
                  "http", "ssl", "email", "btrfs", "concurrent"}
NEVER_OURS = {"stacker_kernel.kernel", "stacker_kernel.engine.sbom", "stacker_kernel.oci.registry",
              "stacker_kernel.engine.remote_cache", "urllib.request", "ctypes.util"}


# What a cached build whose OCI layout already holds its images never needs: the image
# writers and their tar, diff and socket modules, the YAML of the recipe the image
# carries, the base importers' layer readers.
LAYOUT_HELD = {"tarfile", "gzip", "socket", "yaml", "stacker_kernel.oci.export", "stacker_kernel.oci.layer_types",
               "stacker_kernel.oci.diff", "stacker_kernel.oci.tarwriter", "stacker_kernel.oci.tarlayer",
               "stacker_kernel.oci.attach", "stacker_kernel.oci.sbom", "stacker_kernel.recipe.stacker_yaml"}


# What a build whose steps all come from the cache no longer loads: the Dockerfile
# translator and its Go parser (the store keeps the notebook a Dockerfile gave), the
# .dockerignore parser (there is none), and what
# only a step, a container, a base import or a mistake needs: the container runtime and
# its limits, the OCI layout reader, logging, subprocess, tempfile, pickle, difflib, uuid
# and platform, secrets, the terminal modules.
CACHED_NEVER = {"stacker_kernel.recipe.dockerfile", "dockerfile", "stacker_kernel.recipe.dockerignore",
                "stacker_kernel.container.runtime",
                "stacker_kernel.container.limits", "stacker_kernel.oci.layout", "stacker_kernel.oci.cas",
                "logging", "subprocess", "tempfile", "pickle", "difflib", "uuid", "platform", "secrets", "termios",
                "tty"}


def unneeded(loaded: set[str], more: set[str] = set()) -> set[str]:
    return {m for m in loaded if m.split(".")[0] in NEVER_PACKAGES | more} | (NEVER_OURS & loaded)


def modules_after(code: str, cwd: Path | None = None) -> set[str]:
    """The modules a fresh interpreter has imported after running `code`."""
    run = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_parsing_a_build_command_adds_only_the_build_options():
    loaded = modules_after("from stacker_kernel.cli import build_parser, command_of\n"
                           "argv = ['--storage', '/x', 'build', '-f', 'Dockerfile', '--no-oci']\n"
                           "args = build_parser(command_of(argv)).parse_args(argv)\n"
                           "assert args.file == ['Dockerfile'] and args.no_oci and args.storage == '/x'\n")
    # setup-storage and install name their defaults from these: not parsed, not imported
    assert not {"stacker_kernel.storage.location", "stacker_kernel.kernel.install", "btrfs"} & loaded
    assert not unneeded(loaded, {"yaml", "dockerfile"})


@pytest.mark.parametrize("argv, command", [
    (["build", "-f", "x"], "build"),
    (["--storage", "gc", "build"], "build"),  # an option's value is no command
    (["--stor", "gc", "layers"], "layers"),  # nor a prefix's (argparse takes those)
    (["--storage=gc", "sbom"], "sbom"),
    (["--storage-driver", "btrfs", "clean", "."], "clean"),
    (["-h"], None), ([], None), (["bogus", "build"], None),
])
def test_the_command_is_found_before_parsing(argv, command):
    assert command_of(argv) == command


def test_every_command_still_parses_its_own_options_and_help_lists_them_all(capsys):
    for c in COMMANDS:
        parser = build_parser(c.name)
        sub = next(a for a in parser._actions if a.dest == "command").choices[c.name]
        assert len(sub._actions) > 3 or c.name == "layers", c.name  # -h, --storage, --storage-driver + its own
    with pytest.raises(SystemExit):
        build_parser(None).parse_args(["--help"])
    listed = capsys.readouterr().out
    assert all(c.name in listed for c in COMMANDS)


def test_a_cached_dockerfile_build_imports_no_notebook_kernel_or_sbom_library(storage, busybox_tar, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN echo hi > /hi\n")
    argv = ["--storage", str(storage), "build", "-f", "Dockerfile", "--base", f"busybox=tar:{busybox_tar}"]
    build = f"import sys\nfrom stacker_kernel.cli import main\nassert main({argv!r}) == 0\n"
    first = modules_after(build, tmp_path)  # runs the step, writes the OCI layout with its SBOM
    assert unneeded(first) >= {"spdx_tools.spdx.model", "stacker_kernel.engine.sbom", "pexpect"}
    assert first >= LAYOUT_HELD
    cached = modules_after(build, tmp_path)
    assert not unneeded(cached)
    assert not cached & LAYOUT_HELD
    assert not cached & CACHED_NEVER


def test_a_cached_notebook_build_imports_no_nbformat_or_dockerfile_parser(storage, busybox_tar, tmp_path):
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "id": "c1", "metadata": {}, "execution_count": None, "outputs": [],
         "source": f"%layer app\n%from tar {busybox_tar}"},
        {"cell_type": "code", "id": "c2", "metadata": {}, "execution_count": None, "outputs": [],
         "source": "echo hi > /hi"}]}
    (tmp_path / "app.ipynb").write_text(json.dumps(nb))
    argv = ["--storage", str(storage), "build", "-f", "app.ipynb"]
    build = f"from stacker_kernel.cli import main\nassert main({argv!r}) == 0\n"
    modules_after(build, tmp_path)
    cached = modules_after(build, tmp_path)
    assert not unneeded(cached, {"dockerfile"})
    assert not cached & LAYOUT_HELD
    assert not cached & CACHED_NEVER


def test_a_cached_no_oci_build_loads_no_image_writer(storage, busybox_tar, tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN echo hi > /hi\n")
    argv = ["--storage", str(storage), "build", "-f", "Dockerfile", "--base", f"busybox=tar:{busybox_tar}",
            "--no-oci"]
    build = f"from stacker_kernel.cli import main\nassert main({argv!r}) == 0\n"
    modules_after(build, tmp_path)
    assert not modules_after(build, tmp_path) & (LAYOUT_HELD | {"stacker_kernel.oci.provenance"})


def _cli(storage, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "stacker_kernel", "--storage", str(storage), *args], cwd=cwd,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    # what it says of the images (the steps' lines carry timings)
    return "".join(line for line in proc.stdout.splitlines(keepends=True) if "image" in line and " in " not in line)


def test_a_layout_changed_since_the_build_gets_its_image_again(storage, busybox_tar, tmp_path):
    """The cached build trusts the layout only as it left it: a tag dropped or a blob
    deleted by hand (or another tool) is written again, and it says the same either way."""
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN echo hi > /hi\n")
    build = ["build", "-f", "Dockerfile", "--base", f"busybox=tar:{busybox_tar}"]
    _cli(storage, tmp_path, *build)
    full = _cli(storage, tmp_path, *build)  # the first cached build checks the layout in full
    assert "wrote image to oci" in full and "manifest sha256:" in full
    assert _cli(storage, tmp_path, *build) == full  # the layout held: the same lines, nothing written

    index_path = tmp_path / "oci" / "index.json"
    index = json.loads(index_path.read_text())
    tagged = [d for d in index["manifests"] if d.get("annotations", {}).get("org.opencontainers.image.ref.name")]
    index["manifests"] = [d for d in index["manifests"] if d not in tagged]
    index_path.write_text(json.dumps(index))
    again = _cli(storage, tmp_path, *build)
    assert "wrote image to oci" in again and "manifest sha256:" in again
    tagged = [d for d in json.loads(index_path.read_text())["manifests"]
              if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "image"]
    assert len(tagged) == 1

    manifest = json.loads((tmp_path / "oci/blobs/sha256" / tagged[0]["digest"].split(":")[1]).read_text())
    layer = tmp_path / "oci/blobs/sha256" / manifest["layers"][-1]["digest"].split(":")[1]
    layer.unlink()
    assert _cli(storage, tmp_path, *build) == again
    assert layer.is_file()

    # Another user's build of the same steps: its image names that author
    _cli(storage, tmp_path, *build, env={"LOGNAME": "someone-else"})
    manifest = json.loads((tmp_path / "oci/blobs/sha256" / _tagged(tmp_path, "image").split(":")[1]).read_text())
    config = json.loads((tmp_path / "oci/blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    assert config["author"].startswith("someone-else@")


def _tagged(tmp_path: Path, tag: str) -> str:
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    return next(d["digest"] for d in index["manifests"]
                if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
