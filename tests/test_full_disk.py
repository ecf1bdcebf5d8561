"""A step that fills the btrfs: a clear error, earlier snapshots intact, and the same
session works again once space is freed.

Rootful: it makes its own 256 MiB loop btrfs (mounted with
user_subvol_rm_allowed, like setup-storage) in a temporary directory, so the
shared test filesystem never fills.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from stacker_kernel.engine.session import BuildSession
from stacker_kernel.errors import StackerKernelError
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Store, collect_garbage

pytestmark = pytest.mark.rootful


@pytest.fixture
def full_session(small_btrfs, busybox_tar):
    """A session on the small btrfs with one committed step (/keep and 1 MiB of /data)."""
    root = small_btrfs / "storage"
    root.mkdir()
    store = Store.open(root)
    s = BuildSession.open(store, "/full/disk.ipynb", resume=False)
    s.use_cache = False
    s.begin_layer(Layer(name="disk", from_=ImageSource(type="tar", url=str(busybox_tar))))
    first = s.run_step("echo keep > /keep; head -c 1048576 /dev/urandom > /data; sha256sum /data > /data.sum")
    assert first.ok, first.message
    yield s, store.get(first.snapshot_id)
    s.close()
    store.close()


def fill(s: BuildSession) -> str:
    """Run a step that writes until the disk is full; its error, whichever layer reports it."""
    out: list[str] = []
    try:
        o = s.run_step("dd if=/dev/zero of=/fill bs=1M", on_output=out.append)
    except StackerKernelError as e:
        return str(e)
    assert not o.ok
    return o.message + "\n" + "".join(out)


def free_space(mnt: Path) -> None:
    """Wait until btrfs has really reclaimed deleted subvolumes (it does so in the background)."""
    subprocess.run(["btrfs", "filesystem", "sync", str(mnt)], check=True, capture_output=True)
    subprocess.run(["btrfs", "subvolume", "sync", str(mnt)], check=True, capture_output=True)


def test_step_filling_the_disk_fails_with_a_clear_error(full_session):
    s, _ = full_session
    message = fill(s)
    assert "No space left" in message or "full" in message
    assert "Traceback" not in message


def test_earlier_snapshot_is_intact_after_the_disk_filled(full_session):
    s, first = full_session
    fill(s)
    assert (first.path / "keep").read_text() == "keep\n"
    want = (first.path / "data.sum").read_text().split()[0]
    assert hashlib.sha256((first.path / "data").read_bytes()).hexdigest() == want


def test_same_session_works_after_space_is_freed(full_session, small_btrfs):
    s, first = full_session
    fill(s)
    free_space(small_btrfs)
    again = s.run_step("test ! -e /fill && echo after > /after && cat /keep")
    assert again.ok, again.message
    snap = s.store.get(again.snapshot_id)
    assert (snap.path / "after").read_text() == "after\n"
    assert snap.parent == first.id  # the failed step left no trace in the history


def test_store_reopens_consistent_after_the_disk_filled(full_session):
    s, first = full_session
    fill(s)
    with Store.open(s.store.root) as again:
        assert [x.id for x in again.snapshots() if x.kind == "step"] == [first.id]
        assert sorted(p.name for p in (again.root / "snapshots").iterdir()) == [first.id]


def test_gc_on_a_full_disk_deletes_and_reports_what_it_freed(small_btrfs, busybox_tar):
    root = small_btrfs / "storage"
    root.mkdir()
    with Store.open(root) as store:
        s = BuildSession.open(store, "/full/gc.ipynb", resume=False)
        s.use_cache = False
        s.begin_layer(Layer(name="gc", from_=ImageSource(type="tar", url=str(busybox_tar))))
        step = s.run_step("head -c 8388608 /dev/urandom > /data")
        assert step.ok, step.message
        session = s.session.id
        s.close()
        store.forget_session(session)  # nothing references the step any more
    with pytest.raises(OSError), (root / "junk").open("wb") as f:  # a truly full disk
        while True:
            f.write(b"x" * (1 << 20))
            f.flush()
    removed, freed = collect_garbage(root)
    assert step.snapshot_id in [s.id for s in removed] and freed >= 8 << 20
