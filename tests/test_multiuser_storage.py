"""Two users on one host: neither reads the other's layers, and one user's full storage stops only them.

Rootful: root sets up storage for the unprivileged users sktest and sktest2
(each a 256 MiB image in a temporary state dir, never the machine's storage)
and runs every command as each user with runuser.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.container import limits
from stacker_kernel.storage import location, setup

pytestmark = pytest.mark.rootful

REPO = str(Path(__file__).resolve().parent.parent)
ALICE = os.environ.get("STACKER_KERNEL_TEST_USER", "sktest")
BOB = os.environ.get("STACKER_KERNEL_TEST_USER2", "sktest2")
SECRET = "alice-secret-3f9c1e7d"


def unmount(path: Path) -> None:
    """Unmount `path`; detach it lazily when a mount namespace another process made still holds a copy."""
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _restore_configs(users):
    saved = {}
    for user in users:
        cfg = location.config_file(setup.lookup_user(user).home)
        saved[user] = (cfg, cfg.read_bytes() if cfg.exists() else None)
    return saved


@pytest.fixture
def host(busybox_tar):
    """A scratch state dir with both users' storage set up (256 MiB each) and a world-readable work dir."""
    top = Path(tempfile.mkdtemp(prefix="sk-users-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    saved = _restore_configs([ALICE, BOB])
    # setup-storage re-caps each user's pids cgroup (shared with their real builds): put the caps back after
    caps = {u: limits.V1_PIDS / limits.DELEGATED_DIR / u / "pids.max" for u in (ALICE, BOB)}
    saved_caps = {u: p.read_text() for u, p in caps.items() if p.exists()}
    try:
        work = top / "work"
        work.mkdir(mode=0o777)
        os.chmod(work, 0o777)
        shutil.copy(busybox_tar, work / "busybox.tar")
        os.chmod(work / "busybox.tar", 0o644)
        roots = {u: setup.setup_storage(u, "256M", mount=top / "btrfs", state=top) for u in (ALICE, BOB)}
        yield top, work, roots
    finally:
        for u in (ALICE, BOB):
            if location.is_mount_point(top / "btrfs" / u / "storage"):
                unmount(top / "btrfs" / u / "storage")
        shutil.rmtree(top)
        for user, cap in saved_caps.items():
            limits.delegate(user, int(cap))
        for user, (cfg, data) in saved.items():
            if data is not None:
                info = setup.lookup_user(user)
                cfg.write_bytes(data)
                os.chown(cfg, info.uid, info.gid)


def as_user(user: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python ARGS` as `user` with a clean environment, like a login would."""
    home = str(setup.lookup_user(user).home)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "USER": user, "LANG": "C.UTF-8",
           "PYTHONPATH": REPO, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                           sys.executable, *args], capture_output=True, text=True, cwd=cwd)


def sk(user: str, storage: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return as_user(user, "-m", "stacker_kernel", "--storage", str(storage), *args, cwd=cwd)


def recipe(work: Path, name: str, run: str) -> Path:
    path = work / name
    path.write_text(textwrap.dedent(f"""\
        base:
          from:
            type: tar
            url: {work / 'busybox.tar'}
          run: {run}
        """))
    os.chmod(path, 0o644)
    return path


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single `stacker-kernel: …` line a failed command printed (and nothing else)."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stacker-kernel: "), proc.stderr
    return lines[0]


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_another_user_cannot_read_the_image_holding_a_users_layers(host):
    top, work, roots = host
    yaml = recipe(work, "secret.yaml", f"echo {SECRET} > /secret")
    built = sk(ALICE, roots[ALICE], "build", "--no-oci", "-f", str(yaml), cwd=work)
    assert built.returncode == 0, built.stderr
    subprocess.run(["sync"], check=True)
    image = setup._backing_file(roots[ALICE])
    # Bob scans Alice's image the way an attacker would: raw bytes, looking for her secret.
    scan = ("import sys\n"
            "try:\n"
            "    data = open(sys.argv[1], 'rb').read()\n"
            "except PermissionError:\n"
            "    print('cannot open')\n"
            "else:\n"
            "    print('found' if sys.argv[2].encode() in data else 'not found')\n")
    out = as_user(BOB, "-c", scan, str(image), SECRET, cwd=work)
    assert out.stdout.strip() == "cannot open", out.stderr
    # The secret really is in the image: root finds it, so the scan above was a real test.
    assert SECRET.encode() in image.read_bytes()


def test_another_user_cannot_enter_a_users_storage(host):
    top, work, roots = host
    out = as_user(BOB, "-c", "import os, sys; os.listdir(sys.argv[1])", str(roots[ALICE]), cwd=work)
    assert "PermissionError" in out.stderr


def test_a_full_storage_says_so_in_one_line_and_stops_only_its_user(host):
    top, work, roots = host
    yaml = recipe(work, "alice.yaml", "echo keep > /keep")
    assert sk(ALICE, roots[ALICE], "build", "--no-oci", "-f", str(yaml), cwd=work).returncode == 0
    # Alice fills her bounded space to ENOSPC.
    fill = as_user(ALICE, "-c", "import shutil, sys\n"
                   "with open(sys.argv[1], 'wb') as f:\n"
                   "    try:\n"
                   "        while True: f.write(b'x' * (1 << 20)); f.flush()\n"
                   "    except OSError as e: print(e.errno)\n", str(roots[ALICE] / "junk"), cwd=work)
    assert fill.stdout.strip() == "28", fill.stderr  # ENOSPC
    for args in (["layers"], ["grab", "-f", str(yaml), "base:/keep", str(work / "got")],
                 ["build", "--no-oci", "-f", str(yaml)]):
        line = one_line_error(sk(ALICE, roots[ALICE], *args, cwd=work))
        assert f"storage {roots[ALICE]} is full: run 'stacker-kernel gc --wait'" in line
    # Bob's space is his own: his build works while Alice's storage is full.
    bob = sk(BOB, roots[BOB], "build", "--no-oci", "-f", str(recipe(work, "bob.yaml", "echo bob > /bob")), cwd=work)
    assert bob.returncode == 0, bob.stderr
    # gc works on the full storage (it has a reserve for opening the records) ...
    gc = sk(ALICE, roots[ALICE], "gc", cwd=work)
    assert gc.returncode == 0, gc.stderr
    # ... and once Alice deletes her own file, everything works again.
    (roots[ALICE] / "junk").unlink()
    layers = sk(ALICE, roots[ALICE], "layers", cwd=work)
    assert layers.returncode == 0 and "echo keep" in layers.stdout, layers.stderr


def test_gc_frees_a_storage_that_a_failed_step_filled(host):
    top, work, roots = host
    root = roots[ALICE]
    big = free_bytes(root) * 6 // 10 >> 20  # MiB: two of these do not fit
    yaml = work / "alice.yaml"
    recipe(work, "alice.yaml", f"dd if=/dev/urandom of=/big1 bs=1M count={big}")
    assert sk(ALICE, root, "build", "--no-oci", "-f", str(yaml), cwd=work).returncode == 0
    recipe(work, "alice.yaml", "echo small > /small")  # rebuilt: the big snapshot is garbage now
    assert sk(ALICE, root, "build", "--no-oci", "-f", str(yaml), cwd=work).returncode == 0
    other = recipe(work, "other.yaml", f"dd if=/dev/urandom of=/big2 bs=1M count={big}")
    failed = sk(ALICE, root, "build", "--no-oci", "-f", str(other), cwd=work)
    assert "No space left" in one_line_error(failed)
    # Right after the failure every command still answers without a traceback.
    layers = sk(ALICE, root, "layers", cwd=work)
    assert "Traceback" not in layers.stderr
    gc = sk(ALICE, root, "gc", "--wait", cwd=work)
    assert gc.returncode == 0, gc.stderr
    assert "removed 1 snapshot(s)" in gc.stdout
    freed_mib = float(gc.stdout.split("freed ")[1].split()[0]) * (1024 if "GiB" in gc.stdout else 1)
    assert freed_mib >= big * 0.9
    again = sk(ALICE, root, "build", "--no-oci", "-f", str(other), cwd=work)
    assert again.returncode == 0, again.stderr


def test_a_system_wide_kernel_spec_is_readable_by_every_user(tmp_path):
    prefix = Path(tempfile.mkdtemp(prefix="sk-kernelspec-", dir="/var/tmp"))
    try:
        os.chmod(prefix, 0o755)
        # Root's umask is often 077; the spec must still be readable.
        subprocess.run([sys.executable, "-m", "stacker_kernel", "install", "--prefix", str(prefix / "sys")],
                       check=True, capture_output=True, preexec_fn=lambda: os.umask(0o077),
                       env={**os.environ, "PYTHONPATH": REPO})
        spec = prefix / "sys/share/jupyter/kernels/stacker/kernel.json"
        code = ("import json, sys; from jupyter_client.kernelspec import KernelSpecManager\n"
                "m = KernelSpecManager(kernel_dirs=[sys.argv[1]])\n"
                "print(json.load(open(sys.argv[2]))['language'], m.find_kernel_specs().get('stacker'))\n")
        out = as_user(ALICE, "-c", code, str(spec.parent.parent), str(spec), cwd=prefix)
        assert out.stdout.strip() == f"stacker {spec.parent}", out.stderr
    finally:
        shutil.rmtree(prefix)
