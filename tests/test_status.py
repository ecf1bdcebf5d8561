"""Issue 14, "say where you are" and "messages a person reads", through the real kernel:
the status line of each step, cached before its replay, the kept failed state,
no phantom layer, plain error headlines, the failed step's log beside the
notebook, Restart & Run All in plain words, and `%from docker` causes in one line.
"""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from kernel_support import BASE, kernel, kernels, nbdir, start_kernel, write_notebook  # noqa: F401 (fixtures)
from net_support import free_port, serve_registry

STATUS = re.compile(r"^\[step (\d+), layer (\S+): (.*)\]$", re.M)


def _reply_metadata(kernel, code: str, cell_id: str) -> tuple[dict, str, list[dict]]:
    """Run a cell; its execute_reply's `stacker` metadata, its text (streams and
    display_data) and its iopub messages up to idle."""
    msg = kernel.kc.session.msg("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": cell_id})
    kernel.kc.shell_channel.send(msg)
    msg_id = msg["header"]["msg_id"]
    while True:
        reply = kernel.kc.get_shell_msg(timeout=120)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    text, msgs = [], []
    while True:
        out = kernel.kc.get_iopub_msg(timeout=60)
        if out["parent_header"].get("msg_id") != msg_id:
            continue
        if out["msg_type"] == "status" and out["content"]["execution_state"] == "idle":
            break
        msgs.append(out)
        if out["msg_type"] == "stream":
            text.append(out["content"]["text"])
        elif out["msg_type"] == "display_data":
            text.append(out["content"]["data"]["text/plain"] + "\n")
    return reply["metadata"].get("stacker", {}), "".join(text), msgs


def _traceback(run) -> str:
    return "\n".join("\n".join(o.get("traceback", [])) for o in run.outputs
                     if o.get("output_type") == "error")


# --- 6: the status line ----------------------------------------------------------------


def test_a_step_ends_with_one_status_line_naming_step_layer_time_size_and_snapshot(kernel):
    meta, text, msgs = _reply_metadata(kernel, f"echo {uuid.uuid4().hex}", "s1")
    last = text.rstrip("\n").split("\n")[-1]
    m = STATUS.fullmatch(last)
    assert m, text
    assert m.group(1) == "1" and m.group(2) == "test"
    assert re.fullmatch(r"ran in \d+\.\d s, (size being measured|[+-]?[\d.]+ (B|KiB|MiB)), "
                        r"snapshot [0-9a-f]{12}", m.group(3)), last
    assert m.group(3).endswith(f"snapshot {meta['snapshot'][:12]}")


def test_the_status_line_gets_the_size_in_place_once_it_is_measured(kernel):
    _, text, msgs = _reply_metadata(kernel, f"head -c 3000 /dev/zero > /three-k-{uuid.uuid4().hex}", "s1")
    assert "size being measured" in text, text
    status = next(m for m in msgs if m["msg_type"] == "display_data")
    display_id = status["content"]["transient"]["display_id"]
    while True:  # after the reply: the kernel updates that output when the size is known
        msg = kernel.kc.get_iopub_msg(timeout=60)
        if msg["msg_type"] == "update_display_data":
            break
    assert msg["content"]["transient"]["display_id"] == display_id
    assert re.fullmatch(r"\[step 1, layer test: ran in \d+\.\d s, \+2\.9 KiB, snapshot [0-9a-f]{12}\]",
                        msg["content"]["data"]["text/plain"]), msg["content"]


def test_a_cache_hit_says_cached_before_its_replayed_output_and_layers_marks_it(kernel):
    token = uuid.uuid4().hex
    assert kernel.execute(f"echo {token}", "c1").status == "ok"
    # The same cell again: back to its parent, then a hit on the snapshot this session made.
    again = kernel.execute(f"echo {token}", "c1").text()
    header = again.index("[step 1, layer test: cached (unchanged, not run again)")
    assert header < again.index(token), again
    assert again.count("[step 1") == 1  # one status line, not a second one after the replay
    table = kernel.execute("%layers", "l").text()
    row = next(line for line in table.splitlines() if f"echo {token}" in line)
    assert row.rstrip().endswith("cached"), table


def test_a_failed_step_says_nothing_was_committed_and_which_step_is_the_last(kernel):
    assert kernel.execute(f"echo {uuid.uuid4().hex}", "ok1").status == "ok"
    failed = kernel.execute("false", "bad")
    assert failed.status == "error"
    assert re.search(r"^\[step 2, layer test: failed after \d+\.\d s; nothing committed "
                     r"\(the last committed step is 1\)\]$", _traceback(failed), re.M), _traceback(failed)


# --- 8: %keep_failed shows the uncommitted failed state as such ---------------------------


def test_keep_failed_state_is_shown_uncommitted_in_the_status_line_and_in_layers(kernel):
    assert kernel.execute(f"echo {uuid.uuid4().hex}", "ok1").status == "ok"
    assert kernel.execute("%keep_failed on", "kf").status == "ok"
    failed = kernel.execute("touch /half-done; false", "bad")
    assert failed.status == "error"
    assert re.search(r"\[step 2, layer test: failed after \d+\.\d s; its state is kept to inspect, "
                     r"not committed \(the last committed step is 1; %rollback drops it\)\]",
                     _traceback(failed)), _traceback(failed)
    inspect = kernel.execute("ls /half-done", "look")
    assert inspect.status == "ok" and "/half-done" in inspect.text()
    assert re.search(r"\[layer test: ran in \d+\.\d s in the kept failed state of step 2, not "
                     r"committed \(the last committed step is 1; %rollback drops it\)\]",
                     inspect.text()), inspect.text()
    table = kernel.execute("%layers", "l").text().splitlines()
    assert len(table) == 3  # header, the committed step, the kept failed state
    assert table[2].startswith("2 ") and "FAILED, kept uncommitted" in table[2]
    assert "touch /half-done; false" in table[2]
    assert kernel.execute("%rollback", "rb").status == "ok"
    assert "FAILED" not in kernel.execute("%layers", "l2").text()


# --- 11: no phantom layer -------------------------------------------------------------------


def test_a_failed_first_cell_without_from_says_how_to_pick_a_base_and_leaves_no_layer(nbdir, kernels):
    k = start_kernel(nbdir / "Untitled.ipynb", kernels)
    try:
        first = k.execute("echo hello", "first")
        assert first.status == "error"
        assert first.error.startswith("Cannot run this cell: there is no base image yet")
        for syntax in ("%from tar ", "%from oci ", "%from docker "):
            assert syntax in first.error
        assert k.execute("%layer app\n" + BASE, "base", timeout=120).status == "ok"
        assert k.execute("echo built > /built", "step").status == "ok"
        exported = k.execute("%export oci out", "export", timeout=300)
        assert exported.status == "ok", exported.error
        assert "with tags: app\n" in exported.text() + "\n"
        index = json.loads((nbdir / "out" / "index.json").read_text())
        tags = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
                if "artifactType" not in m}  # not the SBOM and provenance
        assert tags == {"app"}
        yaml_text = k.execute("%export", "yaml").text().split("\n\n", 1)[1]  # after "wrote PATH"
        assert "Untitled" not in yaml_text and "app:" in yaml_text
    finally:
        k.close()


# --- 14: errors without internals, the failed step's log reachable -------------------------


def test_error_headlines_are_plain_words_not_class_names(kernel, nbdir, kernels):
    bad_magic = kernel.execute("%no_such_magic", "m")
    failed = kernel.execute("false", "f")
    second = start_kernel(nbdir / "test.ipynb", kernels)  # the notebook's build is in use
    try:
        busy = second.execute("true", "b")
    finally:
        second.close()
    heads = [r.error.split(":")[0] for r in (bad_magic, failed, busy)]
    assert heads == ["Cannot run this cell", "Step failed", "Build busy"]
    for run in (bad_magic, failed, busy):
        assert not re.search(r"\w+Error\b|StepFailed", _traceback(run)), _traceback(run)


def test_the_shell_names_the_cell_and_line_not_fd_paths(kernel):
    run = kernel.execute("true\nno-such-command-here", "c0ffee00-aaaa")
    assert run.status == "error"
    assert "/proc/self/fd" not in run.text()
    assert re.search(r"layer test cell c0ffee00: line 2: no-such-command-here: not found", run.text()), \
        run.text()


def test_no_error_shows_the_live_rootfs_path(kernel, nbdir):
    import io
    import tarfile

    from stacker_kernel.storage.location import resolve_storage

    with tarfile.open(nbdir / "nosh.tar", "w") as tar:  # a base without /bin/sh
        info = tarfile.TarInfo("hello")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    run = kernel.execute("%layer nosh\n%from tar nosh.tar\necho hi", "c", timeout=120)
    assert run.status == "error"
    assert run.error.startswith("Container did not start: the layer's rootfs has no /bin/sh"), run.error
    assert str(resolve_storage()) not in _traceback(run), _traceback(run)


def test_a_failed_steps_log_is_saved_beside_the_notebook_named_after_the_step(kernel, nbdir):
    token = uuid.uuid4().hex
    failed = kernel.execute(f"echo before-{token}; false", "bad")
    assert failed.status == "error"
    saved = nbdir / "stacker-logs" / "test-step1-test-failed.log"
    assert f"before-{token}" in saved.read_text()
    tb = _traceback(failed)
    assert "stacker-logs/test-step1-test-failed.log (%log failed shows it)" in tb
    assert "/logs/running-" not in tb  # no path inside the storage
    shown = kernel.execute("%log failed", "log")
    assert shown.status == "ok" and f"before-{token}" in shown.text()
    assert 'href="stacker-logs/test-step1-test-failed.log"' in shown.outputs[0]["data"]["text/html"]
    assert kernel.execute(f"echo worked-{token}", "good").status == "ok"
    latest = kernel.execute("%log", "log2")  # the latest step's log: the one that worked
    assert f"worked-{token}" in latest.text() and "before-" not in latest.text()
    assert (nbdir / "stacker-logs" / "test-step1-test.log").read_text().strip() == f"worked-{token}"
    nothing = kernel.execute("%log failed", "log3")
    assert nothing.status == "error" and "no step has failed" in nothing.error
    wrong = kernel.execute("%log 7", "log4")
    assert wrong.status == "error" and "no step 7" in wrong.error


def test_replayed_and_shown_logs_carry_no_terminal_control(nbdir, kernels):
    """Issue 23 12c: a cached step's replayed output keeps colours but no OSC 52
    clipboard write, cursor move or CR-overwritten fake line; %log shows no escape."""
    token = uuid.uuid4().hex
    loud = (f"printf 'ok-{token}\\n\\033]52;c;ZXZpbA==\\007\\033[2A\\033[Kbuild succeeded"
            "\\rfake\\033[31mred\\033[0m\\n'")
    cells = [("base", BASE), ("loud", loud)]
    nb = write_notebook(nbdir / "loud.ipynb", cells)
    for run in range(2):
        k = start_kernel(nb, kernels)
        try:
            outs = [k.execute(src, cid, timeout=120) for cid, src in cells]
            shown = k.execute("%log 1", "log")
        finally:
            k.close()
        assert all(o.status == "ok" for o in outs) and shown.status == "ok"
        if run == 1:  # a cache hit: the stored output replayed
            text = outs[1].text()
            assert f"ok-{token}" in text and "cached" in text
            assert "\x1b]" not in text and "\x1b[2A" not in text and "\x1b[K" not in text
            assert "\r" not in text and "\x07" not in text and "\x1b[31mred" in text
        for part in (shown.text(), shown.outputs[0]["data"]["text/html"]):
            assert f"ok-{token}" in part and "\x1b" not in part and "\r" not in part and "red" in part


def test_capped_output_points_to_log_n(kernel):
    run = kernel.execute(f": {uuid.uuid4().hex}; yes 0123456789abcdef | head -c 1200000", "big")
    assert run.status == "ok"
    assert "[the output above was cut: %log 1 shows all of it]" in run.text()


# --- 15: Restart & Run All explains itself ----------------------------------------------------


def test_restart_and_run_all_says_what_was_resumed_and_what_comes_from_the_cache(nbdir, kernels):
    token = uuid.uuid4().hex
    cells = [("base", BASE), ("one", f"echo {token}")]
    nb = write_notebook(nbdir / "again.ipynb", cells)
    for _ in range(2):
        k = start_kernel(nb, kernels)
        try:
            runs = [k.execute(src, cid, timeout=120) for cid, src in cells]
        finally:
            k.close()
    first, second = (r.text() for r in runs)
    assert ("[the kernel restarted: this notebook's build goes on where it stopped, at step 1 "
            f"(layer again: echo {token}), found by its cells. Cells run again are not rebuilt when"
            " unchanged: they come from the cache") in first
    assert "layer again starts again from its base" in first
    assert second.index("cached (unchanged, not run again)") < second.index(token)
    assert "its output below is from when it was built" in second


# --- 16: %from docker failures in one line ----------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    yield from serve_registry(tmp_path)


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """skopeo looks for credentials under $XDG_RUNTIME_DIR (else /run/containers/UID, which a
    rootful podman on the machine may have made unreadable): an empty one of the test's."""
    run = tmp_path / "xdg-run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return run


def test_from_docker_on_a_plain_http_registry_says_insecure_in_cell_syntax(nbdir, kernels, registry,
                                                                            no_credentials):
    url = f"docker://{registry}/nothing/here:1"
    k = start_kernel(nbdir / "pull.ipynb", kernels, XDG_RUNTIME_DIR=str(no_credentials))
    try:
        run = k.execute(f"%from docker {url}\necho x", "d", timeout=120)
    finally:
        k.close()
    assert run.status == "error"
    assert run.error == (f"Base image unusable: cannot pull {url}: {registry} speaks plain HTTP, not"
                         f" HTTPS: write %from docker {url} --insecure in the cell (insecure: true in"
                         " a stacker.yaml) if you trust it")


@pytest.mark.parametrize("case", ["dns", "refused", "manifest", "credentials"])
def test_skopeo_failures_become_one_line_with_the_cause(case, storage, registry, no_credentials,
                                                         monkeypatch, tmp_path):
    from stacker_kernel.errors import ImageError
    from stacker_kernel.oci.bases import import_base
    from stacker_kernel.recipe.model import ImageSource
    from stacker_kernel.storage.store import Store

    url, insecure, cause = {
        "dns": ("docker://no-such-host.invalid/x:1", False,
                "the DNS lookup of no-such-host.invalid failed: check the host name"),
        "refused": (f"docker://127.0.0.1:{free_port()}/x:1", False, "refused the connection"),
        "manifest": (f"docker://{registry}/x/y:1", True,
                     "the registry has no such image or tag (manifest unknown)"),
        "credentials": (f"docker://{registry}/x/y:1", True,
                        "the registry credentials could not be read: fix or remove the auth file "
                        f"skopeo names here: reading JSON file \"{tmp_path}/auth.json\""),
    }[case]
    if case == "credentials":
        (tmp_path / "auth.json").write_text("{}")
        (tmp_path / "auth.json").chmod(0)
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    store = Store.open(storage)
    try:
        with pytest.raises(ImageError) as e:
            import_base(store, ImageSource("docker", url=url, insecure=insecure))
    finally:
        store.close()
    message = str(e.value)
    assert message.startswith(f"cannot pull {url}: ") and cause in message
    assert "\n" not in message and "level=fatal" not in message and "pinging" not in message



def test_a_headless_build_of_a_scratch_layer_with_a_run_says_to_give_it_a_base(tmp_path, storage, capsys):
    from stacker_kernel.cli import main

    (tmp_path / "stacker.yaml").write_text("empty:\n  from: {type: scratch}\n  run: echo hi\n")
    assert main(["--storage", str(storage), "build", "--no-oci", "-f", str(tmp_path / "stacker.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].endswith("layer empty is from scratch, which is empty: it has no /bin/sh to"
                                         " run its steps; give it a base (from: type tar, oci or docker)"), err
