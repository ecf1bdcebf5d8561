"""A Dockerfile's COPY resolves its sources inside the build context, as Docker does
(issue 23, point 2): a symlink in the context whose target is outside it (`leak ->
/etc/shadow`, `hostetc -> /etc`) resolves within the context root, never to the
host's file; a link inside a copied directory is copied as a link."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kernel_support import kernels  # noqa: F401 (fixture)
from stacker_kernel.engine.build import build, layer_snapshot
from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.dockerfile import DockerfileOptions
from stacker_kernel.storage.store import Store
from conftest import in_tree

DOCKERFILE = """\
FROM busybox
COPY leak /s1
COPY hostetc/shadow /s2
COPY dir/ /d/
"""


def _context(tmp_path: Path, secret: Path) -> Path:
    """A context whose links point at `secret` (a host file) and at its folder."""
    ctx = tmp_path / "ctx"
    own = ctx / str(secret).lstrip("/")  # where the links lead when resolved inside the context
    own.parent.mkdir(parents=True)
    own.write_text("the context's own\n")
    (ctx / "dir").mkdir()
    (ctx / "dir" / "inner").symlink_to(secret)
    (ctx / "leak").symlink_to(secret)
    (ctx / "hostetc").symlink_to(secret.parent)
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("shadow", secret.name))
    return ctx


def _build(storage, busybox_oci, ctx: Path, oci: Path) -> Path:
    with Store.open(storage) as store:
        build(store, str(ctx / "Dockerfile"), out=lambda s: None, stream=lambda s: None, oci_dir=str(oci),
              dockerfile=DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
        return layer_snapshot(store, str(ctx / "Dockerfile"), "image").path


def _no_blob_holds(oci: Path, data: bytes) -> None:
    import gzip

    for blob in (oci / "blobs" / "sha256").iterdir():
        raw = blob.read_bytes()
        try:
            raw = gzip.decompress(raw)
        except OSError:
            pass
        assert data not in raw, blob


def test_copy_resolves_symlinks_inside_the_context(storage, busybox_oci, tmp_path):
    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    secret.write_text("host secret 5b1d\n")
    ctx = _context(tmp_path, secret)
    root = _build(storage, busybox_oci, ctx, tmp_path / "oci")
    assert in_tree(root, "s1").read_text() == "the context's own\n"
    assert in_tree(root, "s2").read_text() == "the context's own\n"
    assert os.readlink(in_tree(root, "d/inner")) == str(secret)  # a link, as in the context
    _no_blob_holds(tmp_path / "oci", b"host secret 5b1d")


def test_a_source_whose_link_leads_nowhere_in_the_context_is_one_line(storage, busybox_oci, tmp_path):
    secret = tmp_path / "outside" / "key"
    secret.parent.mkdir()
    secret.write_text("host key\n")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "leak").symlink_to(secret)
    (ctx / "Dockerfile").write_text("FROM busybox\nCOPY leak /k\n")
    with pytest.raises(RecipeError, match=r"COPY source leak does not exist in the build context"):
        _build(storage, busybox_oci, ctx, tmp_path / "oci")


@pytest.mark.rootful
def test_a_root_build_never_copies_the_hosts_etc_shadow(storage, busybox_oci, tmp_path):
    shadow = Path("/etc/shadow")
    line = next(ln for ln in shadow.read_text().splitlines() if ln.startswith("root:")).encode()
    ctx = _context(tmp_path, shadow)
    root = _build(storage, busybox_oci, ctx, tmp_path / "oci")
    assert in_tree(root, "s1").read_text() == "the context's own\n"
    assert in_tree(root, "s2").read_text() == "the context's own\n"
    assert os.readlink(in_tree(root, "d/inner")) == "/etc/shadow"
    _no_blob_holds(tmp_path / "oci", line)
    found = subprocess.run(["grep", "-rlF", line.decode(), str(root)], capture_output=True, text=True)
    assert found.stdout == ""


def _as_notebook(ctx: Path, busybox_oci: str) -> Path:
    """The context's Dockerfile made a notebook beside it, as `stacker-kernel import` and
    JupyterLab's Open as stacker notebook make it."""
    import nbformat

    from stacker_kernel.engine.build import convert_dockerfile

    nb_path = ctx / "Dockerfile.ipynb"
    nb = convert_dockerfile(str(ctx / "Dockerfile"), str(nb_path),
                            DockerfileOptions({}, {"busybox": "oci:" + busybox_oci}))
    nbformat.write(nbformat.from_dict(nb), nb_path)
    return nb_path


def test_a_notebook_made_from_a_dockerfile_keeps_its_copies_inside_the_context(storage, busybox_oci, tmp_path):
    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    secret.write_text("host secret 6c2e\n")
    ctx = _context(tmp_path, secret)
    nb_path = _as_notebook(ctx, busybox_oci)
    with Store.open(storage) as store:
        build(store, str(nb_path), out=lambda s: None, stream=lambda s: None, oci_dir=str(tmp_path / "oci"))
        root = layer_snapshot(store, str(nb_path), "image").path
    from conftest import in_tree

    assert in_tree(root, "s1").read_text() == "the context's own\n"
    assert in_tree(root, "s2").read_text() == "the context's own\n"
    _no_blob_holds(tmp_path / "oci", b"host secret 6c2e")


def test_its_cells_run_in_the_kernel_keep_them_inside_the_context_too(busybox_oci, tmp_path, kernels):
    import nbformat

    from kernel_support import start_kernel

    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    secret.write_text("host secret 7d3f\n")
    ctx = _context(tmp_path, secret)
    nb_path = _as_notebook(ctx, busybox_oci)
    cells = [c for c in nbformat.read(nb_path, as_version=4).cells if c.cell_type == "code"]
    k = start_kernel(nb_path, kernels)
    try:
        for cell in cells:
            run = k.execute(cell.source, cell.id, timeout=120)
            assert run.status == "ok", run.error
        shown = k.execute("cat /s1 /s2", "show", timeout=120)
        assert shown.text().split("\n")[:2] == ["the context's own", "the context's own"], shown.text()
        assert "host secret" not in shown.text()
    finally:
        k.close()
