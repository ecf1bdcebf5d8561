"""The notebook is the recipe in a real JupyterLab (issue 22): a rename and a fixed failed cell.

Driven by Playwright in Debian's chromium, like tests/test_browser.py (whose JupyterLab
server and helpers this reuses), with the user's ordinary habits:

- a notebook worked on as Untitled.ipynb and renamed in JupyterLab (File > Rename
  Notebook, the kernel keeps running): `%export` writes the new name's stacker.yaml with
  the steps run before and after the rename, and nothing under the old name;
- a cell in the middle fails, the user goes on with Shift-Enter (the cells below commit),
  fixes the cell and runs it: the cells below it are shown undone; run again, `%export`
  has every step in document order and the image has the fix (the `app` user that
  `%runtime_user app` needs).
"""
from __future__ import annotations

import re

import pytest
import yaml

from kernel_support import write_notebook
from test_browser import (BUILD_TIMEOUT_MS, CHROMIUM, CHROMIUM_ARGS, _wait_all_ran, running_lab, _wait_idle,
                          output_text, run_cell)

pytestmark = pytest.mark.slow

BASE = "%layer app\n%from tar busybox.tar"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, busybox_tar):
    yield from running_lab(tmp_path_factory, busybox_tar, "lab-recipe")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def open_notebook(browser, lab, name: str, workspace: str):
    """A page with notebook `name` open in a workspace of its own, its kernel idle."""
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{lab.url}/lab/workspaces/{workspace}/tree/{name}?reset&token={lab.token}")
    _wait_idle(page)
    return page


def code_cell(page, index: int):
    return page.locator(".jp-Notebook .jp-CodeCell").nth(index)


def prompt(page, index: int) -> str:
    return (code_cell(page, index).locator(".jp-InputPrompt").text_content() or "").strip()


def shift_enter(page, index: int) -> None:
    """Click into code cell `index`, Shift-Enter, wait until it has run (a new prompt number)."""
    before = prompt(page, index)
    code_cell(page, index).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(
        """([i, before]) => {
            const cell = document.querySelectorAll('.jp-Notebook .jp-CodeCell')[i];
            const text = cell.querySelector('.jp-InputPrompt').textContent.trim();
            return /^\\[\\d+\\]:$/.test(text) && text !== before;
        }""", arg=[index, before], timeout=BUILD_TIMEOUT_MS)


def replace_source(page, index: int, source: str) -> None:
    """Select all of code cell `index`'s text and type `source` instead, then save (Ctrl-S)."""
    code_cell(page, index).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+a")
    page.keyboard.type(source)
    page.keyboard.press("Escape")
    page.keyboard.press("Control+s")


def run_lines(recipe: dict, layer: str = "app") -> list[str]:
    return [ln.strip() for ln in (recipe[layer].get("run") or "").splitlines() if ln.strip()]


def test_a_notebook_renamed_in_jupyterlab_exports_under_its_new_name(browser, lab):
    write_notebook(lab.root / "Untitled.ipynb", [
        ("base", BASE), ("one", "echo one > /one"), ("two", "echo two > /two")])
    page = open_notebook(browser, lab, "Untitled.ipynb", "rename")
    try:
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
        _wait_all_ran(page, 3)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^File$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Rename Notebook")).click()
        dialog = page.locator(".jp-Dialog")
        dialog.locator("input").fill("debbuild.ipynb")
        dialog.locator("button", has_text="Rename").click()
        page.locator(".lm-TabBar-tab.lm-mod-current", has_text="debbuild.ipynb").wait_for()
        assert (lab.root / "debbuild.ipynb").is_file() and not (lab.root / "Untitled.ipynb").exists()
        run_cell(page, "echo three > /three")  # the build goes on after the rename
        exported = run_cell(page, "%export")
        assert "debbuild.stacker.yaml" in output_text(exported)
        recipe = yaml.safe_load((lab.root / "debbuild.stacker.yaml").read_text())
        assert run_lines(recipe) == ["echo one > /one", "echo two > /two", "echo three > /three"], recipe
        assert recipe["app"]["from"] == {"type": "tar", "url": "busybox.tar"}
        assert not (lab.root / "Untitled.stacker.yaml").exists()
    finally:
        page.close()


PASSWD_LINE = "echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd"
BROKEN = f"mkdir -p /home/app\nchown app /home/app\n{PASSWD_LINE}"  # chown before the user exists
FIXED = f"{PASSWD_LINE}\nmkdir -p /home/app\nchown app /home/app"


def test_a_failed_cell_fixed_after_the_cells_below_ran_takes_its_place_in_the_recipe(browser, lab):
    write_notebook(lab.root / "fixrun.ipynb", [
        ("base", BASE), ("user", BROKEN),
        ("site", "mkdir -p /srv/app && echo hello > /srv/app/index.html"),
        ("ready", "%runtime_user app\necho ready > /srv/app/ready")])
    page = open_notebook(browser, lab, "fixrun.ipynb", "fixrun")
    try:
        for index in range(4):  # Shift-Enter through every cell, past the failing one
            shift_enter(page, index)
        assert "unknown user app" in output_text(code_cell(page, 1))
        assert "snapshot" in output_text(code_cell(page, 3))  # committed on top of the failure
        replace_source(page, 1, FIXED)
        shift_enter(page, 1)
        fixed = output_text(code_cell(page, 1))
        assert "mkdir -p /srv/app" in fixed and "echo ready" in fixed, fixed  # names what it undoes
        for below in (2, 3):  # the cells below the fixed one left the image, and say so
            code_cell(page, below).locator(".jp-OutputArea", has_text="undone by").wait_for()
        shift_enter(page, 2)
        shift_enter(page, 3)
        # Running them again keeps the fix: it is not the one undone this time.
        assert "undone by" not in output_text(code_cell(page, 1))
        assert "undone by" not in output_text(code_cell(page, 3))
        exported = run_cell(page, "%export")
        recipe = yaml.safe_load((lab.root / "fixrun.stacker.yaml").read_text())
        assert run_lines(recipe) == [PASSWD_LINE, "mkdir -p /home/app", "chown app /home/app",
                                     "mkdir -p /srv/app && echo hello > /srv/app/index.html",
                                     "echo ready > /srv/app/ready"], output_text(exported)
        assert recipe["app"]["runtime_user"] == "app"
        run_cell(page, "%grab /etc/passwd passwd.txt")
        assert "app:x:1000:1000::/home/app:/bin/sh" in (lab.root / "passwd.txt").read_text()
    finally:
        page.close()
