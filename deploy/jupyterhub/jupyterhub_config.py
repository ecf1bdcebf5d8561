# JupyterHub for a team on one host: every local user gets their own
# single-user JupyterLab with the stacker kernel and their own bounded btrfs
# storage. Run the hub as root from the stacker-kernel venv:
#
#   /opt/stacker-kernel/venv/bin/jupyterhub -f /etc/stacker-kernel/jupyterhub_config.py
#
# (deploy/jupyterhub/install.sh puts this file there.) Nothing here replaces
# a part of JupyterHub: the real hub, configurable-http-proxy, PAM and
# LocalProcessSpawner; the only addition is the pre-spawn hook below.
import asyncio
import os
import sys
from pathlib import Path

c = get_config()  # noqa: F821 (provided by JupyterHub when it loads this file)

# The hub runs from the venv that has stacker_kernel, jupyterhub and jupyterlab;
# the single-user servers and their kernels run from the same venv.
VENV = Path(sys.prefix)
STACKER_KERNEL = str(VENV / "bin" / "stacker-kernel")
# Each user's storage is a btrfs of this size of their own (a full disk stops only them).
USER_STORAGE_SIZE = os.environ.get("STACKER_KERNEL_USER_STORAGE_SIZE", "20G")
# Hub state (user database, cookie secret, proxy pid), readable by root only.
STATE_DIR = Path(os.environ.get("STACKER_KERNEL_HUB_STATE", "/srv/jupyterhub"))

# --- where it listens --------------------------------------------------------
# Users reach the hub through configurable-http-proxy on this address; put a
# TLS terminator in front, or set c.JupyterHub.ssl_cert / ssl_key.
c.JupyterHub.bind_url = "http://:8000"
c.JupyterHub.db_url = f"sqlite:///{STATE_DIR / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE_DIR / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(STATE_DIR / "jupyterhub-proxy.pid")

# --- who can log in ----------------------------------------------------------
# Local system users with their system password (PAM). Only members of the
# group `stacker-users` may log in: adding a user to the team is
# `usermod -aG stacker-users NAME` (plus a subuid range, see README.md).
c.JupyterHub.authenticator_class = "pam"
c.Authenticator.allowed_groups = {"stacker-users"}
# Hub admins (may start and stop others' servers, but not read their storage:
# that stays 0700 and owned by its user). Add names here.
c.Authenticator.admin_users = set()

# --- what a user's server is --------------------------------------------------
# One jupyterhub-singleuser (JupyterLab) per user, run as that system user
# (LocalProcessSpawner setuids; that is why the hub runs as root).
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [str(VENV / "bin" / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = "~"
# Kernels build in user namespaces and btrfs; the first spawn also sets up storage.
c.Spawner.start_timeout = 120


async def setup_user_storage(spawner):
    """Give the user their own bounded btrfs storage before their server starts.

    setup-storage is idempotent, so it runs on every spawn: the first creates
    the user's storage, later ones remount it after a reboot (loop mounts do
    not survive one) and are otherwise a no-op.
    """
    user = spawner.user.name
    proc = await asyncio.create_subprocess_exec(
        STACKER_KERNEL, "setup-storage", "--user", user, "--size", USER_STORAGE_SIZE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        # The hub shows this message on the user's spawn page.
        raise RuntimeError(f"could not set up stacker-kernel storage for {user}: {text}")
    spawner.log.info("stacker-kernel storage for %s: %s", user, text)
    # Storage is private, but notebooks and %grab results live in the home directory.
    home = Path(os.path.expanduser(f"~{user}"))
    if home.is_dir() and home.stat().st_mode & 0o077:
        spawner.log.warning("home %s of %s is readable by other users: their notebooks and grabbed "
                            "files are visible to them; run 'chmod 0700 %s' to keep them private",
                            home, user, home)


c.Spawner.pre_spawn_hook = setup_user_storage
