"""Tab completion (paths, commands) and Shift-Tab (whatis, --help) read the rootfs through
its storage driver: on overlay a tree is a stack of layer directories, whose union
(whiteouts and opaque directories honoured) is what the container shows (issue 24).
Run on both drivers (conftest.BOTH_DRIVERS)."""
import os
import tempfile
from pathlib import Path

import pytest

from conftest import OVERLAY_PARENT
from kernel_support import BASE, kernels, nbdir, start_kernel  # noqa: F401 (fixtures)
from stacker_kernel.storage import overlay


@pytest.fixture
def kernel(storage, nbdir, kernels):
    """A kernel on nbdir/test.ipynb building on `storage` (either driver), its base set."""
    k = start_kernel(nbdir / "test.ipynb", kernels, STACKER_KERNEL_STORAGE=str(storage))
    base = k.execute(BASE, "base", timeout=120)
    assert base.status == "ok", base.error
    yield k
    k.close()


def _complete(kernel, code: str) -> list[str]:
    return kernel.kc.complete(code, len(code), reply=True, timeout=15)["content"]["matches"]


def _inspect(kernel, code: str) -> str:
    reply = kernel.kc.inspect(code, len(code), reply=True, timeout=60)["content"]
    assert reply["status"] == "ok" and reply["found"], reply
    return reply["data"]["text/plain"]


def test_paths_and_commands_complete_from_the_union_of_the_steps(kernel):
    """Files of earlier steps and of this one, minus what a later step removed."""
    assert kernel.execute("mkdir -p /srv/site/old /srv/site/keep /srv/stale && touch /srv/site/old/a", "a").status == "ok"
    assert kernel.execute("rm -r /srv/site/old /srv/stale; mkdir /srv/site/new", "b").status == "ok"
    # A directory removed and made again hides what it held below (an opaque directory).
    assert kernel.execute("mkdir -p /opt/d && touch /opt/d/before", "c").status == "ok"
    assert kernel.execute("rm -r /opt/d && mkdir /opt/d && touch /opt/d/after", "d").status == "ok"
    assert _complete(kernel, "ls /srv/s") == ["/srv/site/"]
    assert _complete(kernel, "ls /srv/site/") == ["/srv/site/keep/", "/srv/site/new/"]
    assert _complete(kernel, "ls /opt/d/") == ["/opt/d/after"]
    assert _complete(kernel, "ls /et") == ["/etc/"]
    assert _complete(kernel, "busyb") == ["busybox"]
    assert "mkdir" in _complete(kernel, "mkd")
    # A command a step put on the PATH, and one a step removed.
    assert kernel.execute("printf '#!/bin/sh\\n' > /usr/bin/greet-me && chmod +x /usr/bin/greet-me; rm /bin/rmdir",
                          "e").status == "ok"
    assert _complete(kernel, "greet-") == ["greet-me"]
    assert _complete(kernel, "rmdi") == []
    # Relative to the shell's cwd, through a symlink of the image.
    assert kernel.execute("ln -s /srv/site /link; cd /link", "f").status == "ok"
    assert _complete(kernel, "ls ne") == ["new/"]


def test_shift_tab_shows_whatis_and_help_of_a_command_from_the_snapshot(kernel):
    setup = kernel.execute(
        "mkdir -p /usr/share/man/man1\n"
        "printf '.TH GREET 1\\n.SH NAME\\ngreet \\\\- say hello nicely\\n' > /usr/share/man/man1/greet.1\n"
        "printf '#!/bin/sh\\necho \"Usage: greet [NAME]\"\\n' > /usr/bin/greet\n"
        "chmod +x /usr/bin/greet", "setup")
    assert setup.status == "ok", setup.error
    text = _inspect(kernel, "greet")
    assert "greet is /usr/bin/greet in the container" in text
    assert "greet (1) - say hello nicely" in text
    assert "$ greet --help\nUsage: greet [NAME]" in text
    assert "Usage: ls" in _inspect(kernel, "ls")  # a busybox applet: a symlink in the base layer
    assert kernel.execute("rm /usr/bin/greet", "rm").status == "ok"
    assert "greet: not found on the container's PATH" in _inspect(kernel, "greet")


# --- the union listing itself, on hand-made layers ---------------------------------------

def _whiteout(path: Path) -> None:
    """An overlayfs whiteout as an unprivileged mount makes it (userxattr)."""
    path.write_bytes(b"")
    os.setxattr(path, overlay.WHITEOUT_XATTR, b"")


def test_the_union_listing_honours_whiteouts_opaque_directories_and_files_in_the_way():
    base = Path(tempfile.mkdtemp(prefix="sk-union-", dir=OVERLAY_PARENT))  # user xattrs: ext4
    try:
        top, mid, low = (base / n for n in ("top", "mid", "low"))
        for layer in (top, mid, low):
            (layer / "d").mkdir(parents=True)
        (low / "d" / "a").write_text("")
        (low / "d" / "b").write_text("")
        (low / "d" / "sub").mkdir()
        (low / "d" / "sub" / "x").write_text("")
        (low / "gone").mkdir()
        (low / "gone" / "y").write_text("")
        (low / "opaque").mkdir()
        (low / "opaque" / "old").write_text("")
        (low / "file").mkdir()
        (mid / "d" / "c").write_text("")
        _whiteout(mid / "d" / "b")
        _whiteout(mid / "gone")
        (mid / "opaque").mkdir()
        (mid / "opaque" / "new").write_text("")
        os.setxattr(mid / "opaque", overlay.OPAQUE_XATTR, b"y")
        (mid / "file").write_text("")  # a file over a directory of a lower layer
        (top / "d" / "b").write_text("")  # made again above its whiteout
        stack = overlay.Stack((str(top), str(mid), str(low)))
        assert overlay.listdir(stack, "/d") == ["a", "b", "c", "sub"]
        assert overlay.listdir(stack, "d/sub") == ["x"]
        assert overlay.listdir(stack, "/") == ["d", "file", "opaque"]
        assert overlay.listdir(stack, "/opaque") == ["new"]
        assert overlay.listdir(stack, "/gone") is None
        assert overlay.listdir(stack, "/file") is None
        assert overlay.listdir(stack, "/d/a") is None
        assert overlay.listdir(stack, "/absent") is None
    finally:
        import shutil

        shutil.rmtree(base)
