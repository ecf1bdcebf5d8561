"""Storage location, checks and root-only setup-storage (on separate loop images)."""
import json
import os
import re
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
TEST_USER2 = os.environ.get("STACKER_KERNEL_TEST_USER2", "sktest2")
REPO = str(Path(__file__).resolve().parent.parent)


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


def test_resolve_storage_without_any_source_is_the_users_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(location.ENV_VAR, raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert location.resolve_storage() == tmp_path / ".local/share/stacker-kernel"
    assert (tmp_path / ".local/share/stacker-kernel").is_dir()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert location.resolve_storage() == tmp_path / "data/stacker-kernel"


def test_resolve_storage_says_how_to_fix_an_uncreatable_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(location.ENV_VAR, raising=False)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "file"))
    with pytest.raises(StorageError, match="cannot be created.*--storage DIR.*setup-storage"):
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

def _unmount_all(top: Path) -> None:
    for m in sorted(location.mounts(), key=lambda m: len(m.mount_point.parts), reverse=True):
        if top in m.mount_point.parents:
            # Lazily when a mount namespace another process made meanwhile still holds a copy.
            if subprocess.run(["umount", str(m.mount_point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(m.mount_point)], check=True)


@pytest.fixture
def scratch():
    """A world-traversable state dir for test images, records and mounts; unmounted and removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="sk-setup-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    yield top
    _unmount_all(top)
    shutil.rmtree(top)


def _saved_config(user: str):
    info = setup.lookup_user(user)
    cfg = location.config_file(info.home)
    saved = cfg.read_bytes() if cfg.exists() else None
    yield cfg
    if saved is None:
        cfg.unlink(missing_ok=True)
    else:
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_bytes(saved)
        os.chown(cfg, info.uid, info.gid)


@pytest.fixture
def user_config():
    """The test user's config file, restored after the test (setup-storage rewrites it)."""
    yield from _saved_config(TEST_USER)


@pytest.fixture
def user2_config():
    yield from _saved_config(TEST_USER2)


@pytest.fixture
def root_config():
    yield from _saved_config("root")


def _setup(scratch: Path, user: str = TEST_USER, size: str = "256M", **kw) -> Path:
    return setup.setup_storage(user, size, mount=scratch / "btrfs", state=scratch, **kw)


def _teardown(scratch: Path, user: str = TEST_USER) -> list[str]:
    return setup.teardown_storage(user, scratch / "btrfs", scratch)


def _image(scratch: Path, user: str = TEST_USER) -> Path:
    return scratch / "images" / f"{user}.img"


@pytest.mark.rootful
def test_setup_storage_mounts_the_users_own_image_with_the_needed_options(scratch, user_config):
    target = _setup(scratch)
    mount = location.find_mount(target)
    assert mount.mount_point == scratch / "btrfs" / TEST_USER / "storage" and mount.fstype == "btrfs"
    assert {"user_subvol_rm_allowed", "noatime"} <= mount.options
    assert setup._backing_file(target) == _image(scratch)


@pytest.mark.rootful
def test_setup_storage_formats_the_image_with_small_tree_blocks(scratch, user_config):
    # A snapshot's cost grows with the children of its tree's root: 4 KiB nodes keep it flat.
    _setup(scratch)
    out = subprocess.run(["btrfs", "inspect-internal", "dump-super", str(_image(scratch))], check=True,
                         capture_output=True, text=True).stdout
    assert re.search(r"^nodesize\s+4096$", out, re.M), out


@pytest.mark.rootful
def test_the_image_is_readable_by_root_only(scratch, user_config):
    _setup(scratch)
    image = _image(scratch)
    assert (image.stat().st_uid, image.stat().st_mode & 0o777) == (0, 0o600)
    assert image.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.rootful
def test_the_size_bounds_the_users_filesystem(scratch, user_config):
    target = _setup(scratch, size="256M")
    assert os.statvfs(target).f_blocks * os.statvfs(target).f_frsize <= 256 << 20


@pytest.mark.rootful
def test_setup_storage_with_a_larger_size_grows_the_filesystem(scratch, user_config):
    target = _setup(scratch, size="256M")
    (target / "keep").write_text("x")
    _setup(scratch, size="512M")
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize > 400 << 20 and (target / "keep").read_text() == "x"


@pytest.mark.rootful
def test_setup_storage_gives_the_user_a_private_dir_and_config(scratch, user_config):
    target = _setup(scratch)
    info = setup.lookup_user(TEST_USER)
    st = target.stat()
    assert target == scratch / "btrfs" / TEST_USER / "storage"
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (info.uid, info.gid, 0o700)
    assert json.loads(user_config.read_text()) == {"storage": str(target)}
    assert user_config.stat().st_uid == info.uid


@pytest.mark.rootful
def test_another_user_cannot_see_a_users_usage_with_df(scratch, user_config):
    # Issue 23 point 12a: statfs needs no permission on the mount point itself, only on
    # the way there: each user's mount point lies behind a gate only they may pass.
    mine = _setup(scratch)
    free = "import os, sys; st = os.statvfs(sys.argv[1]); print(st.f_blocks - st.f_bfree)"
    me = subprocess.run(["runuser", "-u", TEST_USER, "--", sys.executable, "-c", free, str(mine)],
                        capture_output=True, text=True, cwd="/")
    assert me.returncode == 0 and int(me.stdout) > 0, me.stderr  # the user sees their own
    other = subprocess.run(["runuser", "-u", TEST_USER2, "--", "df", str(mine)], capture_output=True,
                           text=True, cwd="/")
    assert other.returncode != 0 and "Permission denied" in other.stderr, other.stdout
    gate = mine.parent
    assert (gate.stat().st_uid, gate.stat().st_mode & 0o777) == (0, 0o710)  # group bits: the ACL's mask
    _teardown(scratch)
    assert not gate.exists()


@pytest.mark.rootful
def test_setup_storage_records_what_it_created_for_root_only(scratch, user_config):
    target = _setup(scratch)
    rec = setup.read_record(TEST_USER, scratch)
    assert (rec.storage, rec.image) == (target, _image(scratch))
    record = scratch / "users" / f"{TEST_USER}.json"
    assert record.stat().st_uid == 0 and (scratch / "users").stat().st_mode & 0o777 == 0o700


@pytest.mark.rootful
def test_setup_storage_twice_is_idempotent(scratch, user_config):
    first = _setup(scratch)
    (first / "keep").write_text("x")
    second = _setup(scratch)
    assert second == first and (second / "keep").read_text() == "x"
    assert sum(1 for m in location.mounts() if m.mount_point == first) == 1


@pytest.mark.rootful
def test_setup_storage_remounts_an_existing_image_after_a_reboot(scratch, user_config):
    target = _setup(scratch)
    (target / "keep").write_text("x")
    subprocess.run(["umount", str(target)], check=True)  # what a reboot does
    assert _setup(scratch) == target and (target / "keep").read_text() == "x"
    assert location.is_mount_point(target)


def _old_shared_layout(scratch: Path) -> Path:
    """The layout before per-user images: one 0644 image STATE/btrfs.img mounted at STATE/btrfs."""
    image, mnt = scratch / "btrfs.img", scratch / "btrfs"
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    os.chmod(image, 0o644)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", setup.MOUNT_OPTIONS, str(image), str(mnt)], check=True)
    return mnt


@pytest.mark.rootful
def test_setup_storage_keeps_a_user_of_the_old_shared_image_and_locks_the_image(scratch, user_config):
    mnt = _old_shared_layout(scratch)
    (mnt / TEST_USER).mkdir()
    (mnt / TEST_USER / "keep").write_text("x")
    target = _setup(scratch)
    assert target == mnt / TEST_USER and (target / "keep").read_text() == "x"
    assert not location.is_mount_point(target) and not _image(scratch).exists()
    assert (scratch / "btrfs.img").stat().st_mode & 0o777 == 0o600


@pytest.mark.rootful
def test_setup_storage_remounts_the_old_shared_image_after_a_reboot(scratch, user_config):
    mnt = _old_shared_layout(scratch)
    (mnt / TEST_USER).mkdir()
    (mnt / TEST_USER / "keep").write_text("x")
    _setup(scratch)
    subprocess.run(["umount", str(mnt)], check=True)  # what a reboot does
    target = _setup(scratch)
    assert target == mnt / TEST_USER and (target / "keep").read_text() == "x"
    assert location.is_mount_point(mnt)


@pytest.mark.rootful
def test_setup_storage_accepts_an_existing_btrfs_with_the_option(scratch, storage, user_config):
    # The machine's own mount (STACKER_KERNEL_STORAGE is on it): only the dir is made.
    target = _setup(scratch, storage=storage / "u")
    assert target.is_dir() and target.stat().st_uid == setup.lookup_user(TEST_USER).uid
    location.check_storage(target)


@pytest.mark.rootful
def test_setup_storage_does_not_follow_a_symlink_the_user_planted(scratch, storage, user_config):
    victim = storage / "root-store"
    victim.mkdir(mode=0o700)
    mine = storage / "mine"
    mine.mkdir()
    os.chown(mine, setup.lookup_user(TEST_USER).uid, -1)
    (mine / "store").symlink_to(victim)
    with pytest.raises(StorageError, match="symbolic link"):
        _setup(scratch, storage=mine / "store")
    assert (victim.stat().st_uid, victim.stat().st_mode & 0o777) == (0, 0o700)


@pytest.mark.rootful
def test_setup_storage_refuses_a_path_below_another_users_directory(scratch, storage, user_config):
    other = storage / "other"
    other.mkdir()
    os.chown(other, setup.lookup_user(TEST_USER2).uid, -1)
    with pytest.raises(StorageError, match="belongs to uid"):
        _setup(scratch, storage=other / "store")


@pytest.mark.rootful
def test_setup_storage_result_is_usable_by_the_user(scratch, user_config):
    target = _setup(scratch)
    code = ("from stacker_kernel.storage.store import Store; import sys;"
            "Store.open(sys.argv[1]).close(); print('ok')")
    out = subprocess.run(["runuser", "-u", TEST_USER, "--", sys.executable, "-c", code, str(target)],
                         capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.rootful
def test_teardown_unmounts_and_deletes_the_users_image(scratch, user_config):
    target = _setup(scratch)
    btrfs.create_subvolume(target / "sub")
    _teardown(scratch)
    assert not location.is_mount_point(target) and not target.exists()
    assert not _image(scratch).exists() and setup.read_record(TEST_USER, scratch) is None
    assert not user_config.exists()


@pytest.fixture
def fuse_over_storage(scratch, user_config):
    """The test user's storage set up, then a FUSE mount of their own (bindfs) placed
    over it by them, as a user may: the mount point is their directory."""
    target = _setup(scratch)
    src = scratch / "fuse-src"
    src.mkdir()
    os.chown(src, setup.lookup_user(TEST_USER).uid, -1)
    subprocess.run(["runuser", "-u", TEST_USER, "--", "bindfs", "--no-allow-other", str(src), str(target)], check=True, cwd="/")
    try:
        yield target
    finally:
        subprocess.run(["runuser", "-u", TEST_USER, "--", "fusermount3", "-u", str(target)], cwd="/")


def _top_mount(path: Path) -> str:
    return [m.fstype for m in location.mounts() if m.mount_point == path][-1]


@pytest.mark.rootful
def test_setup_storage_refuses_in_one_line_when_a_users_fuse_mount_covers_their_storage(fuse_over_storage, scratch):
    # Issue 23 point 7: it once ended in a traceback (root may not enter another user's FUSE mount).
    fstype = _top_mount(fuse_over_storage)
    assert fstype.startswith("fuse")
    with pytest.raises(StorageError) as e:
        _setup(scratch)
    assert str(e.value) == (f"{fuse_over_storage} has a {fstype} mount over {TEST_USER}'s storage, not the "
                            f"image {_image(scratch)}: {TEST_USER} should unmount it (fusermount3 -u "
                            f"{fuse_over_storage}), then run setup-storage again")
    assert _top_mount(fuse_over_storage) == fstype  # theirs, untouched
    # The hub's spawn hook runs the command: one line, exit status 1.
    proc = subprocess.run([sys.executable, "-m", "stacker_kernel", "setup-storage", "--user", TEST_USER,
                           "--size", "256M", "--state-dir", str(scratch), "--mount", str(scratch / "btrfs")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 1 and proc.stderr == f"stacker-kernel: {e.value}\n", proc.stderr


@pytest.mark.rootful
def test_teardown_neither_unmounts_a_users_fuse_mount_nor_deletes_the_image_under_it(fuse_over_storage, scratch):
    fstype = _top_mount(fuse_over_storage)
    with pytest.raises(StorageError) as e:
        _teardown(scratch)
    assert "\n" not in str(e.value) and str(e.value).startswith(
        f"{fuse_over_storage} has a {fstype} mount over {TEST_USER}'s storage")
    assert _top_mount(fuse_over_storage) == fstype and _image(scratch).exists()
    assert setup.read_record(TEST_USER, scratch) is not None  # kept: the next teardown still knows the image


@pytest.mark.rootful
def test_teardown_does_not_delete_an_image_that_is_still_mounted_elsewhere(scratch, user_config):
    target = _setup(scratch)
    elsewhere = scratch / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", "--bind", str(target), str(elsewhere)], check=True)
    subprocess.run(["umount", str(target)], check=True)
    with pytest.raises(StorageError, match=r"is still mounted at .*elsewhere: unmount it"):
        _teardown(scratch)
    assert _image(scratch).exists()


@pytest.fixture
def kept_caps():
    """The delegated cgroups' pids.max as they were, put back afterwards (the real users' builds use them)."""
    from stacker_kernel.container import limits

    caps = {u: (limits.V1_PIDS / limits.DELEGATED_DIR / u / "pids.max") for u in (TEST_USER, TEST_USER2)}
    saved = {u: p.read_text() if p.exists() else None for u, p in caps.items()}
    yield caps
    for u in caps:
        if saved[u] is not None:
            limits.delegate(u, int(saved[u]))


@pytest.mark.rootful
def test_every_users_process_cap_is_a_share_of_pid_max(scratch, user_config, user2_config, kept_caps, monkeypatch):
    # Issue 23 point 12e: two users at 16384 each once took all of a 32768 pid_max.
    from stacker_kernel.container import limits

    if not (limits.V1_PIDS / "cgroup.procs").exists():
        pytest.fail("this host has no cgroup v1 pids hierarchy: setup-storage delegates none here")
    monkeypatch.setattr(limits, "pid_max", lambda: 32768)
    cap = lambda u: int(kept_caps[u].read_text())  # noqa: E731
    try:
        _setup(scratch)
        assert cap(TEST_USER) == 16384
        _setup(scratch, TEST_USER2)
        assert cap(TEST_USER) == cap(TEST_USER2) == 12288  # together 3/4 of pid_max: the host keeps the rest
        _setup(scratch, max_user_processes=5000)
        _setup(scratch, TEST_USER2)  # the admin's number is kept for later runs
        assert cap(TEST_USER) == cap(TEST_USER2) == 5000
        (scratch / "limits.json").unlink()
        _teardown(scratch)
        assert cap(TEST_USER2) == 16384  # one user fewer: a larger share
    finally:
        _teardown(scratch, TEST_USER2)


@pytest.mark.rootful
def test_setup_delegates_a_process_limit_cgroup_and_teardown_removes_it(scratch):
    from stacker_kernel.container import limits

    user = f"skcg{os.getpid() % 100000}"  # a user of its own: nobody else's builds are in its cgroup
    subprocess.run(["useradd", "--create-home", user], check=True)
    cgroup = limits.V1_PIDS / limits.DELEGATED_DIR / user
    try:
        _setup(scratch, user)
        assert cgroup.is_dir() and cgroup.stat().st_uid == setup.lookup_user(user).uid
        lines = _teardown(scratch, user)
        assert not cgroup.exists() and any("process-limit cgroup" in line for line in lines)
    finally:
        limits.undelegate(user)
        subprocess.run(["userdel", "-r", user], capture_output=True)


@pytest.mark.rootful
def test_teardown_keeps_the_other_users_storage(scratch, user_config, root_config):
    _setup(scratch, "root")
    target = _setup(scratch)
    _teardown(scratch)
    assert not target.exists()
    assert location.is_mount_point(scratch / "btrfs" / "root" / "storage") and _image(scratch, "root").exists()


@pytest.mark.rootful
@pytest.mark.parametrize("victim", ["root-dir", "other-users-storage"])
def test_teardown_never_removes_what_the_users_config_names(scratch, user_config, root_config, victim):
    if victim == "root-dir":
        named = scratch / "root-only"
        named.mkdir()
    else:
        named = _setup(scratch, "root")
    (named / "precious").write_text("x")
    _setup(scratch)
    user_config.write_text(json.dumps({"storage": str(named)}))  # the user may write anything there
    _teardown(scratch)
    assert (named / "precious").read_text() == "x"
    assert not (scratch / "btrfs" / TEST_USER).exists()


@pytest.mark.rootful
def test_teardown_without_a_record_removes_only_the_users_dir_under_the_mount(scratch, user_config):
    # Set up before records existed: root made MOUNT/USER on the shared image.
    mnt = _old_shared_layout(scratch)
    info = setup.lookup_user(TEST_USER)
    (mnt / TEST_USER).mkdir(mode=0o700)
    os.chown(mnt / TEST_USER, info.uid, info.gid)
    subprocess.run(["runuser", "-u", TEST_USER, "--", sys.executable, "-c",
                    "import sys; from stacker_kernel.storage import btrfs; btrfs.create_subvolume(sys.argv[1])",
                    str(mnt / TEST_USER / "sub")], check=True, cwd="/", env={**os.environ, "PYTHONPATH": REPO})
    (mnt / "neighbour").mkdir()
    user_config.write_text(json.dumps({"storage": str(mnt / "neighbour")}))
    assert setup.teardown_storage(TEST_USER, mnt, scratch) == [f"removed {mnt / TEST_USER}"]
    assert not (mnt / TEST_USER).exists() and (mnt / "neighbour").is_dir()


@pytest.mark.rootful
def test_storage_path_for_a_user_reads_roots_record(scratch, user_config, capsys):
    target = _setup(scratch)
    user_config.write_text(json.dumps({"storage": "/elsewhere"}))
    assert cli.main(["storage-path", "--user", TEST_USER, "--state-dir", str(scratch)]) == 0
    assert capsys.readouterr().out.strip() == str(target)


@pytest.mark.rootful
def test_two_setups_of_one_user_at_once_both_succeed(scratch, user_config):
    # A hub may spawn the same user's server twice at once; both run setup-storage.
    cmd = [sys.executable, "-m", "stacker_kernel", "setup-storage", "--user", TEST_USER, "--size", "256M",
           "--state-dir", str(scratch), "--mount", str(scratch / "btrfs")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO}) for _ in range(3)]
    results = [p.communicate() + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0, 0], results
    assert sum(1 for m in location.mounts() if m.mount_point == scratch / "btrfs" / TEST_USER / "storage") == 1
