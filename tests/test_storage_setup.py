"""Storage location, checks and root-only setup-storage (on separate loop images)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from stacker_kernel import cli
from stacker_kernel.errors import StorageError
from stacker_kernel.storage import btrfs, location, setup

TEST_USER = os.environ.get("STACKER_KERNEL_TEST_USER", "sktest")


# --- location (any user) ----------------------------------------------------------------

def test_resolve_storage_prefers_the_argument(monkeypatch, tmp_path):
    monkeypatch.setenv(location.ENV_VAR, "/from/env")
    assert location.resolve_storage(str(tmp_path)) == tmp_path


def test_resolve_storage_uses_the_environment_next(monkeypatch):
    monkeypatch.setenv(location.ENV_VAR, "/from/env")
    assert location.resolve_storage() == Path("/from/env")


def test_resolve_storage_falls_back_to_the_config_file(monkeypatch, tmp_path):
    monkeypatch.delenv(location.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = location.config_file(tmp_path)
    cfg.parent.mkdir(parents=True)
    cfg.write_text(json.dumps({"storage": "/from/config"}))
    assert location.resolve_storage() == Path("/from/config")


def test_resolve_storage_without_any_source_says_how_to_set_up(monkeypatch, tmp_path):
    monkeypatch.delenv(location.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(StorageError, match="btrfs.*setup-storage"):
        location.resolve_storage()


def test_check_storage_refuses_a_dir_not_on_btrfs(tmp_path):
    with pytest.raises(StorageError, match=f"storage {tmp_path} is not on btrfs: run 'sudo stacker-kernel setup-storage"):
        location.check_storage(tmp_path)


def test_check_storage_accepts_the_test_storage(storage):
    location.check_storage(storage)
    assert "user_subvol_rm_allowed" in location.find_mount(storage).options


def test_find_mount_finds_the_btrfs_holding_a_path(storage):
    mount = location.find_mount(storage)
    assert mount.fstype == "btrfs" and mount.mount_point in storage.parents


def test_parse_size_understands_binary_suffixes():
    assert [setup.parse_size(s) for s in ("20G", "512M", "1k", "4096")] == [20 << 30, 512 << 20, 1024, 4096]


def test_setup_storage_as_a_user_is_refused_with_the_fix(capsys):
    assert cli.main(["setup-storage", "--user", "nobody"]) == 1
    assert "must run as root: run 'sudo stacker-kernel setup-storage" in capsys.readouterr().err


def test_storage_path_prints_the_resolved_root(monkeypatch, capsys, storage):
    monkeypatch.setenv(location.ENV_VAR, str(storage))
    assert cli.main(["storage-path"]) == 0
    assert capsys.readouterr().out.strip() == str(storage)


# --- rootful: setup-storage on separate images -----------------------------------------------

@pytest.fixture
def scratch():
    """A world-traversable dir for a test image and mount point; unmounted and removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="sk-setup-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    yield top
    if location.is_mount_point(top / "mnt"):
        subprocess.run(["umount", str(top / "mnt")], check=True)
    shutil.rmtree(top)


@pytest.fixture
def user_config():
    """The test user's config file, restored after the test (setup-storage rewrites it)."""
    info = setup.lookup_user(TEST_USER)
    cfg = location.config_file(info.home)
    saved = cfg.read_bytes() if cfg.exists() else None
    yield cfg
    if saved is None:
        cfg.unlink(missing_ok=True)
    else:
        cfg.write_bytes(saved)
        os.chown(cfg, info.uid, info.gid)


def _setup(scratch: Path, user: str = TEST_USER) -> Path:
    return setup.setup_storage(user, "256M", scratch / "btrfs.img", scratch / "mnt")


@pytest.mark.rootful
def test_setup_storage_mounts_an_image_with_the_needed_options(scratch, user_config):
    _setup(scratch)
    mount = location.find_mount(scratch / "mnt")
    assert mount.mount_point == scratch / "mnt" and mount.fstype == "btrfs"
    assert {"user_subvol_rm_allowed", "noatime"} <= mount.options


@pytest.mark.rootful
def test_setup_storage_gives_the_user_a_private_dir_and_config(scratch, user_config):
    target = _setup(scratch)
    info = setup.lookup_user(TEST_USER)
    st = target.stat()
    assert target == scratch / "mnt" / TEST_USER
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (info.uid, info.gid, 0o700)
    assert json.loads(user_config.read_text()) == {"storage": str(target)}
    assert user_config.stat().st_uid == info.uid


@pytest.mark.rootful
def test_setup_storage_twice_is_idempotent(scratch, user_config):
    first = _setup(scratch)
    (first / "keep").write_text("x")
    second = _setup(scratch)
    assert second == first and (second / "keep").read_text() == "x"
    assert sum(1 for m in location.mounts() if m.mount_point == scratch / "mnt") == 1


@pytest.mark.rootful
def test_setup_storage_remounts_an_existing_image_after_a_reboot(scratch, user_config):
    target = _setup(scratch)
    (target / "keep").write_text("x")
    subprocess.run(["umount", str(scratch / "mnt")], check=True)  # what a reboot does
    assert _setup(scratch) == target and (target / "keep").read_text() == "x"


@pytest.mark.rootful
def test_setup_storage_accepts_an_existing_btrfs_with_the_option(storage, user_config):
    # The machine's own mount (STACKER_KERNEL_STORAGE is on it): only the dir is made.
    target = setup.setup_storage(TEST_USER, storage=storage / "u")
    assert target.is_dir() and target.stat().st_uid == setup.lookup_user(TEST_USER).uid
    location.check_storage(target)


@pytest.mark.rootful
def test_setup_storage_result_is_usable_by_the_user(scratch, user_config):
    target = _setup(scratch)
    code = ("from stacker_kernel.storage.store import Store; import sys;"
            "Store.open(sys.argv[1]).close(); print('ok')")
    out = subprocess.run(["runuser", "-u", TEST_USER, "--", sys.executable, "-c", code, str(target)],
                         capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.rootful
def test_teardown_of_the_last_user_unmounts_and_deletes_the_image(scratch, user_config):
    target = _setup(scratch)
    btrfs.create_subvolume(target / "sub")
    setup.teardown_storage(TEST_USER, scratch / "btrfs.img", scratch / "mnt")
    assert not location.is_mount_point(scratch / "mnt")
    assert not (scratch / "btrfs.img").exists()
    assert not user_config.exists()


@pytest.mark.rootful
def test_teardown_keeps_the_mount_while_other_users_remain(scratch, user_config):
    root_cfg = location.config_file(setup.lookup_user("root").home)
    saved = root_cfg.read_bytes() if root_cfg.exists() else None
    try:
        _setup(scratch, "root")
        target = _setup(scratch)
        setup.teardown_storage(TEST_USER, scratch / "btrfs.img", scratch / "mnt")
        assert not target.exists()
        assert location.is_mount_point(scratch / "mnt") and (scratch / "mnt" / "root").is_dir()
    finally:
        if saved is None:
            root_cfg.unlink(missing_ok=True)
        else:
            root_cfg.write_bytes(saved)


@pytest.mark.rootful
def test_storage_path_for_a_user_reads_their_config(scratch, user_config, capsys):
    target = _setup(scratch)
    assert cli.main(["storage-path", "--user", TEST_USER]) == 0
    assert capsys.readouterr().out.strip() == str(target)
