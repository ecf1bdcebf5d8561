"""The JupyterLab extension (labextension/, prebuilt into stacker_kernel/labextension/prebuilt)
in a real JupyterLab and headless chromium, with test_browser.py's server and helpers.

The lab finds the extension as an installed package puts it: the prebuilt folder as
JUPYTER_PATH/labextensions/stacker-kernel-extension, and the server side enabled by
stacker_kernel.json in jupyter_server_config.d. The terminal runs in xterm's screen
reader mode (a setting), whose accessibility tree holds its text as DOM.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from kernel_support import write_notebook
from test_browser import (
    BUILD_TIMEOUT_MS, CHROMIUM, CHROMIUM_ARGS, REPO, _wait_all_ran, _wait_idle, output_text, running_lab,
    run_cell,
)

pytestmark = pytest.mark.slow

PREBUILT = REPO / "stacker_kernel" / "labextension" / "prebuilt"
SERVER_CONFIG = REPO / "jupyter-config" / "jupyter_server_config.d" / "stacker_kernel.json"
DOCKERFILE = "FROM busybox\nRUN echo from-dockerfile > /x\nCMD [\"cat\", \"/x\"]\n"


def _prepare(root, home):
    """marker.ipynb, a Dockerfile, and the extension where a wheel's data files put it."""
    write_notebook(root / "marker.ipynb", [
        ("base", "%layer img\n%from tar busybox.tar\necho image-marker > /etc/marker"),
        ("more", "echo second > /etc/second")])
    (root / "Dockerfile").write_text(DOCKERFILE)
    # where a wheel's data files put them (pyproject's [tool.setuptools.data-files])
    labext = home / "jupyter" / "labextensions"
    labext.mkdir(parents=True)
    (labext / "stacker-kernel-extension").symlink_to(PREBUILT)
    config = home / "config" / "jupyter_server_config.d"
    config.mkdir(parents=True)
    shutil.copyfile(SERVER_CONFIG, config / SERVER_CONFIG.name)
    terminal = home / "lab-settings" / "@jupyterlab" / "terminal-extension" / "plugin.jupyterlab-settings"
    terminal.parent.mkdir(parents=True)
    terminal.write_text(json.dumps({"screenReaderMode": True}))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, busybox_tar):
    yield from running_lab(tmp_path_factory, busybox_tar, "lab-ext", _prepare)


@pytest.fixture(scope="module")
def page(lab, tmp_path_factory):
    """marker.ipynb open in chromium, after Run All has built both cells."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile-ext")
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        try:
            p = browser.new_page()
            p.set_default_timeout(60_000)
            p.goto(f"{lab.url}/lab/tree/marker.ipynb?token={lab.token}")
            _wait_idle(p)
            p.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
            p.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
            try:
                _wait_all_ran(p, 2)
            except Exception:
                p.screenshot(path=str(lab.root.parent / "run-all-failed.png"), full_page=True)
                raise
            yield p
        finally:
            browser.close()


def _terminal_text(page) -> str:
    return page.locator(".jp-Terminal:visible .xterm-accessibility-tree").inner_text()


def _wait_terminal_shows(page, text: str) -> None:
    try:
        page.wait_for_function(
            """t => [...document.querySelectorAll('.jp-Terminal .xterm-accessibility-tree')]
                    .some(e => e.textContent.includes(t))""",
            arg=text, timeout=90_000)
    except Exception:
        shown = page.locator(".jp-Terminal .xterm-accessibility-tree").all_inner_texts()
        raise AssertionError(f"no terminal shows {text!r}; they show: {shown}") from None


def _type_in_terminal(page, text: str) -> None:
    """Type into the visible terminal once its shell prompts (keys sent while the chroot
    starts may be lost)."""
    page.locator(".jp-Terminal:visible .xterm-accessibility-tree",
                 has_text=re.compile(r"[/\w]+ # ")).wait_for(timeout=90_000)
    page.locator(".jp-Terminal:visible .xterm-screen").click()
    page.keyboard.type(text)


def _back_to_notebook(page) -> None:
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="marker.ipynb").click()


def test_the_toolbar_button_opens_a_terminal_in_the_image_and_nothing_is_kept(page, lab):
    button = page.locator(".jp-StackerShell-button")
    button.wait_for()
    button.click()
    page.locator(".jp-Terminal").first.wait_for()
    _wait_terminal_shows(page, "nothing done here is kept")
    first = _terminal_text(page).strip().splitlines()[0]
    assert first == "stacker-kernel: a throwaway copy of marker.ipynb's state: nothing done here is kept"
    _type_in_terminal(page, "cat /etc/marker /etc/second; echo changed > /etc/marker; echo d$((40+2))ne\n")
    _wait_terminal_shows(page, "d42ne")
    shown = _terminal_text(page)
    assert "image-marker" in shown and "second" in shown
    page.keyboard.type("exit\n")
    _back_to_notebook(page)
    cell = run_cell(page, "cat /etc/marker")
    assert "image-marker" in output_text(cell) and "changed" not in output_text(cell)


def test_the_shell_magic_opens_a_terminal_and_says_the_command_for_other_front_ends(page, lab):
    import urllib.request

    def terminals() -> list:
        with urllib.request.urlopen(f"{lab.url}/api/terminals?token={lab.token}") as r:
            return json.load(r)

    before = len(terminals())
    _back_to_notebook(page)
    # run_cell's wait would race with the terminal taking the main area: type it here
    index = page.locator(".jp-Notebook .jp-CodeCell").count()
    page.locator(".jp-Notebook .jp-Cell").last.locator(".jp-Cell-inputArea").first.click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.keyboard.type("%shell")
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(
        """([url, n]) => fetch(url).then(r => r.json()).then(t => t.length > n)""",
        arg=[f"{lab.url}/api/terminals?token={lab.token}", before], timeout=BUILD_TIMEOUT_MS)
    _wait_terminal_shows(page, "nothing done here is kept")
    assert len(terminals()) == before + 1
    _back_to_notebook(page)
    cell = page.locator(".jp-Notebook .jp-CodeCell").nth(index)
    cell.locator("button", has_text="Open terminal in the image").wait_for()
    assert f"stacker-kernel chroot -f {lab.root / 'marker.ipynb'}" in output_text(cell)


def test_export_dockerfile_writes_the_file_beside_the_notebook(page, lab):
    _back_to_notebook(page)
    cell = run_cell(page, "%export dockerfile")
    assert "wrote" in output_text(cell)
    text = (lab.root / "marker.Dockerfile").read_text()
    assert 'FROM scratch AS img\nADD ["busybox.tar", "/"]\n' in text
    run = next(line for line in text.splitlines() if line.startswith("RUN "))
    assert "echo image-marker > /etc/marker" in json.loads(run[4:])[-1]


def test_open_as_stacker_notebook_on_a_dockerfile_opens_its_steps(page, lab):
    if not page.locator("#filebrowser").is_visible():
        page.locator(".jp-SideBar [data-id='filebrowser']").click()
    name = page.locator("#filebrowser .jp-DirListing-itemText", has_text=re.compile(r"^Dockerfile$"))
    name.first.click(button="right")
    page.locator(".lm-Menu-itemLabel", has_text="Open as stacker notebook").click()
    tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="Dockerfile.ipynb")
    tab.wait_for()
    notebook = page.locator(".jp-NotebookPanel:visible")
    notebook.locator(".jp-CodeCell", has_text="echo from-dockerfile").first.wait_for()
    assert (lab.root / "Dockerfile.ipynb").is_file()
    assert "from-dockerfile" in (lab.root / "Dockerfile.ipynb").read_text()
    tab.locator(".lm-TabBar-tabCloseIcon").click()  # the next tests use marker.ipynb's cells
    tab.wait_for(state="detached")


def _post(lab, endpoint: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{lab.url}/stacker-kernel/{endpoint}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Authorization": f"token {lab.token}"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_open_as_notebook_never_overwrites_and_a_bad_file_is_one_line(lab):
    (lab.root / "app.Containerfile").write_text("FROM busybox\nFROBNICATE now\n")
    status, answer = _post(lab, "open-as-notebook", {"path": "app.Containerfile"})
    assert status == 400 and "\n" not in answer["message"]
    assert re.search(r"line 2.*FROBNICATE", answer["message"], re.I), answer
    assert not (lab.root / "app.Containerfile.ipynb").exists()
    (lab.root / "stacker.yaml").write_text("app:\n  from:\n    type: tar\n    url: busybox.tar\n  run: echo hi\n")
    names = [_post(lab, "open-as-notebook", {"path": "stacker.yaml"}) for _ in range(2)]
    assert names == [(200, {"path": "stacker.ipynb"}), (200, {"path": "stacker-2.ipynb"})]
    status, answer = _post(lab, "open-as-notebook", {"path": "../home/jupyterlab.log"})
    assert status == 400


def test_after_a_failed_cell_under_keep_failed_the_terminal_opens_in_the_failed_state(page, lab):
    _back_to_notebook(page)
    run_cell(page, "%keep_failed on")
    failed = run_cell(page, "echo partial > /etc/partial\nfalse")
    assert "Step failed" in output_text(failed)
    page.locator(".jp-StackerShell-button").click()
    _wait_terminal_shows(page, "the failed state of step")
    _type_in_terminal(page, "cat /etc/partial; echo d$((40+3))ne\n")
    _wait_terminal_shows(page, "d43ne")
    assert "partial" in _terminal_text(page).split("cat /etc/partial", 1)[1]
    page.keyboard.type("exit\n")  # the terminal closes (closeOnExit)
    page.locator(".jp-Terminal:visible").wait_for(state="detached")
    # once the notebook goes on (the failure rolled back, a new step), the terminal is back in it
    _back_to_notebook(page)
    run_cell(page, "%rollback")
    run_cell(page, "echo after > /etc/after")
    page.locator(".jp-StackerShell-button").click()
    page.locator(".jp-Terminal:visible .xterm-accessibility-tree",
                 has_text="nothing done here is kept").wait_for(timeout=90_000)
    # the outputs are words the typed line does not hold: the terminal may wrap or drop its echo
    _type_in_terminal(page, "sed s/^/got-/ /etc/after; test -e /etc/partial || echo no-par''tial; echo d$((40+4))ne\n")
    _wait_terminal_shows(page, "d44ne")
    shown = _terminal_text(page)
    assert "failed state" not in shown and "no-partial" in shown and "got-after" in shown
