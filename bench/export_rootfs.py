"""A whole Debian rootfs exported into a fresh OCI layout: ours beside `umoci repack`
and `buildah push oci:`, in interleaved rounds (issue 14).

Ours: `export_image` of one image whose only layer is the rootfs snapshot
(diff against nothing, tar, gzip, config, manifest, index) into an empty
layout. umoci: `umoci repack` of the same tree unpacked in a bundle, into a
copy of an empty layout (it walks, tars and compresses the whole tree).
buildah: `buildah push IMAGE oci:DIR` of the same rootfs committed once
beforehand to a throwaway buildah storage (as root only; it reads its layer
diff from that storage, tars and compresses it). Each round runs the three
in turn, so the machine's load hits all alike; the figures are medians.

    sudo STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/root python bench/export_rootfs.py [--rounds N] [--profile] [ROOTFS.tar]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.oci.export import ImageSpec, export_image
from stacker_kernel.oci import tarwriter
from stacker_kernel.storage import btrfs

REPO = Path(__file__).resolve().parent.parent


def rootfs_tar(given: str | None) -> str:
    if given:
        return given
    env = dict(os.environ)
    shared = Path("/home/sktest/.cache/stacker-kernel/debian-bookworm-minbase.tar")
    if "STACKER_KERNEL_DEBIAN_TAR" not in env and shared.is_file():
        env["STACKER_KERNEL_DEBIAN_TAR"] = str(shared)  # the test user's copy: no second mmdebstrap
    return subprocess.run([str(REPO / "scripts/debian-rootfs.sh")], check=True, capture_output=True,
                          text=True, env=env).stdout.strip()


def _untar(tar: str, dest: str) -> None:
    subprocess.run(["tar", "-xpf", tar, "--numeric-owner", "--exclude=./dev/*", "-C", dest], check=True)


class Umoci:
    def __init__(self, work: Path, tar: str):
        self.flag = ["--rootless"] if os.geteuid() != 0 else []
        self.empty, self.bundle, self.work = work / "umoci-empty", work / "bundle", work
        subprocess.run(["umoci", "init", "--layout", str(self.empty)], check=True)
        subprocess.run(["umoci", "new", "--image", f"{self.empty}:base"], check=True)
        subprocess.run(["umoci", "unpack", *self.flag, "--image", f"{self.empty}:base", str(self.bundle)],
                       check=True, capture_output=True)
        _untar(tar, str(self.bundle / "rootfs"))

    def once(self, n: int) -> float:
        layout = self.work / f"umoci-{n}"
        shutil.copytree(self.empty, layout)
        t = time.perf_counter()
        subprocess.run(["umoci", "repack", "--image", f"{layout}:rootfs", str(self.bundle)], check=True,
                       capture_output=True)
        took = time.perf_counter() - t
        shutil.rmtree(layout)
        return took


class Buildah:
    def __init__(self, work: Path, tar: str):
        self.work = Path(tempfile.mkdtemp(prefix="bench-buildah-", dir="/var/tmp"))
        self.base = ["buildah", "--root", str(self.work / "root"), "--runroot", str(self.work / "run"),
                     "--storage-driver", "overlay"]
        ctr = self._out("from", "scratch")
        mnt = self._out("mount", ctr)
        _untar(tar, mnt)
        self._out("umount", ctr)
        self._out("commit", "--quiet", ctr, "bench-rootfs")
        self.out = work

    def _out(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True).stdout.strip()

    def once(self, n: int) -> float:
        layout = self.out / f"buildah-{n}"
        t = time.perf_counter()
        self._out("push", "--quiet", "bench-rootfs", f"oci:{layout}:rootfs")
        took = time.perf_counter() - t
        shutil.rmtree(layout)
        return took

    def close(self) -> None:
        subprocess.run([*self.base, "rm", "--all"], capture_output=True)
        subprocess.run([*self.base, "rmi", "--all", "--force"], capture_output=True)
        subprocess.run(["umount", "-R", str(self.work / "root" / "overlay")], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)


def ours_once(work: Path, snap: str, n: int) -> float:
    layout = work / f"ours-{n}"
    t = time.perf_counter()
    export_image(str(layout), [ImageSpec("rootfs", object(), base_rootfs=snap)], source_date_epoch=1700000000)
    took = time.perf_counter() - t
    shutil.rmtree(layout)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rootfs", nargs="?", help="rootfs tarball (default: scripts/debian-rootfs.sh)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile one export of ours (in the helper) instead")
    args = ap.parse_args()
    tar = rootfs_tar(args.rootfs)
    storage = Path(os.environ.get("STACKER_KERNEL_STORAGE", "/var/lib/stacker-kernel/btrfs/root"))
    work = Path(tempfile.mkdtemp(prefix="bench-export-rootfs-", dir=storage))
    buildah = None
    try:
        live = work / "live"
        btrfs.create_subvolume(live)
        run_in_userns(_untar, tar, str(live))
        snap = str(work / "s0")
        btrfs.snapshot(live, snap, readonly=True)
        if args.profile:
            import cProfile
            import pstats

            from stacker_kernel.oci.diff import diff_snapshots

            def profiled(out: str) -> str:
                prof = cProfile.Profile()
                prof.enable()
                tarwriter.write_layer(snap, diff_snapshots(None, snap), out)
                prof.disable()
                stats = pstats.Stats(prof).sort_stats("cumulative")
                stats.print_stats(25)
                return ""
            run_in_userns(profiled, str(work / "prof"))
            return
        umoci = Umoci(work, tar)
        if os.geteuid() == 0 and shutil.which("buildah"):
            buildah = Buildah(work, tar)
        rows: dict[str, list[float]] = {"ours": [], "umoci repack": [], "buildah push oci:": []}
        for n in range(args.rounds):
            rows["ours"].append(ours_once(work, snap, n))
            rows["umoci repack"].append(umoci.once(n))
            if buildah is not None:
                rows["buildah push oci:"].append(buildah.once(n))
    finally:
        if buildah is not None:
            buildah.close()
        btrfs.remove_tree(work)
    entries = int(subprocess.run(f"tar -tf {tar} | wc -l", shell=True, capture_output=True, text=True).stdout)
    print(f"rootfs: {tar} ({entries} entries); gzip: {'pigz' if shutil.which('pigz') else 'zlib'} "
          f"level {tarwriter.GZIP_LEVEL}; {args.rounds} interleaved rounds, into a fresh layout each")
    ours = statistics.median(rows["ours"])
    print(f"{'':<22}{'median s':>10}{'min s':>8}{'ours / it':>11}")
    for name, times in rows.items():
        if not times:
            print(f"{name:<22}{'(not run: root only)':>29}")
            continue
        med = statistics.median(times)
        ratio = "" if name == "ours" else f"{ours / med:.2f}x"
        print(f"{name:<22}{med:>10.2f}{min(times):>8.2f}{ratio:>11}")
    print("goal: ours / each <= 1.0x")


if __name__ == "__main__":
    main()
