"""The deployment installs the package, not a checkout (deploy/install-package.sh,
run by deploy/jupyterhub/install.sh --service): a fresh venv gets a wheel built
from this checkout, whose files are copies, so a later change to the checkout
(by anyone who can write it) reaches no kernel."""
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_install_package_installs_a_wheel_not_an_editable_checkout(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, capture_output=True)
    before = {p.name for p in REPO.iterdir()}  # a development checkout has its own egg-info (pip -e)
    res = subprocess.run([str(REPO / "deploy/install-package.sh"), str(venv)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("installed stacker_kernel-") and res.stdout.strip().endswith(str(venv))
    site = next((venv / "lib").glob("python3*/site-packages"))
    dist = next(site.glob("stacker_kernel-*.dist-info"))
    direct = dist / "direct_url.json"
    assert not direct.exists() or not json.loads(direct.read_text()).get("dir_info", {}).get("editable")
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.egg-link"))
    installed = site / "stacker_kernel" / "__init__.py"
    assert not installed.is_symlink() and installed.read_bytes() == (REPO / "stacker_kernel/__init__.py").read_bytes()
    assert (site / "stacker_kernel/oci/signing.py").is_file()  # the whole package, subpackages too
    assert {p.name for p in REPO.iterdir()} == before  # the checkout stays as it was: no build/, no egg-info
    # The venv's python finds the installed copy, never the checkout.
    where = subprocess.run([str(venv / "bin/python"), "-c",
                            "import importlib.util; print(importlib.util.find_spec('stacker_kernel').origin)"],
                           capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert where.stdout.strip() == str(installed), where.stderr
