"""Run a notebook headless through the kernel protocol, as JupyterLab would.

Unlike nbclient, every execute_request carries JupyterLab's metadata
(`cellId`, the cell's tags), so the kernel sees the same cell identity as in
the browser: re-runs roll back, and a restarted kernel resumes and replays
from the cache. The kernel starts in the notebook's directory with
JPY_SESSION_NAME set to the notebook's path, as jupyter_server does.

    python -m stacker_kernel.kernel.runner NOTEBOOK [--export stacker.yaml] [--oci-dir oci]

prints one line per code cell (time, ran or cached) and stops at the first
error, with exit status 1.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from stacker_kernel.recipe.model import first_line
from stacker_kernel.recipe.notebook import EXPECTED_ERROR_TAG


@dataclass
class CellRun:
    """The result of one execute_request."""

    index: int                 # 1-based position among the code cells (0 for extra requests)
    cell_id: str | None
    first_line: str
    status: str                # "ok" or "error" (or "aborted")
    seconds: float             # execute_request sent -> execute_reply received
    cached: bool
    outputs: list[dict] = field(default_factory=list)  # nbformat outputs
    error: str | None = None   # "ename: evalue" when status is error
    expected_error: bool = False  # the cell is tagged raises-exception (JupyterLab goes on past it)

    def text(self) -> str:
        """All stream and text/plain output, concatenated."""
        parts = []
        for out in self.outputs:
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
        return "".join(parts)

    def stream_text(self) -> str:
        """Only what the cell printed (stream output): no status line, no tables."""
        return "".join(out.get("text", "") for out in self.outputs if out.get("output_type") == "stream")


class NotebookKernel:
    """A stacker kernel serving one notebook, started like jupyter_server starts it."""

    def __init__(self, notebook: Path, kernel_name: str = "stacker",
                 env: dict[str, str] | None = None, kernels_dir: Path | None = None) -> None:
        """Start the kernel; `kernels_dir` (a directory of kernel specs) overrides Jupyter's path."""
        self.notebook = notebook.absolute()
        if kernels_dir is not None:
            specs = KernelSpecManager(kernel_dirs=[str(kernels_dir)])
            self.km = KernelManager(kernel_name=kernel_name, kernel_spec_manager=specs)
        else:
            self.km = KernelManager(kernel_name=kernel_name)
        kernel_env = dict(os.environ if env is None else env)
        kernel_env["JPY_SESSION_NAME"] = str(self.notebook)
        self.km.start_kernel(cwd=str(self.notebook.parent), env=kernel_env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str, cell_id: str | None = None, tags: list[str] | None = None,
                timeout: float = 600, index: int = 0,
                on_output: Callable[[dict], None] | None = None) -> CellRun:
        """Send one JupyterLab-shaped execute_request and wait for its reply and outputs."""
        metadata: dict[str, Any] = {"tags": list(tags or [])}
        if cell_id is not None:
            metadata["cellId"] = cell_id
        msg = self.kc.session.msg("execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}, metadata=metadata)
        started = time.monotonic()
        self.kc.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        reply = None
        while reply is None:
            remaining = timeout - (time.monotonic() - started)
            if remaining <= 0:
                raise TimeoutError(f"no execute_reply within {timeout:.0f} s")
            try:
                candidate = self.kc.get_shell_msg(timeout=remaining)
            except queue.Empty:
                continue
            if candidate["parent_header"].get("msg_id") == msg_id:
                reply = candidate
        seconds = time.monotonic() - started
        outputs = self._outputs(msg_id, on_output)
        content = reply["content"]
        error = None
        if content["status"] == "error":
            error = f"{content.get('ename')}: {content.get('evalue')}"
        cached = bool(reply.get("metadata", {}).get("stacker", {}).get("cached"))
        return CellRun(index, cell_id, first_line(code), content["status"], seconds, cached,
                       outputs, error)

    def _outputs(self, msg_id: str, on_output: Callable[[dict], None] | None) -> list[dict]:
        """iopub outputs of `msg_id` up to its `idle` status, as nbformat outputs."""
        outputs: list[dict] = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                return outputs
            if kind in ("stream", "display_data", "execute_result", "error"):
                out = nbformat.v4.output_from_msg(msg)
                outputs.append(out)
                if on_output is not None:
                    on_output(out)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def run_notebook(path: Path, kernel_name: str = "stacker", timeout: float = 600,
                 on_cell: Callable[[CellRun], None] | None = None,
                 extra: list[str] = (), write_outputs: Path | None = None,
                 kernels_dir: Path | None = None) -> list[CellRun]:
    """Run every code cell of `path` in order in a new kernel, stopping at the first error.

    `extra` cells (e.g. `%export stacker.yaml`) run after the notebook when it
    succeeded. With `write_outputs`, the executed notebook is saved there;
    `kernels_dir` is as for NotebookKernel.
    """
    nb = nbformat.read(path, as_version=4)
    kernel = NotebookKernel(path, kernel_name, kernels_dir=kernels_dir)
    runs: list[CellRun] = []
    try:
        code_cells = [c for c in nb.cells if c.cell_type == "code"]
        for n, cell in enumerate(code_cells, 1):
            run = kernel.execute(cell.source, cell.get("id"), cell.metadata.get("tags"),
                                 timeout, index=n)
            cell.outputs = [nbformat.from_dict(o) for o in run.outputs]
            run.expected_error = EXPECTED_ERROR_TAG in (cell.metadata.get("tags") or [])
            runs.append(run)
            if on_cell:
                on_cell(run)
            if run.status != "ok" and not run.expected_error:
                break
        else:
            for code in extra:
                run = kernel.execute(code, None, None, timeout)
                runs.append(run)
                if on_cell:
                    on_cell(run)
                if run.status != "ok":
                    break
    finally:
        kernel.close()
    if write_outputs is not None:
        nbformat.write(nb, write_outputs)
    return runs


def print_cell(run: CellRun, total: int) -> None:
    """One line per cell: position, cell id, time, ran/cached/failed, first line."""
    what = ("cached" if run.cached else "ran" if run.status == "ok"
            else "failed as expected" if run.expected_error else "FAILED")
    where = f"[{run.index:>2}/{total}]" if run.index else "[extra]"
    print(f"{where} {run.cell_id or '-':<14} {run.seconds * 1000:8.0f} ms  {what:<6}  "
          f"{run.first_line[:60]}", flush=True)
    if run.status != "ok" and not run.expected_error:
        print(run.text().rstrip(), file=sys.stderr)
        print(f"error: {run.error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a stacker notebook headless, like "
                                     "JupyterLab's Restart & Run All.")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--kernel", default="stacker", help="kernel spec name (default: stacker)")
    parser.add_argument("--export", metavar="YAML", help="write the stacker.yaml here afterwards")
    parser.add_argument("--oci-dir", metavar="DIR", help="export the OCI image layout here afterwards")
    parser.add_argument("--output", type=Path, help="save the executed notebook here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    total = sum(1 for c in nb.cells if c.cell_type == "code")
    extra = []
    if args.export:
        extra.append(f"%export {Path(args.export).absolute()}")
    if args.oci_dir:
        extra.append(f"%export oci {Path(args.oci_dir).absolute()}")
    started = time.monotonic()
    runs = run_notebook(args.notebook, args.kernel, args.timeout,
                        on_cell=lambda r: print_cell(r, total), extra=extra,
                        write_outputs=args.output)
    failed = any(r.status != "ok" and not r.expected_error for r in runs)
    cells = [r for r in runs if r.index]
    print(f"{len(cells)}/{total} cells, {sum(r.cached for r in cells)} cached, "
          f"{time.monotonic() - started:.2f} s in all" + (" -- stopped at an error" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
