"""oci/diff.py: the difference between two read-only snapshots, on real btrfs
inside a real user namespace."""
import os
import pickle
import stat
import struct
import time
from pathlib import Path

import pytest

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.oci.diff import Change, Diff, diff_snapshots, summary
from stacker_kernel.storage import btrfs


class Chain:
    """A writable subvolume `live` and read-only snapshots of it, s0, s1, …"""

    def __init__(self, root: Path):
        self.root = root
        self.live = root / "live"
        btrfs.create_subvolume(self.live)
        self.count = 0

    def change(self, fn, *args):
        """Run fn(live_path, *args) as root of a user namespace."""
        return run_in_userns(fn, str(self.live), *args)

    def snap(self) -> str:
        dest = self.root / f"s{self.count}"
        self.count += 1
        btrfs.snapshot(self.live, dest, readonly=True)
        return str(dest)

    def diff(self, old, new) -> Diff:
        return run_in_userns(diff_snapshots, old, new)


@pytest.fixture
def chain(storage) -> Chain:
    return Chain(storage)


def by_path(diff: Diff) -> dict[str, Change]:
    return {c.path: c for c in diff.changes}


def _base(live):
    os.makedirs(f"{live}/etc/app")
    os.makedirs(f"{live}/usr/bin")
    Path(f"{live}/etc/app/conf").write_text("a=1\n")
    Path(f"{live}/etc/keep").write_text("keep\n")
    Path(f"{live}/usr/bin/tool").write_text("#!/bin/sh\n")
    os.chmod(f"{live}/usr/bin/tool", 0o755)


def test_everything_is_added_without_an_old_snapshot(chain):
    chain.change(_base)
    s0 = chain.snap()
    d = chain.diff(None, s0)
    assert {c.kind for c in d.changes} == {"added"}
    assert d.paths() == ["etc", "etc/app", "etc/app/conf", "etc/keep", "usr", "usr/bin", "usr/bin/tool"]


def test_identical_snapshots_have_an_empty_diff(chain):
    chain.change(_base)
    s0 = chain.snap()
    s1 = chain.snap()
    assert chain.diff(s0, s1).empty


def test_added_file_and_its_changed_parent(chain):
    chain.change(_base)
    s0 = chain.snap()
    chain.change(lambda live: Path(f"{live}/etc/new").write_text("n"))
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/new"].kind == "added"
    assert d["etc"].kind == "modified"
    assert "etc/keep" not in d and "etc/app/conf" not in d


def test_content_change_is_modified(chain):
    chain.change(_base)
    s0 = chain.snap()
    chain.change(lambda live: Path(f"{live}/etc/app/conf").write_text("a=2\n"))
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/app/conf"].kind == "modified"
    assert list(d) == ["etc/app/conf"]


def test_same_size_rewrite_with_restored_mtime_is_still_caught(chain):
    chain.change(_base)
    s0 = chain.snap()

    def rewrite(live):
        p = f"{live}/etc/app/conf"
        st = os.stat(p)
        Path(p).write_text("a=9\n")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    chain.change(rewrite)
    d = by_path(chain.diff(s0, chain.snap()))
    assert "etc/app/conf" in d


def test_chmod_and_chown_are_metadata_only(chain):
    chain.change(_base)
    s0 = chain.snap()

    def meta(live):
        os.chmod(f"{live}/etc/keep", 0o600)
        os.chown(f"{live}/usr/bin/tool", 1000, 1000)
    chain.change(meta)
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/keep"].kind == "metadata"
    assert d["usr/bin/tool"].kind == "metadata"


def test_removed_directory_is_listed_once_without_children(chain):
    chain.change(_base)
    s0 = chain.snap()
    chain.change(lambda live: __import__("shutil").rmtree(f"{live}/etc/app"))
    d = chain.diff(s0, chain.snap())
    assert [(c.path, c.kind) for c in d.changes if c.kind == "removed"] == [("etc/app", "removed")]


def test_xattr_change_including_security_capability(chain):
    chain.change(_base)
    s0 = chain.snap()
    cap_v2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw=ep

    def setx(live):
        os.setxattr(f"{live}/etc/keep", "user.note", b"hi")
        os.setxattr(f"{live}/usr/bin/tool", "security.capability", cap_v2)
    chain.change(setx)
    s1 = chain.snap()
    d = by_path(chain.diff(s0, s1))
    assert d["etc/keep"].kind == "metadata"
    assert d["usr/bin/tool"].kind == "metadata"
    read = run_in_userns(lambda p: os.getxattr(p, "security.capability"), f"{s1}/usr/bin/tool")
    assert read == cap_v2


def test_symlink_retarget_is_a_replacement(chain):
    chain.change(_base)
    chain.change(lambda live: os.symlink("keep", f"{live}/etc/link"))
    s0 = chain.snap()

    def retarget(live):
        os.unlink(f"{live}/etc/link")
        os.symlink("app/conf", f"{live}/etc/link")
    chain.change(retarget)
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/link"].kind == "added" and d["etc/link"].type == "symlink"
    assert not d["etc/link"].opaque


def test_hard_link_change_lists_every_path_of_the_inode(chain):
    chain.change(_base)
    chain.change(lambda live: os.link(f"{live}/etc/keep", f"{live}/usr/bin/keep-link"))
    s0 = chain.snap()
    chain.change(lambda live: open(f"{live}/usr/bin/keep-link", "a").write("more"))
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/keep"].kind == "modified" and d["usr/bin/keep-link"].kind == "modified"
    assert d["etc/keep"].ino == d["usr/bin/keep-link"].ino
    assert d["etc/keep"].nlink == 2


def test_new_hard_link_to_an_old_file_lists_the_old_path_too(chain):
    chain.change(_base)
    s0 = chain.snap()
    chain.change(lambda live: os.link(f"{live}/etc/keep", f"{live}/etc/keep2"))
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/keep2"].kind == "added"
    assert d["etc/keep"].kind == "metadata"


def test_sparse_file_is_added_with_its_apparent_size(chain):
    def sparse(live):
        with open(f"{live}/sparse", "wb") as f:
            f.seek(64 << 20)
            f.write(b"end")
        st = os.stat(f"{live}/sparse")
        return st.st_size, st.st_blocks * 512
    s0 = chain.snap()
    size, allocated = chain.change(sparse)
    assert allocated < size
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["sparse"].kind == "added" and d["sparse"].type == "file"


def test_directory_replaced_by_file(chain):
    chain.change(_base)
    s0 = chain.snap()

    def swap(live):
        __import__("shutil").rmtree(f"{live}/etc/app")
        Path(f"{live}/etc/app").write_text("now a file")
    chain.change(swap)
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/app"].kind == "added" and d["etc/app"].type == "file"
    assert not d["etc/app"].opaque
    assert "etc/app/conf" not in d  # the applier removes the old directory


def test_file_replaced_by_directory(chain):
    chain.change(_base)
    s0 = chain.snap()

    def swap(live):
        os.unlink(f"{live}/etc/keep")
        os.mkdir(f"{live}/etc/keep")
        Path(f"{live}/etc/keep/inside").write_text("x")
    chain.change(swap)
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/keep"].type == "dir" and d["etc/keep"].kind == "added"
    assert not d["etc/keep"].opaque
    assert d["etc/keep/inside"].kind == "added"


def test_directory_replaced_by_directory_is_opaque(chain):
    chain.change(_base)
    s0 = chain.snap()

    def swap(live):
        __import__("shutil").rmtree(f"{live}/etc/app")
        os.mkdir(f"{live}/etc/app")
        Path(f"{live}/etc/app/other").write_text("x")
    chain.change(swap)
    d = by_path(chain.diff(s0, chain.snap()))
    assert d["etc/app"].opaque
    assert d["etc/app/other"].kind == "added"
    assert "etc/app/conf" not in d  # hidden by the opaque whiteout, no own whiteout


def test_nested_subvolume_is_flagged_and_not_walked(chain):
    s0 = chain.snap()
    btrfs.create_subvolume(chain.live / "nested")
    (chain.live / "nested" / "inner").write_text("x")
    d = chain.diff(s0, chain.snap())
    assert d.nested_subvolumes == ["nested"]
    assert "nested/inner" not in d.paths()


def test_diff_pickles_and_summarises(chain):
    chain.change(_base)
    s0 = chain.snap()

    def work(live):
        Path(f"{live}/etc/keep").write_text("changed")
        Path(f"{live}/new").write_text("n")
        os.unlink(f"{live}/usr/bin/tool")
    chain.change(work)
    d = pickle.loads(pickle.dumps(chain.diff(s0, chain.snap())))
    assert summary(d) == [("M", "/etc/keep"), ("A", "/new"), ("M", "/usr/bin/"), ("D", "/usr/bin/tool")]


@pytest.mark.rootful
def test_root_diff_sees_real_owners(chain):
    chain.change(_base)
    s0 = chain.snap()
    chain.change(lambda live: os.chown(f"{live}/etc/keep", 123, 456))
    s1 = chain.snap()
    d = by_path(chain.diff(s0, s1))
    assert d["etc/keep"].kind == "metadata"
    assert os.lstat(f"{s1}/etc/keep").st_uid == 123


def test_entry_stamped_in_the_old_snapshots_clock_tick_is_compared_in_full(chain):
    from stacker_kernel.oci.diff import compare, walk
    chain.change(_base)
    s0, s1 = chain.snap(), chain.snap()
    old, _ = run_in_userns(walk, s0)
    new, _ = run_in_userns(walk, s1)
    tick = new["etc/keep"].ctime_ns
    asked = []

    def differs(path, o, n):
        asked.append(path)
        return path != "etc/keep"
    changes = compare(old, new, old_taken_ns=tick, same=differs)
    assert "etc/keep" in asked
    assert [c.path for c in changes if c.path == "etc/keep"] == ["etc/keep"]



def _layer_members(new, diff, out):
    from stacker_kernel.oci.tarwriter import write_layer
    import gzip
    import io
    import tarfile
    blob = write_layer(new, diff, out)
    data = gzip.decompress(Path(out, "blobs", "sha256", blob.digest.split(":")[1]).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() if m.isfile() else None for m in tar}


def _diff_in_one_tick(old, new):
    """diff_snapshots' comparison of `old` and `new` as if every file of `new` had kept
    the ctime it has in `old` (a change in the coarse-clock tick of the old snapshot)
    and the old snapshot's creation time were unknown."""
    import dataclasses
    from stacker_kernel.oci.diff import _same_in_full, compare, walk
    old_entries, _ = walk(old)
    new_entries, _ = walk(new)
    same_tick = {p: dataclasses.replace(e, ctime_ns=old_entries[p].ctime_ns) if p in old_entries else e
                 for p, e in new_entries.items()}
    changes = compare(old_entries, same_tick, old_taken_ns=None,
                      same=lambda path, o, n: _same_in_full(old, new, path, o, n))
    return Diff(old=old, new=new, changes=changes)


def test_same_tick_change_with_unknown_snapshot_time_is_in_the_layer(chain):
    chain.change(_base)
    s0 = chain.snap()

    def rewrite(live):  # same size, mtime restored: only the content tells
        p = f"{live}/etc/app/conf"
        st = os.stat(p)
        Path(p).write_text("a=9\n")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    chain.change(rewrite)
    s1 = chain.snap()
    d = run_in_userns(_diff_in_one_tick, s0, s1)
    assert d.paths() == ["etc/app/conf"]
    members = run_in_userns(_layer_members, s1, d, str(chain.root / "layout"))
    assert members["etc/app/conf"] == b"a=9\n"


def test_snapshot_time_of_a_tree_that_is_no_subvolume_is_unknown(chain):
    from stacker_kernel.oci.diff import _snapshot_time_ns
    chain.change(_base)
    s0 = chain.snap()
    assert run_in_userns(_snapshot_time_ns, s0) == pytest.approx(btrfs.subvolume_info(s0).otime * 1e9, abs=1e3)
    assert run_in_userns(_snapshot_time_ns, f"{s0}/etc") is None

def test_unknown_snapshot_time_compares_every_unchanged_looking_entry_in_full(chain):
    from stacker_kernel.oci.diff import compare, walk
    chain.change(_base)
    s0, s1 = chain.snap(), chain.snap()
    old, _ = run_in_userns(walk, s0)
    new, _ = run_in_userns(walk, s1)
    asked = []

    def same(path, o, n):
        asked.append(path)
        return path != "etc/keep"
    changes = compare(old, new, old_taken_ns=None, same=same)
    assert sorted(asked) == sorted(new)
    assert [c.path for c in changes] == ["etc/keep"]


def test_a_base_made_read_only_after_filling_is_not_hashed_whole(chain, monkeypatch):
    """A base subvolume is created, filled, then made read-only (store.add_base): its
    creation time is older than its files, yet only entries stamped in the clock tick
    of its last change are compared in full, and a change in that tick still shows."""
    from stacker_kernel.oci import diff as diff_mod
    base = chain.root / "base"
    btrfs.create_subvolume(base)
    run_in_userns(_base, str(base))
    time.sleep(0.05)  # more than the clock window: only the last file is stamped near the end
    run_in_userns(lambda root: Path(f"{root}/etc/last").write_text("last\n"), str(base))
    btrfs.set_readonly(base, True)
    over = chain.root / "over"
    btrfs.snapshot(base, over)  # a rootfs over that base, and its read-only snapshot
    s1 = str(chain.root / "s1")
    btrfs.snapshot(over, s1, readonly=True)
    hashed = []
    real = diff_mod._sha256

    def counting(path):
        hashed.append(path)
        return real(path)
    monkeypatch.setattr(diff_mod, "_sha256", counting)
    d = diff_snapshots(str(base), s1)  # as root of the test's own files: no namespace needed
    assert d.empty
    # both sides of the one file stamped in the last tick, and no other file
    assert sorted(hashed) == sorted([f"{base}/etc/last", f"{s1}/etc/last"])


def test_size_changes_of_a_chain_walk_each_snapshot_once(chain, monkeypatch):
    """The background size measurement of consecutive steps (engine/inspect.py) walks
    each snapshot once: a step's snapshot is the next one's parent."""
    from stacker_kernel.engine.inspect import _size_changes_in_ns
    from stacker_kernel.oci import diff as diff_mod
    chain.change(_base)
    s0 = chain.snap()
    chain.change(lambda live: Path(f"{live}/etc/big").write_bytes(b"x" * 5000))
    s1 = chain.snap()
    chain.change(lambda live: os.unlink(f"{live}/etc/keep"))
    s2 = chain.snap()
    walked = []
    real = diff_mod.walk
    monkeypatch.setattr(diff_mod, "walk", lambda root: walked.append(root) or real(root))
    assert _size_changes_in_ns([(s0, s1), (s1, s2)]) == [5000, -len("keep\n")]
    assert sorted(walked) == sorted([s0, s1, s2])
