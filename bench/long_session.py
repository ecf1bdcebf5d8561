"""Speed that does not decay (issue 14): a long session's cells, `%layers`, and live `%layers` outputs.

Three ratios, each measured beside its comparison in the same run, through
the Jupyter protocol (a stacker-kernel on busybox, cache off so every cell
is a real step with its snapshot):

- a `true` cell at step 1000 beside the same cell at step 10 (goal <= 1.1x);
  the two kernels take turns, cell by cell, as do the two of the last case;
- the first `%layers` at 1000 steps (goal < 0.5 s), beside a `true` cell;
- a `true` cell with five live `%layers` widget outputs over 200 steps,
  beside a kernel with the same 200 steps and no `%layers` output (goal <= 1.1x).

A cell's time is the wall time from its execute_request to its `idle`
status (so work the kernel does after the reply, such as refreshing
widgets, is counted), the median over a batch of cells.

    STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/$USER python bench/long_session.py [STEPS]
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from stacker_kernel.kernel.install import write_spec
from stacker_kernel.kernel.runner import NotebookKernel

REPO = Path(__file__).resolve().parent.parent
BATCH = 20


class Kernel:
    """A stacker-kernel on busybox with the cache off, counting its steps."""

    def __init__(self, nbdir: Path, kernels: Path, name: str):
        self.k = NotebookKernel(nbdir / f"{name}-{uuid.uuid4().hex[:6]}.ipynb", kernels_dir=kernels)
        self.steps = 0
        for line in ("%from tar busybox.tar", "%cache off"):
            self.run(line)

    def run(self, code: str) -> float:
        t = time.monotonic()
        run = self.k.execute(code, f"c{uuid.uuid4().hex[:12]}", timeout=120)
        if run.status != "ok":
            raise SystemExit(f"{code!r} failed: {run.error}")
        return time.monotonic() - t

    def steps_to(self, n: int) -> None:
        while self.steps < n:
            self.run("true")
            self.steps += 1

    def cell_ms(self) -> float:
        """Median ms of BATCH `true` cells (each one more step)."""
        times = [self.run("true") * 1000 for _ in range(BATCH)]
        self.steps += BATCH
        return statistics.median(times)

    def widget_front_end(self) -> None:
        """What JupyterLab's widget manager does when it connects (then %layers shows a widget)."""
        from ipywidgets._version import __control_protocol_version__

        kc = self.k.kc
        kc.shell_channel.send(kc.session.msg(
            "comm_open", {"comm_id": uuid.uuid4().hex, "target_name": "jupyter.widget.control",
                          "data": {}}, metadata={"version": __control_protocol_version__}))
        time.sleep(0.5)

    def close(self) -> None:
        self.k.close()


def alternate(a: Kernel, b: Kernel) -> tuple[float, float]:
    """Median ms of BATCH `true` cells in each of `a` and `b`, taken in turns (a machine
    busy with other work slows both alike)."""
    ta, tb = [], []
    for _ in range(BATCH):
        ta.append(a.run("true") * 1000)
        tb.append(b.run("true") * 1000)
    a.steps += BATCH
    b.steps += BATCH
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp:
        root = Path(tmp)
        kernels = root / "kernels"
        write_spec(kernels / "stacker")
        nbdir = root / "nb"
        nbdir.mkdir()
        subprocess.run([str(REPO / "scripts" / "busybox-rootfs.sh"), str(nbdir / "busybox.tar")],
                       check=True)

        short, long = Kernel(nbdir, kernels, "short"), Kernel(nbdir, kernels, "long")
        try:
            short.steps_to(10)
            long.steps_to(steps)
            at_10, at_n = alternate(short, long)
            plain = short.run("true")
            layers = long.run("%layers")
        finally:
            short.close()
            long.close()
        print(f"\na long session (busybox, cache off): median of {BATCH} `true` cells, request -> idle,")
        print("taken in turns in two kernels")
        print(f"{'':<44} {'ms':>9}")
        print(f"{'cell at step 10':<44} {at_10:>9.1f}")
        print(f"{f'cell at step {steps}':<44} {at_n:>9.1f}")
        print(f"{f'first %layers at {steps + BATCH} steps':<44} {layers * 1000:>9.1f}")
        print(f"{'a `true` cell just before it':<44} {plain * 1000:>9.1f}")
        print(f"step {steps} / step 10: {at_n / at_10:.2f}x (goal <= 1.1x); "
              f"first %layers: {layers:.3f} s (goal < 0.5 s)", flush=True)

        widget_steps = 200
        none, five = Kernel(nbdir, kernels, "none"), Kernel(nbdir, kernels, "five")
        try:
            for k in (none, five):
                k.widget_front_end()
                k.steps_to(widget_steps - BATCH)
            for _ in range(5):
                five.run("%layers")
            alternate(none, five)  # the outputs' first refreshes
            without, with_five = alternate(none, five)
        finally:
            none.close()
            five.close()
        print(f"\n{widget_steps} steps, a widget front-end connected: median of {BATCH} `true` cells,")
        print("taken in turns in two kernels")
        print(f"{'':<44} {'ms':>9}")
        print(f"{'no %layers output':<44} {without:>9.1f}")
        print(f"{'five live %layers outputs':<44} {with_five:>9.1f}")
        print(f"five outputs / none: {with_five / without:.2f}x (goal <= 1.1x)", flush=True)


if __name__ == "__main__":
    main()
