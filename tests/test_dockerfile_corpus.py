"""Real-world-shaped Dockerfiles (tests/data/dockerfiles/*/Dockerfile) on a Debian base.

Each is a service as such Dockerfiles are written (Go, Python, Node, Rust-like:
multi-stage, cache mounts, a build secret, bind mounts, USER, ARG UID,
.dockerignore, wildcards), buildable offline: the "compilers" are shell. Each
builds unprivileged here; as root, it builds here and with `buildah bud
--isolation chroot` from the same Debian OCI base, and every file (type, mode,
owner, content) and the image config must be equal, with the comparison rules
of test_dockerfile.py (the base's device nodes are left out of the base).
"""
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from stacker_kernel.cli import main
from stacker_kernel.oci.layout import OCILayout
from test_dockerfile import _unpack, tree_differences

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "data" / "dockerfiles"
SERVICES = sorted(p.name for p in CORPUS.iterdir() if (p / "Dockerfile").is_file())
SECRET = "//registry.example.com/:_authToken=corpus-secret-0123456789\n"


@pytest.fixture(scope="module")
def debian_tar(tmp_path_factory) -> Path:
    """The Debian bookworm minbase rootfs tar of scripts/debian-rootfs.sh."""
    out = tmp_path_factory.mktemp("debian") / "debian.tar"
    subprocess.run([str(REPO / "scripts/debian-rootfs.sh"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="module")
def debian_oci(debian_tar, tmp_path_factory) -> str:
    """`LAYOUT:debian`, an OCI layout of the tar, made with umoci. Without its device
    nodes, which neither builder may create unprivileged, and without shadow's backup
    files (/etc/group- ...): their rewrite by groupadd keeps size and mtime, so
    buildah's layer diff (vfs) misses it and its image keeps the base's backups."""
    base = tmp_path_factory.mktemp("debian-oci")
    layout, bundle = base / "oci", base / "bundle"

    def umoci(*args):
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    rootless = ["--rootless"] if os.getuid() else []
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:debian")
    umoci("unpack", *rootless, "--image", f"{layout}:debian", str(bundle))
    with tarfile.open(debian_tar) as tar:
        members = [m for m in tar.getmembers() if not (m.ischr() or m.isblk())
                   and not (m.name.startswith("./etc/") and m.name.endswith("-"))]
        tar.extractall(bundle / "rootfs", members=members, numeric_owner=True)
    umoci("repack", "--image", f"{layout}:debian", str(bundle))
    shutil.rmtree(bundle, ignore_errors=True)
    return f"{layout}:debian"


def _context(tmp_path: Path, service: str) -> Path:
    ctx = tmp_path / service
    shutil.copytree(CORPUS / service, ctx)
    for p in [tmp_path, *ctx.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o055 | (0o011 if p.is_dir() else 0))
    (tmp_path / "npmrc").write_text(SECRET)
    (tmp_path / "npmrc").chmod(0o644)
    return ctx


def _ours(storage: Path, ctx: Path, base: str, oci: Path) -> None:
    assert main(["--storage", str(storage), "build", "-f", str(ctx / "Dockerfile"),
                 "--base", f"debian:12={base}", "--secret", f"id=npmrc,src={ctx.parent / 'npmrc'}",
                 "--oci-dir", str(oci)]) == 0


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_dockerfile_builds_unprivileged(service, storage, debian_oci, tmp_path):
    ctx = _context(tmp_path, service)
    _ours(storage, ctx, "oci:" + debian_oci, tmp_path / "oci")
    assert OCILayout(str(tmp_path / "oci")).tags() == ["image"]  # only the target
    for p in Path(tmp_path / "oci").rglob("*"):  # the secret is in no blob of the layout
        if p.is_file():
            assert b"corpus-secret" not in p.read_bytes()


def _buildah(ctx: Path, base: str, work: Path) -> str:
    """The image buildah builds from the service's Dockerfile: `LAYOUT:want`."""
    root = work / "buildah"
    buildah = ["buildah", "--root", str(root / "root"), "--runroot", str(root / "run"),
               "--storage-driver", "vfs"]
    made_run = not os.path.exists("/run/containers")
    try:
        subprocess.run(buildah + ["pull", "-q", base], check=True, capture_output=True)
        image = subprocess.run(buildah + ["images", "-q"], check=True, capture_output=True,
                               text=True).stdout.split()[0]
        subprocess.run(buildah + ["tag", image, "docker.io/library/debian:12"], check=True)
        bud = subprocess.run(buildah + ["bud", "--isolation", "chroot", "--pull-never", "-q",
                                        "--secret", f"id=npmrc,src={ctx.parent / 'npmrc'}",
                                        "-f", str(ctx / "Dockerfile"), "-t", "want", str(ctx)],
                             capture_output=True, text=True)
        assert bud.returncode == 0, bud.stderr
        subprocess.run(buildah + ["push", "-q", "want", f"oci:{work}/want:want"], check=True,
                       capture_output=True)
    finally:
        subprocess.run(buildah + ["rmi", "-a", "-f"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        if made_run:
            shutil.rmtree("/run/containers", ignore_errors=True)
    return f"{work}/want"


@pytest.fixture(scope="module")
def buildah_images(tmp_path_factory) -> dict:
    """Service -> the layout of buildah's image of it, built once for both storage drivers."""
    return {}


@pytest.mark.rootful
@pytest.mark.parametrize("service", SERVICES)
def test_a_service_image_equals_what_buildah_builds(service, storage, debian_oci, buildah_images, tmp_path,
                                                    tmp_path_factory):
    ctx = _context(tmp_path, service)
    if service not in buildah_images:
        buildah_images[service] = _buildah(ctx, "oci:" + debian_oci, tmp_path_factory.mktemp(f"buildah-{service}"))
    _ours(storage, ctx, "oci:" + debian_oci, tmp_path / "got")
    want_tree, want_config = _unpack(buildah_images[service], "want", tmp_path / "want-bundle")
    got_tree, got_config = _unpack(str(tmp_path / "got"), "image", tmp_path / "got-bundle")
    differ = tree_differences(got_tree, want_tree)
    for p in sorted(differ):
        if p.startswith("/etc/"):
            for name, bundle in (("got", "got-bundle"), ("want", "want-bundle")):
                f = tmp_path / bundle / "rootfs" / p.lstrip("/")
                print(name, p, f.read_text(errors="replace") if f.is_file() else None)
    assert differ == {}
    assert got_config == want_config
