"""Server side of the JupyterLab extension: two POST endpoints under /stacker-kernel/.

- `shell` {"path": notebook (relative to the server root) or "notebook": its absolute
  path}: a server terminal running `stacker-kernel chroot -f NOTEBOOK` (a throwaway copy of
  the notebook's current or kept failed state), whose first line says nothing is kept;
  answers {"name": terminal name} for `terminal:open`.
- `open-as-notebook` {"path": a Dockerfile, Containerfile or stacker.yaml}: runs
  `stacker-kernel import` to write NAME.ipynb beside it (never over a file) and answers
  {"path": the notebook, relative to the root}.

Both stay thin: the CLI does the work, its one-line error is the answer's "message".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

NOTICE = "stacker-kernel: a throwaway copy of {name}'s state: nothing done here is kept"


def _cli() -> list[str]:
    return [sys.executable, "-P", "-m", "stacker_kernel"]


class _Base(APIHandler):
    def _inside_root(self, path: str) -> str:
        """The real path of `path` (relative to the root, or absolute) if it is a file inside the root."""
        root = os.path.realpath(self.settings["server_root_dir"])
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path.lstrip("/")))
        if os.path.commonpath([root, full]) != root or not os.path.isfile(full):
            raise web.HTTPError(400, f"{path}: no such file under the server's root")
        return full

    def _fail(self, status: int, message: str) -> None:
        self.set_status(status)
        self.finish(json.dumps({"message": message}))


class ShellHandler(_Base):
    @web.authenticated
    def post(self) -> None:
        body = self.get_json_body() or {}
        notebook = self._inside_root(str(body.get("notebook") or body.get("path") or ""))
        manager = self.settings.get("terminal_manager")
        if manager is None:
            return self._fail(503, "this server has terminals turned off")
        notice = NOTICE.format(name=os.path.basename(notebook))
        command = ["/bin/sh", "-c", 'printf "%s\\n" "$0"; exec "$@"', notice,
                   *_cli(), "chroot", "-f", notebook]
        model = manager.create(shell_command=command, cwd=os.path.dirname(notebook))
        self.finish(json.dumps({"name": model["name"]}))


def notebook_name(source: str) -> str:
    """NAME.ipynb beside `source`, never an existing file: Dockerfile -> Dockerfile.ipynb,
    stacker.yaml -> stacker.ipynb, then NAME-2.ipynb, ..."""
    folder, base = os.path.split(source)
    stem = base[:-5] if base.endswith(".yaml") else base[:-4] if base.endswith(".yml") else base
    candidate, n = os.path.join(folder, stem + ".ipynb"), 2
    while os.path.lexists(candidate):
        candidate, n = os.path.join(folder, f"{stem}-{n}.ipynb"), n + 1
    return candidate


class OpenAsNotebookHandler(_Base):
    @web.authenticated
    def post(self) -> None:
        body = self.get_json_body() or {}
        source = self._inside_root(str(body.get("path") or ""))
        target = notebook_name(source)
        r = subprocess.run([*_cli(), "import", source, "-o", target], capture_output=True,
                           text=True, cwd=os.path.dirname(source), stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            return self._fail(400, lines[-1] if lines else f"import of {body.get('path')} failed")
        root = os.path.realpath(self.settings["server_root_dir"])
        self.finish(json.dumps({"path": os.path.relpath(target, root)}))


def setup_handlers(serverapp) -> None:
    web_app = serverapp.web_app
    base = url_path_join(web_app.settings["base_url"], "stacker-kernel")
    web_app.add_handlers(".*$", [(url_path_join(base, "shell"), ShellHandler),
                                 (url_path_join(base, "open-as-notebook"), OpenAsNotebookHandler)])
