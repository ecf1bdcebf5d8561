"""The kernel over jupyter_client, as JupyterLab drives it: real kernel, engine and container.

Requests are JupyterLab-shaped (`cellId` in the metadata). Each test serves
its own notebook path, so sessions never resume across tests unless the test
means them to.
"""
from __future__ import annotations

import os
import queue
import re
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from kernel_support import BASE, kernel, kernels, nbdir, notebook_dir, start_kernel, write_notebook  # noqa: F401 (fixtures)
from stacker_kernel.kernel.runner import run_notebook
from conftest import in_tree


def _send(kernel, code: str, cell_id: str | None = None) -> str:
    metadata = {"cellId": cell_id} if cell_id else {}
    msg = kernel.kc.session.msg("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True}, metadata=metadata)
    kernel.kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def _reply(kernel, msg_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = kernel.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


def _iopub_until(kernel, msg_id: str, predicate, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id and predicate(msg):
            return msg


def _is_stream_with(text: str):
    return lambda m: m["msg_type"] == "stream" and text in m["content"]["text"]


def test_output_streams_before_the_cell_ends(kernel):
    # A fresh script each time: a cache hit would replay both lines at once.
    msg_id = _send(kernel, f": {uuid.uuid4().hex}; echo first; sleep 4; echo second", "c1")
    first = _iopub_until(kernel, msg_id, _is_stream_with("first"))
    assert "second" not in first["content"]["text"]
    # The cell is still running: its reply has not come yet.
    with pytest.raises(queue.Empty):
        kernel.kc.get_shell_msg(timeout=0.5)
    _iopub_until(kernel, msg_id, _is_stream_with("second"))
    assert _reply(kernel, msg_id)["content"]["status"] == "ok"


def test_failed_cell_replies_error_naming_status_and_command(kernel):
    run = kernel.execute("true\nfalse\necho unreachable", "c1")
    assert run.status == "error"
    assert run.error.startswith("Step failed")
    assert "1" in run.error and "false" in run.error
    assert "unreachable" not in run.text()


def test_error_reply_aborts_the_queued_cells(kernel):
    ids = [_send(kernel, code, f"c{n}") for n, code in
           enumerate(["echo one", "false", "echo never-runs"])]
    statuses = [_reply(kernel, i)["content"]["status"] for i in ids]
    assert statuses == ["ok", "error", "aborted"]


def test_interrupt_ends_a_long_cell_with_an_error_and_the_next_cell_works(kernel):
    msg_id = _send(kernel, "echo started; sleep 1000", "long")
    _iopub_until(kernel, msg_id, _is_stream_with("started"))
    kernel.km.interrupt_kernel()  # interrupt_mode message: an interrupt_request
    reply = _reply(kernel, msg_id, timeout=60)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "Interrupted"
    after = kernel.execute("echo after-interrupt", "next")
    assert after.status == "ok"
    assert "after-interrupt" in after.text()


def test_failed_cell_leaves_no_trace_in_the_rootfs(kernel):
    failed = kernel.execute("touch /left-behind; false", "c1")
    assert failed.status == "error"
    check = kernel.execute("test ! -e /left-behind && echo clean", "c2")
    assert check.status == "ok" and "clean" in check.text()


def test_shell_state_carries_from_cell_to_cell(kernel):
    assert kernel.execute("cd /tmp; GREETING=hi", "c1").status == "ok"
    run = kernel.execute('echo "$GREETING from $(pwd)"', "c2")
    assert "hi from /tmp" in run.text()


def test_rerunning_a_cell_by_id_rolls_back_to_its_parent_first(kernel):
    assert kernel.execute("touch /old-run", "edited").status == "ok"
    rerun = kernel.execute("touch /new-run; ls /", "edited")
    assert rerun.status == "ok"
    listing = rerun.text().split()
    assert "new-run" in listing
    assert "old-run" not in listing


def test_bad_magic_line_is_an_error_and_runs_nothing(kernel):
    run = kernel.execute("%no_such_magic\ntouch /should-not-exist", "c1")
    assert run.status == "error" and run.error.startswith("Cannot run this cell")
    check = kernel.execute("test ! -e /should-not-exist && echo absent", "c2")
    assert "absent" in check.text()


def test_restart_and_run_all_of_an_unchanged_notebook_is_served_from_the_cache(nbdir, kernels):
    token = uuid.uuid4().hex  # a fresh cache key: the first run must really run
    nb = write_notebook(nbdir / "cached.ipynb", [
        ("base", "%layer cached\n" + BASE),
        ("one", f"echo {token} > /token; date +%s%N"),
        ("two", "cat /token"),
    ])
    first = _run_all(nb, kernels)
    second = _run_all(nb, kernels)
    assert [r.status for r in first + second] == ["ok"] * 6
    assert [r.cached for r in first[1:]] == [False, False]
    assert [r.cached for r in second[1:]] == [True, True]
    # The replayed output is the stored one: `date` did not run again.
    # (after the line saying it is cached)
    assert second[1].text().split("\n")[1] == first[1].text().split("\n")[0]
    assert "cached (unchanged, not run again)" in second[1].text()


def test_rerunning_the_first_cell_after_a_restart_starts_its_layer_over(nbdir, kernels):
    # Restart & Run All of a notebook whose first cell sets the base without %layer.
    nb = write_notebook(nbdir / "from-only.ipynb", [
        ("base", BASE),
        ("one", "echo built > /one"),
    ])
    first = _run_all(nb, kernels)
    second = _run_all(nb, kernels)
    assert [r.status for r in first + second] == ["ok"] * 4, [r.error for r in second]
    assert second[1].cached


def _run_all(nb: Path, kernels: Path):
    k = start_kernel(nb, kernels)
    try:
        runs = []
        for cell in nbformat.read(nb, as_version=4).cells:
            runs.append(k.execute(cell.source, cell.id, timeout=120))
        return runs
    finally:
        k.close()


def test_restart_resumes_the_previous_session_with_a_line_saying_so(nbdir, kernels):
    # The build is found by its cells: the saved notebook holds the cell run after the restart.
    nb = write_notebook(nbdir / "resume.ipynb", [("base", BASE), ("m", "echo resumable > /marker"),
                                                 ("after-restart", "cat /marker")])
    k = start_kernel(nb, kernels)
    try:
        assert k.execute(BASE, "base", timeout=120).status == "ok"
        assert k.execute("echo resumable > /marker", "m").status == "ok"
    finally:
        k.close()
    k = start_kernel(nb, kernels)
    try:
        run = k.execute("cat /marker", "after-restart")
        assert "the kernel restarted" in run.text()
        assert "resumable" in run.text()
    finally:
        k.close()


def test_storage_error_is_the_error_of_every_cell_and_the_kernel_keeps_answering(
        tmp_path, kernels):
    k = start_kernel(tmp_path / "nostorage.ipynb", kernels,
                     STACKER_KERNEL_STORAGE=str(tmp_path / "not-a-storage-root"))
    try:
        for cell in ("c1", "c2"):
            run = k.execute("true", cell)
            assert run.status == "error" and run.error.startswith("Storage unusable")
        assert k.kc.kernel_info(reply=True, timeout=15)["content"]["status"] == "ok"
    finally:
        k.close()


def test_comm_info_lists_comms_opened_on_the_widget_target(kernel):
    # What JupyterLab's widget manager does first: open the control comm.
    from ipywidgets._version import __control_protocol_version__

    comm_id = uuid.uuid4().hex
    kernel.kc.shell_channel.send(kernel.kc.session.msg(
        "comm_open", {"comm_id": comm_id, "target_name": "jupyter.widget.control", "data": {}},
        metadata={"version": __control_protocol_version__}))
    reply = kernel.kc.comm_info(target_name="jupyter.widget.control", reply=True, timeout=15)
    assert reply["content"]["status"] == "ok"
    assert reply["content"]["comms"][comm_id]["target_name"] == "jupyter.widget.control"


def test_subshell_creation_is_refused_with_a_reply(kernel):
    msg = kernel.kc.session.msg("create_subshell_request", {})
    kernel.kc.control_channel.send(msg)
    reply = kernel.kc.get_control_msg(timeout=15)
    assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]
    assert reply["content"]["status"] == "error"


def test_completion_lists_rootfs_paths_and_commands(kernel):
    assert kernel.execute("mkdir -p /srv/site", "c1").status == "ok"
    paths = kernel.kc.complete("ls /sr", reply=True, timeout=15)["content"]
    assert "/srv/" in paths["matches"]
    commands = kernel.kc.complete("busyb", reply=True, timeout=15)["content"]
    assert commands["matches"] == ["busybox"]


def test_layers_magic_shows_a_row_per_step(kernel):
    assert kernel.execute("echo step-one", "s1").status == "ok"
    layers = kernel.execute("%layers", "l")
    assert layers.status == "ok"
    assert "echo step-one" in layers.text()
    assert re.search(r" \[\d+\] +echo step-one", layers.text())  # the cell by its prompt, not its id


def test_demo_notebook_builds_and_exports_its_stacker_yaml(busybox_tar, kernels, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    nbdir = notebook_dir(tmp_path / "demo", busybox_tar)
    nb = nbdir / "hello.ipynb"
    nb.write_bytes((repo / "notebooks" / "hello.ipynb").read_bytes())
    yaml_path = nbdir / "stacker.yaml"
    runs = run_notebook(nb, timeout=300, extra=[f"%export {yaml_path}"], kernels_dir=kernels)
    assert [r.status for r in runs] == ["ok"] * len(runs), [r.error for r in runs]
    text = yaml_path.read_text()
    assert "hello:" in text and "hello-web:" in text


def test_kernel_killed_with_kill_9_leaves_no_process_and_loses_no_snapshot(nbdir, kernels):
    import os
    import signal

    from stacker_kernel.storage.location import resolve_storage
    from stacker_kernel.storage.store import Store

    marker = f"sleep 9{uuid.uuid4().int % 10**6:06d}"
    k = start_kernel(nbdir / "killed.ipynb", kernels)
    try:
        assert k.execute(BASE, "base", timeout=120).status == "ok"
        done = k.execute(f"echo committed > /c-{marker.split()[1]}", "commit", timeout=60)
        assert done.status == "ok"
        msg_id = _send(k, f"{marker} & wait", "hang")
        _iopub_until(k, msg_id, lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "busy")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _processes(marker):
            time.sleep(0.1)
        assert _processes(marker), "the step never started"
        os.kill(k.km.provisioner.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _processes(marker):
            time.sleep(0.1)
        assert _processes(marker) == []
    finally:
        k.close()
    with Store.open(resolve_storage()) as store:
        name = str((nbdir / "killed.ipynb").resolve())
        sess = next(s for s in store.find_sessions(name=name) if s.history)
        snaps = [store.get(i) for i in sess.history]
        assert any(in_tree(s.path, f"c-{marker.split()[1]}").exists() for s in snaps)
        assert not store.live_path(sess.id).exists()  # collected on open: its owner is dead


def _processes(cmdline: str) -> list[int]:
    want = cmdline.split()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")[:2] == want:
                    found.append(int(pid))
            except OSError:
                pass
    return found


def test_generate_labels_cell_is_not_a_step_and_labels_the_exported_image(kernel, nbdir):
    import json

    assert kernel.execute("echo 2.0 > /version", "v", timeout=60).status == "ok"
    labels = kernel.execute("%generate_labels\ncp /version /stacker/oci-labels/version", "labels", timeout=60)
    assert labels.status == "ok" and "generate_labels set" in labels.text()
    steps_before = kernel.execute("%layers", "l1", timeout=60).text()
    assert "oci-labels" not in steps_before
    oci = nbdir / "oci"
    assert kernel.execute(f"%export oci {oci}", "exp", timeout=120).status == "ok"
    index = json.loads((oci / "index.json").read_text())
    blob = lambda d: json.loads((oci / "blobs/sha256" / d.split(":")[1]).read_text())  # noqa: E731
    image = [m for m in index["manifests"] if "artifactType" not in m][-1]  # not its SBOM or provenance
    config = blob(blob(image["digest"])["config"]["digest"])
    assert config["config"]["Labels"]["version"] == "2.0"


def test_completion_of_a_relative_path_starts_at_the_shells_cwd(kernel):
    assert kernel.execute("mkdir -p /srv/site/htdocs; cd /srv/site", "c1").status == "ok"
    paths = kernel.kc.complete("ls htd", reply=True, timeout=15)["content"]
    assert paths["matches"] == ["htdocs/"]


def test_completion_offers_the_variables_earlier_steps_of_the_layer_set(kernel):
    assert kernel.execute("FOLDER_PLAIN=1; export FOLDER_EXPORTED=2", "c1").status == "ok"
    plain = kernel.kc.complete("echo $FOL", reply=True, timeout=15)["content"]
    assert plain["matches"] == ["$FOLDER_EXPORTED", "$FOLDER_PLAIN"]
    assert plain["cursor_start"] == len("echo ")
    braced = kernel.kc.complete('echo "${FOLDER_E', reply=True, timeout=15)["content"]
    assert braced["matches"] == ["${FOLDER_EXPORTED}"]
    build_env = kernel.kc.complete("echo $STACKER_L", reply=True, timeout=15)["content"]
    assert build_env["matches"] == ["$STACKER_LAYER_NAME"]
    in_cell = kernel.kc.complete("FOLDER_NEW=3\necho $FOLDER_N", reply=True, timeout=15)["content"]
    assert in_cell["matches"] == ["$FOLDER_NEW"]


def _inspect(kernel, code: str) -> str:
    reply = kernel.kc.inspect(code, len(code), reply=True, timeout=60)["content"]
    assert reply["status"] == "ok" and reply["found"], reply
    return reply["data"]["text/plain"]


def test_inspection_shows_whatis_and_the_first_lines_of_help_from_the_snapshot(kernel):
    setup = kernel.execute(
        "mkdir -p /usr/share/man/man1\n"
        "printf '.TH GREET 1\\n.SH NAME\\ngreet \\\\- say hello nicely\\n.SH SYNOPSIS\\n.B greet\\n'"
        " > /usr/share/man/man1/greet.1\n"
        "printf '#!/bin/sh\\necho \"Usage: greet [NAME]\"\\ntouch /tmp/greeted 2>/dev/null\\n' > /usr/bin/greet\n"
        "chmod +x /usr/bin/greet", "setup")
    assert setup.status == "ok", setup.error
    text = _inspect(kernel, "greet")
    assert "greet is /usr/bin/greet in the container" in text
    assert "greet (1) - say hello nicely" in text
    assert "$ greet --help\nUsage: greet [NAME]" in text
    # Run in the read-only snapshot: its attempt to write left nothing in the image.
    check = kernel.execute("test ! -e /tmp/greeted && echo untouched", "check")
    assert "untouched" in check.text()
    assert "Usage: ls" in _inspect(kernel, "ls")  # busybox's help of the applet


def test_inspection_cuts_off_a_help_that_never_ends(kernel):
    slow = kernel.execute("printf '#!/bin/sh\\necho starting\\nsleep 1000\\n' > /usr/bin/slowpoke;"
                          " chmod +x /usr/bin/slowpoke", "slow")
    assert slow.status == "ok", slow.error
    text = _inspect(kernel, "slowpoke")
    assert "starting" in text and "did not finish within 3 s" in text
    assert _processes("sleep 1000") == []
