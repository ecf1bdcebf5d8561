"""A Debian notebook from the shared cache on an empty store, beside pulling and
unpacking the same bytes, measured in one run.

User A builds a Debian minbase notebook (scripts/debian-rootfs.sh; apt-get
update, an apt-get install, a small step) cold with --cache-to a
docker-registry started on localhost. User B, with an empty store, imports
the same base and builds the notebook with --cache-from: no step runs. Beside
B's steps: the floor for the same bytes, a plain HTTP GET of each layer blob
from the same registry and `tar -xzf` of it (in the user namespace) onto a
snapshot of the base, as a `docker pull` does. Goal: B's steps cost at most
~1.5x that floor.

    STACKER_KERNEL_STORAGE=/var/lib/stacker-kernel/btrfs/root python bench/remote_cache.py [ROOTFS.tar]
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.build import build
from stacker_kernel.engine.remote_cache import CacheSettings
from stacker_kernel.oci.bases import import_base
from stacker_kernel.oci.registry import MANIFEST_MEDIA_TYPE, cache_tag
from stacker_kernel.recipe.model import ImageSource
from stacker_kernel.storage import btrfs
from stacker_kernel.storage.store import Store

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "python3"  # ~25 MB of .debs, ~80 MB unpacked: a typical "install the toolchain" cell

CELLS = [
    "apt-get update -q",
    f"apt-get install -y -qq --no-install-recommends {PACKAGE} >/dev/null\napt-get clean",
    "python3 -c 'import sys; print(sys.version)' > /version\ncd /tmp\nexport GREETING=hello",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    conf = work / "registry.yml"
    conf.write_text(f"version: 0.1\nlog: {{level: error}}\nstorage:\n  filesystem: {{rootdirectory: {work / 'data'}}}\n"
                    f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


def notebook(path: Path, rootfs_tar: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"%from tar {rootfs_tar}\n%build_env DEBIAN_FRONTEND=noninteractive",
                                          id="base")]
    nb.cells += [nbformat.v4.new_code_cell(src, id=f"c{i}") for i, src in enumerate(CELLS)]
    nbformat.write(nb, path)
    return path


def timed_build(root: Path, nb: Path, rootfs_tar: str, **cache) -> tuple[float, float, list[str]]:
    """(base import s, steps s, cache keys) of one build on the store at `root`."""
    with Store.open(root) as store:
        t = time.perf_counter()
        import_base(store, ImageSource(type="tar", url=rootfs_tar))
        base = time.perf_counter() - t
        t = time.perf_counter()
        result = build(store, str(nb), out=lambda s: None, stream=lambda s: None, cache=CacheSettings(**cache))
        steps = time.perf_counter() - t
        keys = [s.cache_key for s in store.snapshots() if s.kind == "step" and s.cache_key]
        assert result.steps_cached == (len(CELLS) if cache.get("cache_from") else 0), result
    return base, steps, keys


def layers(registry: str, repo: str, keys: list[str]) -> list[tuple[str, int]]:
    """(digest, size) of the layer of each key's entry."""
    out = []
    for key in keys:
        req = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{cache_tag(key)}",
                                     headers={"Accept": MANIFEST_MEDIA_TYPE})
        with urllib.request.urlopen(req, timeout=30) as resp:
            layer = json.loads(resp.read())["layers"][0]
        out.append((layer["digest"], layer["size"]))
    return out


def _untar(blob: str, rootfs: str) -> None:
    subprocess.run(["tar", "-xzpf", blob, "--numeric-owner", "-C", rootfs], check=True)


def pull_and_unpack(registry: str, repo: str, blobs: list[tuple[str, int]], base: str, work: Path,
                    rootfs: Path) -> float:
    """Seconds to GET each blob and untar it onto a snapshot `rootfs` of the base (the floor)."""
    t = time.perf_counter()
    btrfs.snapshot(base, rootfs, readonly=False)
    for digest, _ in blobs:
        path = work / digest.split(":", 1)[1]
        with urllib.request.urlopen(f"http://{registry}/v2/{repo}/blobs/{digest}", timeout=60) as resp, \
                open(path, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
        if os.geteuid() == 0:
            _untar(str(path), str(rootfs))
        else:
            run_in_userns(_untar, str(path), str(rootfs))
        path.unlink()
    took = time.perf_counter() - t
    btrfs.remove_tree(rootfs)
    return took


def main() -> None:
    rootfs_tar = sys.argv[1] if len(sys.argv) > 1 else subprocess.run(
        [str(REPO / "scripts/debian-rootfs.sh")], check=True, capture_output=True, text=True).stdout.strip()
    storage = Path(os.environ.get("STACKER_KERNEL_STORAGE", "/var/lib/stacker-kernel/btrfs/root"))
    work = Path(tempfile.mkdtemp(prefix="bench-remote-cache-"))
    roots = [storage / f"bench-{uuid.uuid4().hex}" for _ in range(2)]
    proc, registry = start_registry(work)
    repo = "bench/cache"
    url = f"docker://{registry}/{repo}"
    try:
        for root in roots:
            root.mkdir()
        nb = notebook(work / "debian.ipynb", rootfs_tar)
        a_base, a_steps, keys = timed_build(roots[0], nb, rootfs_tar, cache_to=url)
        b_base, b_steps, _ = timed_build(roots[1], nb, rootfs_tar, cache_from=[url])
        blobs = layers(registry, repo, keys)
        with Store.open(roots[1]) as store:
            base = next(s for s in store.snapshots() if s.kind == "base")
            floor = pull_and_unpack(registry, repo, blobs, str(base.path), work, roots[1] / "floor")
    finally:
        proc.terminate()
        proc.wait()
        for root in roots:
            btrfs.remove_tree(root)
        shutil.rmtree(work, ignore_errors=True)
    pulled = sum(size for _, size in blobs)
    print(f"rootfs: {rootfs_tar}; notebook: {len(CELLS)} cells (apt-get update, install {PACKAGE}, a small step); "
          f"registry: Debian docker-registry on localhost")
    print(f"{'':<44} {'seconds':>8}")
    print(f"{'A cold build, pushing (--cache-to)':<44} {a_steps:>8.2f}")
    print(f"{'B from the registry cache (--cache-from)':<44} {b_steps:>8.2f}")
    print(f"{'floor: GET + tar -xzf of the same blobs':<44} {floor:>8.2f}")
    print(f"{'base import (each store, not counted above)':<44} {b_base:>8.2f}")
    print(f"bytes pulled: {pulled / 1e6:.1f} MB in {len(blobs)} layers; "
          f"B / floor = {b_steps / floor:.2f}x (goal <= 1.5x); cold / B = {a_steps / b_steps:.1f}x")


if __name__ == "__main__":
    main()
