"""The flagship demo, notebooks/deb-build.ipynb: a Debian package from source in two layers.

The notebook is built once, headless, as `stacker-kernel build` does it (a
Debian minbase rootfs from scripts/debian-rootfs.sh, the Debian mirror for
apt); the tests then check what that build produced: the cache on a second
build, the grabbed `.deb`, the OCI layout, the exported stacker.yaml, the
package installed and run in a fresh container from the exported `build`
image, and the notebook as JupyterLab runs it (its `%grab`, its rollback demo).
The timings of the first and the cached build are printed (`pytest -s`).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from conftest import BTRFS_STORAGE, overlay_root
from kernel_support import install_spec, start_kernel

from stacker_kernel.cli import main
from stacker_kernel.recipe.stacker_yaml import load

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "deb-build.ipynb"
BASE_TAR = "debian-bookworm-minbase.tar"  # what the notebook's `%from tar` names


@dataclass
class Built:
    """One `stacker-kernel build` of the notebook: what it printed and how long it took."""

    output: str
    seconds: float


@dataclass
class DemoDir:
    """The notebook copied to a directory of its own, beside its base tar."""

    notebook: Path
    oci: Path
    storage: Path


def cli(storage: Path, *args: str) -> str:
    """Run `stacker-kernel --storage STORAGE ARGS...`; its stdout (it must succeed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["--storage", str(storage), *args])
    assert status == 0, out.getvalue()
    return out.getvalue()


def timed_build(demo: DemoDir) -> Built:
    t0 = time.monotonic()
    output = cli(demo.storage, "build", "-f", str(demo.notebook), "--oci-dir", str(demo.oci))
    return Built(output, time.monotonic() - t0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, driver_storage) -> DemoDir:
    """The notebook and its base tar in a fresh directory, on storage of its own of the
    module's driver (removed afterwards); the repository itself may not be writable."""
    from stacker_kernel.storage import btrfs, driver

    work = tmp_path_factory.mktemp("deb-build")
    notebook = work / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, notebook)
    subprocess.run([str(REPO / "scripts/debian-rootfs.sh"), str(work / BASE_TAR)],
                   check=True, stdout=subprocess.DEVNULL)
    if driver.recorded(driver_storage) == "overlay":
        storage = overlay_root()
        yield DemoDir(notebook, work / "oci", storage)
        driver.OverlayDriver().remove(storage)
        return
    storage = Path(BTRFS_STORAGE) / f"t-deb-{uuid.uuid4().hex}"
    storage.mkdir()
    yield DemoDir(notebook, work / "oci", storage)
    btrfs.remove_tree(storage)


@pytest.fixture(scope="module")
def first_build(demo) -> Built:
    built = timed_build(demo)
    print(f"\ndeb-build.ipynb first build: {built.seconds:.1f} s")
    return built


@pytest.fixture(scope="module")
def second_build(demo, first_build) -> Built:
    built = timed_build(demo)
    print(f"\ndeb-build.ipynb cached build: {built.seconds:.1f} s")
    return built


@pytest.fixture(scope="module")
def grabbed_deb(demo, first_build) -> Path:
    """The hello .deb, grabbed out of layer pkg with `stacker-kernel grab`."""
    dest = demo.notebook.parent / "grabbed"
    cli(demo.storage, "grab", "-f", str(demo.notebook), "pkg:/debs", str(dest))
    debs = sorted(dest.glob("hello_*.deb"))
    assert len(debs) == 1, f"expected one hello_*.deb in /debs, found {debs}"
    return debs[0]


def oci_index(layout: Path) -> dict[str, dict]:
    """Tag -> manifest of an OCI image layout."""
    index = json.loads((layout / "index.json").read_text())
    manifests = {}
    for desc in index["manifests"]:
        tag = desc.get("annotations", {}).get("org.opencontainers.image.ref.name")
        digest = desc["digest"].split(":", 1)[1]
        manifests[tag] = json.loads((layout / "blobs/sha256" / digest).read_text())
    return manifests


def test_first_build_runs_both_layers_and_every_step(first_build):
    assert "built 2 layer(s): 7 step(s) ran, 0 cached" in first_build.output


def test_second_build_is_served_from_the_cache(second_build):
    assert "built 2 layer(s): 0 step(s) ran, 7 cached" in second_build.output


def test_grabbed_deb_is_the_hello_package(grabbed_deb):
    info = subprocess.run(["dpkg-deb", "--info", str(grabbed_deb)], check=True,
                          capture_output=True, text=True).stdout
    assert re.search(r"^ Package: hello$", info, re.M)
    assert re.search(r"^ Architecture: \S+$", info, re.M)


def test_oci_layout_has_the_build_and_pkg_images(demo, first_build):
    assert {"build", "pkg"} <= set(oci_index(demo.oci))


def test_pkg_image_is_built_on_the_build_image(demo, first_build):
    manifests = oci_index(demo.oci)
    build_layers = [d["digest"] for d in manifests["build"]["layers"]]
    pkg_layers = [d["digest"] for d in manifests["pkg"]["layers"]]
    assert len(pkg_layers) > len(build_layers)
    assert pkg_layers[:len(build_layers)] == build_layers


def test_exported_stacker_yaml_has_both_layers_and_their_steps(demo, first_build):
    out = demo.notebook.parent / "stacker.yaml"
    cli(demo.storage, "export", str(demo.notebook), "-o", str(out))
    recipe = load(out.read_text(), path=str(out))
    assert list(recipe.layers) == ["build", "pkg"]
    build, pkg = recipe.layers["build"], recipe.layers["pkg"]
    assert (build.from_.type, build.from_.url) == ("tar", BASE_TAR)
    assert (pkg.from_.type, pkg.from_.tag) == ("built", "build")
    assert "apt-get build-dep -y -qq hello" in build.run_script()
    assert "dpkg-buildpackage -b -uc -us" in pkg.run_script()
    assert pkg.build_env == {"DEBIAN_FRONTEND": "noninteractive"}


def test_deb_installs_and_runs_in_a_fresh_container_from_the_build_image(
        demo, grabbed_deb, tmp_path):
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(
        "hello-installed:\n"
        "    from:\n"
        "        type: oci\n"
        "        url: ${{OCI}}:build\n"
        "    imports:\n"
        "        - ${{DEB}}\n"
        "    run: |\n"
        "        dpkg -i /stacker/imports/hello_*.deb\n"
        "        hello > /hello.out\n")
    cli(demo.storage, "build", "-f", str(yaml), "--no-oci",
        "--substitute", f"OCI={demo.oci}", "--substitute", f"DEB={grabbed_deb}")
    cli(demo.storage, "grab", "-f", str(yaml), "hello-installed:/hello.out", str(tmp_path))
    assert (tmp_path / "hello.out").read_text() == "Hello, world!\n"


def test_notebook_runs_in_the_kernel_from_the_cache_and_grabs_the_deb(demo, first_build,
                                                                      tmp_path):
    kernels = install_spec(tmp_path)
    kernel = start_kernel(demo.notebook, kernels, STACKER_KERNEL_STORAGE=str(demo.storage))
    try:
        nb = nbformat.read(demo.notebook, as_version=4)
        runs = [kernel.execute(c.source, c.id, c.metadata.get("tags"), timeout=900)
                for c in nb.cells if c.cell_type == "code"]
    finally:
        kernel.close()
    expected = ["error" if "raises-exception" in (c.metadata.get("tags") or []) else "ok"
                for c in nb.cells if c.cell_type == "code"]
    assert [r.status for r in runs] == expected
    assert all(r.cached for r, want in zip(runs, expected) if want == "ok" and "%grab" not in r.first_line)
    assert list((demo.notebook.parent / "debs").glob("hello_*.deb"))


def test_rollback_demo_cell_fails_and_leaves_no_trace(demo, first_build, tmp_path):
    kernels = install_spec(tmp_path)
    kernel = start_kernel(demo.notebook, kernels, STACKER_KERNEL_STORAGE=str(demo.storage))
    try:
        nb = nbformat.read(demo.notebook, as_version=4)
        runs = {c.id: kernel.execute(c.source, c.id, c.metadata.get("tags"), timeout=900)
                for c in nb.cells if c.cell_type == "code"}
    finally:
        kernel.close()
    failed, after = runs["typo"], runs["after-typo"]
    assert failed.status == "error" and "./configure --with-typo-flag" in failed.error
    # its first line of its own output (a cache hit first says so in its status line)
    own = [line for line in after.text().splitlines() if not line.startswith("[step ")]
    assert after.status == "ok" and own[:1] == ["/src"]
    assert "no trace of the failed step" in after.text()
