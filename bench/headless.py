"""A fully cached headless build (issue 14): `stacker-kernel build -f NOTEBOOK.ipynb`
when every step is in the cache and the OCI layout already holds the images.

Measured in one run, rounds taken in turn: the whole command (a fresh
interpreter each time, as a user or CI runs it), the interpreter alone
(`python -c pass`), and the imports the command makes (`python -c 'import
stacker_kernel.cli, stacker_kernel.engine.build'`); for scale, what importing
nbformat (and jsonschema with it) alone costs, which the build no longer
pays. The notebook has a busybox base and ten small steps.

    STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/$USER python bench/headless.py [--rounds N]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 10


def busybox_tar(dest: Path) -> None:
    """A minimal rootfs: the host's busybox (static) as /bin/sh, as tests/conftest.py makes it."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("busybox is needed (apt-get install busybox-static)")
    with tarfile.open(dest, "w") as tar:
        for d in ("bin", "etc", "tmp", "dev", "proc", "sys", "root"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        data = Path(busybox).read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for tool in ("sh", "echo", "true", "mkdir", "cat"):
            link = tarfile.TarInfo(f"bin/{tool}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)


def notebook(path: Path) -> None:
    sources = ["%layer app\n%from tar busybox.tar\necho 0 > /s0"] + [f"echo {i} > /s{i}" for i in range(1, STEPS)]
    cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
              "source": src} for i, src in enumerate(sources)]
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "cells": cells, "metadata": {
        "kernelspec": {"name": "stacker", "display_name": "Stacker", "language": "stacker"}}}))


def timed(argv: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stdout}{proc.stderr}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    py = sys.executable
    env_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = env_path
    work = Path(tempfile.mkdtemp(prefix="bench-headless-"))
    try:
        busybox_tar(work / "busybox.tar")
        notebook(work / "app.ipynb")
        build = [py, "-m", "stacker_kernel", "build", "-f", "app.ipynb", "--oci-dir", "oci"]
        timed(build, work)  # runs the steps and writes the layout once
        rows: dict[str, list[float]] = {"cached build, whole command": [], "python -c pass": [],
                                        "imports of the command": [], "import nbformat (not paid)": []}
        argvs = {"cached build, whole command": build,
                 "python -c pass": [py, "-c", "pass"],
                 "imports of the command": [py, "-c", "import stacker_kernel.cli, stacker_kernel.engine.build"],
                 "import nbformat (not paid)": [py, "-c", "import nbformat"]}
        for _ in range(args.rounds):
            for name, argv in argvs.items():
                rows[name].append(timed(argv, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(times) for name, times in rows.items()}
    whole = med["cached build, whole command"]
    print(f"notebook: busybox base + {STEPS} steps, all cached, layout up to date; "
          f"median of {args.rounds} rounds taken in turns")
    print(f"{'':<30}{'median s':>10}{'share':>8}")
    for name, value in med.items():
        share = f"{value / whole:.0%}" if name != "import nbformat (not paid)" else ""
        print(f"{name:<30}{value:>10.3f}{share:>8}")
    print(f"imports beyond the interpreter: {med['imports of the command'] - med['python -c pass']:.3f} s "
          f"of {whole:.3f} s; before issue 14 the build also imported nbformat "
          f"(+{med['import nbformat (not paid)'] - med['python -c pass']:.3f} s)")


if __name__ == "__main__":
    main()
