#!/bin/sh
# Rebuild the JupyterLab extension's frontend (labextension/) into
# stacker_kernel/labextension/prebuilt, which is committed: installing the package
# needs no Node. Needs Node 20 + npm and the venv's JupyterLab (for its core
# package versions). Not run by CI.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${STACKER_KERNEL_VENV:-/opt/stacker-kernel/venv}
staging=$("$venv/bin/python" -c 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging"))')
cd "$here/labextension"
npm ci --no-audit --no-fund
npx tsc
node node_modules/@jupyterlab/builder/lib/build-labextension.js --core-path "$staging" .
echo "built $here/stacker_kernel/labextension/prebuilt"
