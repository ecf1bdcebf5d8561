"""A notebook folder other users can write (a world-writable scratch folder, a group
share): what they plant there neither runs as you nor redirects what you write
(issue 23, point 1).

Rootful: root acts as the unprivileged users sktest (Alice, who opens the
notebook) and sktest2 (Bob, who plants files), with runuser, as
tests/test_multiuser_storage.py does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from stacker_kernel.kernel.install import kernel_json, write_spec
from stacker_kernel.storage import setup
from test_multiuser_storage import ALICE, BOB, REPO, as_user, host  # noqa: F401 (fixture)

pytestmark = pytest.mark.rootful


def _run_as(user: str, argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(setup.lookup_user(user).home), "USER": user,
            "LANG": "C.UTF-8", "PYTHONPATH": REPO, "PYTHONDONTWRITEBYTECODE": "1", **env}
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", *(f"{k}={v}" for k, v in base.items()),
                           *argv], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture
def share(host):
    """A folder everyone can write, inside the host fixture's work dir."""
    top, work, roots = host
    folder = work / "share"
    folder.mkdir()
    os.chmod(folder, 0o777)
    return folder, work, roots


def test_a_json_py_planted_in_the_notebook_folder_does_not_run_in_the_kernel(share):
    folder, work, _ = share
    marker = work / "planted-code-ran"
    plant = f"open({str(marker)!r}, 'w').close()\n"
    planted = as_user(BOB, "-c", f"open('json.py', 'w').write({plant!r})", cwd=folder)
    assert planted.returncode == 0 and (folder / "json.py").is_file(), planted.stderr
    conn = work / "not-a-connection-file.json"
    conn.write_text("{")  # the kernel stops at it: what matters is what it imported before
    os.chmod(conn, 0o644)
    argv = [a.replace("{connection_file}", str(conn)) for a in kernel_json(sys.executable)["argv"]]
    started = _run_as(ALICE, argv, folder)
    assert started.returncode != 0  # it really started (and stopped at the connection file)
    assert not marker.exists(), "the planted json.py ran as the notebook's user"


def test_a_link_planted_at_a_failed_steps_log_does_not_overwrite_its_target(share):
    folder, work, _ = share
    victim = work / "alice-bashrc"
    victim.write_text("precious\n")
    alice = setup.lookup_user(ALICE)
    os.chown(victim, alice.uid, alice.gid)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "stacker", "display_name": "Stacker",
                                                           "language": "stacker"}})
    nb.cells = [nbformat.v4.new_code_cell(f"%from tar {work / 'busybox.tar'}", id="base"),
                nbformat.v4.new_code_cell("echo overwritten; false", id="bad")]
    path = folder / "nb.ipynb"
    nbformat.write(nb, path)
    os.chown(path, alice.uid, alice.gid)
    log = "stacker-logs/nb-step1-nb-failed.log"
    planted = as_user(BOB, "-c", "import os, sys\nos.mkdir('stacker-logs', 0o777); os.chmod('stacker-logs', 0o777)\n"
                      f"os.symlink(sys.argv[1], {log!r})", str(victim), cwd=folder)
    assert planted.returncode == 0 and (folder / log).is_symlink(), planted.stderr
    spec = work / "jupyter"
    write_spec(spec / "kernels" / "stacker")
    subprocess.run(["chmod", "-R", "a+rX", str(spec)], check=True)
    ran = _run_as(ALICE, [sys.executable, "-m", "stacker_kernel.kernel.runner", str(path)], folder,
                  JUPYTER_PATH=str(spec))
    assert ran.returncode == 1 and "Step failed" in ran.stdout + ran.stderr, (ran.stdout, ran.stderr)
    assert victim.read_text() == "precious\n"
    assert (folder / log).is_symlink() and os.readlink(folder / log) == str(victim)


def test_a_grab_never_follows_a_link_another_user_planted(share):
    from test_multiuser_storage import one_line_error, recipe, sk

    folder, work, roots = share
    yaml = recipe(work, "alice.yaml", "echo mine > /mine")
    assert sk(ALICE, roots[ALICE], "build", "--no-oci", "-f", str(yaml), cwd=work).returncode == 0
    private = work / "alice-private"
    private.mkdir(mode=0o700)
    alice = setup.lookup_user(ALICE)
    os.chown(private, alice.uid, alice.gid)
    planted = as_user(BOB, "-c", "import os, sys; os.symlink(sys.argv[1], 'out')", str(private), cwd=folder)
    assert planted.returncode == 0, planted.stderr
    grabbed = sk(ALICE, roots[ALICE], "grab", "-f", str(yaml), "base:/mine", str(folder / "out"), cwd=folder)
    assert "is a symbolic link another user made: not followed" in one_line_error(grabbed)
    assert list(private.iterdir()) == []
    # Nor a link on the way to the destination: `out/sub/` would be made in Alice's folder.
    grabbed = sk(ALICE, roots[ALICE], "grab", "-f", str(yaml), "base:/mine", str(folder / "out" / "sub") + "/",
                 cwd=folder)
    assert one_line_error(grabbed).endswith(f"{folder / 'out'} is a symbolic link another user made: not followed;"
                                            " remove it or grab to another place")
    assert list(private.iterdir()) == []
    # A link of her own is hers to follow.
    os.symlink(private, folder / "mine")
    os.lchown(folder / "mine", alice.uid, alice.gid)
    grabbed = sk(ALICE, roots[ALICE], "grab", "-f", str(yaml), "base:/mine", str(folder / "mine" / "sub") + "/",
                 cwd=folder)
    assert grabbed.returncode == 0, grabbed.stderr
    assert (private / "sub" / "mine").read_text() == "mine\n"
