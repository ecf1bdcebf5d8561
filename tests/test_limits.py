"""A step cannot take the host's pid space: each container is capped (container/limits.py).

Unprivileged without a delegated cgroup the cap is RLIMIT_NPROC; as root, and
for a user given a cgroup at setup-storage, it is a pids cgroup of the build's
own. Real containers, real btrfs; the fork bombs are bounded themselves.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.container import limits
from stacker_kernel.engine.session import BuildSession
from stacker_kernel.errors import ContainerError
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage import btrfs
from stacker_kernel.storage.store import Store

from test_hostile import _count_procs
from conftest import in_tree

STACKER_KERNEL = str(Path(sys.executable).parent / "stacker-kernel")
# Starts sleeps until fork fails (the cap) or 400 of them ran (no cap: the step succeeds).
BOMB = "i=0; while [ $i -lt 400 ]; do sleep 86397 & i=$((i+1)); done; echo no-limit"
LIMIT = 64


@pytest.fixture
def session(storage, busybox_tar, tmp_path, monkeypatch):
    monkeypatch.setenv(limits.ENV_VAR, str(LIMIT))
    store = Store.open(storage)
    s = BuildSession.open(store, str(tmp_path / "bomb.ipynb"), resume=False)
    s.begin_layer(Layer(name="bomb", from_=ImageSource(type="tar", url=str(busybox_tar))))
    yield s
    s.close()
    store.close()


def _fork_bomb_is_stopped(session) -> None:
    first = session.run_step("echo kept > /kept")
    assert first.ok, first.message
    out: list[str] = []
    bomb = session.run_step(BOMB, on_output=out.append)
    assert not bomb.ok and "no-limit" not in "".join(out)
    assert bomb.message.startswith(f"step hit the process limit of {LIMIT} (fork: Resource temporarily unavailable); "
                                   "raise it with"), bomb.message
    assert "\n" not in bomb.message and "--max-processes" in bomb.message
    assert _count_procs(b"86397") == 0  # nothing of the bomb outlives the step
    assert subprocess.run(["true"]).returncode == 0  # the host still forks
    after = session.run_step("cat /kept > /after; i=0; while [ $i -lt 20 ]; do sleep 0 & i=$((i+1)); done; wait")
    assert after.ok, after.message
    assert in_tree(session.store.get(after.snapshot_id).path, "after").read_text() == "kept\n"
    assert in_tree(session.store.get(first.snapshot_id).path, "kept").exists()  # the previous snapshot survives


def test_fork_bomb_stops_at_the_limit_with_a_clear_message(session):
    _fork_bomb_is_stopped(session)


def test_fork_bomb_as_another_id_is_capped_too(session):
    # The cap is the container's, not one id's: a bomb as `nobody` stops at the same number.
    out: list[str] = []
    bomb = session.run_step(f"su -s /bin/sh nobody -c '{BOMB}'", on_output=out.append)
    assert not bomb.ok and "no-limit" not in "".join(out)
    assert bomb.message.startswith(f"step hit the process limit of {LIMIT} "), bomb.message
    assert _count_procs(b"86397") == 0


@pytest.mark.rootful
def test_fork_bomb_of_a_root_build_stops_at_the_limit(session):
    # Root is exempt from RLIMIT_NPROC: its builds get a pids cgroup of their own.
    _fork_bomb_is_stopped(session)


@pytest.mark.rootful
def test_root_build_runs_in_its_own_pids_cgroup_removed_afterwards(session):
    out: list[str] = []
    o = session.run_step("grep ':pids:' /proc/self/cgroup; cat /sys/fs/cgroup/pids$(grep ':pids:' /proc/self/cgroup "
                         "| cut -d: -f3)/pids.max", on_output=out.append)
    assert o.ok, o.message
    line, cap = "".join(out).split()
    path = line.split(":", 2)[2]
    assert path.startswith("/stacker-kernel/root/build-") and cap == str(LIMIT)
    session.close()
    assert not Path(f"/sys/fs/cgroup/pids{path}").exists()


def test_a_normal_build_under_the_default_limit_works(storage, busybox_tar, tmp_path, monkeypatch):
    # Processes of several ids in one step (the cap is on the whole container, not per id).
    monkeypatch.delenv(limits.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert limits.max_processes() == limits.DEFAULT_MAX_PROCESSES
    with Store.open(storage) as store:
        s = BuildSession.open(store, str(tmp_path / "n.ipynb"), resume=False)
        try:
            s.begin_layer(Layer(name="n", from_=ImageSource(type="tar", url=str(busybox_tar))))
            o = s.run_step("i=0; while [ $i -lt 200 ]; do sleep 1 & i=$((i+1)); done; "
                           "su -s /bin/sh nobody -c 'sleep 0 & wait' ; wait; echo fine > /fine")
            assert o.ok, o.message
        finally:
            s.close()


def test_max_processes_comes_from_env_then_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(limits.ENV_VAR, raising=False)
    cfg = tmp_path / ".config/stacker-kernel/config.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(json.dumps({"storage": "/x", "max_processes": 300}))
    from stacker_kernel.storage.location import config_file
    assert config_file(tmp_path) == cfg
    assert limits.max_processes() == 300
    monkeypatch.setenv(limits.ENV_VAR, "77")
    assert limits.max_processes() == 77


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_a_bad_max_processes_is_one_line_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv(limits.ENV_VAR, value)
    with pytest.raises(ContainerError, match=f"{limits.ENV_VAR} is '{value}': give the most processes"):
        limits.max_processes()


def test_build_max_processes_flag_caps_the_build_with_a_one_line_error(storage, tmp_path, busybox_tar):
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(textwrap.dedent(f"""\
        bomb:
            from:
                type: tar
                url: {busybox_tar}
            run: |
                {BOMB}
        """))
    env = {k: v for k, v in os.environ.items() if k != limits.ENV_VAR}
    proc = subprocess.run([STACKER_KERNEL, "--storage", str(storage), "build", "-f", str(yaml), "--no-oci",
                           "--max-processes", "48"], capture_output=True, text=True, timeout=300, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "step hit the process limit of 48" in lines[0], proc.stderr
    assert _count_procs(b"86397") == 0


# --- a delegated cgroup (root gives it at setup-storage, the user's builds use it) -----------------

@pytest.mark.rootful
@pytest.mark.parametrize("delegated", [True, False], ids=["pids-cgroup", "rlimit-nproc"])
def test_an_unprivileged_users_build_is_capped_with_or_without_a_delegated_cgroup(busybox_tar, delegated):
    user = "sktest2"
    info = pwd.getpwnam(user)
    mine = limits.V1_PIDS / limits.DELEGATED_DIR / user
    existed = mine.exists()
    if existed and not delegated:
        mine.rmdir()  # as on a machine where setup-storage gave no cgroup (restored below)
    # setup-host.sh gives every test user storage; root's record says where
    from stacker_kernel.storage.setup import storage_path

    storage = storage_path(user) / f"t-limits-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="sk-limits-"))  # readable by the user, unlike pytest's tmp
    shutil.copy(busybox_tar, work / "busybox.tar")
    (work / "stacker.yaml").write_text(textwrap.dedent(f"""\
        bomb:
            from:
                type: tar
                url: {work / 'busybox.tar'}
            run: |
                grep ':pids:' /proc/self/cgroup
                {BOMB}
        """))
    for p in (work, *work.iterdir()):
        shutil.chown(p, info.pw_uid, info.pw_gid)
    try:
        if delegated:
            assert limits.delegate(user) == mine
            assert (mine / "pids.max").read_text().strip() == str(limits.USER_MAX_PROCESSES)
            assert mine.stat().st_uid == info.pw_uid and (mine / "pids.max").stat().st_uid == 0
        as_user = ["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin", f"HOME={info.pw_dir}",
                   "LANG=C.UTF-8", f"PYTHONPATH={Path(__file__).parent.parent}"]
        subprocess.run([*as_user, "mkdir", "-p", str(storage)], check=True)
        proc = subprocess.run([*as_user, STACKER_KERNEL, "--storage", str(storage),
                               "build", "-f", str(work / "stacker.yaml"), "--no-oci", "--max-processes", "40"],
                              capture_output=True, text=True, timeout=300, cwd=work)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1 and "Traceback" not in out, out
        assert "step hit the process limit of 40" in out, out
        in_cgroup = f"/{limits.DELEGATED_DIR}/{user}/build-" in out
        assert in_cgroup == delegated, out
        if delegated:
            assert [p for p in mine.iterdir() if p.name.startswith("build-")] == []
        assert _count_procs(b"86397") == 0
    finally:
        shutil.rmtree(work)
        if storage.exists():
            btrfs.remove_tree(storage)
        if existed:
            limits.delegate(user)
        elif mine.exists():
            for d in mine.glob("build-*"):
                d.rmdir()
            mine.rmdir()


@pytest.mark.rootful
def test_a_live_engines_new_cgroup_survives_another_container_starting():
    # The cgroup of a container about to start is empty until it joins; another
    # container starting meanwhile (a second kernel, a concurrent build) must not
    # take it for a crashed engine's leftover.
    first = limits.make_cgroup(LIMIT)
    try:
        second = limits.make_cgroup(LIMIT)
        try:
            assert first and second and first != second
            assert os.path.isdir(first), "a live engine's cgroup was removed as stale"
        finally:
            limits.remove_cgroup(second)
    finally:
        limits.remove_cgroup(first)


@pytest.mark.rootful
def test_a_dead_engines_cgroup_is_removed_when_the_next_container_starts():
    proc = subprocess.Popen(["true"])  # its pid names a leftover of an engine that died
    proc.wait()
    probe = limits.make_cgroup(LIMIT)
    limits.remove_cgroup(probe)
    leftover = Path(probe).parent / f"{limits.BUILD_PREFIX}{proc.pid}-deadbeef"
    leftover.mkdir()
    mine = limits.make_cgroup(LIMIT)
    try:
        assert not leftover.exists()
    finally:
        limits.remove_cgroup(mine)
        limits.remove_cgroup(str(leftover))


def test_users_caps_together_leave_the_host_a_quarter_of_its_pids():
    # Issue 23 point 12e: a fixed 16384 per user was half of the default pid_max (32768).
    for pids in (32768, 65536, 4194304):
        for users in (1, 2, 3, 10, 200):
            cap = limits.user_cap(pids, users)
            assert cap * users <= pids * 3 // 4 and cap <= limits.USER_MAX_PROCESSES
    assert limits.user_cap(32768, 2) == 12288 and limits.user_cap(32768, 1) == 16384
    assert limits.user_cap(4194304, 2) == 16384  # a large pid_max: the per-user maximum
    assert limits.user_cap(32768, 2, configured=1000) == 1000  # the admin's choice wins
