"""No sudo for one person: a fresh account builds at once on overlay storage in its home.

Rootful: root creates the account (useradd, with a subordinate id range, as a
distribution does) and runs every command as it with runuser; the account
never has root, a btrfs or a config file. Its home is on the machine's / (ext4).
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
import uuid
from pathlib import Path

import pytest

from stacker_kernel.storage import btrfs

pytestmark = pytest.mark.rootful

REPO = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def fresh_user():
    """A new account with a home on ext4 and 65536 subordinate ids; deleted afterwards."""
    name = f"skfresh{uuid.uuid4().hex[:6]}"
    start = 400000 + (os.getpid() % 500) * 65536
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        subprocess.run(["usermod", "--add-subuids", f"{start}-{start + 65535}",
                        "--add-subgids", f"{start}-{start + 65535}", name], check=True, capture_output=True)
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
        for f in ("/etc/subuid", "/etc/subgid"):
            lines = Path(f).read_text().splitlines(keepends=True)
            Path(f).write_text("".join(line for line in lines if not line.startswith(name + ":")))


def as_user(user: pwd.struct_passwd, *args: str, cwd: str) -> subprocess.CompletedProcess:
    """`python ARGS` as `user` with a clean environment, like a login (no storage configured)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user.pw_dir, "USER": user.pw_name,
           "LANG": "C.UTF-8", "PYTHONPATH": REPO, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(["runuser", "-u", user.pw_name, "--", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), sys.executable, *args],
                          capture_output=True, text=True, cwd=cwd)


def test_a_fresh_account_builds_and_exports_on_overlay_in_its_home(fresh_user, busybox_tar):
    home = Path(fresh_user.pw_dir)
    assert not btrfs.is_btrfs(home)
    work = home / "work"
    work.mkdir()
    shutil.copy(busybox_tar, work / "busybox.tar")
    (work / "stacker.yaml").write_text(textwrap.dedent(f"""\
        base:
          from:
            type: tar
            url: {work / 'busybox.tar'}
          run: |
            echo hello > /hello
            rm /etc/group
            mkdir -p /srv/data && echo 1 > /srv/data/one && chown 1000:1000 /srv/data/one
        app:
          from:
            type: built
            tag: base
          run: rm /hello && touch /app
        """))
    subprocess.run(["chown", "-R", f"{fresh_user.pw_uid}:{fresh_user.pw_gid}", str(work)], check=True)

    built = as_user(fresh_user, "-m", "stacker_kernel", "build", "-f", "stacker.yaml", "--oci-dir", "oci",
                    cwd=str(work))
    assert built.returncode == 0, built.stderr
    storage = home / ".local/share/stacker-kernel"
    assert (storage / "driver").read_text().strip() == "overlay"
    assert (storage / "layers").is_dir()

    layers = as_user(fresh_user, "-m", "stacker_kernel", "layers", cwd=str(work))
    assert layers.returncode == 0, layers.stderr
    assert f"storage {storage} (overlay driver)" in layers.stdout

    # umoci (rootless) unpacks what the account exported; skopeo reads the layout.
    for tag, present, absent in (("base", ["hello", "srv/data/one"], ["app", "etc/group"]),
                                 ("app", ["app", "srv/data/one"], ["hello", "etc/group"])):
        out = tempfile.mkdtemp(prefix=f"sk-fresh-{tag}-", dir="/var/tmp")
        try:
            subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{work / 'oci'}:{tag}", f"{out}/b"],
                           check=True, capture_output=True)
            for name in present:
                assert os.path.lexists(f"{out}/b/rootfs/{name}"), (tag, name)
            for name in absent:
                assert not os.path.lexists(f"{out}/b/rootfs/{name}"), (tag, name)
        finally:
            shutil.rmtree(out)
    inspect = subprocess.run(["skopeo", "inspect", f"oci:{work / 'oci'}:app"], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert len(json.loads(inspect.stdout)["Layers"]) >= 3  # the base and one per layer's step


def test_an_account_without_subordinate_ids_is_told_how_to_fix_it(fresh_user, busybox_tar):
    for f in ("/etc/subuid", "/etc/subgid"):
        lines = Path(f).read_text().splitlines(keepends=True)
        Path(f).write_text("".join(line for line in lines if not line.startswith(fresh_user.pw_name + ":")))
    work = Path(fresh_user.pw_dir)
    shutil.copy(busybox_tar, work / "busybox.tar")
    (work / "stacker.yaml").write_text(f"base:\n  from:\n    type: tar\n    url: {work / 'busybox.tar'}\n  run: true\n")
    subprocess.run(["chown", "-R", f"{fresh_user.pw_uid}:{fresh_user.pw_gid}", str(work)], check=True)
    built = as_user(fresh_user, "-m", "stacker_kernel", "build", "-f", "stacker.yaml", "--no-oci", cwd=str(work))
    assert built.returncode == 1
    lines = built.stderr.strip().splitlines()
    assert len(lines) == 1 and "no subordinate range" in lines[0] and "/etc/subuid" in lines[0], built.stderr
