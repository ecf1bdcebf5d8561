"""Single-id mode (container/userns.py), forced with STACKER_KERNEL_SINGLE_ID=1 for the
test user (who has subordinate ids): builds on both drivers, the confinement of a
tool that keeps the user's own id, and the one-line diagnostics a user can meet.
tests/test_no_sudo.py runs the mode for real accounts without subordinate ids.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.container import userns
from stacker_kernel.container.userns import IdMap, isolate, isolated_id, run_in_userns
from stacker_kernel.errors import ContainerError

REPO = str(Path(__file__).resolve().parent.parent)


def single_map() -> IdMap:
    return IdMap((userns.IdRange(0, os.getuid(), 1),), (userns.IdRange(0, os.getgid(), 1),),
                 rootful=False, single="forced")


def cli(storage: Path, cwd: Path, *args: str, single: bool = True, prefix: tuple[str, ...] = ()):
    env = dict(os.environ, STACKER_KERNEL_STORAGE=str(storage), PYTHONPATH=REPO)
    env.pop(userns.SINGLE_ID_ENV, None)
    if single:
        env[userns.SINGLE_ID_ENV] = "1"
    return subprocess.run([*prefix, sys.executable, "-m", "stacker_kernel", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_the_mode_is_chosen_by_the_variable_and_maps_only_the_users_ids(monkeypatch):
    monkeypatch.delenv(userns.SINGLE_ID_ENV, raising=False)
    assert IdMap.for_current_user().single == "" and userns.single_id_notice() is None
    monkeypatch.setenv(userns.SINGLE_ID_ENV, "1")
    m = IdMap.for_current_user()
    assert m.uids == (userns.IdRange(0, os.getuid(), 1),) and m.gids == (userns.IdRange(0, os.getgid(), 1),)
    seen = run_in_userns(lambda: (Path("/proc/self/uid_map").read_text().split(),
                                  Path("/proc/self/setgroups").read_text(), os.getuid(),
                                  userns.in_single_id_namespace()))
    assert seen == (["0", str(os.getuid()), "1"], "deny\n", 0, True)
    assert userns.single_id_notice().startswith(f"[single-id mode: {userns.SINGLE_ID_ENV} is set. ")


def test_a_build_in_single_id_mode_caches_exports_and_grabs_and_refuses_other_owners(storage, tmp_path, busybox_tar):
    (tmp_path / "stacker.yaml").write_text(textwrap.dedent(f"""\
        base:
          from:
            type: tar
            url: {busybox_tar}
          run: |
            echo x > /x && chown 0:0 /x
            id -u > /whoami
        """))
    (tmp_path / "chown.yaml").write_text(f"c:\n  from:\n    type: tar\n    url: {busybox_tar}\n"
                                         "  run: echo y > /y && chown 1000 /y\n")
    built = cli(storage, tmp_path, "build", "-f", "stacker.yaml", "--oci-dir", "oci")
    assert built.returncode == 0, built.stderr
    assert sum("[single-id mode:" in line for line in built.stderr.splitlines()) == 1, built.stderr
    again = cli(storage, tmp_path, "build", "-f", "stacker.yaml", "--oci-dir", "oci")
    assert again.returncode == 0 and "1 cached" in again.stdout, again.stdout + again.stderr
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{tmp_path / 'oci'}:base", str(bundle)],
                   check=True, capture_output=True)
    assert (bundle / "rootfs/x").read_text() == "x\n" and (bundle / "rootfs/whoami").read_text() == "0\n"
    got = cli(storage, tmp_path, "grab", "-f", "stacker.yaml", "base:/x", "got")
    assert got.returncode == 0 and (tmp_path / "got").read_text() == "x\n", got.stderr
    failed = cli(storage, tmp_path, "build", "-f", "chown.yaml", "--no-oci")
    assert failed.returncode == 1 and "chown: /y: Invalid argument" in failed.stdout, failed.stdout
    # the same user in full mode: the failed state kept by single-id mode does not stand in the way
    full = cli(storage, tmp_path, "build", "-f", "chown.yaml", "--no-oci", single=False)
    assert full.returncode == 0 and "single-id" not in full.stderr, full.stderr


def test_shift_tab_help_in_single_id_mode_keeps_the_id_but_no_capability(tmp_path, busybox_tar, monkeypatch):
    import tarfile

    from stacker_kernel.engine.command_help import help_text

    monkeypatch.setenv(userns.SINGLE_ID_ENV, "1")
    root = tmp_path / "rootfs"
    root.mkdir()
    with tarfile.open(busybox_tar) as tar:
        tar.extractall(root)
    probe = root / "bin/probe"
    probe.write_text('#!/bin/sh\necho "uid=$(id -u)"\n'
                     'mkdir /tmp/x; chroot /tmp/x /bin/true 2>/dev/null && echo chroot-allowed || echo chroot-refused\n'
                     'touch /bin/new 2>/dev/null && echo wrote-image || echo image-read-only\n'
                     'echo x > /dev/null && echo devnull-ok\n')
    probe.chmod(0o755)
    text = help_text(str(root), "/bin/probe")
    assert text.splitlines() == ["uid=0", "chroot-refused", "image-read-only", "devnull-ok"], text
    assert not (root / "bin/new").exists()


def _confined_run(d: str, script: str) -> tuple[int, int, str, str]:
    out = isolated_id()
    p = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, cwd=f"{d}/scratch",
                       preexec_fn=functools.partial(isolate, outside=out))
    return out, p.returncode, p.stdout, p.stderr


def test_a_tool_isolated_in_single_id_mode_writes_only_its_scratch_and_sees_no_home_run_or_proc(tmp_path):
    """fsck.erofs's isolation without a spare id: the user's own id, no capability, every
    mount read-only but its scratch, home folders, /run and the host's /proc hidden."""
    (tmp_path / "scratch").mkdir()
    secret = Path.home() / f".sk-single-id-{os.getpid()}"
    secret.write_text("secret")
    try:
        script = (f"cat {secret} 2>/dev/null && echo read-home || echo home-hidden\n"
                  f"echo e > {tmp_path}/escaped 2>/dev/null && echo escaped || echo kept-in\n"
                  "echo w > out && echo wrote-scratch\n"
                  "ls /proc | grep -c . ; ls /run | grep -c . \n"
                  "mkdir y; chroot y /bin/true 2>/dev/null && echo chroot-allowed || echo chroot-refused\n"
                  "pwd\n")
        out, _, stdout, stderr = run_in_userns(_confined_run, str(tmp_path), script, idmap=single_map())
    finally:
        secret.unlink()
    assert out == 0
    assert stdout.split() == ["home-hidden", "kept-in", "wrote-scratch", "0", "0", "chroot-refused", "/tmp"], \
        stdout + stderr
    assert (tmp_path / "scratch/out").read_text() == "w\n" and not (tmp_path / "escaped").exists()


def test_an_erofs_base_imports_in_single_id_mode(tmp_path):
    import tarfile

    from stacker_kernel.oci.layer_types import MEDIA_TYPE_EROFS, fs_layer_to_tar

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_text("data")
    blob = tmp_path / "layer.erofs"
    subprocess.run(["mkfs.erofs", str(blob), str(src)], check=True, capture_output=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run_in_userns(fs_layer_to_tar, str(blob), MEDIA_TYPE_EROFS, str(tmp_path / "out.tar"), str(scratch),
                  idmap=single_map())
    with tarfile.open(tmp_path / "out.tar") as t:
        assert t.extractfile("d/f").read() == b"data"


def test_user_namespaces_disabled_by_their_limit_is_one_line_naming_the_sysctl(storage, tmp_path, busybox_tar):
    """user.max_user_namespaces is per user namespace: 0 in a namespace of the test's own
    disables them below it, as the sysctl does for the machine."""
    (tmp_path / "stacker.yaml").write_text(f"b:\n  from:\n    type: tar\n    url: {busybox_tar}\n  run: true\n")
    prefix = ("unshare", "-U", "-r", "sh", "-c", 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh")
    built = cli(storage, tmp_path, "build", "-f", "stacker.yaml", "--no-oci", single=False, prefix=prefix)
    assert built.returncode == 1
    assert built.stderr.strip().splitlines() == [(
        "stacker-kernel: cannot create a user namespace: the limit user.max_user_namespaces (0 here) is reached "
        "(0 disables them): as root, sysctl -w user.max_user_namespaces=15000")], built.stderr


def test_a_kernel_too_old_to_confine_tools_in_single_id_mode_is_one_line():

    with pytest.raises(ContainerError, match=r"^Linux 5\.10\.0-28-amd64 cannot confine image tools in single-id "
                                             r"mode \(needs 5\.12 or later for mount_setattr\): upgrade"):
        userns._check_confinement_kernel("5.10.0-28-amd64")
    userns._check_confinement_kernel("5.12.0")
