"""End-to-end time of a trivial cell, and of a cached Restart & Run All, in one run.

For stacker-kernel (a real step: container, pty, read-only btrfs snapshot,
cache off so every cell runs), bash_kernel (no container, no snapshot) and
ipykernel's Python kernel (the protocol floor): the median time from sending
an execute_request for `true` (Python: `pass`) to receiving its execute_reply.
Then a 20-cell notebook is built once and re-run in a new kernel, as
JupyterLab's Restart & Run All: every cell is served from the cache.

    STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/$USER python bench/cell.py [N]

Targets (issue 4): trivial cell < 25 ms; cached 20-cell replay < 1 s.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nbformat

from stacker_kernel.kernel.install import write_spec
from stacker_kernel.kernel.runner import NotebookKernel

REPO = Path(__file__).resolve().parent.parent


def install_specs(root: Path) -> Path:
    """stacker, bash and python3 kernel specs in one kernels dir, all on this venv's python."""
    kernels = root / "kernels"
    write_spec(kernels / "stacker")
    prefix = root / "prefix"
    subprocess.run([sys.executable, "-m", "bash_kernel.install", "--prefix", str(prefix)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix),
                    "--name", "python3"], check=True, capture_output=True)
    for name in ("bash", "python3"):
        src = prefix / "share" / "jupyter" / "kernels" / name
        (kernels / name).mkdir(parents=True)
        for f in src.iterdir():
            (kernels / name / f.name).write_bytes(f.read_bytes())
    return kernels


def trivial_cell_ms(kernel: NotebookKernel, code: str, n: int, warmup: int = 5) -> list[float]:
    """Reply times in ms of `n` executions of `code`, each with its own cell id."""
    times = []
    for i in range(warmup + n):
        run = kernel.execute(code, f"trivial-{i}", timeout=60)
        if run.status != "ok":
            raise SystemExit(f"{code!r} failed: {run.error}")
        if i >= warmup:
            times.append(run.seconds * 1000)
    return times


def cached_replay(nbdir: Path, kernels: Path, cells: int = 20) -> tuple[float, float, int]:
    """(run-all seconds, restart + run-all seconds, cached cells) of a re-run of a built notebook."""
    token = uuid.uuid4().hex[:8]
    sources = ["%from tar busybox.tar"] + [f"echo {token}-{i} > /step-{i}" for i in range(cells)]
    nb = nbformat.v4.new_notebook()
    for i, src in enumerate(sources):
        cell = nbformat.v4.new_code_cell(src)
        cell.id = f"cell-{i}"
        nb.cells.append(cell)
    path = nbdir / f"replay-{token}.ipynb"
    nbformat.write(nb, path)

    def run_all() -> tuple[float, float, int]:
        started = time.monotonic()
        kernel = NotebookKernel(path, kernels_dir=kernels)
        try:
            ready = time.monotonic()
            cached = 0
            for cell in nb.cells:
                run = kernel.execute(cell.source, cell.id, timeout=120)
                if run.status != "ok":
                    raise SystemExit(f"cell {cell.id} failed: {run.error}")
                cached += run.cached
            done = time.monotonic()
        finally:
            kernel.close()
        return done - ready, done - started, cached

    run_all()  # the build
    return run_all()  # Restart & Run All


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    with tempfile.TemporaryDirectory(prefix="bench-cell-") as tmp:
        root = Path(tmp)
        kernels = install_specs(root)
        nbdir = root / "nb"
        nbdir.mkdir()
        subprocess.run([str(REPO / "scripts" / "busybox-rootfs.sh"), str(nbdir / "busybox.tar")],
                       check=True)
        results: dict[str, list[float]] = {}
        for name, setup, code in [
            ("python3", [], "pass"),
            ("bash", [], "true"),
            ("stacker", ["%from tar busybox.tar", "%cache off"], "true"),
        ]:
            kernel = NotebookKernel(nbdir / f"trivial-{name}-{uuid.uuid4().hex[:6]}.ipynb",
                                    kernel_name=name, kernels_dir=kernels)
            try:
                for line in setup:
                    run = kernel.execute(line, None, timeout=120)
                    if run.status != "ok":
                        raise SystemExit(f"{line!r} failed: {run.error}")
                results[name] = trivial_cell_ms(kernel, code, n)
            finally:
                kernel.close()
        print_trivial(results, n)
        run_all, with_restart, cached = cached_replay(nbdir, kernels)
    print(f"\nRestart & Run All, 21 cells (base + 20 steps), {cached} served from the cache")
    print(f"{'run all (kernel ready)':<28} {run_all:>10.3f} s")
    print(f"{'restart + run all':<28} {with_restart:>10.3f} s   (target: cached replay < 1 s)")


def print_trivial(results: dict[str, list[float]], n: int) -> None:
    floor = statistics.median(results["python3"])
    print(f"\ntrivial cell, execute_request -> execute_reply, {n} runs each")
    print(f"{'kernel':<28} {'median ms':>10} {'p90 ms':>8} {'x python':>9}")
    labels = {"python3": "ipykernel python (floor)", "bash": "bash_kernel",
              "stacker": "stacker-kernel (snapshot)"}
    for name in ("python3", "bash", "stacker"):
        t = sorted(results[name])
        med = statistics.median(t)
        p90 = t[int(len(t) * 0.9) - 1]
        print(f"{labels[name]:<28} {med:>10.1f} {p90:>8.1f} {med / floor:>9.1f}")
    ratio = statistics.median(results["stacker"]) / statistics.median(results["bash"])
    print(f"stacker-kernel / bash_kernel: {ratio:.2f}  (target: trivial cell < 25 ms)", flush=True)


if __name__ == "__main__":
    main()
