"""stacker_kernel.storage.btrfs on a real btrfs: the subvolume ioctls, unprivileged and in a userns."""
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.errors import StorageError
from stacker_kernel.storage import btrfs


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def test_create_subvolume_makes_a_writable_subvolume(storage):
    btrfs.create_subvolume(storage / "a")
    assert btrfs.is_subvolume(storage / "a")
    assert not btrfs.is_readonly(storage / "a")


def test_plain_directory_is_not_a_subvolume(storage):
    (storage / "d").mkdir()
    assert not btrfs.is_subvolume(storage / "d")


def test_is_btrfs_distinguishes_btrfs_from_tmp(storage, tmp_path):
    assert btrfs.is_btrfs(storage)
    assert not btrfs.is_btrfs(tmp_path)


def test_readonly_snapshot_is_born_readonly_with_the_content(storage):
    btrfs.create_subvolume(storage / "a")
    _write(storage / "a" / "f", "one")
    btrfs.snapshot(storage / "a", storage / "s", readonly=True)
    assert btrfs.is_readonly(storage / "s")
    assert (storage / "s" / "f").read_text() == "one"


def test_writing_into_a_readonly_snapshot_fails(storage):
    btrfs.create_subvolume(storage / "a")
    btrfs.snapshot(storage / "a", storage / "s", readonly=True)
    with pytest.raises(OSError) as exc:
        _write(storage / "s" / "new", "x")
    assert exc.value.errno == errno.EROFS


def test_writable_snapshot_is_independent_of_its_source(storage):
    btrfs.create_subvolume(storage / "a")
    _write(storage / "a" / "f", "one")
    btrfs.snapshot(storage / "a", storage / "s")
    _write(storage / "s" / "f", "two")
    assert (storage / "a" / "f").read_text() == "one"


def test_snapshot_of_a_readonly_snapshot_is_writable(storage):
    btrfs.create_subvolume(storage / "a")
    btrfs.snapshot(storage / "a", storage / "ro", readonly=True)
    btrfs.snapshot(storage / "ro", storage / "rw")
    _write(storage / "rw" / "f", "x")
    assert not btrfs.is_readonly(storage / "rw")
    assert (storage / "rw" / "f").read_text() == "x"


def test_snapshot_of_a_plain_directory_is_refused(storage):
    (storage / "d").mkdir()
    with pytest.raises(StorageError, match="not a btrfs subvolume"):
        btrfs.snapshot(storage / "d", storage / "s")


def test_snapshot_onto_an_existing_name_is_refused(storage):
    btrfs.create_subvolume(storage / "a")
    (storage / "s").mkdir()
    with pytest.raises(StorageError, match="already exists"):
        btrfs.snapshot(storage / "a", storage / "s")


def test_set_readonly_sets_and_clears_the_flag(storage):
    btrfs.create_subvolume(storage / "a")
    btrfs.set_readonly(storage / "a", True)
    assert btrfs.is_readonly(storage / "a")
    btrfs.set_readonly(storage / "a", False)
    assert not btrfs.is_readonly(storage / "a")


def test_delete_subvolume_clears_readonly_first(storage):
    btrfs.create_subvolume(storage / "a")
    btrfs.snapshot(storage / "a", storage / "s", readonly=True)
    btrfs.delete_subvolume(storage / "s")
    assert not (storage / "s").exists()


def test_delete_subvolume_deletes_nested_subvolumes(storage):
    btrfs.create_subvolume(storage / "a")
    (storage / "a" / "dir").mkdir()
    btrfs.create_subvolume(storage / "a" / "dir" / "inner")
    btrfs.delete_subvolume(storage / "a")
    assert not (storage / "a").exists()


def test_delete_of_a_plain_directory_is_refused(storage):
    (storage / "d").mkdir()
    with pytest.raises(StorageError, match="not a btrfs subvolume"):
        btrfs.delete_subvolume(storage / "d")


def test_subvolume_info_links_a_snapshot_to_its_source(storage):
    btrfs.create_subvolume(storage / "a")
    btrfs.snapshot(storage / "a", storage / "s", readonly=True)
    src, snap = btrfs.subvolume_info(storage / "a"), btrfs.subvolume_info(storage / "s")
    assert snap.parent_uuid == src.uuid
    assert snap.readonly and not src.readonly
    assert snap.id != src.id and snap.name == "s"


def test_subvolume_info_ctransid_moves_only_when_something_changes(storage):
    btrfs.create_subvolume(storage / "a")
    btrfs.sync(storage)
    before = btrfs.subvolume_info(storage / "a").ctransid
    btrfs.sync(storage)
    assert btrfs.subvolume_info(storage / "a").ctransid == before
    _write(storage / "a" / "f", "x")
    btrfs.sync(storage)
    assert btrfs.subvolume_info(storage / "a").ctransid > before


def test_remove_tree_deletes_directories_and_readonly_subvolumes(storage):
    top = storage / "top"
    (top / "x" / "y").mkdir(parents=True)
    _write(top / "x" / "file", "x")
    os.symlink("/nonexistent", top / "link")
    btrfs.create_subvolume(top / "x" / "sub")
    btrfs.snapshot(top / "x" / "sub", top / "x" / "y" / "ro", readonly=True)
    btrfs.remove_tree(top)
    assert not top.exists()


def test_remove_tree_tolerates_a_missing_path(storage):
    btrfs.remove_tree(storage / "missing")
    assert not (storage / "missing").exists()


def test_fs_usage_reports_bytes_on_btrfs(storage):
    assert btrfs.fs_usage(storage) > 0


def test_fs_usage_refuses_a_non_btrfs_path(tmp_path):
    with pytest.raises(StorageError, match="not on btrfs"):
        btrfs.fs_usage(tmp_path)


def test_subvolume_calls_work_as_root_in_a_user_namespace(storage):
    script = textwrap.dedent(f"""
        import os
        from stacker_kernel.storage import btrfs
        assert os.geteuid() == 0
        r = {str(storage)!r}
        btrfs.create_subvolume(r + "/a")
        open(r + "/a/f", "w").write("x")
        btrfs.snapshot(r + "/a", r + "/s", readonly=True)
        assert btrfs.subvolume_info(r + "/s").readonly
        btrfs.delete_subvolume(r + "/s")
        btrfs.delete_subvolume(r + "/a")
        print("ok")
    """)
    out = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", script],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    assert list(storage.iterdir()) == []


# --- rootful: a second btrfs mounted WITHOUT user_subvol_rm_allowed ---------------

@pytest.fixture
def plain_btrfs():
    """A small btrfs loop-mounted without user_subvol_rm_allowed, with a dir owned by nobody."""
    # Under /var/tmp, not pytest's 0700 tmp_path, so that nobody can reach it.
    top = Path(tempfile.mkdtemp(prefix="sk-plain-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    image, mnt = top / "plain.img", top / "mnt"
    with image.open("wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    user_dir = mnt / "nobody"
    user_dir.mkdir()
    os.chown(user_dir, 65534, 65534)
    yield user_dir
    subprocess.run(["umount", str(mnt)], check=True)
    shutil.rmtree(top)


def _as_nobody(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          user=65534, group=65534, extra_groups=[], cwd="/")


@pytest.mark.rootful
def test_delete_without_user_subvol_rm_allowed_says_how_to_fix(plain_btrfs):
    code = textwrap.dedent(f"""
        from stacker_kernel.errors import StorageError
        from stacker_kernel.storage import btrfs
        btrfs.create_subvolume({str(plain_btrfs / "a")!r})
        try:
            btrfs.delete_subvolume({str(plain_btrfs / "a")!r})
        except StorageError as e:
            print(e)
    """)
    out = _as_nobody(code)
    assert "user_subvol_rm_allowed" in out.stdout, out.stderr
    assert "setup-storage" in out.stdout


@pytest.mark.rootful
def test_root_deletes_subvolumes_without_the_mount_option(plain_btrfs):
    btrfs.create_subvolume(plain_btrfs / "a")
    btrfs.snapshot(plain_btrfs / "a", plain_btrfs / "s", readonly=True)
    btrfs.remove_tree(plain_btrfs / "a")
    btrfs.remove_tree(plain_btrfs / "s")
    assert list(plain_btrfs.iterdir()) == []


@pytest.mark.rootful
def test_a_snapshot_whose_delete_fails_stays_read_only(plain_btrfs):
    code = textwrap.dedent(f"""
        from stacker_kernel.errors import StorageError
        from stacker_kernel.storage import btrfs
        btrfs.create_subvolume({str(plain_btrfs / "a")!r})
        btrfs.snapshot({str(plain_btrfs / "a")!r}, {str(plain_btrfs / "s")!r}, readonly=True)
        try:
            btrfs.delete_subvolume({str(plain_btrfs / "s")!r})
        except StorageError:
            print("refused")
        print("readonly" if btrfs.is_readonly({str(plain_btrfs / "s")!r}) else "writable")
    """)
    out = _as_nobody(code)
    assert out.stdout.split() == ["refused", "readonly"], out.stderr
