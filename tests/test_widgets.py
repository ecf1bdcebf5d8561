"""The widgets over the kernel protocol: what JupyterLab's widget manager sees and sends.

A real kernel builds on real btrfs in a real user namespace; the test plays
the front-end: it mirrors the widget models from the iopub comm messages
(comm_open, update, comm_close) and clicks buttons by sending the `comm_msg`
a button view sends. The real-browser test is tests/test_browser.py.
"""
from __future__ import annotations

import base64
import hashlib
import queue
import re
import time
import uuid
from pathlib import Path

import nbformat
import pytest

from kernel_support import BASE, kernels, nbdir, start_kernel, write_notebook  # noqa: F401 (fixtures)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class FrontEnd:
    """The kernel's widget models as a front-end holds them, kept from iopub messages."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.models: dict[str, dict] = {}

    def _apply(self, msg: dict) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "comm_open" and content.get("target_name") == "jupyter.widget":
            self.models[content["comm_id"]] = dict(content["data"]["state"])
        elif kind == "comm_msg" and content["data"].get("method") in ("update", "echo_update"):
            self.models.setdefault(content["comm_id"], {}).update(content["data"]["state"])
        elif kind == "comm_close":
            self.models.pop(content["comm_id"], None)

    def pump(self, timeout: float = 0.1) -> list[dict]:
        """Apply the iopub messages that arrive within `timeout`; returns them."""
        seen = []
        while True:
            try:
                msg = self.kernel.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                return seen
            self._apply(msg)
            seen.append(msg)

    def execute(self, code: str, cell_id: str, timeout: float = 120) -> tuple[dict, list[dict]]:
        """Run a cell; returns its execute_reply content and its iopub output messages."""
        msg_id = self.send_execute(code, cell_id)
        outputs: list[dict] = []
        deadline = time.monotonic() + timeout
        idle = False
        while not idle:
            msg = self.kernel.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            self._apply(msg)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] in ("stream", "display_data", "error"):
                outputs.append(msg)
            idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
        return self.reply(msg_id, deadline - time.monotonic()), outputs

    def send_execute(self, code: str, cell_id: str) -> str:
        msg = self.kernel.kc.session.msg("execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": cell_id})
        self.kernel.kc.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    def reply(self, msg_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kernel.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    def ok(self, code: str, cell_id: str) -> list[dict]:
        reply, outputs = self.execute(code, cell_id)
        assert reply["status"] == "ok", reply
        return outputs

    def find(self, **attrs: str) -> list[str]:
        """Ids of the models whose state has these values (a regex for `match_*` keys)."""
        found = []
        for comm_id, state in self.models.items():
            good = True
            for key, want in attrs.items():
                if key.startswith("match_"):
                    good = good and re.search(want, str(state.get(key[6:], ""))) is not None
                else:
                    good = good and state.get(key) == want
            if good:
                found.append(comm_id)
        return found

    def wait_for(self, timeout: float = 60, **attrs: str) -> str:
        """The id of the (last-opened) model with these attributes, once it exists."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(**attrs)
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no widget with {attrs} within {timeout} s")
            self.pump()

    def wait_gone(self, timeout: float = 60, **attrs: str) -> None:
        deadline = time.monotonic() + timeout
        while self.find(**attrs):
            if time.monotonic() > deadline:
                raise AssertionError(f"a widget with {attrs} is still shown after {timeout} s")
            self.pump()

    def connect_widget_manager(self) -> None:
        """What JupyterLab's widget manager does when it connects: open the control comm."""
        from ipywidgets._version import __control_protocol_version__

        self.kernel.kc.shell_channel.send(self.kernel.kc.session.msg(
            "comm_open", {"comm_id": uuid.uuid4().hex, "target_name": "jupyter.widget.control",
                          "data": {}}, metadata={"version": __control_protocol_version__}))

    def click(self, comm_id: str) -> None:
        """What a button view sends on a click."""
        self.kernel.kc.shell_channel.send(self.kernel.kc.session.msg("comm_msg", {
            "comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}}))

    def click_button(self, tooltip: str) -> None:
        self.click(self.wait_for(_model_name="ButtonModel", tooltip=tooltip))

    def html_values(self) -> list[str]:
        return [s.get("value", "") for s in self.models.values() if s.get("_model_name") == "HTMLModel"]


@pytest.fixture
def plain(nbdir, kernels):
    """A kernel whose client renders no widgets (a console, nbclient, the headless runner)."""
    k = start_kernel(nbdir / "widgets.ipynb", kernels)
    front = FrontEnd(k)
    front.ok(BASE, "base")
    yield front
    k.close()


@pytest.fixture
def ui(plain):
    """A kernel connected to a widget manager, as in JupyterLab."""
    plain.connect_widget_manager()
    return plain


def _offered(ui: FrontEnd, name: str) -> str:
    """The HTML of the download the browser widget offers for file `name` (its Output widget)."""
    pattern = f'download="{re.escape(name)}"'
    output = ui.wait_for(_model_name="OutputModel", match_outputs=pattern)
    return ui.models[output]["outputs"][0]["data"]["text/html"]


def _data_uri_bytes(offered: str, name: str) -> bytes:
    m = re.search(r'href="data:application/octet-stream;base64,([^"]*)" download="' + re.escape(name), offered)
    assert m, f"no data: link for {name} in {offered}"
    return base64.b64decode(m.group(1))


def _wait_html(ui: FrontEnd, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for value in ui.html_values():
            if re.search(pattern, value):
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no HTML widget matching {pattern!r} within {timeout} s")
        ui.pump()


# --- %layers ------------------------------------------------------------------


def test_layers_is_a_plain_table_until_a_widget_front_end_connects(plain):
    plain.ok("echo one > /one", "s1")
    outputs = plain.ok("%layers", "l")
    data = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"][0]
    assert WIDGET_VIEW not in data
    assert "echo one &gt; /one" in data["text/html"]
    assert not plain.models


def test_browse_without_a_widget_front_end_says_what_to_use_instead(plain):
    plain.ok("echo one > /one", "s1")
    reply, _ = plain.execute("%browse", "b")
    assert reply["status"] == "error"
    assert "%grab PATH" in reply["evalue"]


def test_layers_displays_a_widget_view_with_the_table_as_plain_text(ui):
    ui.ok("echo one > /one", "s1")
    outputs = ui.ok("%layers", "l")
    data = [m["content"]["data"] for m in outputs if m["msg_type"] == "display_data"][0]
    assert data[WIDGET_VIEW]["model_id"] in ui.models
    assert "echo one > /one" in data["text/plain"]
    assert "echo one &gt; /one" in data["text/html"]  # for renderers without widgets


def test_layers_widget_has_a_row_per_step_with_roll_back_diff_and_browse(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("echo two > /two", "s2")
    ui.ok("%layers", "l")
    for step in (1, 2):
        ui.wait_for(_model_name="ButtonModel", tooltip=f"roll back to step {step}")
        ui.wait_for(_model_name="ButtonModel", tooltip=f"files step {step} changed")
        ui.wait_for(_model_name="ButtonModel", tooltip=f"browse the snapshot of step {step}")
    assert any("echo two &gt; /two" in v for v in ui.html_values())


def test_roll_back_here_returns_the_container_to_that_step(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("echo two > /two", "s2")
    ui.ok("%layers", "l")
    ui.click_button("roll back to step 1")
    ui.wait_gone(_model_name="ButtonModel", tooltip="roll back to step 2")
    ui.ok("test -e /one && test ! -e /two", "check")


def test_layers_widget_adds_the_row_of_a_new_cell(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("%layers", "l")
    ui.ok("echo two > /two", "s2")
    ui.wait_for(_model_name="ButtonModel", tooltip="roll back to step 2")


def test_a_new_step_builds_one_row_however_many_layers_outputs_show_it(ui):
    for n in range(4):
        ui.ok(f"echo {n} > /f{n}", f"s{n}")
    ui.ok("%layers", "l1")
    ui.ok("%layers", "l2")
    ui.pump(1)
    seen: list[dict] = []
    apply = ui._apply
    ui._apply = lambda msg: seen.append(msg) or apply(msg)
    ui.ok("echo new > /new", "s9")
    ui.wait_for(_model_name="ButtonModel", tooltip="roll back to step 5")
    ui.pump(1)
    opened = [m["content"]["data"]["state"] for m in seen if m["msg_type"] == "comm_open"]
    buttons = [s["tooltip"] for s in opened if s.get("_model_name") == "ButtonModel"]
    assert sorted(buttons) == ["browse the snapshot of step 5", "files step 5 changed", "roll back to step 5"]
    assert not [m for m in seen if m["msg_type"] == "comm_close"]  # no row was rebuilt
    # Step 4 is no longer the head: its Roll back here is enabled, step 5's is not.
    for comm_id in ui.find(_model_name="ButtonModel", tooltip="roll back to step 4"):
        assert ui.models[comm_id]["disabled"] is False
    for comm_id in ui.find(_model_name="ButtonModel", tooltip="roll back to step 5"):
        assert ui.models[comm_id]["disabled"] is True


def test_layers_widget_shows_a_steps_size_once_measured(ui):
    ui.ok("%layers", "l")
    ui.ok("head -c 3000 /dev/zero > /f", "s1")
    _wait_html(ui, r"\+2\.9 KiB")


def test_a_long_history_shows_its_newest_steps_a_page_at_a_time(ui):
    for n in range(45):
        ui.ok(f"echo {n} > /f", f"s{n}")
    ui.ok("%layers", "l")
    ui.wait_for(_model_name="ButtonModel", tooltip="roll back to step 45")
    ui.wait_for(_model_name="ButtonModel", tooltip="roll back to step 6")
    assert not ui.find(_model_name="ButtonModel", tooltip="roll back to step 5")  # not built
    _wait_html(ui, "steps 6–45 of 45")
    ui.click(ui.wait_for(_model_name="ButtonModel", description="earlier steps"))
    ui.wait_for(_model_name="ButtonModel", tooltip="roll back to step 5")
    ui.wait_gone(_model_name="ButtonModel", tooltip="roll back to step 45")
    ui.ok("echo new > /new", "s45")  # a page the user chose stays put
    _wait_html(ui, "steps 1–40 of 46")


UUID = "0f6b9a2e-4c1d-4e8a-9b7f-2d3c4e5f6a7b"  # a cell id as JupyterLab makes them


def test_layers_widget_names_cells_by_their_execution_count_not_their_uuid(ui):
    ui.ok("echo one > /one", UUID)  # execution count 2: the base cell was 1
    ui.ok("%layers", "l")
    row = _wait_html(ui, "echo one &gt; /one")
    assert ">[2]<" in row
    assert not [v for v in ui.html_values() if "0f6b9a2e" in v]


def test_layers_table_names_cells_by_their_execution_count(plain):
    plain.ok("echo one > /one", UUID)
    outputs = plain.ok("%layers", "l")
    text = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "display_data"][0]
    assert re.search(r"^1 .* \[2\] +echo one > /one", text, re.M), text
    assert "0f6b9a2e" not in text


def test_a_resumed_step_is_named_by_its_prompt_in_the_saved_notebook(nbdir, kernels):
    path = write_notebook(nbdir / "resumed.ipynb", [("base", BASE), ("md", "# notes"), (UUID, "echo one > /one")])
    first = FrontEnd(start_kernel(path, kernels))
    first.ok(BASE, "base")
    first.ok("echo one > /one", UUID)
    first.kernel.close()
    nb = nbformat.read(path, as_version=4)  # saved as JupyterLab saves it: with the prompts
    nb.cells[0].execution_count, nb.cells[2].execution_count = 1, 2
    nbformat.write(nb, path)
    again = FrontEnd(start_kernel(path, kernels))
    try:
        outputs = again.ok("%layers", "l")
        text = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "display_data"][0]
        assert re.search(r"\[2\] +echo one > /one", text), text  # the prompt the saved notebook shows
    finally:
        again.kernel.close()


def test_layers_widget_drops_rows_after_the_rollback_magic(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("echo two > /two", "s2")
    ui.ok("%layers", "l")
    ui.wait_for(_model_name="ButtonModel", tooltip="roll back to step 2")
    ui.ok("%rollback 1", "rb")
    ui.wait_gone(_model_name="ButtonModel", tooltip="roll back to step 2")


def test_diff_button_lists_the_files_a_step_changed(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("echo two > /two", "s2")
    ui.ok("%layers", "l")
    ui.click_button("files step 2 changed")
    diff = _wait_html(ui, "stacker-diff")
    assert "A /two" in diff and "/one" not in diff


def test_browse_button_opens_the_snapshot_of_that_step(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("echo two > /two", "s2")
    ui.ok("%layers", "l")
    ui.click_button("browse the snapshot of step 1")
    _wait_html(ui, r"<b>/</b> in step 1 ")
    ui.wait_for(_model_name="ButtonModel", tooltip="download /one")
    assert not ui.find(_model_name="ButtonModel", tooltip="download /two")


def test_rollback_button_refuses_while_a_cell_runs(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("echo two > /two", "s2")
    ui.ok("%layers", "l")
    msg_id = ui.send_execute("sleep 60", "slow")
    time.sleep(1)  # let the step start; the assertion below does not depend on it
    ui.click_button("roll back to step 1")
    _wait_html(ui, "a cell is running")
    ui.kernel.km.interrupt_kernel()
    assert ui.reply(msg_id, 60)["status"] == "error"
    ui.ok("test -e /two", "check")


# --- %browse ------------------------------------------------------------------


DATA = ("mkdir -p /data/sub && printf 'hello bytes\\n' > /data/f && chown 12:34 /data/f"
        " && chmod 640 /data/f && mkfifo /data/pipe && ln -s ../../../../../etc /data/up"
        " && ln -s /data/sub /data/tosub && echo in-sub > /data/sub/g")


def test_browse_lists_size_mode_owner_and_mtime(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    _wait_html(ui, r"<b>/data</b> in step 1 ")
    row = _wait_html(ui, r"-rw-r-----")
    assert ">12 B<" in row and ">12:34<" in row
    assert re.search(r">\d{4}-\d\d-\d\d \d\d:\d\d<", row)


def test_clicking_a_directory_enters_it_and_dotdot_goes_back_up(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    ui.click_button("open /data/sub")
    ui.wait_for(_model_name="ButtonModel", tooltip="download /data/sub/g")
    up = ui.wait_for(_model_name="ButtonModel", description="..")
    ui.click(up)
    ui.wait_for(_model_name="ButtonModel", tooltip="download /data/f")


def test_leaving_a_directory_closes_the_models_of_its_rows(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    up = ui.wait_for(_model_name="ButtonModel", description="..")
    ui.wait_for(_model_name="ButtonModel", tooltip="download /data/f")
    ui.pump(0.5)
    before = len(ui.models)
    ui.click_button("open /data/sub")
    ui.wait_gone(_model_name="ButtonModel", tooltip="download /data/f")
    ui.click(up)
    ui.wait_gone(_model_name="ButtonModel", tooltip="download /data/sub/g")
    ui.wait_for(_model_name="ButtonModel", tooltip="download /data/f")
    ui.pump(0.5)
    assert len(ui.models) == before


def test_dotdot_is_disabled_at_the_root(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse", "b")
    _wait_html(ui, r"<b>/</b> in step 1 ")
    up = ui.wait_for(_model_name="ButtonModel", description="..")
    assert ui.models[up]["disabled"] is True


def test_symlink_to_a_directory_opens_its_target_inside_the_rootfs(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    assert any("tosub/ → /data/sub" in ui.models[i]["description"]
               for i in ui.find(_model_name="ButtonModel", match_tooltip="^open /data/sub$"))
    ui.click(ui.find(_model_name="ButtonModel", match_description="^tosub/")[0])
    _wait_html(ui, r"<b>/data/sub</b>")


def test_symlink_leaving_the_rootfs_is_shown_with_its_target_and_not_followed(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    assert any("up → ../../../../../etc" in v for v in ui.html_values())
    assert "<i>points outside the rootfs</i>" in ui.html_values()
    assert not ui.find(_model_name="ButtonModel", match_description="^up/")


def test_special_files_say_why_they_cannot_be_downloaded(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    assert "<i>FIFO: not downloadable</i>" in ui.html_values()
    assert not ui.find(_model_name="ButtonModel", tooltip="download /data/pipe")


def test_small_file_downloads_as_a_data_uri_of_its_bytes(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    ui.click_button("download /data/f")
    assert _data_uri_bytes(_offered(ui, "f"), "f") == b"hello bytes\n"


def test_download_link_starts_the_download_by_itself_once(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    ui.click_button("download /data/f")
    offered = _offered(ui, "f")
    # The one click on Download is enough: the offered link comes with the script that
    # clicks it (the real-browser test checks the file arrives), once.
    assert "<script>" in offered and "a.click()" in offered and "stackerDownloads" in offered


def test_file_over_256_kib_is_served_beside_the_notebook_not_inlined(ui, nbdir):
    ui.ok("mkdir /mid && yes stacker | head -c 300000 > /mid/blob", "mid")
    ui.ok("%browse /mid", "b")
    ui.click_button("download /mid/blob")
    offered = _offered(ui, "blob")
    assert 'href="data:' not in offered
    href = re.search(r'href="([^"]+)" download="blob"', offered).group(1)
    assert href.startswith("stacker-downloads/")
    assert (nbdir / href).read_bytes() == (b"stacker\n" * 37500)[:300000]


def test_large_file_is_copied_beside_the_notebook_and_offered_as_a_served_link(ui, nbdir):
    ui.ok("mkdir /big && yes stacker | head -c 6000000 > /big/blob", "big")
    ui.ok("%browse /big", "b")
    ui.click_button("download /big/blob")
    output = ui.wait_for(_model_name="OutputModel", match_outputs="stacker-downloads/")
    html_link = ui.models[output]["outputs"][0]["data"]["text/html"]
    href = re.search(r'href="([^"]+)" download="blob"', html_link).group(1)
    copy = nbdir / href
    assert copy.read_bytes() == (b"stacker\n" * 750000)[:6000000]


def test_browse_by_step_number_shows_that_snapshot(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("echo two > /two", "s2")
    ui.ok("%browse 1 /", "b")
    _wait_html(ui, r"<b>/</b> in step 1 ")
    assert not ui.find(_model_name="ButtonModel", tooltip="download /two")


def test_browse_of_a_missing_path_is_an_error_naming_it(ui):
    ui.ok("echo one > /one", "s1")
    reply, _ = ui.execute("%browse /nope", "b")
    assert reply["status"] == "error"
    assert "/nope does not exist" in reply["evalue"]


def test_browser_answers_clicks_while_a_cell_runs(ui):
    ui.ok(DATA, "data")
    ui.ok("%browse /data", "b")
    msg_id = ui.send_execute("sleep 60", "slow")
    time.sleep(1)  # let the step start
    ui.click_button("open /data/sub")
    ui.wait_for(_model_name="ButtonModel", tooltip="download /data/sub/g")
    with pytest.raises(queue.Empty):  # the sleeping cell has not replied yet
        ui.kernel.kc.get_shell_msg(timeout=0.01)
    ui.kernel.km.interrupt_kernel()
    assert ui.reply(msg_id, 60)["status"] == "error"


# --- %grab --------------------------------------------------------------------


def test_grab_copies_from_the_snapshot_beside_the_notebook_with_a_download_link(ui, nbdir):
    ui.ok(DATA, "data")
    outputs = ui.ok("%grab /data/f", "g")
    html_out = [m["content"]["data"]["text/html"] for m in outputs if m["msg_type"] == "display_data"][0]
    assert '<a href="f" download="f">' in html_out
    assert (nbdir / "f").read_bytes() == b"hello bytes\n"


def test_grab_to_dest_writes_there(ui, nbdir):
    ui.ok(DATA, "data")
    ui.ok("%grab /data/sub out", "g")
    assert (nbdir / "out" / "g").read_text() == "in-sub\n"


def test_grab_reads_the_snapshot_not_a_failed_cells_leftovers(ui, nbdir):
    ui.ok(DATA, "data")
    reply, _ = ui.execute("echo changed > /data/f; false", "bad")
    assert reply["status"] == "error"
    ui.ok("%grab /data/f", "g")
    assert hashlib.sha256((nbdir / "f").read_bytes()).digest() == hashlib.sha256(b"hello bytes\n").digest()


def _tree(root: Path) -> list[tuple[str, str]]:
    return sorted((str(p.relative_to(root)), p.read_text() if p.is_file() and not p.is_symlink() else "")
                  for p in root.rglob("*"))


def test_grab_of_a_directory_twice_gives_the_same_tree(ui, nbdir):
    ui.ok(DATA, "data")
    for _ in range(2):
        ui.ok("%grab /data/sub", "g")
        assert _tree(nbdir / "sub") == [("g", "in-sub\n")]


def test_grab_of_a_directory_skips_the_fifo_with_a_note(ui, nbdir):
    ui.ok(DATA, "data")
    outputs = ui.ok("%grab /data", "g")
    text = [m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "display_data"][0]
    assert "skipped /data/pipe: a FIFO" in text.splitlines(), text
    assert _tree(nbdir / "data") == [("f", "hello bytes\n"), ("sub", ""), ("sub/g", "in-sub\n"),
                                     ("tosub", ""), ("up", "")]
    assert (nbdir / "data" / "up").readlink() == Path("../../../../../etc")


def test_grab_dest_with_a_slash_puts_the_copy_inside(ui, nbdir):
    ui.ok(DATA, "data")
    for _ in range(2):
        ui.ok("%grab /data/sub dist/", "g")
    assert _tree(nbdir / "dist") == [("sub", ""), ("sub/g", "in-sub\n")]


def test_grab_of_a_fifo_is_an_error_naming_it(ui, nbdir):
    ui.ok(DATA, "data")
    reply, _ = ui.execute("%grab /data/pipe", "g")
    assert reply["status"] == "error"
    assert "/data/pipe is a FIFO" in reply["evalue"]
    assert not (nbdir / "pipe").exists()


def test_large_sparse_file_download_copy_stays_sparse(ui, nbdir):
    ui.ok("mkdir /big && truncate -s 2G /big/sparse && echo end >> /big/sparse", "big")
    ui.ok("%browse /big", "b")
    ui.click_button("download /big/sparse")
    output = ui.wait_for(_model_name="OutputModel", match_outputs="stacker-downloads/")
    html_link = ui.models[output]["outputs"][0]["data"]["text/html"]
    copy = nbdir / re.search(r'href="([^"]+)" download="sparse"', html_link).group(1)
    st = copy.stat()
    assert st.st_size == (2 << 30) + 4
    assert st.st_blocks * 512 < 16 << 20


# --- where the code lives -------------------------------------------------------


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


KERNEL_DIR = Path(__file__).resolve().parent.parent / "stacker_kernel" / "kernel"


def test_magics_and_widgets_do_not_import_each_other():
    assert not {m for m in _imported_modules(KERNEL_DIR / "magics.py") if "widgets" in m.split(".")}
    assert not {m for m in _imported_modules(KERNEL_DIR / "widgets.py") if "magics" in m.split(".")}


def test_widgets_use_only_public_session_methods_and_read_no_snapshot_themselves():
    import ast

    tree = ast.parse((KERNEL_DIR / "widgets.py").read_text())
    private = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.startswith("__")
               and isinstance(node.value, ast.Attribute) and node.value.attr == "session"]
    assert private == []
    readers = {"stacker_kernel.container.userns", "stacker_kernel.engine.grab", "stacker_kernel.engine.inspect"}
    assert not readers & _imported_modules(KERNEL_DIR / "widgets.py")


def test_the_layers_widget_shows_the_failed_state_keep_failed_keeps(ui):
    ui.ok("echo one > /one", "s1")
    ui.ok("%layers", "l")
    ui.ok("%keep_failed on", "k")
    reply, _ = ui.execute("echo half > /half; false", "bad")
    assert reply["status"] == "error"
    # Below the steps, as the README says: the kept state, until %rollback drops it.
    _wait_html(ui, r"<b>step 2</b> \(layer widgets, cell \[\d+\]: <code>echo half &gt; /half; false</code>\):"
                   r" FAILED, kept uncommitted \(%rollback drops it\)")
