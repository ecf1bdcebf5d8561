#!/usr/bin/env bash
# Install what a team JupyterHub for stacker-kernel needs (as root, idempotent),
# on a host where scripts/setup-host.sh (or an install of stacker-kernel into
# $STACKER_KERNEL_VENV) already ran:
#   - jupyterhub and jupyterlab (PyPI) into the stacker-kernel venv,
#   - configurable-http-proxy (npm, as JupyterHub's docs install it),
#   - the stacker kernel spec in the venv, readable by every user,
#   - the group `stacker-users` whose members may log in.
# With --service it also replaces an editable install of stacker-kernel in the
# venv by a wheel built from this checkout (deploy/install-package.sh), and
# installs the hub's config as /etc/stacker-kernel/jupyterhub_config.py and a systemd unit
# `stacker-jupyterhub.service` (not started: `systemctl enable --now stacker-jupyterhub`).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (it installs into the venv, npm and /etc)" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
VENV=${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}
[ -x "$VENV/bin/stacker-kernel" ] || {
  echo "install.sh: no stacker-kernel in $VENV: run scripts/setup-host.sh first (or set STACKER_KERNEL_VENV)" >&2; exit 1; }

# Only add packages: never reinstall stacker-kernel itself (it may be an editable checkout).
if ! "$VENV/bin/python" -c 'import jupyterhub, jupyterlab' 2>/dev/null; then
  "$VENV/bin/pip" install -q "jupyterhub>=5" "jupyterlab>=4"
fi

if ! command -v configurable-http-proxy >/dev/null; then
  command -v npm >/dev/null || {
    echo "install.sh: npm is missing: install Node.js and npm (apt-get install nodejs npm), then run this again" >&2; exit 1; }
  npm install -g --no-fund --no-audit configurable-http-proxy
fi

# The spec must be readable by every user whose server lists kernels.
"$VENV/bin/stacker-kernel" install --sys-prefix
chmod -R a+rX "$VENV/share/jupyter/kernels/stacker"

getent group stacker-users >/dev/null || groupadd --system stacker-users

if [ "${1:-}" = --service ]; then
  # A deployed hub runs the package, not a checkout (setup-host.sh's venv is an
  # editable install of it, for development): replace it with a built wheel.
  if "$VENV/bin/python" -c '
import json, sys
from importlib.metadata import distribution
url = distribution("stacker-kernel").read_text("direct_url.json")
sys.exit(0 if url and json.loads(url).get("dir_info", {}).get("editable") else 1)'; then
    "$here/../install-package.sh" "$VENV"
  fi
  install -d -m 0755 /etc/stacker-kernel
  install -m 0644 "$here/jupyterhub_config.py" /etc/stacker-kernel/jupyterhub_config.py
  install -d -m 0700 /srv/jupyterhub
  sed "s|@VENV@|$VENV|g" "$here/stacker-jupyterhub.service" > /etc/systemd/system/stacker-jupyterhub.service
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
  echo "installed; start it with: systemctl enable --now stacker-jupyterhub"
fi
