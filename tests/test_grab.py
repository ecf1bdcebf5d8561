"""`stacker-kernel grab` of what a build step made: only files, directories and symlinks come out.

A layer built by a real step (as the container's root) holds a setuid file, a
world-writable file, a setgid directory, a FIFO, symlinks to /etc/shadow and
out of the rootfs, and a 10 GiB sparse file. The grab runs through the CLI in
a fresh process under a chosen umask, as a user would run it. The rootful
tests put a real device node and a setuid-root file into a snapshot (a
container cannot mknod) and grab it as root, and fill a small tmpfs.
"""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from stacker_kernel.engine.build import layer_snapshot
from stacker_kernel.storage.store import Store
from conftest import in_tree
from test_hostile import STACKER_KERNEL, assert_one_line_error, stacker_yaml

SPARSE_SIZE = 10 << 30
SPARSE_DATA_AT = 5 << 30

STEP = " && ".join([
    "mkdir -p /d/sub /d/sgid",
    "echo suid > /d/suid", "chmod 4755 /d/suid",
    "echo world > /d/ww", "chmod 0666 /d/ww",
    "chmod 2775 /d/sgid", "echo in-sgid > /d/sgid/f",
    "echo sub > /d/sub/g",
    "mkfifo /d/pipe",
    "ln -s /etc/shadow /d/shadow", "ln -s ../../.. /d/up",
    "truncate -s 10G /d/sparse",
    "printf middle | dd of=/d/sparse bs=1M seek=5120 conv=notrunc 2>/dev/null",
])


def grab_cli(storage: Path, yaml: Path, source: str, dest: Path, umask: int = 0o022,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([STACKER_KERNEL, "--storage", str(storage), "grab", "-f", str(yaml),
                           source, str(dest)], capture_output=True, text=True, timeout=300,
                          umask=umask, cwd=cwd)


@pytest.fixture
def built(storage, tmp_path, busybox_tar) -> Path:
    """stacker.yaml of layer `hostile`, built: its /d holds the entries of STEP."""
    yaml = stacker_yaml(tmp_path / "stacker.yaml", "tar", str(busybox_tar), STEP)
    proc = subprocess.run([STACKER_KERNEL, "--storage", str(storage), "build", "-f", str(yaml), "--no-oci"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return yaml


def assert_no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_directory_grab_skips_the_fifo_with_a_note_and_copies_the_rest(storage, built, tmp_path):
    dest = tmp_path / "out"
    proc = grab_cli(storage, built, "hostile:/d", dest)
    assert_no_traceback(proc)
    assert proc.stderr.splitlines() == ["skipped /d/pipe: a FIFO"]
    assert sorted(os.listdir(dest)) == ["sgid", "shadow", "sparse", "sub", "suid", "up", "ww"]
    assert (dest / "sub" / "g").read_text() == "sub\n"
    assert (dest / "sgid" / "f").read_text() == "in-sgid\n"


def test_symlinks_are_copied_as_symlinks_never_followed(storage, built, tmp_path):
    dest = tmp_path / "out"
    assert_no_traceback(grab_cli(storage, built, "hostile:/d", dest))
    assert os.readlink(dest / "shadow") == "/etc/shadow"
    assert os.readlink(dest / "up") == "../../.."
    assert (dest / "shadow").is_symlink() and (dest / "up").is_symlink()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_modes_lose_setuid_setgid_and_follow_the_umask(storage, built, tmp_path, umask):
    dest = tmp_path / "out"
    assert_no_traceback(grab_cli(storage, built, "hostile:/d", dest, umask=umask))
    modes = {p: stat.S_IMODE((dest / p).lstat().st_mode) for p in ("suid", "ww", "sgid", "sgid/f", "sub")}
    assert modes == {"suid": 0o755 & ~umask, "ww": 0o666 & ~umask, "sgid": 0o775 & ~umask,
                     "sgid/f": 0o644 & ~umask, "sub": 0o755 & ~umask}
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755 & ~umask
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [dest, *dest.rglob("*")]}
    assert owners == {(os.getuid(), os.getgid())}


def test_single_file_grab_drops_setuid_and_world_write(storage, built, tmp_path):
    dest = tmp_path / "got"
    dest.mkdir()
    assert_no_traceback(grab_cli(storage, built, "hostile:/d/suid", dest, umask=0o022))
    assert_no_traceback(grab_cli(storage, built, "hostile:/d/ww", dest, umask=0o022))
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "ww").stat().st_mode) == 0o644
    assert (dest / "suid").read_text() == "suid\n"


def test_sparse_file_stays_sparse(storage, built, tmp_path):
    dest = tmp_path / "sparse"
    assert_no_traceback(grab_cli(storage, built, "hostile:/d/sparse", dest))
    st = dest.stat()
    assert st.st_size == SPARSE_SIZE
    assert st.st_blocks * 512 < 16 << 20  # the one data block, not 10 GiB
    with dest.open("rb") as f:
        f.seek(SPARSE_DATA_AT)
        assert f.read(6) == b"middle"
        f.seek(SPARSE_DATA_AT - 4096)
        assert f.read(4096) == bytes(4096)


def test_sparse_file_inside_a_directory_grab_stays_sparse(storage, built, tmp_path):
    dest = tmp_path / "out"
    assert_no_traceback(grab_cli(storage, built, "hostile:/d", dest))
    st = (dest / "sparse").stat()
    assert st.st_size == SPARSE_SIZE and st.st_blocks * 512 < 16 << 20


def test_grabbing_a_fifo_itself_is_one_line_error(storage, built, tmp_path):
    proc = grab_cli(storage, built, "hostile:/d/pipe", tmp_path / "p")
    assert_one_line_error(proc, "/d/pipe is a FIFO")
    assert not (tmp_path / "p").exists()


def test_grab_through_a_symlink_component_stays_in_the_rootfs(storage, built, tmp_path):
    # /d/up -> ../../.. climbs above the rootfs from /d: refused, never resolved on the host.
    proc = grab_cli(storage, built, "hostile:/d/up/etc/passwd", tmp_path / "p")
    assert_one_line_error(proc, "escapes the rootfs")
    assert not (tmp_path / "p").exists()


def test_planted_symlinks_in_the_destination_are_never_followed(storage, built, tmp_path):
    out, elsewhere, victim = tmp_path / "out", tmp_path / "elsewhere", tmp_path / "victim"
    (out / "d").mkdir(parents=True)
    elsewhere.mkdir()
    victim.write_text("untouched\n")
    (out / "d" / "ww").symlink_to(victim)
    (out / "d" / "sub").symlink_to(elsewhere)
    # cp -r semantics: the existing directory `out` receives the copy as out/d.
    proc = grab_cli(storage, built, "hostile:/d", out)
    assert_no_traceback(proc)
    assert "skipped /d/sub: a symlink of that name is in the way on the host" in proc.stderr.splitlines()
    assert victim.read_text() == "untouched\n" and os.listdir(elsewhere) == []
    assert not (out / "d" / "ww").is_symlink() and (out / "d" / "ww").read_text() == "world\n"
    (out / "d" / "ww").unlink()
    (out / "d" / "ww").symlink_to(victim)
    assert_no_traceback(grab_cli(storage, built, "hostile:/d/ww", out / "d" / "ww"))
    assert victim.read_text() == "untouched\n"
    assert not (out / "d" / "ww").is_symlink() and (out / "d" / "ww").read_text() == "world\n"


def test_grab_into_an_existing_directory_twice_gives_the_same_tree(storage, built, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    for _ in range(2):
        assert_no_traceback(grab_cli(storage, built, "hostile:/d/sub", dest))
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["sub", "sub/g"]


# --- rootful: a real device node and a setuid-root file, grabbed as root -------------------------------

def _writable(path: Path, flag: str) -> None:
    subprocess.run(["btrfs", "property", "set", "-ts", str(path), "ro", flag], check=True)


@pytest.fixture
def root_snapshot(storage, built) -> Path:
    """The built snapshot with, added by root while it is briefly writable (a btrfs
    snapshot; on overlay, its step's layer directory): /d/loop (a block device), /d/null
    (a character device) and /d/rootsuid (setuid root, 04755)."""
    with Store.open(storage) as store:
        snap = layer_snapshot(store, str(built), "hostile").path
        on_btrfs = store.driver.name == "btrfs"
    d = in_tree(snap, "d")
    if on_btrfs:
        _writable(snap, "false")
    try:
        # Major 60 is reserved for local use: no driver, so even old code cannot copy 40 GiB.
        os.mknod(d / "loop", 0o666 | stat.S_IFBLK, os.makedev(60, 0))
        os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (d / "rootsuid").write_text("#!/bin/sh\n")
        os.chown(d / "rootsuid", 0, 0)
        os.chmod(d / "rootsuid", 0o4755)
    finally:
        if on_btrfs:
            _writable(snap, "true")
    return snap


@pytest.mark.rootful
def test_root_grab_skips_device_nodes_and_drops_setuid_root(storage, built, root_snapshot, tmp_path):
    dest = tmp_path / "out"
    proc = grab_cli(storage, built, "hostile:/d", dest)
    assert_no_traceback(proc)
    assert sorted(proc.stderr.splitlines()) == ["skipped /d/loop: a block device",
                                                "skipped /d/null: a character device",
                                                "skipped /d/pipe: a FIFO"]
    assert not os.path.lexists(dest / "loop") and not os.path.lexists(dest / "null")
    st = (dest / "rootsuid").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert stat.S_IMODE((dest / "ww").stat().st_mode) == 0o644


@pytest.mark.rootful
def test_root_grab_of_a_device_itself_is_one_line_error(storage, built, root_snapshot, tmp_path):
    proc = grab_cli(storage, built, "hostile:/d/loop", tmp_path / "loop")
    assert_one_line_error(proc, "/d/loop is a block device")
    assert not os.path.lexists(tmp_path / "loop")


@pytest.mark.rootful
def test_grab_checks_free_space_before_writing(storage, tmp_path, busybox_tar):
    yaml = stacker_yaml(tmp_path / "stacker.yaml", "tar", str(busybox_tar),
                        "mkdir /d && head -c 4000000 /dev/urandom > /d/big && echo small > /d/small")
    proc = subprocess.run([STACKER_KERNEL, "--storage", str(storage), "build", "-f", str(yaml), "--no-oci"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    small = tmp_path / "small-fs"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        proc = grab_cli(storage, yaml, "hostile:/d", small / "d")
        assert_one_line_error(proc, "free")
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
