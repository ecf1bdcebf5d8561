"""Cells whose steps leave the image say so in place, and %export says which it leaves out.

A real kernel builds on real btrfs; the test plays JupyterLab: it sends
execute requests with `cellId`, keeps every iopub message, and follows the
display ids of the step marks the way a front-end does (an
`update_display_data` rewrites every output with that display id).
"""
from __future__ import annotations

import queue
import re
import time
import uuid

import pytest

from kernel_support import BASE, kernels, nbdir, start_kernel  # noqa: F401 (fixtures)


class Lab:
    """The iopub side of a front-end: outputs by display id, widget models, clicks."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.messages: list[dict] = []
        self.displays: dict[str, dict] = {}  # display id -> its current data
        self.models: dict[str, dict] = {}

    def _take(self, msg: dict) -> None:
        self.messages.append(msg)
        kind, content = msg["msg_type"], msg["content"]
        display_id = content.get("transient", {}).get("display_id") if isinstance(content, dict) else None
        if kind == "display_data" and display_id:
            self.displays[display_id] = content["data"]
        elif kind == "update_display_data" and display_id in self.displays:
            self.displays[display_id] = content["data"]
        elif kind == "comm_open" and content.get("target_name") == "jupyter.widget":
            self.models[content["comm_id"]] = dict(content["data"]["state"])

    def pump(self, timeout: float = 0.2) -> None:
        while True:
            try:
                self._take(self.kernel.kc.get_iopub_msg(timeout=timeout))
            except queue.Empty:
                return

    def run(self, code: str, cell_id: str, timeout: float = 120) -> tuple[dict, list[dict]]:
        """Run a cell; its execute_reply content and its iopub messages."""
        msg = self.kernel.kc.session.msg("execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": cell_id})
        self.kernel.kc.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        mine: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            m = self.kernel.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            self._take(m)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
            mine.append(m)
        while True:
            reply = self.kernel.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"], mine

    def ok(self, code: str, cell_id: str) -> list[dict]:
        reply, outputs = self.run(code, cell_id)
        assert reply["status"] == "ok", reply
        return outputs


def mark_of(outputs: list[dict]) -> str:
    """The display id of the step mark among a cell's outputs."""
    ids = [m["content"]["transient"]["display_id"] for m in outputs
           if m["msg_type"] == "display_data" and m["content"].get("transient", {}).get("display_id", "")
           .startswith("stacker-step-")]
    assert len(ids) == 1, outputs
    return ids[0]


def text(outputs: list[dict]) -> str:
    return "".join(m["content"].get("text", "") or m["content"].get("data", {}).get("text/plain", "")
                   for m in outputs if m["msg_type"] in ("stream", "display_data"))


@pytest.fixture
def lab(nbdir, kernels):
    k = start_kernel(nbdir / "undone.ipynb", kernels)
    front = Lab(k)
    front.ok(BASE, "base")  # execution count 1
    yield front
    k.close()


def _three_steps(lab: Lab) -> list[str]:
    token = uuid.uuid4().hex  # fresh steps, so every mark is of this test's steps
    return [mark_of(lab.ok(f"echo {token} {n} > /f{n}", f"c{n}")) for n in (1, 2, 3)]


def test_a_step_cell_shows_a_mark_saying_its_step_is_in_the_image(lab):
    outputs = lab.ok(f"echo {uuid.uuid4().hex}", "c1")
    data = lab.displays[mark_of(outputs)]
    # the mark is the cell's status line while the step is in the image
    assert data["text/plain"].startswith("[step 1, layer undone: ran in ")


def test_rollback_rewrites_the_marks_of_the_undone_cells_in_place(lab):
    first, second, third = _three_steps(lab)
    reply, outputs = lab.run("%rollback 1", "rb")  # execution count 5
    assert reply["status"] == "ok"
    updated = {m["content"]["transient"]["display_id"] for m in outputs
               if m["msg_type"] == "update_display_data"
               and m["content"]["data"]["text/plain"].startswith("undone")}  # not size updates
    assert updated == {second, third}
    assert lab.displays[second]["text/plain"].startswith("undone by %rollback to step 1 in cell [5]")
    assert "no longer in the image" in lab.displays[third]["text/plain"]
    assert lab.displays[first]["text/plain"].startswith("[step ")


def test_rerunning_an_earlier_cell_marks_the_cells_after_it_undone(lab):
    first, second, third = _three_steps(lab)
    lab.ok(f"echo again {uuid.uuid4().hex}", "c2")  # execution count 5
    assert lab.displays[third]["text/plain"].startswith(
        "undone by re-running an earlier cell as cell [5]")
    assert lab.displays[first]["text/plain"].startswith("[step ")


def test_rerunning_a_cell_of_an_earlier_layer_names_the_layers_it_drops_first(lab):
    token = uuid.uuid4().hex
    lab.ok(f"echo {token} > /a", "a1")
    later = mark_of(lab.ok(f"%layer second\n%from built undone\necho {token} > /b", "b1"))
    outputs = lab.ok(f"echo {token} rerun; echo step-output", "a1")
    said = text(outputs)
    assert "the later layer second leaves the image" in said
    assert said.index("leaves the image") < said.index("step-output")
    assert lab.displays[later]["text/plain"].startswith("undone by re-running an earlier cell")


def test_roll_back_here_in_the_layers_widget_marks_the_undone_cells(lab):
    from ipywidgets._version import __control_protocol_version__

    first, second, third = _three_steps(lab)
    kc = lab.kernel.kc
    kc.shell_channel.send(kc.session.msg(
        "comm_open", {"comm_id": uuid.uuid4().hex, "target_name": "jupyter.widget.control", "data": {}},
        metadata={"version": __control_protocol_version__}))
    lab.ok("%layers", "l")
    button = next(cid for cid, state in lab.models.items()
                  if state.get("_model_name") == "ButtonModel" and state.get("description") == "Roll back here"
                  and re.search(r"\bstep 1\b", state.get("tooltip", "")))
    kc.shell_channel.send(kc.session.msg("comm_msg", {
        "comm_id": button, "data": {"method": "custom", "content": {"event": "click"}}}))
    deadline = time.monotonic() + 60
    while lab.displays[third]["text/plain"].startswith("[step ") and time.monotonic() < deadline:
        lab.pump()
    assert lab.displays[third]["text/plain"].startswith(
        "undone by Roll back here (to step 1) in the %layers table")
    assert lab.displays[second]["text/plain"].startswith("undone by Roll back here")
    assert lab.displays[first]["text/plain"].startswith("[step ")


def test_export_lists_the_executed_cells_it_leaves_out(lab, nbdir):
    token = uuid.uuid4().hex
    lab.ok(f"echo {token} kept", "k")
    lab.ok(f"echo {token} undone", "u")  # cell [3]
    reply, _ = lab.run("false", "f")  # cell [4]
    assert reply["status"] == "error"
    lab.ok("%rollback 1", "rb")  # cell [5]
    said = text(lab.ok(f"%export {nbdir / 'out.yaml'}", "x"))
    assert "2 executed cell(s) are not in this export" in said
    assert f"[3] echo {token} undone (undone by %rollback to step 1 in cell [5])" in said
    assert "[4] false (failed)" in said
    assert "kept" not in said.split("wrote")[0]


def test_export_names_its_default_outputs_after_the_notebook(lab, nbdir):
    lab.ok(f"echo {uuid.uuid4().hex}", "c1")
    assert "undone.stacker.yaml" in text(lab.ok("%export", "x"))
    assert (nbdir / "undone.stacker.yaml").is_file()
    assert not (nbdir / "stacker.yaml").exists()
    lab.ok("%export oci", "o")
    assert (nbdir / "undone-oci" / "index.json").is_file()
    assert not (nbdir / "oci").exists()


def test_export_refuses_an_option_instead_of_writing_a_file_named_after_it(lab, nbdir):
    lab.ok(f"echo {uuid.uuid4().hex}", "c1")
    reply, _ = lab.run("%export --per-cell", "x")
    assert reply["status"] == "error"
    assert "one output path" in reply["evalue"]
    assert not (nbdir / "--per-cell").exists()
