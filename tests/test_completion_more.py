"""Completion a daily user reaches for (issue 26): `$HO`/`${HO` (steps have HOME, as
stacker's), `%from tar book` (host paths beside the notebook), `%browse p` (layers)."""
from kernel_support import BASE, kernel, kernels, nbdir  # noqa: F401 (fixtures)


def _complete(kernel, code: str) -> dict:
    return kernel.kc.complete(code, len(code), reply=True, timeout=15)["content"]


def test_home_is_set_in_steps_and_completes(kernel):
    run = kernel.execute("echo home=$HOME", "h")
    assert run.status == "ok" and "home=/root" in run.stream_text()
    assert "$HOME" in _complete(kernel, "cd $HO")["matches"]
    assert "${HOME}" in _complete(kernel, 'ls "${HO')["matches"]


def test_from_tar_completes_host_paths_relative_to_the_notebook(kernel, nbdir):
    (nbdir / "bookworm.tar").write_bytes(b"")
    (nbdir / "books").mkdir()
    (nbdir / "books" / "rootfs.tar").write_bytes(b"")
    reply = _complete(kernel, "%from tar boo")
    assert reply["matches"] == ["books/", "bookworm.tar"]
    assert reply["cursor_start"] == len("%from tar ")
    assert _complete(kernel, "%from tar books/r")["matches"] == ["books/rootfs.tar"]
    assert _complete(kernel, "%import bookw")["matches"] == ["bookworm.tar"]


def test_browse_completes_layer_names(kernel):
    assert kernel.execute("touch /in-test", "t").status == "ok"
    run = kernel.execute("%layer pkg\n%from built test\ntouch /in-pkg", "pkg")
    assert run.status == "ok", run.error
    reply = _complete(kernel, "%browse p")
    assert reply["matches"] == ["pkg"]
    assert reply["cursor_start"] == len("%browse ")
    assert _complete(kernel, "%from built t")["matches"] == ["test"]
    assert "/etc/" in _complete(kernel, "%browse pkg /et")["matches"]  # a path after the layer
