"""The JupyterLab extension: its prebuilt frontend (prebuilt/, built from labextension/ at
the repository root by scripts/build-labextension.sh and installed as
share/jupyter/labextensions/stacker-kernel-extension) and the server side it calls
(handlers.py), a jupyter_server extension enabled by the package's
etc/jupyter/jupyter_server_config.d/stacker_kernel.json."""
from __future__ import annotations


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "stacker_kernel.labextension"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "prebuilt", "dest": "stacker-kernel-extension"}]


def _load_jupyter_server_extension(serverapp) -> None:
    from stacker_kernel.labextension.handlers import setup_handlers

    setup_handlers(serverapp)
