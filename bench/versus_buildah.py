"""stacker-kernel beside rootless buildah, as users run both (issue 25).

Run as an unprivileged user (e.g. `runuser -u sktest`) with STACKER_KERNEL_STORAGE
set to that user's storage; the bench makes a fresh store below it and a
buildah storage of its own (overlay through fuse-overlayfs, the rootless
overlay driver of buildah 1.28; or `--buildah-driver vfs`), and deletes both.
Every figure is a whole command in a fresh process: `stacker-kernel build`
(OCI layout written, SBOM and provenance attached: the defaults) beside
`buildah bud` / `buildah push` / `mkfs.erofs`. Each round takes every pair in
turn, so the machine's load hits both sides alike; the table shows medians
and the ratio ours / theirs.

Rows (Debian bookworm minbase base, `scripts/debian-rootfs.sh`, imported by
both beforehand: `--base debian:12=tar:` for ours, `FROM scratch` + `ADD` for
buildah):
- rebuild after a late RUN changed: the Dockerfile's last RUN differs each round
  (ours: build; buildah: bud --layers)
- from scratch: every RUN again (ours: build --no-cache; buildah: bud --layers --no-cache)
- fully cached: nothing changed
- whole rootfs -> a fresh OCI layout: a Dockerfile of only `FROM debian:12`
  (ours: build --oci-dir NEW, the layer kept in the store from an earlier
  export, and again with the store's kept layers deleted, compressed anew;
  buildah: push oci:NEW)
- erofs: the same rootfs as an erofs layer, made anew (ours: build --layer-type
  erofs --no-verity; theirs: mkfs.erofs of the same snapshot, as its root)
- cold build with --cache-to: from scratch, pushing each step to a local
  docker-registry (a new repository each round), beside the same build without

    STACKER_KERNEL_STORAGE=$(stacker-kernel storage-path) python bench/versus_buildah.py [--rounds N] [--rows ROW...]
    (as root it runs itself as --as-user, $SUDO_USER or sktest, in that user's storage:
    the checkout must be readable by that user)
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
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from remote_cache import start_registry  # noqa: E402 (bench/remote_cache.py)

from stacker_kernel.container.userns import run_in_userns  # noqa: E402
from stacker_kernel.storage import btrfs  # noqa: E402

# The rows, by the short name --rows takes.
ROWS = {"rebuild": "rebuild after a late RUN changed", "cached": "fully cached", "scratch": "from scratch",
        "cache-to": "cold build with --cache-to (vs without)",
        "kept": "whole rootfs -> fresh OCI layout (layer kept)",
        "anew": "whole rootfs -> fresh OCI layout (compressed anew)",
        "erofs": "erofs layer, made anew (vs mkfs.erofs)"}

DOCKERFILE = """FROM debian:12
RUN cp -a /usr/share /opt/share && rm -rf /opt/share/doc
RUN dd if=/dev/urandom of=/opt/blob bs=1M count=16 status=none
RUN echo {late} > /late
"""


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return took


def debian_tar() -> Path:
    out = subprocess.run([str(REPO / "scripts/debian-rootfs.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _mkfs_erofs(rootfs: str, img: str) -> float:
    t = time.perf_counter()
    subprocess.run(["mkfs.erofs", "--quiet", img, rootfs], check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--buildah-driver", choices=("overlay", "vfs"), default="overlay")
    ap.add_argument("--as-user", help="run as root: the unprivileged user to run as (default $SUDO_USER, else sktest)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, metavar="ROW",
                    help=f"only these rows (default all): {', '.join(ROWS)}")
    args = ap.parse_args()
    if os.geteuid() == 0:  # as users run both: again as an unprivileged user, in that user's storage
        rerun_as_user(args.as_user, __file__, ["--rounds", str(args.rounds), "--buildah-driver", args.buildah_driver,
                                               *(["--rows", *args.rows] if args.rows else [])])
    top = Path(os.environ["STACKER_KERNEL_STORAGE"])
    store = top / f"bench-{uuid.uuid4().hex[:12]}"
    store.mkdir()
    work = Path(tempfile.mkdtemp(prefix="bench-vs-buildah-", dir="/var/tmp"))
    try:
        rows, notes = run(args, store, work, debian_tar())
    finally:
        btrfs.remove_tree(store)
        subprocess.run(["buildah", "unshare", "rm", "-rf", str(work)], capture_output=True,
                       env=_buildah_env(work, args.buildah_driver))
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, args, notes)


def rerun_as_user(user: str | None, script: str, argv: list[str]) -> None:
    """Replace this root process by `script argv` run as `user` (default $SUDO_USER, else
    sktest) in that user's storage: rootless buildah runs as an ordinary user runs it."""
    user = user or os.environ.get("SUDO_USER") or "sktest"
    storage = subprocess.run([sys.executable, "-m", "stacker_kernel", "storage-path", "--user", user],
                             check=True, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.strip()
    os.execvp("runuser", ["runuser", "-u", user, "--", "env", f"STACKER_KERNEL_STORAGE={storage}",
                          f"PYTHONPATH={REPO}", sys.executable, script, *argv])


def _buildah_env(work: Path, driver: str) -> dict[str, str]:
    conf = work / "storage.conf"
    if not conf.exists():
        options = '[storage.options.overlay]\nmount_program = "/usr/bin/fuse-overlayfs"\n' if driver == "overlay" else ""
        conf.write_text(f'[storage]\ndriver = "{driver}"\ngraphroot = "{work}/buildah-root"\n'
                        f'rootless_storage_path = "{work}/buildah-root"\nrunroot = "{work}/buildah-run"\n{options}')
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "BUILDAH_ISOLATION": "chroot"}


def run(args, store: Path, work: Path, tar: Path):
    # Bytecode cached in the work dir: an unprivileged user cannot write __pycache__ in
    # a checkout it does not own, and an installed package has its .pyc files.
    env = {**os.environ, "STACKER_KERNEL_STORAGE": str(store), "PYTHONPYCACHEPREFIX": str(work / "pycache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    benv = _buildah_env(work, args.buildah_driver)
    sk = [sys.executable, "-m", "stacker_kernel"]
    ours_dir, theirs_dir, base_dir = work / "ours", work / "theirs", work / "base"
    for d in (ours_dir, theirs_dir, base_dir):
        d.mkdir()
        os.link(tar, d / "base.tar") if os.stat(tar).st_dev == os.stat(d).st_dev else shutil.copy(tar, d / "base.tar")
    (base_dir / "Dockerfile").write_text("FROM debian:12\n")
    (base_dir / "Containerfile.import").write_text("FROM scratch\nADD base.tar /\n")
    bud = ["buildah", "bud", "--quiet", "--layers", "--pull-never"]
    timed(bud + ["-f", "Containerfile.import", "-t", "localhost/debian:12", "."], base_dir, benv)
    base = ["--base", "debian:12=tar:base.tar"]
    build = sk + ["build", "-f", "Dockerfile", *base, "--oci-dir", "oci"]
    registry, reg = start_registry(work)
    rows: dict[str, list[tuple[float, float]]] = {}
    notes: list[str] = []

    def pair(row: str, ours, theirs, first_ours: bool) -> None:
        """Time both (thunks), in the given order: rounds alternate who goes first (a warm page cache)."""
        if args.rows and row not in args.rows:
            if row == "rebuild":  # untimed: the next row is a fully cached build of this round's change
                ours()
                theirs()
            return
        if first_ours:
            a = ours()
            b = theirs()
        else:
            b = theirs()
            a = ours()
        rows.setdefault(ROWS[row], []).append((a, b))

    def dockerfile(d: Path, late: str) -> None:
        (d / "Dockerfile").write_text(DOCKERFILE.format(late=late))

    try:
        for d in (ours_dir, theirs_dir):
            dockerfile(d, "start")
        timed(build, ours_dir, env)  # the base imported, every step built once
        timed(bud + ["-t", "app", "."], theirs_dir, benv)
        timed(sk + ["build", "-f", "Dockerfile", *base, "--oci-dir", "warm"], base_dir, env)
        rootfs = str(next(p for p in (store / "bases").iterdir() if p.name.startswith("tar-sha256-")))
        for r in range(args.rounds):
            first = r % 2 == 0
            timed(sk + ["build", "-f", "Dockerfile", *base, "--oci-dir", "warm"], base_dir, env)  # layer kept again
            for d in (ours_dir, theirs_dir):
                dockerfile(d, f"round-{r}")
            pair("rebuild", lambda: timed(build, ours_dir, env),
                 lambda: timed(bud + ["-t", "app", "."], theirs_dir, benv), first)
            pair("cached", lambda: timed(build, ours_dir, env),
                 lambda: timed(bud + ["-t", "app", "."], theirs_dir, benv), first)
            pair("scratch", lambda: timed(build + ["--no-cache"], ours_dir, env),
                 lambda: timed(bud + ["--no-cache", "-t", "app", "."], theirs_dir, benv), first)
            pair("cache-to",
                 lambda: timed(build + ["--no-cache", "--cache-to", f"docker://{reg}/bench/r{r}"], ours_dir, env),
                 lambda: timed(build + ["--no-cache"], ours_dir, env), first)
            fresh = base_dir / f"fresh-{r}"
            pair("kept",
                 lambda: timed(sk + ["build", "-f", "Dockerfile", *base, "--oci-dir", f"{fresh}-kept"], base_dir, env),
                 lambda: timed(["buildah", "push", "--quiet", "localhost/debian:12", f"oci:{fresh}-b1"],
                               base_dir, benv), first)

            def anew(*more: str, name: str = "anew") -> float:
                # The store's kept layers, set aside for this build (compressed anew) and put
                # back after it: the next round's rebuild is a user's, who deletes no cache.
                kept = [(store / "cache" / c, store / "cache" / f"{c}.set-aside") for c in ("layers", "layer-blobs")]
                for path, aside in kept:
                    if path.exists():
                        path.rename(aside)
                try:
                    return timed(sk + ["build", "-f", "Dockerfile", *base, *more, "--oci-dir", f"{fresh}-{name}"],
                                 base_dir, env)
                finally:
                    for path, aside in kept:
                        if aside.exists():
                            shutil.rmtree(path, ignore_errors=True)
                            aside.rename(path)
            pair("anew", anew,
                 lambda: timed(["buildah", "push", "--quiet", "localhost/debian:12", f"oci:{fresh}-b2"],
                               base_dir, benv), first)
            img = str(work / f"erofs-{r}.img")
            pair("erofs",
                 lambda: anew("--layer-type", "erofs", "--no-verity", "--no-sbom", "--no-provenance", name="erofs"),
                 lambda: run_in_userns(_mkfs_erofs, rootfs, img), first)
            Path(img).unlink(missing_ok=True)  # not made when --rows leaves the erofs row out
            for d in base_dir.glob(f"fresh-{r}-*"):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        registry.terminate()
    return rows, notes


def print_table(rows: dict[str, list[tuple[float, float]]], args, notes: list[str]) -> None:
    print(f"Debian bookworm minbase base; {args.rounds} rounds, every pair in turn; buildah 1.28 rootless, "
          f"{args.buildah_driver} driver{' (fuse-overlayfs)' if args.buildah_driver == 'overlay' else ''}, "
          "isolation chroot; medians")
    print(f"{'path':<52}{'ours s':>9}{'theirs s':>10}{'ratio':>8}")
    for name, pairs in rows.items():
        ours = statistics.median(p[0] for p in pairs)
        theirs = statistics.median(p[1] for p in pairs)
        ratios = statistics.median(p[0] / p[1] for p in pairs)
        print(f"{name:<52}{ours:>9.2f}{theirs:>10.2f}{ratios:>7.2f}x")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
