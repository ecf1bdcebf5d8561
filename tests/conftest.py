"""Shared test setup.

The suite runs twice (scripts/test.sh): as an unprivileged user with a subuid
range, deselecting `rootful` tests, and as root running only them. Tests are
deselected rather than skipped so that a skip never hides a missing feature.
"""
import os
import subprocess
import tarfile
import tempfile
import io
from pathlib import Path

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        rootful = item.get_closest_marker("rootful") is not None
        (keep if rootful == IS_ROOT else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _busybox_rootfs_tar(dest: Path) -> Path:
    """A minimal busybox rootfs as an uncompressed tar, owned by 0:0."""
    busybox = Path("/bin/busybox")
    applets = subprocess.run([str(busybox), "--list-full"], check=True,
                             capture_output=True, text=True).stdout.split()
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        def add_dir(name, mode=0o755):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, 1700000000
            tar.addfile(ti)

        def add_file(name, data: bytes, mode=0o644):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, 1700000000
            tar.addfile(ti, io.BytesIO(data))

        for d in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "proc",
                  "sys", "dev", "var", "var/tmp", "home", "run"]:
            add_dir(d, 0o700 if d == "root" else 0o755)
        add_dir("tmp", 0o1777)
        ti = tarfile.TarInfo("bin/busybox")
        ti.size, ti.mode, ti.mtime = busybox.stat().st_size, 0o755, 1700000000
        with busybox.open("rb") as f:
            tar.addfile(ti, f)
        for path in applets:
            path = path.lstrip("/")
            if path == "bin/busybox":
                continue
            ti = tarfile.TarInfo(path)
            ti.type, ti.mtime = tarfile.SYMTYPE, 1700000000
            ti.linkname = "/bin/busybox"
            tar.addfile(ti)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return dest


@pytest.fixture(scope="session")
def busybox_tar(tmp_path_factory) -> Path:
    """Path to a busybox rootfs tar (from Debian's busybox-static)."""
    return _busybox_rootfs_tar(tmp_path_factory.mktemp("busybox") / "busybox.tar")


# Every test whose storage matters runs on both storage drivers (storage/driver.py):
# btrfs (the root-prepared storage) and overlay (a folder on ext4). Storage matters to a
# test that takes the `storage` fixture (a fresh storage root of the driver) or
# `driver_storage` (the storage of the kernels and commands that use
# $STACKER_KERNEL_STORAGE, as kernel_support's `kernels` does): pytest_generate_tests
# gives each such test one parameter per driver. A test of a btrfs-only feature (subvolume
# flags, ioctls, reflinked blobs) is marked `btrfs_only` with a one-line reason; the
# modules below are wholly about btrfs and run on it alone. (Tests that make a btrfs of
# their own, as test_full_disk and test_multiuser_storage do, take neither fixture.)
BTRFS_ONLY_MODULES = {
    "test_btrfs",              # the btrfs ioctls and subvolume flags themselves
    "test_diff",               # oci/diff.py's tree walk between btrfs subvolumes it makes itself
    "test_storage_setup",      # root's setup-storage: the btrfs image and its mount options
    "test_layer_types_whole",  # a whole-rootfs squashfs/erofs packed from btrfs subvolumes it makes itself
}
OVERLAY_ONLY_MODULES = {"test_overlay_store", "test_overlay_depth", "test_overlay_usage"}  # the overlay driver's layers
# Where overlay stores are made: on the machine's / (ext4), not on the btrfs storage.
OVERLAY_PARENT = Path(os.environ.get("STACKER_KERNEL_OVERLAY_TEST_DIR", "/var/tmp"))
DRIVERS = ["btrfs", "overlay"]
# The machine's btrfs storage ($STACKER_KERNEL_STORAGE as the run began): driver_storage
# points the variable elsewhere while a module's overlay tests run.
BTRFS_STORAGE = os.environ.get("STACKER_KERNEL_STORAGE", "")


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rpartition(".")[2]
    names = [n for n in ("storage", "driver_storage") if n in metafunc.fixturenames]
    if not names or module in BTRFS_ONLY_MODULES:
        return
    only_btrfs = metafunc.definition.get_closest_marker("btrfs_only") is not None
    drivers = ["btrfs"] if only_btrfs else ["overlay"] if module in OVERLAY_ONLY_MODULES else DRIVERS
    if names == ["storage"]:
        metafunc.parametrize("storage", drivers, indirect=True)
    else:  # the test's own storage, if any, takes the driver of the module's kernels (`storage`)
        metafunc.parametrize("driver_storage", drivers, indirect=True, scope="module")


def overlay_root() -> Path:
    """A fresh, empty overlay storage folder on ext4 (the caller deletes it)."""
    from stacker_kernel.storage import btrfs, driver

    root = Path(tempfile.mkdtemp(prefix="sk-overlay-", dir=OVERLAY_PARENT))
    assert not btrfs.is_btrfs(root), f"{OVERLAY_PARENT} is on btrfs: set STACKER_KERNEL_OVERLAY_TEST_DIR"
    driver.choose(root, "overlay")
    return root


@pytest.fixture(scope="module")
def driver_storage(request):
    """The storage that $STACKER_KERNEL_STORAGE names while the tests of one module run (the
    one kernels and commands of the test build on): the machine's btrfs storage, or, for
    the overlay parameter, a fresh overlay storage folder on ext4, deleted afterwards."""
    from stacker_kernel.storage import driver

    if getattr(request, "param", "btrfs") != "overlay":
        yield Path(BTRFS_STORAGE)
        return
    root = overlay_root()
    os.environ["STACKER_KERNEL_STORAGE"] = str(root)
    try:
        yield root
    finally:
        os.environ["STACKER_KERNEL_STORAGE"] = BTRFS_STORAGE
        _after_reaper(root)
        driver.OverlayDriver().remove(root)


def reaped(root: Path, timeout: float = 120) -> None:
    """Wait until gc's background reaper has emptied the trash of storage `root` (a
    test that waits longer than `timeout` fails)."""
    import time

    from stacker_kernel.storage import driver

    deadline = time.monotonic() + timeout
    while driver.trash_entries(root):
        assert time.monotonic() < deadline, f"the reaper left {driver.trash_entries(root)}"
        time.sleep(0.05)


def _after_reaper(root: Path) -> None:
    """Wait until no gc reaper works in storage `root` (it would race with the
    deletion of the storage) and destroy what is left in its trash."""
    from stacker_kernel.storage.store import reap_trash

    reap_trash(root, wait=True)


def in_tree(tree: Path, rel: str) -> Path:
    """Where file `rel` of tree `tree` (a snapshot or live rootfs of either driver) is
    on the host, for a test that reads it directly (the overlay driver's tree is a
    stack of layer directories)."""
    from stacker_kernel.storage import driver

    found = driver.of_root(tree.parent.parent).locate(tree, rel)
    return found if found is not None else tree / rel


def _copy_union(tree: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    subprocess.run(["cp", "-a", "--", tree, dest], check=True)


def host_view(tree: Path) -> Path:
    """A directory on the host that holds snapshot `tree` as the container sees it, owners
    and all, for a test that walks or lists it: the tree itself on btrfs; on overlay, a
    copy of its union made once beside the storage's trees (deleted with the storage)."""
    from stacker_kernel.container.userns import run_in_userns
    from stacker_kernel.storage import overlay

    if overlay.read_stack(tree) is None:
        return tree
    dest = tree.parent.parent / "test-views" / f"{tree.parent.name}-{tree.name}"
    if not dest.exists():
        run_in_userns(_copy_union, str(tree), str(dest))
    return dest


def is_frozen(tree: Path) -> bool:
    """Whether snapshot or base `tree` of either driver can no longer change: a read-only
    btrfs subvolume, or an overlay stack without an upper directory."""
    from stacker_kernel.storage import btrfs, driver, overlay

    if driver.of_root(tree.parent.parent).name == "btrfs":
        return btrfs.is_readonly(tree)
    stack = overlay.read_stack(tree)
    return stack is not None and stack.upper is None and all(os.path.isdir(layer) for layer in stack.layers)


@pytest.fixture
def storage(request) -> Path:
    """A fresh storage root, deleted (with its trees) afterwards: a directory under
    the machine's $STACKER_KERNEL_STORAGE (btrfs), or, for the overlay parameter, a folder on ext4
    recorded for the overlay driver."""
    import uuid

    from stacker_kernel.storage import btrfs, driver

    callspec = getattr(request.node, "callspec", None)
    name = getattr(request, "param", None) or (callspec.params.get("driver_storage") if callspec else None)
    if name == "overlay":
        root = overlay_root()
        yield root
        _after_reaper(root)
        driver.OverlayDriver().remove(root)
        return
    root = Path(BTRFS_STORAGE) / f"t-{uuid.uuid4().hex}"
    root.mkdir()
    assert btrfs.is_btrfs(root), f"{root} is not on btrfs: STACKER_KERNEL_STORAGE names no btrfs storage"
    yield root
    _after_reaper(root)
    btrfs.remove_tree(root)


@pytest.fixture(scope="session")
def busybox_oci(busybox_tar, tmp_path_factory) -> str:
    """`LAYOUT:busybox`: an OCI layout of the busybox rootfs, made by umoci (rootless)."""
    base = tmp_path_factory.mktemp("busybox-oci")
    layout, bundle = base / "oci", base / "bundle"

    def umoci(*args):
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:busybox")
    umoci("unpack", "--rootless", "--image", f"{layout}:busybox", str(bundle))
    with tarfile.open(busybox_tar) as tar:
        for m in tar.getmembers():
            tar.extract(m, bundle / "rootfs", set_attrs=not m.issym())
    umoci("repack", "--image", f"{layout}:busybox", str(bundle))
    return f"{layout}:busybox"


@pytest.fixture
def small_btrfs():
    """A fresh 256 MiB btrfs of its own, loop-mounted (root only): nothing else changes
    its usage; unmounted and deleted afterwards."""
    work = Path(tempfile.mkdtemp(prefix="sk-small-", dir="/var/tmp"))
    image, mnt = work / "btrfs.img", work / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop,user_subvol_rm_allowed,noatime", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)
