"""Export time per layer, ours beside `umoci repack`, measured in one run.

A Debian minbase rootfs (scripts/debian-rootfs.sh) plus three steps: one
touching a single file, one installing a package (dpkg-deb -x of a .deb from
apt's cache, or of a generated tree when the cache is empty), one deleting a
directory. For each layer: our diff + tar+gzip layer (inside the user
namespace, on read-only btrfs snapshots) beside `umoci repack --refresh-bundle`
of the same change in an unpacked bundle (umoci re-hashes every file), and
our layer again as zstd (`--compression zstd`: zstd -T0).

    STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/root python bench/export.py [ROOTFS.tar]
"""
from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.oci.diff import diff_snapshots
from stacker_kernel.oci.export import ImageSpec, StepSnapshot, export_image
from stacker_kernel.oci.tarwriter import write_layer
from stacker_kernel.storage import btrfs

REPO = Path(__file__).resolve().parent.parent


def sh(script: str, cwd: str) -> None:
    subprocess.run(["/bin/sh", "-ec", script], cwd=cwd, check=True)


def steps(deb: str | None) -> list[tuple[str, str]]:
    """(label, shell script run in the rootfs directory)."""
    install = (f"dpkg-deb -x {deb} ." if deb else
               "mkdir -p opt/pkg && for i in $(seq 200); do head -c 20000 /dev/urandom > opt/pkg/f$i; done")
    return [("one-file step", "echo 'bench' > etc/motd"),
            ("install a package", install),
            ("delete a directory", "rm -rf usr/share/doc")]


def our_layers(pairs: list[tuple[str | None, str]], out: str,
               compression: str = "gzip") -> list[tuple[float, int, int]]:
    """(seconds, entries, blob bytes) per (old, new) pair; runs in the userns."""
    res = []
    for old, new in pairs:
        t = time.perf_counter()
        d = diff_snapshots(old, new)
        blob = write_layer(new, d, out, compression=compression)
        res.append((time.perf_counter() - t, len(d.changes), blob.size))
    return res


def umoci_repacks(work: Path, rootfs_tar: str, scripts: list[str], rootless: bool) -> list[float]:
    """Seconds of each `umoci repack`: the whole rootfs, then each step."""
    flag = ["--rootless"] if rootless else []
    layout, bundle = work / "umoci-layout", work / "bundle"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:base"], check=True)
    subprocess.run(["umoci", "unpack", *flag, "--image", f"{layout}:base", str(bundle)], check=True, capture_output=True)
    subprocess.run(["tar", "-xpf", rootfs_tar, "--numeric-owner", "--exclude=./dev/*", "-C", str(bundle / "rootfs")], check=True)
    times = []
    for i, script in enumerate([None] + scripts):
        if script:
            sh(script, str(bundle / "rootfs"))
        t = time.perf_counter()
        subprocess.run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:s{i}", str(bundle)], check=True,
                       capture_output=True)
        times.append(time.perf_counter() - t)
    return times


# A typical package, the same on every machine: ~7 MB, ~2000 files.
PACKAGE = "vim-runtime"


def fetch_package(name: str) -> str | None:
    """`apt-get download` the package into a temp dir (the Debian mirror); else the
    largest cached .deb up to 20 MB; else None (the step is left out)."""
    tmp = tempfile.mkdtemp(prefix="bench-deb-")
    atexit.register(shutil.rmtree, tmp, True)
    if subprocess.run(["apt-get", "download", "-q", name], cwd=tmp, capture_output=True).returncode == 0:
        found = glob.glob(os.path.join(tmp, "*.deb"))
        if found:
            return found[0]
    debs = sorted((d for d in glob.glob("/var/cache/apt/archives/*.deb") if os.path.getsize(d) <= 20e6),
                  key=os.path.getsize)
    return debs[-1] if debs else None


def main() -> None:
    rootfs_tar = sys.argv[1] if len(sys.argv) > 1 else subprocess.run(
        [str(REPO / "scripts/debian-rootfs.sh")], check=True, capture_output=True, text=True).stdout.strip()
    storage = Path(os.environ.get("STACKER_KERNEL_STORAGE", "/var/lib/stacker-kernel/btrfs/root"))
    deb = fetch_package(PACKAGE)
    plan = steps(deb)
    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=storage))
    try:
        live = work / "live"
        btrfs.create_subvolume(live)
        run_in_userns(lambda: subprocess.run(["tar", "-xpf", rootfs_tar, "--numeric-owner", "--exclude=./dev/*", "-C", str(live)], check=True))
        snaps = [str(work / "s0")]
        btrfs.snapshot(live, snaps[0], readonly=True)
        for i, (_, script) in enumerate(plan, 1):
            run_in_userns(sh, script, str(live))
            snaps.append(str(work / f"s{i}"))
            btrfs.snapshot(live, snaps[-1], readonly=True)
        pairs = [(None, snaps[0])] + list(zip(snaps, snaps[1:]))
        ours = run_in_userns(our_layers, pairs, str(work / "layers"))
        zstd = run_in_userns(our_layers, pairs, str(work / "layers"), "zstd")  # --compression zstd
        t = time.perf_counter()
        export_image(str(work / "oci"), [ImageSpec("bench", object(), [StepSnapshot(s, lbl) for s, (lbl, _) in zip(snaps[1:], plan)],
                                                   base_rootfs=snaps[0])], source_date_epoch=1700000000)
        whole = time.perf_counter() - t
        theirs = umoci_repacks(work, rootfs_tar, [s for _, s in plan], rootless=os.geteuid() != 0)
    finally:
        btrfs.remove_tree(work)
    labels = ["whole rootfs (base)"] + [lbl for lbl, _ in plan]
    print(f"rootfs: {rootfs_tar}; package: {deb or 'generated files'}; pigz: {bool(shutil.which('pigz'))}")
    print(f"{'layer':<22} {'entries':>8} {'gzip MB':>8} {'ours s':>8} {'umoci s':>8} {'umoci/ours':>10}"
          f" {'zstd MB':>8} {'zstd s':>8}")
    for label, (secs, entries, size), u, (zsecs, _, zsize) in zip(labels, ours, theirs, zstd):
        print(f"{label:<22} {entries:>8} {size / 1e6:>8.1f} {secs:>8.3f} {u:>8.3f} {u / secs:>9.1f}x"
              f" {zsize / 1e6:>8.1f} {zsecs:>8.3f}")
    print(f"export_image of the whole chain (4 layers, config, manifest): {whole:.3f} s; "
          f"umoci total {sum(theirs):.3f} s")


if __name__ == "__main__":
    main()
