"""Browsing snapshots through BuildSession (engine/browse.py): what the widgets show.

The widgets (tests/test_widgets.py, tests/test_browser.py) reach the snapshots
only through these public session methods, on real btrfs in a real user namespace.
"""
import pytest

from stacker_kernel.engine.grab import GrabError
from stacker_kernel.engine.session import BuildSession
from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Store


@pytest.fixture
def session(storage, busybox_tar, tmp_path):
    store = Store.open(storage)
    s = BuildSession.open(store, str(tmp_path / "nb.ipynb"), resume=False)
    s.begin_layer(Layer(name="nb", from_=ImageSource(type="tar", url=str(busybox_tar))))
    yield s
    s.close()
    store.close()


def step(session, script):
    outcome = session.run_step(script, None)
    assert outcome.ok, outcome.message
    return outcome.snapshot_id


def test_list_dir_names_kinds_as_grab_does_and_follows_links_inside_the_rootfs(session):
    snap = step(session, "mkdir -p /d/sub && echo hi > /d/f && mkfifo /d/p && ln -s /d/sub /d/l")
    listing = session.list_dir(snap, "/d")
    kinds = {e.name: e.kind for e in listing.entries}
    assert kinds == {"sub": "a directory", "f": "a regular file", "p": "a FIFO", "l": "a symlink"}
    link = next(e for e in listing.entries if e.name == "l")
    assert link.is_dir and link.link_path == "/d/sub"
    assert [e.name for e in listing.entries][:2] == ["l", "sub"]  # directories first


def test_list_dir_reads_the_snapshot_not_the_later_steps(session):
    first = step(session, "echo one > /one")
    step(session, "rm /one")
    assert "one" in {e.name for e in session.list_dir(first, "/").entries}


def test_prepare_download_inlines_small_files_and_copies_larger_ones(session, tmp_path):
    snap = step(session, "echo small > /s && head -c 5000 /dev/zero > /big")
    small = session.prepare_download(snap, "/s", tmp_path / "copies", 4096)
    assert small.data == b"small\n" and small.copy is None
    big = session.prepare_download(snap, "/big", tmp_path / "copies", 4096)
    assert big.data is None and big.size == 5000
    assert open(big.copy, "rb").read() == bytes(5000)
    assert big.copy == str(tmp_path / "copies" / "big")


def test_prepare_download_of_a_fifo_says_only_regular_files_can_be(session, tmp_path):
    snap = step(session, "mkfifo /p")
    with pytest.raises(GrabError, match="/p is a FIFO: only regular files can be downloaded"):
        session.prepare_download(snap, "/p", tmp_path, 4096)


def test_browsing_a_snapshot_that_is_gone_says_so(session):
    with pytest.raises(RecipeError, match="no longer exists"):
        session.list_dir("0" * 64, "/")


def test_find_snapshot_takes_a_step_number_from_the_end_or_a_layer(session):
    one = step(session, "echo 1 > /1")
    two = step(session, "echo 2 > /2")
    assert session.find_snapshot(1)[0].id == one
    assert session.find_snapshot(-1)[0].id == two
    assert session.find_snapshot(None)[0].id == two
    snap, view = session.find_snapshot("nb")
    assert snap.id == two and view.index == 2
    with pytest.raises(RecipeError, match="no step 3: %layers lists steps 1..2"):
        session.find_snapshot(3)
    with pytest.raises(RecipeError, match="no step of layer 'web'"):
        session.find_snapshot("web")
