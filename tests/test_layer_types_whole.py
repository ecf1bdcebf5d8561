"""A whole rootfs as one squashfs/erofs layer (oci/layer_types.py
write_whole_fs_layer): packed straight from the read-only snapshot while its
directories are scanned beside it (diff.scan_nested), and hashed in one pass
with its verity data; the same blob as write_fs_layer makes from a walked diff,
on real btrfs in a real user namespace. And a chain of layers walks each
snapshot once."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.errors import ImageError
from stacker_kernel.oci.diff import diff_snapshots, scan_nested, walk
from stacker_kernel.oci import layer_types
from stacker_kernel.oci.layer_types import LayerType, erofs_metadata, write_fs_layer, write_whole_fs_layer
from stacker_kernel.storage import btrfs

from test_layer_types import _verify


def _fill(live: str) -> None:
    os.makedirs(f"{live}/etc/app")
    Path(f"{live}/etc/app/conf").write_text("a=1\n")
    os.symlink("app/conf", f"{live}/etc/link")
    Path(f"{live}/big").write_bytes(os.urandom(300_000))
    os.chown(f"{live}/etc/app/conf", 7, 8)


def _snapshot(root: Path, fill) -> str:
    live = root / "live"
    btrfs.create_subvolume(live)
    if fill is not None:
        run_in_userns(_fill, str(live))
    snap = root / "snap"
    btrfs.snapshot(live, snap, readonly=True)
    return str(snap)


def _listing(blob: Path, kind: str):
    """What the image holds (mkfs.erofs stamps a random UUID and the time: blobs differ)."""
    if kind == "erofs":
        return {p: (e.mode, e.uid, e.gid, e.xattrs) for p, e in erofs_metadata(str(blob)).items()}
    return subprocess.run(["unsquashfs", "-lln", "-d", "", str(blob)], capture_output=True, text=True,
                          check=True).stdout


def _same_layer(whole, walked, out: Path, kind: str) -> None:
    assert (whole.media_type, whole.empty, bool(whole.root_hash)) == \
        (walked.media_type, walked.empty, bool(walked.root_hash))
    assert _listing(out / "whole/blobs/sha256" / whole.digest[7:], kind) == \
        _listing(out / "walked/blobs/sha256" / walked.digest[7:], kind)


def _both(snap: str, out: Path, layer_type: LayerType):
    def work():
        whole = write_whole_fs_layer(snap, str(out / "whole"), layer_type)
        diff = diff_snapshots(None, snap)
        return whole, diff, write_fs_layer(snap, diff, str(out / "walked"), layer_type)
    return run_in_userns(work)


@pytest.mark.parametrize("kind", ["erofs", "squashfs"])
@pytest.mark.parametrize("verity", [True, False], ids=["verity", "plain"])
def test_the_whole_rootfs_layer_is_the_blob_write_fs_layer_makes(storage, tmp_path, kind, verity):
    snap = _snapshot(storage, _fill)
    whole, diff, walked = _both(snap, tmp_path, LayerType(kind, verity))
    _same_layer(whole, walked, tmp_path, kind)
    assert not diff.empty and "etc/app/conf" in diff.paths() and bool(whole.root_hash) == verity
    blob = tmp_path / "whole/blobs/sha256" / whole.digest[7:]
    data = blob.read_bytes()
    # one pass over the image for the salt, the tree hashed after: still the whole blob's sha256
    assert "sha256:" + hashlib.sha256(data).hexdigest() == whole.digest and len(data) == whole.size
    if verity:
        assert _verify(blob, kind, whole.root_hash).returncode == 0
    assert os.listdir(tmp_path / "whole/blobs/sha256") == [whole.digest[7:]]  # no temporary left


def test_an_empty_rootfs_is_no_layer_and_leaves_nothing(storage, tmp_path):
    snap = _snapshot(storage, None)
    assert run_in_userns(write_whole_fs_layer, snap, str(tmp_path / "out"), LayerType("erofs")) is None
    assert run_in_userns(scan_nested, snap) == (False, [])
    assert os.listdir(tmp_path / "out/blobs/sha256") == []


def test_a_rootfs_holding_a_nested_subvolume_is_laid_out_first(storage, tmp_path):
    # a nested subvolume is an empty directory in the snapshot: laid out as write_fs_layer does
    snap_root = storage
    live = snap_root / "live"
    btrfs.create_subvolume(live)
    run_in_userns(_fill, str(live))
    btrfs.create_subvolume(live / "nested")
    (live / "nested" / "inner").write_text("x")
    btrfs.snapshot(live, snap_root / "snap", readonly=True)
    whole, diff, walked = _both(str(snap_root / "snap"), tmp_path, LayerType("erofs"))
    assert diff.nested_subvolumes == ["nested"]
    _same_layer(whole, walked, tmp_path, "erofs")
    assert "nested" in erofs_metadata(str(tmp_path / "whole/blobs/sha256" / whole.digest[7:]))
    btrfs.remove_tree(live / "nested")


def test_the_directory_scan_finds_the_nested_subvolumes_the_walk_finds(storage):
    # what decides between packing the snapshot as it is and laying it out: a
    # placeholder in a snapshot (inode 2), a live nested subvolume (inode 256,
    # another st_dev), deep or at the top, and none below a nested one
    live = storage / "live"
    btrfs.create_subvolume(live)
    run_in_userns(_fill, str(live))
    btrfs.create_subvolume(live / "top")
    os.makedirs(live / "usr/lib/deep")
    btrfs.create_subvolume(live / "usr/lib/deep/sub")
    btrfs.create_subvolume(live / "usr/lib/deep/sub/inner")
    (live / "usr/lib/deep/sub/inner/f").write_text("x")
    btrfs.snapshot(live, storage / "snap", readonly=True)
    try:
        for tree, want in ((live, ["top", "usr/lib/deep/sub"]), (storage / "snap", ["top", "usr/lib/deep/sub"]),
                           (live / "usr/lib/deep/sub", ["inner"]), (live / "etc", [])):
            found = run_in_userns(scan_nested, str(tree))
            assert found == (True, want) == (True, run_in_userns(walk, str(tree))[1]), tree
    finally:
        for sub in ("usr/lib/deep/sub/inner", "usr/lib/deep/sub", "top"):
            btrfs.remove_tree(live / sub)


def test_the_hosts_root_is_never_packed_whole(tmp_path):
    with pytest.raises(ImageError, match="not made"):
        write_whole_fs_layer("/", str(tmp_path), LayerType("erofs"))


@pytest.mark.parametrize("kind", ["erofs", "tar"])
def test_a_chain_of_layers_walks_each_snapshot_once(storage, tmp_path, kind):
    # a step's snapshot is the next step's older side: its walk serves both diffs; a
    # whole-rootfs erofs layer walks its snapshot in full beside the packer when a
    # step follows (and only scans its directories when none does)
    from stacker_kernel.oci import diff as diff_module
    from stacker_kernel.oci.export import _Job, _layers_in_userns

    live = storage / "live"
    btrfs.create_subvolume(live)
    run_in_userns(_fill, str(live))
    snaps = []
    for i in range(3):
        if i:
            run_in_userns(lambda n=i: Path(f"{live}/step{n}").write_text(str(n)))
        snaps.append(str(storage / f"s{i}"))
        btrfs.snapshot(live, snaps[-1], readonly=True)
    jobs = [_Job(None, snaps[0], "base")] + [_Job(a, b, "step") for a, b in zip(snaps, snaps[1:])]

    def work(jobs):
        walked, scanned = [], []
        real_walk, real_scan = diff_module.walk, layer_types.scan_nested

        def walk(root):
            walked.append(root)
            return real_walk(root)

        def scan(root):
            scanned.append(root)
            return real_scan(root)
        diff_module.walk = layer_types.walk = walk
        layer_types.scan_nested = scan
        blobs = _layers_in_userns(jobs, str(tmp_path / f"out-{len(jobs)}"), None, LayerType(kind))
        return blobs, sorted(walked), scanned
    blobs, walked, scanned = run_in_userns(work, jobs)
    assert all(blobs) and walked == snaps and scanned == []
    blobs, walked, scanned = run_in_userns(work, jobs[:1])
    assert blobs[0] is not None and (walked, scanned) == (([], [snaps[0]]) if kind == "erofs" else ([snaps[0]], []))
