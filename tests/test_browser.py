"""The widgets in a real JupyterLab, driven by Playwright in Debian's chromium.

The test starts JupyterLab (from PyPI, the `test` extra) on 127.0.0.1 as the
test user, with the stacker kernel spec in a temporary JUPYTER_PATH and a
fresh storage root, opens notebooks/hello.ipynb, runs all its cells, then uses
the widgets as a user would: Roll back here in `%layers` (checked with a new
cell), the `%layers` table at 1400 px with JupyterLab's file browser and the
widget's own browser open (every button inside the table, checked by bounding
boxes; cells named by their prompt), Download in `%browse` in one click for a
small and a large file (the downloaded bytes are compared with the file in the
snapshot), and the link `%grab` shows. Chromium runs headless without its
sandbox (an unprivileged user in CI has no setuid sandbox helper) and with a
fresh profile, offline.

To check more of the notebook, use the helpers: run_cell(page, code) appends
and runs a cell and returns it, output_text(cell) is what its output shows,
boxes_inside(...) compares bounding boxes.

Screenshots of both widgets go to docs/ (docs/layers-widget.png,
docs/browse-widget.png) when the checkout is writable, else to
$STACKER_KERNEL_SCREENSHOTS or the test's temporary directory.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kernel_support import install_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HELLO_CODE_CELLS = 6
BUILD_TIMEOUT_MS = 300_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _screenshot_dir(tmp: Path) -> Path:
    chosen = os.environ.get("STACKER_KERNEL_SCREENSHOTS")
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        return Path(chosen)
    docs = REPO / "docs"
    return docs if os.access(docs, os.W_OK) else tmp


class Lab:
    """A JupyterLab server serving `root`, stopped with its kernels by `stop()`."""

    def __init__(self, root: Path, home: Path, storage: Path) -> None:
        self.root, self.storage = root, storage
        self.token, self.port = secrets.token_hex(16), _free_port()
        jupyter_path = home / "jupyter"
        install_spec(jupyter_path)
        settings = home / "lab-settings"
        # No news or update checks: offline, and their toast could cover the widgets.
        notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notification.parent.mkdir(parents=True)
        notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = dict(os.environ, JUPYTER_PATH=str(jupyter_path),
                   JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
                   JUPYTER_RUNTIME_DIR=str(home / "runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(settings),
                   JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
                   STACKER_KERNEL_STORAGE=str(storage))
        self.log = (home / "jupyterlab.log").open("wb")
        args = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.token={self.token}",
                "--ServerApp.ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
                f"--ServerApp.root_dir={root}"]
        if os.geteuid() == 0:
            args.append("--allow-root")
        self.proc = subprocess.Popen(args, cwd=root, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"JupyterLab did not start; see {self.log.name}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """Shut the server down through its API (it stops the kernel), then make sure."""
        try:
            req = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(req, timeout=10)
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def running_lab(tmp_path_factory, busybox_tar, name: str, prepare=None):
    """A JupyterLab serving a fresh folder holding busybox.tar (and what `prepare(root,
    home)` adds), on a storage of its own; a generator for module-scoped fixtures."""
    from stacker_kernel.storage import btrfs

    base = tmp_path_factory.mktemp(name)
    root, home = base / "nb", base / "home"
    root.mkdir()
    home.mkdir()
    shutil.copyfile(busybox_tar, root / "busybox.tar")
    if prepare is not None:
        prepare(root, home)
    storage = Path(os.environ["STACKER_KERNEL_STORAGE"]) / f"t-{name}-{secrets.token_hex(6)}"
    storage.mkdir()
    server = Lab(root, home, storage)
    try:
        yield server
    finally:
        server.stop()
        btrfs.remove_tree(storage)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, busybox_tar):
    yield from running_lab(tmp_path_factory, busybox_tar, "lab", lambda root, home: shutil.copyfile(
        REPO / "notebooks" / "hello.ipynb", root / "hello.ipynb"))


@pytest.fixture(scope="module")
def page(lab, tmp_path_factory):
    """hello.ipynb open in chromium, after Run All has finished every cell."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            accept_downloads=True, viewport={"width": 1600, "height": 1000})
        try:
            p = browser.new_page()
            p.set_default_timeout(60_000)
            p.goto(f"{lab.url}/lab/tree/hello.ipynb?token={lab.token}")
            _wait_idle(p)
            p.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
            p.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
            try:
                _wait_all_ran(p, HELLO_CODE_CELLS)
            except Exception:
                p.screenshot(path=str(lab.root.parent / "run-all-failed.png"), full_page=True)
                raise
            yield p
        finally:
            browser.close()


def _wait_idle(page) -> None:
    """Wait until the notebook's kernel has started and is idle (the status bar says so)."""
    page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"Stacker.*\| Idle")).first.wait_for(
        timeout=BUILD_TIMEOUT_MS)


def _wait_all_ran(page, count: int) -> None:
    """Wait until `count` code cells show an execution count and none is queued or running."""
    page.wait_for_function(
        """n => {
            const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
                .map(e => e.textContent.trim());
            return prompts.length >= n && prompts.slice(0, n).every(t => /^\\[\\d+\\]:$/.test(t));
        }""", arg=count, timeout=BUILD_TIMEOUT_MS)


def run_cell(page, code: str):
    """Append a code cell with `code` at the end, run it, wait for it; returns its locator."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    before = page.locator(".jp-Notebook .jp-CodeCell").count()
    cells.last.locator(".jp-Cell-inputArea, .jp-MarkdownOutput").first.click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.keyboard.type(code)
    page.keyboard.press("Shift+Enter")
    cell = page.locator(".jp-Notebook .jp-CodeCell").nth(before)
    cell.locator(".jp-InputPrompt", has_text=re.compile(r"^\[\d+\]:$")).wait_for(
        timeout=BUILD_TIMEOUT_MS)
    return cell


def output_text(cell) -> str:
    """What the cell's output area shows, as text."""
    return cell.locator(".jp-OutputArea").inner_text()


def prompt_number(cell) -> int:
    """The execution count in the cell's prompt, `[7]:` -> 7."""
    # text_content: a cell scrolled out of view renders no text (content-visibility)
    return int(re.search(r"\d+", cell.locator(".jp-InputPrompt").text_content()).group())


def box(locator) -> dict:
    """The bounding box of the first element of `locator` (it must be rendered)."""
    found = locator.first.bounding_box()
    assert found is not None, f"{locator} is not rendered"
    return found


def boxes_inside(inner: list[dict], outer: dict, slack: float = 0.5) -> list[dict]:
    """The boxes of `inner` that reach out of `outer` sideways (none when all fit)."""
    return [b for b in inner if b["x"] < outer["x"] - slack
            or b["x"] + b["width"] > outer["x"] + outer["width"] + slack]


def test_run_all_builds_the_demo_notebook(page):
    last = page.locator(".jp-Notebook .jp-CodeCell").nth(HELLO_CODE_CELLS - 1)
    out = last.locator(".jp-OutputArea").inner_text()
    assert re.search(r"serving \w+ from stacker .* from /srv/www", out)
    # Every step cell ends with its status line: step, layer, ran or cached, time, size, snapshot.
    assert re.search(r"\[step \d+, layer \S+: (ran in [\d.]+ s|cached).*snapshot [0-9a-f]{12}\]", out), out
    assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                        has_text="Step failed").count() == 0


def test_roll_back_here_in_the_layers_widget_undoes_the_later_steps(page, lab):
    cell = run_cell(page, "%layers")
    widget = cell.locator(".stacker-layers")
    widget.wait_for()
    row = widget.locator(".stacker-cols", has_text="mkdir -p /etc/hello")
    number = row.locator("span").first.inner_text()
    step = f"roll back to step {number}"
    rollback = widget.locator(f"button[title='{step}']")
    assert rollback.inner_text() == "Roll back here"
    assert widget.locator(".stacker-cols", has_text="mkdir -p /srv/www").count() == 1
    rollback.click()
    cell.locator(".widget-html", has_text="rolled back to step").wait_for()
    # The cells whose steps left the image say so in place (their marks' display ids).
    undone = page.locator(".jp-Notebook .jp-CodeCell").nth(HELLO_CODE_CELLS - 1)
    undone.locator(".jp-OutputArea", has_text="undone by Roll back here").wait_for()
    undone.screenshot(path=str(_screenshot_dir(lab.root.parent) / "undone-cell.png"))
    check = run_cell(page, "test -e /srv/www || echo srv-gone; cat /etc/hello/hello.conf")
    out = check.locator(".jp-OutputArea").inner_text()
    assert "srv-gone" in out and "name=stacker" in out
    # The table dropped the rolled-back steps and shows the new cell's step after the target.
    after = int(step.rsplit(" ", 1)[1]) + 1
    new_row = widget.locator(".stacker-cols", has=page.locator("span", has_text=re.compile(f"^{after}$")))
    new_row.filter(has_text="test -e /srv/www").wait_for()
    assert widget.locator(".stacker-cols", has_text="mkdir -p /srv/www").count() == 0


def _open_file_browser_panel(page) -> None:
    """JupyterLab's own file browser, open in the left sidebar (it narrows the notebook)."""
    if not page.locator("#filebrowser").is_visible():
        page.locator(".jp-SideBar [data-id='filebrowser']").click()
    page.locator("#filebrowser").wait_for()
    assert box(page.locator("#filebrowser"))["width"] > 150  # it takes its room beside the notebook


def test_layers_table_shows_every_button_at_1400px_with_the_browsers_open(page, lab):
    page.set_viewport_size({"width": 1400, "height": 1000})
    try:
        _open_file_browser_panel(page)
        cell = run_cell(page, "%layers")
        widget = cell.locator(".stacker-layers")
        table = widget.locator(".stacker-steps")
        table.locator("button", has_text="Browse").first.wait_for()
        widget.screenshot(path=str(_screenshot_dir(lab.root.parent) / "layers-widget.png"))
        table.locator("button", has_text="Browse").last.click()
        widget.locator(".stacker-browser button.stacker-download-button").first.wait_for()
        buttons = widget.locator("button:visible")
        assert buttons.count() > 10
        area = box(cell.locator(".jp-OutputArea-output"))
        viewport = {"x": 0, "width": 1400}
        for outer in (area, viewport):
            assert boxes_inside([buttons.nth(i).bounding_box() for i in range(buttons.count())], outer) == []
        steps = box(table)
        row_buttons = table.locator("button")
        assert boxes_inside([row_buttons.nth(i).bounding_box() for i in range(row_buttons.count())], steps) == []
        # One table, one scroll area: nothing in the widget scrolls but the grids, and
        # the steps' grid needs no sideways scrolling at this width.
        scrolling = widget.evaluate("""w => [w, ...w.querySelectorAll('*')].filter(e => {
                const s = getComputedStyle(e);
                return (e.scrollWidth > e.clientWidth + 1 && /auto|scroll/.test(s.overflowX))
                    || (e.scrollHeight > e.clientHeight + 1 && /auto|scroll/.test(s.overflowY));
            }).map(e => e.className)""")
        assert all("stacker-grid" in c for c in scrolling), scrolling
        assert table.evaluate("t => t.scrollWidth <= t.clientWidth + 1")
        # Labels are whole: no button or column title cut short.
        cut = widget.evaluate("""w => [...w.querySelectorAll('button, .stacker-head span')]
            .filter(e => e.offsetParent && e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)""")
        assert cut == []
    finally:
        page.set_viewport_size({"width": 1600, "height": 1000})


def test_layers_table_names_cells_by_their_prompt_not_their_id(page):
    first = page.locator(".jp-Notebook .jp-CodeCell").first
    made_here = run_cell(page, "echo named > /named")  # JupyterLab gives it a uuid
    cell = run_cell(page, "%layers")
    table = cell.locator(".stacker-steps")
    table.locator("span", has_text="echo named > /named").wait_for()
    texts = table.locator(".stacker-cols").all_inner_texts()
    row = next(t for t in texts if "echo named > /named" in t)
    assert f"[{prompt_number(made_here)}]" in row.split()
    mkdir_app = next(t for t in texts if "mkdir -p /app" in t)
    assert f"[{prompt_number(first)}]" in mkdir_app.split()
    assert not [t for t in texts if re.search(r"[0-9a-f]{8}-?[0-9a-f]{4}", t)], texts


def _snapshot_file(storage: Path, snapshot_prefix: str, path: str) -> bytes:
    """A file of a snapshot, read as root of the user namespace (its owner may be a subuid)."""
    from stacker_kernel.container.userns import run_in_userns

    (snap,) = storage.glob(f"snapshots/{snapshot_prefix}*")
    return run_in_userns(Path.read_bytes, snap / path.lstrip("/"))


LONG_NAME = "a-file-whose-name-is-much-longer-than-the-name-column-of-the-browser.txt"


def _download_in_one_click(page, lab, widget, path: str) -> bytes:
    """Click Download once; returns the bytes the browser saved, checked against the snapshot."""
    with page.expect_download(timeout=60_000) as info:
        widget.locator(f"button[title='download {path}']").click()
    downloaded = Path(info.value.path()).read_bytes()
    title = widget.locator(".widget-html", has_text="snapshot ").first.inner_text()
    snapshot = re.search(r"snapshot ([0-9a-f]{12})", title).group(1)
    assert downloaded == _snapshot_file(lab.storage, snapshot, path)
    return downloaded


def test_browse_download_gives_the_bytes_of_the_file_in_one_click(page, lab):
    cell = run_cell(page, "%browse /app")
    widget = cell.locator(".stacker-browser")
    assert _download_in_one_click(page, lab, widget, "/app/hello.sh").startswith(b"#!/bin/sh\n")
    assert widget.locator("a.stacker-download", has_text="Save hello.sh").count() == 1  # to save again


def test_browse_downloads_a_large_file_in_one_click_from_beside_the_notebook(page, lab):
    run_cell(page, f"mkdir -p /data && head -c 400000 /dev/urandom > /data/big.bin && touch /data/{LONG_NAME}")
    cell = run_cell(page, "%browse /data")
    widget = cell.locator(".stacker-browser")
    assert len(_download_in_one_click(page, lab, widget, "/data/big.bin")) == 400000
    link = widget.locator("a.stacker-download", has_text="Save big.bin")
    assert "/files/stacker-downloads/" in link.get_attribute("href")  # served, not a data: URI
    assert list(lab.root.glob("stacker-downloads/*/data/big.bin"))


def test_browse_shows_whole_names_in_aligned_rows(page):
    cell = run_cell(page, "%browse /")
    widget = cell.locator(".stacker-browser")
    widget.locator("button[title='open /data']").click()
    name = widget.locator(".stacker-name", has_text=LONG_NAME)
    name.wait_for()
    assert name.evaluate("e => e.scrollWidth <= e.clientWidth + 1 && e.innerText.includes(e.textContent.trim())")
    assert LONG_NAME in name.inner_text()
    # Each row's cells line up: a directory's button, a file's name, details and action.
    grid = widget.locator(".stacker-files")
    cells = grid.evaluate("g => [...g.children].map(c => c.getBoundingClientRect().toJSON())")
    rows = [cells[i:i + 3] for i in range(3, len(cells), 3)]  # the header is the first three
    assert rows
    for row in rows:
        middles = [c["top"] + c["height"] / 2 for c in row]
        assert max(middles) - min(middles) <= 1, row
    lefts = [{round(c["left"]) for c in column} for column in zip(*rows)]
    assert all(len(x) == 1 for x in lefts), lefts


def test_browse_opens_directories_by_clicking_them(page, lab):
    cell = run_cell(page, "%browse /etc")
    widget = cell.locator(".stacker-browser")
    with page.expect_download():
        widget.locator("button[title='download /etc/passwd']").click()
    widget.locator("a.stacker-download", has_text="Save passwd").wait_for()
    widget.screenshot(path=str(_screenshot_dir(lab.root.parent) / "browse-widget.png"))
    widget.locator("button[title='open /etc/hello']").click()
    widget.locator("button[title='download /etc/hello/hello.conf']").wait_for()
    widget.locator("button", has_text=re.compile(r"^\.\.$")).click()
    widget.locator("button[title='download /etc/passwd']").wait_for()


def test_grab_link_downloads_the_copy_beside_the_notebook(page, lab):
    cell = run_cell(page, "%grab /etc/hello/hello.conf")
    link = cell.locator(".jp-OutputArea a[download]")
    with page.expect_download() as info:
        link.click()
    assert Path(info.value.path()).read_bytes() == (lab.root / "hello.conf").read_bytes()
    assert b"name=stacker" in (lab.root / "hello.conf").read_bytes()

