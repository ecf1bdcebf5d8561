"""Run every benchmark script and write docs/benchmarks.md with their tables.

    sudo STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/root python bench/report.py [--out FILE]

Each script measures its figures beside their comparison in the same run and
prints the ratio (bench/snapshot.py: the raw ioctl; bench/step.py: `sh -c
true` and `buildah run` + `buildah commit`; bench/export.py: `umoci repack`;
bench/cell.py: bash_kernel and ipykernel; bench/remote_cache.py: a GET and
untar of the same blobs; bench/long_session.py: step 10, and no %layers output;
bench/headless.py: the interpreter and the imports; bench/versus_buildah.py:
buildah bud, buildah push oci: and mkfs.erofs, as an unprivileged user;
bench/drivers.py: btrfs beside overlay beside rootless buildah). This
script only runs them one after the other, each with a time limit, and writes
their output with the machine it ran on. Run as root so buildah (chroot
isolation) takes part in bench/step.py; bench/versus_buildah.py and
bench/drivers.py run themselves as $SUDO_USER (else sktest).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    """A bench script, its arguments, what it compares, and its time limit in seconds."""
    script: str
    args: tuple[str, ...]
    title: str
    compares: str
    timeout: int


BENCHES = [
    Bench("snapshot.py", ("--repeat", "25"), "Snapshot per step (issue 2)",
          "a read-only snapshot after a small write, and Store.commit, beside the raw SNAP_CREATE_V2 ioctl", 180),
    Bench("step.py", ("--repeat", "30"), "Trivial step and rollback (issue 3)",
          "a `true` step with its snapshot beside `sh -c true` (no container) and beside "
          "`buildah run --isolation chroot` + `buildah commit`; rollback beside its 50 ms target", 300),
    Bench("export.py", (), "Layer export (issue 5)",
          "our diff + tar+gzip layer beside `umoci repack` of the same change", 300),
    Bench("cell.py", ("30",), "Trivial cell and cached Restart & Run All (issue 4)",
          "a trivial cell beside bash_kernel and ipykernel's Python kernel", 300),
    Bench("remote_cache.py", (), "Shared cache through a registry (issue 16)",
          "a Debian notebook built cold with --cache-to, then on an empty store with --cache-from, "
          "beside a plain GET + `tar -xzf` of the same layer blobs from the same registry", 900),
    Bench("long_session.py", ("1000",), "Speed that does not decay (issue 14)",
          "a `true` cell at step 1000 beside one at step 10, the first `%layers` at 1000 steps, and a "
          "cell with five live `%layers` outputs over 200 steps beside one with none", 900),
    Bench("headless.py", ("--rounds", "10"), "Cached headless build (issue 14)",
          "a fully cached `stacker-kernel build -f notebook.ipynb` (fresh interpreter, layout up to date) "
          "beside the interpreter alone and the command's imports, in turns", 300),
    Bench("versus_buildah.py", ("--rounds", "3"), "Beside rootless buildah, as users run both (issue 25)",
          "`stacker-kernel build` of a Dockerfile (OCI layout, SBOM and provenance written) beside `buildah bud`, "
          "`buildah push oci:` and `mkfs.erofs`, every command in a fresh process as an unprivileged user, "
          "pairs taken in turns", 1800),
    Bench("drivers.py", ("--repeat", "15", "--deep", "1000"), "Storage drivers: btrfs and overlay (issue 24)",
          "the overlay driver (a folder on ext4) beside btrfs and beside rootless buildah (overlay through "
          "fuse-overlayfs, as an unprivileged user): a step + commit, rollback, export of one step's layer, "
          "disk per step, and a step at depth 1000 (buildah: 128, its limit) beside one at depth 10, "
          "every row's samples taken in turns", 1200),
]


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return (f"{datetime.date.today().isoformat()}, commit {commit}, Linux {platform.release()}, "
            f"{os.cpu_count()} x {cpu}, Python {platform.python_version()}, "
            f"run as {'root' if os.geteuid() == 0 else 'an unprivileged user'}, load average "
            f"{os.getloadavg()[0]:.1f} at the start (other jobs on the machine inflate every row alike)")


def run(bench: Bench) -> tuple[str, float, bool]:
    """The script's stdout (or why it failed), its wall time, and whether it succeeded."""
    path = REPO / "bench" / bench.script
    t = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(path), *bench.args], capture_output=True, text=True,
                              timeout=bench.timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return f"timed out after {bench.timeout} s", time.monotonic() - t, False
    took = time.monotonic() - t
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return f"exit status {proc.returncode}\n{tail}", took, False
    return proc.stdout.rstrip(), took, True


def render(results: list[tuple[Bench, str, float, bool]], total: float) -> str:
    lines = ["# Benchmarks", "",
             "Written by `bench/report.py`, which runs every script in `bench/`; each figure is measured "
             "beside its comparison in the same run, on the same machine, and the ratio is printed with it. "
             "Medians unless a column says otherwise.", "",
             f"Machine: {machine()}. Whole report: {total:.0f} s.", ""]
    for bench, output, took, ok in results:
        lines += [f"## {bench.title}", "",
                  f"`bench/{bench.script} {' '.join(bench.args)}`".replace(" `", "`") + f" ({took:.0f} s): "
                  f"{bench.compares}.", ""]
        lines += ["```", output if ok else f"FAILED: {output}", "```", ""]
    lines += NOTES
    return "\n".join(lines) + "\n"


NOTES = [
    "## Reading the figures", "",
    "- **Trivial step** includes running `true` in the persistent container over its pty, the "
    "read-only btrfs snapshot and the SQLite record; `sh -c true` is the floor with no container; "
    "`buildah run` + `buildah commit` is what another daemonless builder pays for the same step "
    "(a fresh chroot per run, and a layer diff + image write per commit).",
    "- **Rollback** stops the layer's container (its pid namespace ends with it), deletes the "
    "live subvolume and snapshots the target: a few ms whatever the rootfs size, as the busybox "
    "and Debian rows show; the next step starts a fresh container.",
    "- **Export** compares one layer's diff + tar + gzip with `umoci repack`, which re-hashes "
    "the whole bundle to find the change.",
    "- **Shared cache**: B's steps fetch each entry's manifest and record, download and check "
    "the layer, apply it with the safe extractor onto a snapshot of the parent and commit it; the "
    "floor only downloads and untars. The base import is the same for both users and not counted.",
    "- **Cell** is end to end through the Jupyter protocol: bash_kernel pays its prompt-scraping "
    "round trips, stacker-kernel pays a container step and a snapshot.",
    "- **Long session**: a step's size change is measured by a helper process at nice 19 after "
    "its commit and recorded, so `%layers` only reads records; the history is a table with a row "
    "per step; all `%layers` outputs of a session are views of one widget, whose refresh after a "
    "step builds only the new row.",
    "- **Cached headless build** is the whole command as a user or CI runs it, each time in a "
    "fresh interpreter: a plain nbformat 4 notebook is read as JSON, so neither nbformat nor "
    "jsonschema is imported, and an unchanged layout is left as it is (no layer is made again, "
    "no file is written).",
    "- **Storage drivers**: on overlay a step's commit turns the container's upper directory into "
    "the step's layer, which needs the container's mount of it gone: the container is parked (its "
    "root's processes and mounts end, its user namespace, cgroup and interpreter stay) and its root "
    "is built again on the new stack while the engine finishes the cell. Past 64 layers a stack is "
    "flattened in the background, so a step's mount never stacks more than 65.",
    "- **Beside buildah** (bench/versus_buildah.py) runs both as the same unprivileged user, as "
    "users run them: `stacker-kernel build` writes the OCI layout with an SBOM and provenance (its "
    "defaults), buildah keeps its images in its own storage (overlay through fuse-overlayfs). A "
    "whole-rootfs export takes the layer the store kept from an earlier export (copied and "
    "verified, never compressed again), or compresses it anew through pigz; `buildah push "
    "oci:` compresses every time.",
]


def _sections(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """(lines before the first `## `, title -> the lines of its section), in order."""
    head: list[str] = []
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:]
            sections[current] = []
        if current is None:
            head.append(line)
        else:
            sections[current].append(line)
    return head, sections


def merge(old: str, new: str) -> str:
    """`old` with the sections `new` has replaced (or added before the notes): a run of
    some scripts (--only) keeps the figures of the others, with a line saying when each ran."""
    old_head, old_sections = _sections(old)
    new_head, new_sections = _sections(new)
    machine_line = next((ln for ln in new_head if ln.startswith("Machine: ")), "")
    machine_line = re.sub(r" Whole report: \d+ s\.$", "", machine_line)
    for title, lines in new_sections.items():
        if title == NOTES[0][3:]:
            continue
        lines = lines[:2] + [f"Run on its own: {machine_line[len('Machine: '):]}", ""] + lines[2:]
        old_sections[title] = lines
    notes_title = NOTES[0][3:]
    notes = old_sections.pop(notes_title, None)
    old_sections[notes_title] = new_sections.get(notes_title, notes or [])
    out = list(old_head)
    for lines in old_sections.values():
        out += lines
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--only", action="append", help="run only this script (e.g. step.py); repeatable")
    args = ap.parse_args()
    benches = [b for b in BENCHES if not args.only or b.script in args.only]
    results = []
    t0 = time.monotonic()
    for bench in benches:
        if not (REPO / "bench" / bench.script).exists():
            continue  # a bench another engineer has not delivered yet
        print(f"running bench/{bench.script} …", flush=True)
        output, took, ok = run(bench)
        print(output, flush=True)
        results.append((bench, output, took, ok))
    text = render(results, time.monotonic() - t0)
    if args.only and Path(args.out).exists():
        text = merge(Path(args.out).read_text(), text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0 if all(ok for *_, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
