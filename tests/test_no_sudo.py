"""No sudo for one person: a fresh account installs, builds and runs a kernel at once,
on overlay storage in its home; without subordinate ids, in single-id mode.

Rootful: root creates the account with `useradd -m` (Debian's useradd gives it a
subordinate id range, SUB_UID_COUNT in /etc/login.defs) and runs every command
as it with runuser and a clean environment; the account never has root, a btrfs
or a config file, and its home is on the machine's / (ext4). `userdel -r`
removes it and its subordinate ranges afterwards.

The install is the README's: `python3 -m venv ~/venv && ~/venv/bin/pip install
CHECKOUT` (Debian's python is "externally managed", PEP 668: `pip install
--user` is refused, which a test shows). To keep it fast, pip installs from a
wheelhouse (/var/cache/stacker-kernel-tests/wheelhouse: the dependencies'
wheels and setuptools, downloaded from PyPI once by `pip wheel` and kept)
with --no-index: the same resolution and install as from PyPI, only the
place the wheels come from differs; the checkout itself is built by the
account's pip every time.
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
import time
import uuid
from pathlib import Path

import pytest

from stacker_kernel.storage import btrfs

pytestmark = pytest.mark.rootful

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = sys.executable  # the test venv's (an editable install of the checkout)
WHEELHOUSE = Path("/var/cache/stacker-kernel-tests/wheelhouse")
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


def _make_user(*useradd_opts: str) -> pwd.struct_passwd:
    name = f"skfresh{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", *useradd_opts, name], check=True, capture_output=True)
    return pwd.getpwnam(name)


def _remove_user(user: pwd.struct_passwd) -> None:
    # only the test's own account: its kernels and containers, if a failure left any
    subprocess.run(["pkill", "-KILL", "-u", user.pw_name], capture_output=True)
    subprocess.run(["userdel", "-r", "-f", user.pw_name], capture_output=True)


def _subordinate_lines(name: str) -> list[str]:
    return [line for f in ("/etc/subuid", "/etc/subgid")
            for line in Path(f).read_text().splitlines() if line.startswith(name + ":")]


@pytest.fixture
def fresh_user():
    """A new account as `useradd -m` makes it, with the subordinate ids the
    distribution's defaults give it (added with usermod where they give none)."""
    user = _make_user()
    try:
        if len(_subordinate_lines(user.pw_name)) < 2:  # login.defs without SUB_UID_COUNT
            start = 400000 + (os.getpid() % 500) * 65536
            subprocess.run(["usermod", "--add-subuids", f"{start}-{start + 65535}",
                            "--add-subgids", f"{start}-{start + 65535}", user.pw_name],
                           check=True, capture_output=True)
        assert len(_subordinate_lines(user.pw_name)) == 2
        yield user
    finally:
        _remove_user(user)


@pytest.fixture
def user_without_subids():
    """A new account with no subordinate ids at all (login.defs' counts set to 0)."""
    user = _make_user("-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0")
    try:
        assert _subordinate_lines(user.pw_name) == []
        yield user
    finally:
        _remove_user(user)


def as_user(user: pwd.struct_passwd, *argv: str, cwd: str | Path, path: str = CLEAN_PATH,
            checkout: bool = False, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`argv` as `user` with a clean environment, like a login (no storage configured);
    with `checkout`, Python finds stacker_kernel in this checkout (no install)."""
    env = {"PATH": path, "HOME": user.pw_dir, "USER": user.pw_name, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    if checkout:
        env["PYTHONPATH"] = str(REPO)
    return subprocess.run([*wrap, "runuser", "-u", user.pw_name, "--", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *argv],
                          capture_output=True, text=True, cwd=str(cwd))


def give(user: pwd.struct_passwd, path: Path) -> None:
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(path)], check=True)


def copy_checkout(dest: Path) -> Path:
    """The checkout's files, as a user would have them (no .git, no build leftovers)."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "dist", "*.egg-info", "node_modules", ".pytest_cache"))
    return dest


def fill_wheelhouse(checkout: Path) -> None:
    """The dependencies' wheels and setuptools in WHEELHOUSE, from PyPI (pip keeps
    what is there); never the checkout's own wheel."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    pip = [str(Path(VENV_PYTHON).parent / "pip"), "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        src = copy_checkout(Path(tmp) / "src")  # pip builds in the tree it is given
        subprocess.run([*pip, "wheel", "--find-links", str(WHEELHOUSE), "-w", str(WHEELHOUSE), str(src)],
                       check=True, capture_output=True)
    subprocess.run([*pip, "download", "--find-links", str(WHEELHOUSE), "-d", str(WHEELHOUSE),
                    "setuptools>=64", "wheel"], check=True, capture_output=True)
    for own in WHEELHOUSE.glob("stacker_kernel-*"):
        own.unlink()
    subprocess.run(["chmod", "-R", "a+rX", str(WHEELHOUSE.parent)], check=True)


YAML = """\
base:
  from:
    type: tar
    url: {tar}
  run: |
    echo hello > /hello
    rm /etc/group
    mkdir -p /srv/data && echo 1 > /srv/data/one && chown 1000:1000 /srv/data/one
app:
  from:
    type: built
    tag: base
  run: rm /hello && touch /app
"""


def umoci_unpack(layout: Path, tag: str) -> Path:
    """`umoci unpack` as root (owners kept) into a temporary bundle; its rootfs."""
    out = Path(tempfile.mkdtemp(prefix=f"sk-fresh-{tag}-", dir="/var/tmp"))
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(out / "b")], check=True, capture_output=True)
    return out / "b/rootfs"


def test_a_fresh_account_installs_with_pip_in_a_venv_builds_and_runs_a_kernel_cell(fresh_user, busybox_tar):
    t0 = time.monotonic()
    home = Path(fresh_user.pw_dir)
    assert not btrfs.is_btrfs(home)
    copy_checkout(home / "stacker-kernel")
    work = home / "work"
    work.mkdir()
    shutil.copy(busybox_tar, work / "busybox.tar")
    (work / "stacker.yaml").write_text(YAML.format(tar=work / "busybox.tar"))
    give(fresh_user, home)

    # Debian's python refuses `pip install --user` (PEP 668): the README's venv instead.
    refused = as_user(fresh_user, "python3", "-m", "pip", "install", "--user", "./stacker-kernel", cwd=home)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stdout + refused.stderr
    venv = as_user(fresh_user, "python3", "-m", "venv", "venv", cwd=home)
    assert venv.returncode == 0, venv.stderr
    install = ["venv/bin/pip", "install", "-q", "--no-index", "--find-links", str(WHEELHOUSE), "./stacker-kernel"]
    installed = as_user(fresh_user, *install, cwd=home)
    if installed.returncode != 0:  # a new dependency, or the first run on this machine
        fill_wheelhouse(home / "stacker-kernel")
        installed = as_user(fresh_user, *install, cwd=home)
    assert installed.returncode == 0, installed.stderr
    t_install = time.monotonic() - t0
    path = f"{home}/venv/bin:{CLEAN_PATH}"
    spec = as_user(fresh_user, "stacker-kernel", "install", "--user", cwd=home, path=path)
    assert spec.returncode == 0, spec.stderr
    kernel_json = json.loads((home / ".local/share/jupyter/kernels/stacker/kernel.json").read_text())
    assert kernel_json["argv"][0] == f"{home}/venv/bin/python3"

    built = as_user(fresh_user, "stacker-kernel", "build", "-f", "stacker.yaml", "--oci-dir", "oci",
                    cwd=work, path=path)
    assert built.returncode == 0, built.stderr
    assert "single-id" not in built.stderr  # the full id range
    storage = home / ".local/share/stacker-kernel"
    assert (storage / "driver").read_text().strip() == "overlay"
    layers = as_user(fresh_user, "stacker-kernel", "layers", cwd=work, path=path)
    assert layers.returncode == 0, layers.stderr
    assert f"storage {storage} (overlay driver)" in layers.stdout

    # umoci unpacks what the account exported (owners kept); skopeo reads the layout.
    for tag, present, absent in (("base", ["hello", "srv/data/one"], ["app", "etc/group"]),
                                 ("app", ["app", "srv/data/one"], ["hello", "etc/group"])):
        rootfs = umoci_unpack(work / "oci", tag)
        try:
            for name in present:
                assert os.path.lexists(rootfs / name), (tag, name)
            for name in absent:
                assert not os.path.lexists(rootfs / name), (tag, name)
            st = (rootfs / "srv/data/one").stat()
            assert (st.st_uid, st.st_gid) == (1000, 1000)
        finally:
            shutil.rmtree(rootfs.parent.parent)
    inspect = subprocess.run(["skopeo", "inspect", f"oci:{work / 'oci'}:app"], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert len(json.loads(inspect.stdout)["Layers"]) >= 3  # the base and one per layer's step

    # One cell through the installed kernel spec, as JupyterLab starts it (jupyter_client).
    (work / "cell.py").write_text(textwrap.dedent("""\
        from pathlib import Path
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name="stacker")
        km.start_kernel(cwd=str(Path.cwd()), env={"JPY_SESSION_NAME": str(Path.cwd() / "nb.ipynb"),
                                                   "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            reply = kc.execute_interactive("%from tar busybox.tar\\necho hi > /f; chown 1000:1000 /f; ls -n /f",
                                           timeout=120)
            print("STATUS", reply["content"]["status"])
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        """))
    give(fresh_user, work)
    cell = as_user(fresh_user, "python", "cell.py", cwd=work, path=path)
    assert cell.returncode == 0, cell.stderr
    assert "STATUS ok" in cell.stdout, cell.stdout + cell.stderr
    assert " 1000 " in cell.stdout and "/f" in cell.stdout, cell.stdout
    print(f"install {t_install:.1f} s, all {time.monotonic() - t0:.1f} s")


OWNED_BASE = """\
base:
  from:
    type: tar
    url: {tar}
  run: |
    echo x > /x && chown 0:0 /x
    ls -ln /home/user1
"""


def _tar_with_other_owners(busybox_tar: Path, dest: Path) -> Path:
    """The busybox rootfs plus a folder and file owned by 1000:1000."""
    import io
    import tarfile

    with tarfile.open(busybox_tar) as src, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out:
        for m in src.getmembers():
            out.addfile(m, src.extractfile(m) if m.isreg() else None)
        d = tarfile.TarInfo("home/user1")
        d.type, d.mode, d.uid, d.gid = tarfile.DIRTYPE, 0o750, 1000, 1000
        out.addfile(d)
        f = tarfile.TarInfo("home/user1/f")
        f.size, f.mode, f.uid, f.gid = 7, 0o600, 1000, 1000
        out.addfile(f, io.BytesIO(b"secret\n"))
    return dest


def test_an_account_without_subordinate_ids_builds_in_single_id_mode(user_without_subids, busybox_tar):
    """Build, cache, export, grab and a failing chown, as a real account with no subids."""
    user = user_without_subids
    work = Path(user.pw_dir) / "work"
    work.mkdir()
    tar = _tar_with_other_owners(busybox_tar, work / "owned.tar")
    (work / "stacker.yaml").write_text(OWNED_BASE.format(tar=tar))
    (work / "chown.yaml").write_text(f"c:\n  from:\n    type: tar\n    url: {tar}\n"
                                     "  run: echo y > /y && chown 1000 /y\n")
    give(user, work)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return as_user(user, VENV_PYTHON, "-m", "stacker_kernel", *args, cwd=work, checkout=True)

    built = cli("build", "-f", "stacker.yaml", "--oci-dir", "oci")
    assert built.returncode == 0, built.stderr
    notices = [line for line in built.stderr.splitlines() if "single-id mode" in line]
    assert len(notices) == 1, built.stderr
    assert f"user {user.pw_name} has no subordinate range" in notices[0]
    assert "usermod --add-subuids" in notices[0] and notices[0].endswith(
        f"{user.pw_name}. The container holds only your own uid, as root: every file of the image is owned by "
        "root, chown to other ids fails, setgroups is denied (apt cannot drop to _apt: give it -o "
        "APT::Sandbox::User=root)]")
    # the archive's other owners collapse to root, said once
    warned = [line for line in built.stdout.splitlines() if "by root here: in single-id mode" in line]
    assert len(warned) == 1 and "'home/user1' of" in warned[0], built.stdout
    assert "0        0" in built.stdout  # ls -ln in the step: root owns home/user1/f
    again = cli("build", "-f", "stacker.yaml", "--oci-dir", "oci")
    assert again.returncode == 0 and "1 cached" in again.stdout, again.stdout + again.stderr

    rootfs = umoci_unpack(work / "oci", "base")
    try:
        st = (rootfs / "x").stat()
        assert (st.st_uid, st.st_gid) == (0, 0) and (rootfs / "x").read_text() == "x\n"
    finally:
        shutil.rmtree(rootfs.parent.parent)

    grabbed = cli("grab", "-f", "stacker.yaml", "base:/x", "got-x")
    assert grabbed.returncode == 0, grabbed.stderr
    assert (work / "got-x").read_text() == "x\n" and (work / "got-x").stat().st_uid == user.pw_uid

    failed = cli("build", "-f", "chown.yaml", "--no-oci")
    assert failed.returncode == 1
    assert "chown: /y: Invalid argument" in failed.stdout + failed.stderr
    assert "step failed with status 1 at `chown 1000 /y`" in failed.stderr


def test_a_kernel_without_subordinate_ids_says_single_id_mode_once_and_keeps_working(user_without_subids,
                                                                                    busybox_tar):
    user = user_without_subids
    nb = Path(user.pw_dir) / "nb"
    nb.mkdir()
    shutil.copy(busybox_tar, nb / "busybox.tar")
    (nb / "cells.py").write_text(textwrap.dedent("""\
        import json
        from pathlib import Path
        from stacker_kernel.kernel.runner import NotebookKernel

        k = NotebookKernel(Path("t.ipynb"))
        out = []
        try:
            for cell_id, code in [("c1", "%from tar busybox.tar\\necho one > /one"),
                                  ("c2", "echo two > /two && chown 0:0 /two"),
                                  ("c3", "chown 1000 /two"),
                                  ("c4", "%rollback 1"),
                                  ("c5", "ls /; echo three > /three"),
                                  ("c6", "%grab /three got-three"),
                                  ("c7", "%export oci out")]:
                r = k.execute(code, cell_id, timeout=120)
                out.append([cell_id, r.status, r.text()])
        finally:
            k.close()
        print(json.dumps(out))
        """))
    give(user, nb)
    ran = as_user(user, VENV_PYTHON, "cells.py", cwd=nb, checkout=True)
    assert ran.returncode == 0, ran.stderr
    cells = {c: (status, text) for c, status, text in json.loads(ran.stdout.splitlines()[-1])}
    assert cells["c1"][0] == "ok" and cells["c1"][1].count("[single-id mode:") == 1, cells["c1"]
    assert cells["c2"][0] == "ok", cells["c2"]
    assert all("single-id mode" not in text for c, (_, text) in cells.items() if c != "c1")
    assert cells["c3"][0] == "error" and "Invalid argument" in cells["c3"][1], cells["c3"]
    assert cells["c4"][0] == "ok", cells["c4"]
    assert cells["c5"][0] == "ok" and "two" not in cells["c5"][1].split(), cells["c5"]
    assert cells["c6"][0] == "ok" and (nb / "got-three").read_text() == "three\n", cells["c6"]
    assert cells["c7"][0] == "ok", cells["c7"]
    rootfs = umoci_unpack(nb / "out", "t")
    try:
        assert (rootfs / "three").exists() and (rootfs / "one").exists() and not (rootfs / "two").exists()
    finally:
        shutil.rmtree(rootfs.parent.parent)


def test_without_newuidmap_an_account_builds_in_single_id_mode_and_is_told_to_install_uidmap(fresh_user,
                                                                                            busybox_tar,
                                                                                            tmp_path):
    """newuidmap hidden (a whiteout in an overlay over /usr/bin, in a mount namespace of
    the test's own): the account's build says, in one line, to install uidmap."""
    hide = tmp_path / "hide"
    hide.mkdir()
    for tool in ("newuidmap", "newgidmap"):
        os.mknod(hide / tool, 0o600 | 0o020000, os.makedev(0, 0))  # an overlayfs whiteout
    work = Path(fresh_user.pw_dir) / "work"
    work.mkdir()
    shutil.copy(busybox_tar, work / "busybox.tar")
    (work / "stacker.yaml").write_text(f"b:\n  from:\n    type: tar\n    url: {work / 'busybox.tar'}\n  run: true\n")
    give(fresh_user, work)
    wrap = ("unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t overlay overlay -o lowerdir={hide}:/usr/bin /usr/bin && exec "$@"', "sh")
    probe = as_user(fresh_user, "sh", "-c", "test -e /usr/bin/newuidmap || echo hidden", cwd=work, wrap=wrap)
    assert probe.stdout.strip() == "hidden", probe.stderr
    built = as_user(fresh_user, VENV_PYTHON, "-m", "stacker_kernel", "build", "-f", "stacker.yaml", "--no-oci",
                    cwd=work, checkout=True, wrap=wrap)
    assert built.returncode == 0, built.stderr
    notices = [line for line in built.stderr.splitlines() if "single-id mode" in line]
    assert len(notices) == 1 and notices[0].startswith(
        "[single-id mode: newuidmap is missing; for full mode, install Debian's uidmap package "
        "(apt-get install uidmap)."), built.stderr
