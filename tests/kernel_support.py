"""Helpers of the kernel tests (tests/test_kernel_*.py): a kernel spec in a temp dir, notebooks.

The kernel runs for real: its spec is installed into a temporary kernels
directory (never the user's Jupyter path), it is started the way
jupyter_server starts it (cwd = the notebook's directory, JPY_SESSION_NAME =
the notebook path), and it builds on the storage of $STACKER_KERNEL_STORAGE: for a
module's tests that take `kernels`, once on the machine's btrfs storage and once on an
overlay storage (conftest's `driver_storage`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest

from stacker_kernel.kernel.install import write_spec
from stacker_kernel.kernel.runner import NotebookKernel


def install_spec(directory: Path) -> Path:
    """Install the stacker kernel spec under `directory`; returns the kernels dir."""
    kernels = directory / "kernels"
    write_spec(kernels / "stacker")
    return kernels


def notebook_dir(directory: Path, busybox_tar: Path) -> Path:
    """A directory with busybox.tar in it, for notebooks whose base is `%from tar busybox.tar`."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox_tar, directory / "busybox.tar")
    return directory


def write_notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    """An nbformat 4.5 notebook of code cells given as (cell id, source)."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {
        "name": "stacker", "display_name": "Stacker", "language": "stacker"}})
    for cell_id, source in cells:
        cell = nbformat.v4.new_code_cell(source)
        cell.id = cell_id
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def start_kernel(notebook: Path, kernels: Path, **env: str) -> NotebookKernel:
    """A stacker kernel serving `notebook`; `env` entries override the kernel's environment."""
    kernel_env = dict(os.environ, JUPYTER_PATH=str(kernels.parent), **env)
    return NotebookKernel(notebook, env=kernel_env, kernels_dir=kernels)


# The first cell of the test notebooks: the busybox rootfs that notebook_dir puts beside them.
BASE = "%from tar busybox.tar"


# Fixtures shared by the kernel test modules (each imports the ones it uses).
@pytest.fixture(scope="module")
def kernels(tmp_path_factory, driver_storage) -> Path:
    """A kernels directory holding the "stacker" spec, for the tests of one module; its
    kernels build on `driver_storage` (each storage driver in turn)."""
    return install_spec(tmp_path_factory.mktemp("jupyter"))


@pytest.fixture
def nbdir(tmp_path, busybox_tar) -> Path:
    """A notebook directory with the busybox rootfs tar in it."""
    return notebook_dir(tmp_path / "nb", busybox_tar)


@pytest.fixture
def kernel(nbdir, kernels):
    """A kernel on nbdir/test.ipynb whose first cell set the busybox base."""
    k = start_kernel(nbdir / "test.ipynb", kernels)
    base = k.execute(BASE, "base", timeout=120)
    assert base.status == "ok", base.error
    yield k
    k.close()
