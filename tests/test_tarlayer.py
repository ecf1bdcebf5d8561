"""Safe layer extraction (oci/tarlayer.py) on real btrfs, inside a real user namespace."""
from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from stacker_kernel.container.userns import IdMap, run_in_userns
from stacker_kernel.errors import ImageError
from stacker_kernel.oci.tarlayer import apply_layer

MTIME = 1600000000


# --- helpers --------------------------------------------------------------------------

def entry(name: str, kind: str = "file", data: bytes = b"", mode: int | None = None, uid: int = 0,
          gid: int = 0, link: str = "", dev: tuple[int, int] = (0, 0), xattrs: dict | None = None):
    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
               "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    ti.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    ti.uid, ti.gid, ti.mtime = uid, gid, MTIME
    ti.linkname = link
    ti.devmajor, ti.devminor = dev
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                          for k, v in xattrs.items()}
    if kind == "file":
        ti.size = len(data)
    return ti, data


def make_tar(path: Path, entries, compress=None) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw) if compress == "gzip" else raw)
    return path


def apply(tar: Path, rootfs: Path, **kw):
    return run_in_userns(apply_layer, str(tar), str(rootfs), **kw)


def probe(fn, *args):
    """Run a read-only check as the container's root (the rootfs belongs to subordinate ids)."""
    return run_in_userns(fn, *args)


def _lstat(path):
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_ino, st.st_mtime


@pytest.fixture
def work(storage) -> Path:
    """A directory on the storage's filesystem (btrfs, or ext4 where overlay layers are
    extracted) with an empty rootfs/ in it."""
    work = storage / "work"
    (work / "rootfs").mkdir(parents=True)
    return work


@pytest.fixture
def canary(tmp_path) -> Path:
    """A file outside the storage that a hostile archive aims at."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "canary").write_text("untouched")
    return d


def assert_canary(d: Path) -> None:
    assert sorted(os.listdir(d)) == ["canary"]
    assert (d / "canary").read_text() == "untouched"


# --- ordinary archives -----------------------------------------------------------------

def test_busybox_rootfs_lands_with_container_owners(work, busybox_tar):
    rootfs = work / "rootfs"
    report = apply(busybox_tar, rootfs)
    assert report.entries > 100 and report.warnings == []
    idmap = IdMap.for_current_user()
    st = os.lstat(rootfs / "etc/passwd")
    assert (st.st_uid, st.st_gid) == (idmap.to_outside_uid(0), idmap.to_outside_gid(0))
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox"
    assert stat.S_IMODE(os.lstat(rootfs / "tmp").st_mode) == 0o1777


def test_numeric_owner_maps_into_the_subordinate_range(work):
    tar = make_tar(work / "l.tar", [entry("home", "dir"), entry("home/f", data=b"x", uid=1000, gid=1001)])
    apply(tar, work / "rootfs")
    idmap = IdMap.for_current_user()
    st = os.lstat(work / "rootfs/home/f")
    assert (st.st_uid, st.st_gid) == (idmap.to_outside_uid(1000), idmap.to_outside_gid(1001))


def test_setuid_bit_is_kept(work):
    tar = make_tar(work / "l.tar", [entry("su", data=b"#!/bin/sh\n", mode=0o4755, uid=0),
                                    entry("sg", data=b"x", mode=0o2755, uid=5, gid=5)])
    apply(tar, work / "rootfs")
    assert stat.S_IMODE(os.lstat(work / "rootfs/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(work / "rootfs/sg").st_mode) == 0o2755


def test_file_content_and_mtime_are_restored(work):
    tar = make_tar(work / "l.tar", [entry("d", "dir"), entry("d/f", data=b"hello" * 1000)])
    apply(tar, work / "rootfs")
    assert (work / "rootfs/d/f").read_bytes() == b"hello" * 1000
    assert os.lstat(work / "rootfs/d/f").st_mtime == MTIME


def test_directory_mtime_is_set_after_its_contents(work):
    tar = make_tar(work / "l.tar", [entry("d", "dir"), entry("d/a", data=b"1"), entry("d/b", data=b"2")])
    apply(tar, work / "rootfs")
    assert os.lstat(work / "rootfs/d").st_mtime == MTIME


def test_user_xattr_from_pax_header_is_applied(work):
    tar = make_tar(work / "l.tar", [entry("f", data=b"x", xattrs={"user.note": b"\xff\x00bin"})])
    apply(tar, work / "rootfs")
    assert os.getxattr(work / "rootfs/f", "user.note") == b"\xff\x00bin"


def test_security_capability_is_applied_inside_the_namespace(work):
    # v2 capability blob: cap_net_raw (bit 13) permitted + effective
    cap = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    tar = make_tar(work / "l.tar", [entry("ping", data=b"x", mode=0o755,
                                          xattrs={"security.capability": cap})])
    report = apply(tar, work / "rootfs")
    got = probe(os.getxattr, str(work / "rootfs/ping"), "security.capability")
    assert got[4:8] == (1 << 13).to_bytes(4, "little"), report.warnings


def test_hard_link_inside_the_archive_shares_the_inode(work):
    tar = make_tar(work / "l.tar", [entry("a", data=b"same"), entry("b", "hardlink", link="a")])
    apply(tar, work / "rootfs")
    assert os.lstat(work / "rootfs/a").st_ino == os.lstat(work / "rootfs/b").st_ino


def test_absolute_names_are_taken_relative_to_the_root(work):
    tar = make_tar(work / "l.tar", [entry("/etc/motd", data=b"hi")])
    apply(tar, work / "rootfs")
    assert (work / "rootfs/etc/motd").read_bytes() == b"hi"


def test_file_replaces_a_lower_directory(work):
    apply(make_tar(work / "1.tar", [entry("x", "dir"), entry("x/inner", data=b"1")]), work / "rootfs")
    apply(make_tar(work / "2.tar", [entry("x", data=b"now a file")]), work / "rootfs")
    assert (work / "rootfs/x").read_bytes() == b"now a file"


def test_directory_replaces_a_lower_file(work):
    apply(make_tar(work / "1.tar", [entry("x", data=b"file")]), work / "rootfs")
    apply(make_tar(work / "2.tar", [entry("x", "dir"), entry("x/inner", data=b"1")]), work / "rootfs")
    assert (work / "rootfs/x/inner").read_bytes() == b"1"


def test_symlink_entry_may_point_anywhere(work, canary):
    tar = make_tar(work / "l.tar", [entry("abs", "symlink", link=str(canary / "canary")),
                                    entry("rel", "symlink", link="../../../../etc/shadow")])
    apply(tar, work / "rootfs")
    assert os.readlink(work / "rootfs/abs") == str(canary / "canary")
    assert os.readlink(work / "rootfs/rel") == "../../../../etc/shadow"
    assert_canary(canary)


def test_lower_dirlink_is_followed_inside_the_root(work):
    apply(make_tar(work / "1.tar", [entry("usr", "dir"), entry("usr/lib", "dir"),
                                    entry("lib", "symlink", link="usr/lib")]), work / "rootfs")
    apply(make_tar(work / "2.tar", [entry("lib", "dir"), entry("lib/libx.so", data=b"elf")]), work / "rootfs")
    assert os.readlink(work / "rootfs/lib") == "usr/lib"
    assert (work / "rootfs/usr/lib/libx.so").read_bytes() == b"elf"


def test_lower_absolute_symlink_to_root_stays_inside(work, canary):
    apply(make_tar(work / "1.tar", [entry("up", "symlink", link="/"),
                                    entry("away", "symlink", link=str(canary))]), work / "rootfs")
    apply(make_tar(work / "2.tar", [entry("up/etc/f", data=b"in"), entry("away/canary", data=b"pwned")]),
          work / "rootfs")
    assert (work / "rootfs/etc/f").read_bytes() == b"in"
    assert_canary(canary)


def test_ten_thousand_entries(work):
    entries = [entry(f"d{i // 1000}", "dir") for i in range(0, 10000, 1000)]
    entries += [entry(f"d{i // 1000}/f{i}", data=str(i).encode()) for i in range(10000)]
    tar = make_tar(work / "big.tar", entries)
    report = apply(tar, work / "rootfs")
    assert report.entries == 10010
    assert sum(len(os.listdir(work / "rootfs" / f"d{k}")) for k in range(10)) == 10000
    assert (work / "rootfs/d7/f7777").read_bytes() == b"7777"


# --- whiteouts -------------------------------------------------------------------------------

def test_whiteout_removes_a_lower_file_and_directory(work):
    apply(make_tar(work / "1.tar", [entry("etc", "dir"), entry("etc/gone", data=b"1"),
                                    entry("etc/keep", data=b"2"), entry("olddir", "dir"),
                                    entry("olddir/x", data=b"3")]), work / "rootfs")
    apply(make_tar(work / "2.tar", [entry("etc/.wh.gone"), entry(".wh.olddir")]), work / "rootfs")
    assert sorted(os.listdir(work / "rootfs")) == ["etc"]
    assert os.listdir(work / "rootfs/etc") == ["keep"]


def test_opaque_directory_hides_lower_content_but_keeps_its_own(work):
    apply(make_tar(work / "1.tar", [entry("d", "dir"), entry("d/old", data=b"1"), entry("d/sub", "dir"),
                                    entry("d/sub/old2", data=b"2"), entry("other", data=b"3")]), work / "rootfs")
    apply(make_tar(work / "2.tar", [entry("d", "dir"), entry("d/new", data=b"n"),
                                    entry("d/.wh..wh..opq"), entry("d/later", data=b"l")]), work / "rootfs")
    assert sorted(os.listdir(work / "rootfs/d")) == ["later", "new"]
    assert (work / "rootfs/other").exists()


def test_entries_after_a_whiteout_of_their_directory_land_in_the_new_one(work):
    # The extractor keeps the last entry's directory open; a whiteout that removes
    # it (or a file that replaces it) must not leave later entries in the old one.
    apply(make_tar(work / "1.tar", [entry("d", "dir"), entry("d/lower", data=b"0")]), work / "rootfs")
    apply(make_tar(work / "2.tar", [entry("d/x", data=b"1"), entry(".wh.d"), entry("d/y", data=b"2"),
                                    entry("e", "dir"), entry("e/sub", "dir"), entry("e/sub/a", data=b"3"),
                                    entry("e/sub", data=b"file now")]), work / "rootfs")
    assert sorted(os.listdir(work / "rootfs/d")) == ["y"]
    assert (work / "rootfs/d/y").read_bytes() == b"2"
    assert (work / "rootfs/e/sub").read_bytes() == b"file now"
    with pytest.raises(ImageError, match=r"e/sub/b.*is a file"):
        apply(make_tar(work / "3.tar", [entry("e/sub2", "dir"), entry("e/sub2/c", data=b"4"),
                                        entry("e/sub/b", data=b"5")]), work / "rootfs")


def test_entries_through_a_symlink_made_by_the_archive_are_refused_in_any_order(work, canary):
    # a directory resolved once (and kept open) is not reused for a path that
    # now goes through a symlink this archive made
    with pytest.raises(ImageError, match=r"d/x.*symlink"):
        apply(make_tar(work / "1.tar", [entry("d", "dir"), entry("d/a", data=b"1"), entry("d", "symlink", link=str(canary)),
                                        entry("d/x", data=b"evil")]), work / "rootfs")
    assert_canary(canary)


def test_whiteouts_are_plain_files_when_disabled(work):
    tar = make_tar(work / "1.tar", [entry(".wh.x", data=b"")])
    apply(tar, work / "rootfs", whiteouts=False)
    assert os.listdir(work / "rootfs") == [".wh.x"]


# --- special files -------------------------------------------------------------------------------

def test_device_node_becomes_empty_file_with_a_warning_rootless(work):
    tar = make_tar(work / "l.tar", [entry("dev", "dir"), entry("dev/null", "chr", dev=(1, 3), mode=0o666)])
    report = apply(tar, work / "rootfs")
    st = os.lstat(work / "rootfs/dev/null")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert any("dev/null" in w and "1:3" in w for w in report.warnings)


def test_fifo_is_created_rootless(work):
    apply(make_tar(work / "l.tar", [entry("pipe", "fifo")]), work / "rootfs")
    assert stat.S_ISFIFO(os.lstat(work / "rootfs/pipe").st_mode)


@pytest.mark.rootful
@pytest.mark.parametrize("in_userns", [False, True])
def test_device_node_is_never_made_even_as_real_root(work, in_userns):
    # A base's `hostdisk` (block 7:0, 0666) must not become the host's loop device in the container.
    ti, data = entry("hostdisk", "chr", dev=(7, 0), mode=0o666)
    ti.type = tarfile.BLKTYPE
    tar = make_tar(work / "l.tar", [(ti, data), entry("null", "chr", dev=(1, 3), mode=0o666)])
    if in_userns:
        report = run_in_userns(apply_layer, str(tar), str(work / "rootfs"))
    else:
        report = apply_layer(tar, work / "rootfs")  # real root, initial namespace: mknod would work
    for name in ("hostdisk", "null"):
        st = os.lstat(work / "rootfs" / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert stat.S_IMODE(os.lstat(work / "rootfs/hostdisk").st_mode) == 0o666
    assert any("hostdisk" in w and "7:0" in w for w in report.warnings)


@pytest.mark.rootful
def test_real_root_keeps_numeric_owners_one_to_one(work):
    tar = make_tar(work / "l.tar", [entry("f", data=b"x", uid=1234, gid=4321)])
    run_in_userns(apply_layer, str(tar), str(work / "rootfs"))
    st = os.lstat(work / "rootfs/f")
    assert (st.st_uid, st.st_gid) == (1234, 4321)


# --- hostile archives ----------------------------------------------------------------------------

HOSTILE = {
    "dotdot": lambda c: [entry("../escaped", data=b"pwned")],
    "absolute_dotdot": lambda c: [entry("/../../escaped", data=b"pwned")],
    "symlink_to_root": lambda c: [entry("evil", "symlink", link="/"),
                                  entry("evil" + str(c) + "/canary", data=b"pwned")],
    "symlink_to_outside": lambda c: [entry("evil", "symlink", link=str(c)),
                                     entry("evil/canary", data=b"pwned")],
    "symlink_to_dotdot": lambda c: [entry("evil", "symlink", link="../../../../../../../../" + str(c)),
                                    entry("evil/canary", data=b"pwned")],
    "hardlink_to_etc_passwd": lambda c: [entry("pw", "hardlink", link="/etc/passwd")],
    "hardlink_to_dotdot": lambda c: [entry("pw", "hardlink", link="../outside/canary")],
}
OFFENDER = {"dotdot": "../escaped", "absolute_dotdot": "/../../escaped", "symlink_to_root": "evil/",
            "symlink_to_outside": "evil/canary", "symlink_to_dotdot": "evil/canary",
            "hardlink_to_etc_passwd": "pw", "hardlink_to_dotdot": "pw"}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_entry_is_refused_and_names_the_entry(work, canary, attack):
    tar = make_tar(work / "evil.tar", HOSTILE[attack](canary))
    with pytest.raises(ImageError) as err:
        apply(tar, work / "rootfs")
    assert OFFENDER[attack] in str(err.value)
    assert_canary(canary)
    assert sorted(os.listdir(work)) == ["evil.tar", "rootfs"]


def test_hardlink_to_passwd_of_the_rootfs_itself_is_allowed(work, busybox_tar):
    apply(busybox_tar, work / "rootfs")
    apply(make_tar(work / "l.tar", [entry("pw", "hardlink", link="/etc/passwd")]), work / "rootfs")
    assert os.lstat(work / "rootfs/pw").st_ino == os.lstat(work / "rootfs/etc/passwd").st_ino


def test_name_longer_than_path_max_is_refused(work):
    tar = make_tar(work / "l.tar", [entry("a/" * 2100 + "f", data=b"x")])
    with pytest.raises(ImageError, match="PATH_MAX"):
        apply(tar, work / "rootfs")


def test_member_larger_than_free_space_is_refused_before_writing(work):
    ti = tarfile.TarInfo("huge")
    ti.size = 1 << 50  # a petabyte
    (work / "l.tar").write_bytes(ti.tobuf(tarfile.PAX_FORMAT) + bytes(4096))
    with pytest.raises(ImageError, match="huge.*free"):
        apply(work / "l.tar", work / "rootfs")
    assert os.listdir(work / "rootfs") == []


# --- compression and corruption ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "bzip2"])
def test_compressed_archive_is_detected_by_magic(work, kind):
    import bz2
    import lzma
    import subprocess

    plain = make_tar(work / "p.tar", [entry("f", data=b"compressed")])
    raw = plain.read_bytes()
    packed = {"gzip": gzip.compress, "xz": lzma.compress, "bzip2": bz2.compress,
              "zstd": lambda b: subprocess.run(["zstd", "-q", "-c"], input=b, capture_output=True,
                                               check=True).stdout}[kind](raw)
    (work / "c.bin").write_bytes(packed)
    apply(work / "c.bin", work / "rootfs")
    assert (work / "rootfs/f").read_bytes() == b"compressed"


def test_corrupt_gzip_is_a_clear_error_naming_the_file(work):
    good = gzip.compress(make_tar(work / "p.tar", [entry("f", data=os.urandom(200000))]).read_bytes())
    (work / "bad.tar.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match=r"bad\.tar\.gz.*(truncated|corrupt)"):
        apply(work / "bad.tar.gz", work / "rootfs")


@pytest.mark.parametrize("pigz", [True, False], ids=["pigz", "zlib"])
def test_gzip_with_a_wrong_checksum_after_the_tar_end_is_refused(work, monkeypatch, pigz):
    # The tar ends before the gzip trailer: the decompressor must still be read to
    # its end, or a damaged layer whose tar happens to parse would be taken.
    import shutil

    from stacker_kernel.oci import tarlayer

    which = shutil.which
    assert which("pigz"), "pigz is part of the machine's setup (scripts/setup-host.sh)"
    if not pigz:  # the in-process zlib path, where pigz is missing (the helper is forked: it sees this)
        monkeypatch.setattr(tarlayer.shutil, "which", lambda prog, *a, **k: None if prog == "pigz" else which(prog, *a, **k))
    good = bytearray(gzip.compress(make_tar(work / "p.tar", [entry("f", data=os.urandom(200000))]).read_bytes()))
    good[-8] ^= 0xFF  # the CRC-32 of the trailer
    (work / "crc.tar.gz").write_bytes(bytes(good))
    with pytest.raises(ImageError, match=r"crc\.tar\.gz.*(truncated|corrupt)"):
        apply(work / "crc.tar.gz", work / "rootfs")


def test_corrupt_zstd_is_a_clear_error_naming_the_file(work):
    import subprocess

    raw = make_tar(work / "p.tar", [entry("f", data=os.urandom(200000))]).read_bytes()
    packed = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    (work / "bad.tar.zst").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ImageError, match=r"bad\.tar\.zst.*(truncated|corrupt)"):
        apply(work / "bad.tar.zst", work / "rootfs")


def test_truncated_plain_tar_is_a_clear_error(work):
    raw = make_tar(work / "p.tar", [entry("f", data=os.urandom(100000))]).read_bytes()
    (work / "cut.tar").write_bytes(raw[:50000])
    with pytest.raises(ImageError, match=r"cut\.tar.*truncated"):
        apply(work / "cut.tar", work / "rootfs")


@pytest.mark.parametrize("name", [".wh...", "sub/.wh...", ".wh.."])
def test_whiteout_of_dot_or_dotdot_is_refused_and_removes_nothing(work, name):
    (work / "sibling").mkdir()
    (work / "sibling/keep").write_text("keep")
    apply(make_tar(work / "1.tar", [entry("sub", "dir"), entry("sub/f", data=b"1")]), work / "rootfs")
    with pytest.raises(ImageError, match="hostile"):
        apply(make_tar(work / "2.tar", [entry(name)]), work / "rootfs")
    assert (work / "sibling/keep").read_text() == "keep"
    assert os.path.exists(work / "rootfs/sub/f")
