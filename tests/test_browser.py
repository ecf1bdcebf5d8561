"""The widgets in a real JupyterLab, driven by Playwright in Debian's chromium.

The test starts JupyterLab (from PyPI, the `test` extra) on 127.0.0.1 as the
test user, with the stacker kernel spec in a temporary JUPYTER_PATH and a
fresh storage root, opens notebooks/hello.ipynb, runs all its cells, then uses
the widgets as a user would: Roll back here in `%layers` (checked with a new
cell), Download in `%browse` (the downloaded bytes are compared with the file
in the snapshot), and the link `%grab` shows. Chromium runs headless without
its sandbox (an unprivileged user in CI has no setuid sandbox helper) and with
a fresh profile, offline (reference/jupyter.md §5.4).

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


@pytest.fixture(scope="module")
def lab(tmp_path_factory, busybox_tar):
    from stacker_kernel.storage import btrfs

    base = tmp_path_factory.mktemp("lab")
    root, home = base / "nb", base / "home"
    root.mkdir()
    home.mkdir()
    shutil.copyfile(REPO / "notebooks" / "hello.ipynb", root / "hello.ipynb")
    shutil.copyfile(busybox_tar, root / "busybox.tar")
    storage = Path(os.environ["STACKER_KERNEL_STORAGE"]) / f"t-browser-{secrets.token_hex(6)}"
    storage.mkdir()
    server = Lab(root, home, storage)
    try:
        yield server
    finally:
        server.stop()
        btrfs.remove_tree(storage)


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


def _run_new_cell(page, code: str):
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


def test_run_all_builds_the_demo_notebook(page):
    last = page.locator(".jp-Notebook .jp-CodeCell").nth(HELLO_CODE_CELLS - 1)
    assert re.search(r"serving \w+ from stacker .* from /srv/www", last.locator(".jp-OutputArea").inner_text())
    assert page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                        has_text="Step failed").count() == 0


def test_roll_back_here_in_the_layers_widget_undoes_the_later_steps(page, lab):
    cell = _run_new_cell(page, "%layers")
    widget = cell.locator(".stacker-layers")
    widget.wait_for()
    row = widget.locator(".widget-hbox", has=page.locator("code", has_text="mkdir -p /etc/hello"))
    rollback = row.locator("button", has_text="Roll back here")
    step = rollback.get_attribute("title")
    assert widget.locator("code", has_text="mkdir -p /srv/www").count() == 1
    assert step.startswith("roll back to step ")
    widget.screenshot(path=str(_screenshot_dir(lab.root.parent) / "layers-widget.png"))
    rollback.click()
    cell.locator(".widget-html", has_text="rolled back to step").wait_for()
    check = _run_new_cell(page, "test -e /srv/www || echo srv-gone; cat /etc/hello/hello.conf")
    out = check.locator(".jp-OutputArea").inner_text()
    assert "srv-gone" in out and "name=stacker" in out
    # The table dropped the rolled-back steps and shows the new cell's step after the target.
    after = int(step.rsplit(" ", 1)[1]) + 1
    new_row = widget.locator(".widget-hbox", has=page.locator("button[title='roll back to step %d']" % after))
    new_row.locator("code", has_text="test -e /srv/www").wait_for()
    assert widget.locator("code", has_text="mkdir -p /srv/www").count() == 0


def _snapshot_file(storage: Path, snapshot_prefix: str, path: str) -> bytes:
    """A file of a snapshot, read as root of the user namespace (its owner may be a subuid)."""
    from stacker_kernel.container.userns import run_in_userns

    (snap,) = storage.glob(f"snapshots/{snapshot_prefix}*")
    return run_in_userns(Path.read_bytes, snap / path.lstrip("/"))


def test_browse_download_gives_the_bytes_of_the_file_in_the_snapshot(page, lab):
    cell = _run_new_cell(page, "%browse /app")
    widget = cell.locator(".stacker-browser")
    widget.locator("button[title='download /app/hello.sh']").click()
    save = widget.locator("a.stacker-download", has_text="Save hello.sh")
    save.wait_for()
    with page.expect_download() as info:
        save.click()
    downloaded = Path(info.value.path()).read_bytes()
    title = widget.locator(".widget-html", has_text="snapshot ").first.inner_text()
    snapshot = re.search(r"snapshot ([0-9a-f]{12})", title).group(1)
    assert downloaded == _snapshot_file(lab.storage, snapshot, "/app/hello.sh")
    assert downloaded.startswith(b"#!/bin/sh\n")


def test_browse_opens_directories_by_clicking_them(page, lab):
    cell = _run_new_cell(page, "%browse /etc")
    widget = cell.locator(".stacker-browser")
    widget.locator("button[title='download /etc/passwd']").click()
    widget.locator("a.stacker-download", has_text="Save passwd").wait_for()
    widget.screenshot(path=str(_screenshot_dir(lab.root.parent) / "browse-widget.png"))
    widget.locator("button[title='open /etc/hello']").click()
    widget.locator("button[title='download /etc/hello/hello.conf']").wait_for()
    widget.locator("button", has_text=re.compile(r"^\.\.$")).click()
    widget.locator("button[title='download /etc/passwd']").wait_for()


def test_grab_link_downloads_the_copy_beside_the_notebook(page, lab):
    cell = _run_new_cell(page, "%grab /etc/hello/hello.conf")
    link = cell.locator(".jp-OutputArea a[download]")
    with page.expect_download() as info:
        link.click()
    assert Path(info.value.path()).read_bytes() == (lab.root / "hello.conf").read_bytes()
    assert b"name=stacker" in (lab.root / "hello.conf").read_bytes()

