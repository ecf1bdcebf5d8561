"""The JupyterLab widgets: the layer history (`%layers`) and the file browser (`%browse`).

Only the UI lives here. What they show comes from public BuildSession methods
(history, find_snapshot, list_dir, prepare_download, diff, rollback), which
read the read-only snapshots below the kernel (engine/browse.py,
engine/inspect.py), so they work while a cell runs. Widget callbacks run on
the kernel's event loop (ipykernel 7.4 serves comm messages while a cell
awaits its step, on its shell channel); anything slow (a diff,
reading or copying a file) goes to a background thread, and session changes
(Roll back here) go to the kernel's engine thread so they never overlap a cell.

Each table is one CSS grid (a GridBox): the columns line up across rows
whatever a cell holds, and the grid is the one scroll area of the table.
`%layers` shows a page of the newest steps, so that its first display costs
the same at any history length; rows are kept across refreshes.

Downloads: the Download button prepares the file
and the browser saves it at once. A regular file up to INLINE_LIMIT travels
as a data: URI; a larger one is copied to `stacker-downloads/` beside the
notebook and linked relative to it, so JupyterLab serves it through its
authenticated `files/` URL (never multi-MB data: URIs in the page or the
notebook). The link is shown in an Output widget, which renders through the
notebook's rendermime (it resolves relative links, and its output is
trusted), with a small script that clicks it once; the link stays for
saving again.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextvars
import html
import json
import logging
import os
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ipywidgets as w
from ipywidgets.widgets.widget_string import HTMLStyle

from stacker_kernel.engine.browse import MAX_ENTRIES, REGULAR_FILE, Download, Entry, Listing, why_not_downloadable
from stacker_kernel.errors import RecipeError, StackerKernelError
from stacker_kernel.kernel.tables import LAYER_COLUMNS, CellName, layer_row, layers_table, short_id, step_label
from stacker_kernel.recipe.model import human_size

INLINE_LIMIT = 256 * 1024  # bytes: larger files are served by JupyterLab instead of a data: URI
DOWNLOADS_DIR = "stacker-downloads"  # beside the notebook; not hidden, or the server 404s it
AUTO_CLICK_SECONDS = 60  # a download link clicks itself only this soon after it was made
PAGE_SIZE = 60  # rows per page of the file browser (each row is a few widget models)
MAX_DIFF_LINES = 500

log = logging.getLogger(__name__)


# --- formatting -------------------------------------------------------------------


def relative_link(path: str, notebook_dir: Path) -> str | None:
    """`path` as a URL relative to the notebook (JupyterLab resolves it to files/...),
    or None when it is not below the notebook's directory (the server cannot serve it)."""
    rel = os.path.relpath(path, notebook_dir)
    if rel.startswith(".."):
        return None
    return urllib.parse.quote(rel.replace(os.sep, "/"))


def download_link_html(name: str, href: str, size: int, note: str = "") -> str:
    """An `<a download>` that JupyterLab leaves to the browser (it does not open it in a tab)."""
    return (f"<a href=\"{html.escape(href)}\" download=\"{html.escape(name)}\""
            " class=\"stacker-download\" style=\"color:var(--jp-content-link-color,#1976d2);"
            f"text-decoration:underline\">Save {html.escape(name)}</a>"
            f" <span>({human_size(size)}{html.escape(note)})</span>")


# Clicks the link beside it once: when its relative href has been resolved to the
# server's files/ URL (rendermime does that after rendering), at once for data:
# URIs. Not again when the output is rendered again (the set), nor when a saved
# notebook is opened later (the expiry).
_AUTO_CLICK = """<script>
(s => {
  const a = s.parentNode.querySelector('a.stacker-download');
  const seen = (window.stackerDownloads = window.stackerDownloads || new Set());
  if (!a || seen.has(%(token)s) || Date.now() > %(until)d) return;
  seen.add(%(token)s);
  const href = a.getAttribute('href');
  let tries = 0;
  const go = () => {
    if (href.startsWith('data:') || a.getAttribute('href') !== href) a.click();
    else if (++tries < 100) setTimeout(go, 50);
  };
  go();
})(document.currentScript);
</script>"""


def self_clicking(link_html: str) -> str:
    """`link_html` (a download_link_html) with the script that starts its download."""
    script = _AUTO_CLICK % {"token": json.dumps(secrets.token_hex(8)),
                            "until": int((time.time() + AUTO_CLICK_SECONDS) * 1000)}
    return f"<div class='stacker-offer'>{link_html}{script}</div>"


def data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


# One style sheet for both widgets: directory names read as names (not centred
# button labels), names wrap instead of being clipped, the header row stays in
# view while the grid scrolls, and a row's text columns keep their widths.
STYLE = """<style>
.stacker-grid .stacker-head{position:sticky;top:0;z-index:2;background:var(--jp-layout-color0,#fff)}
.stacker-grid .widget-html,.stacker-grid .widget-button{margin:1px 0.3em 1px 0}
.stacker-grid .widget-html-content{width:100%}
.stacker-cols{display:flex;align-items:center;width:100%;font-family:var(--jp-code-font-family)}
.stacker-cols>span{flex:0 0 auto;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;margin-right:0.6em}
.stacker-cols>span.stacker-grow{flex:1 1 6em;min-width:6em}
.stacker-head .stacker-cols{font-weight:bold}
.stacker-name{max-width:40em}
.stacker-name,.stacker-name .widget-html-content{white-space:normal;overflow-wrap:anywhere;line-height:1.4}
.stacker-grid button.stacker-dir{justify-content:flex-start;text-align:left;height:auto;padding:0;margin:0;
  background:none;box-shadow:none;color:var(--jp-content-link-color,#1976d2);white-space:normal;
  overflow-wrap:anywhere;font-family:var(--jp-code-font-family);font-size:var(--jp-code-font-size);
  line-height:1.4;max-width:40em}
.stacker-grid button.stacker-dir:hover{text-decoration:underline}
</style>"""


def _cols_html(values: list[str], widths: tuple[str, ...]) -> str:
    """One row's text columns: fixed widths, and the column of width "grow" takes the rest."""
    spans = []
    for value, width in zip(values, widths):
        size = "class='stacker-grow'" if width == "grow" else f"style='width:{width}'"
        spans.append(f"<span {size} title='{html.escape(value)}'>{html.escape(value)}</span>")
    return f"<div class='stacker-cols'>{''.join(spans)}</div>"


# --- the kernel's side: threads and the registry ------------------------------------


@dataclass
class WidgetHost:
    """What widget callbacks may use besides the session.

    `engine` is the kernel's engine thread (session changes, serialised with
    cells); `io` a background thread for slow reads; `busy()` is true while a
    cell executes (rollback then waits for the user, not for the cell);
    `cell_name` names a cell as the notebook shows it (kernel/tables.CellNames).
    """

    session: Any  # engine.session.BuildSession
    notebook_dir: Path
    engine: concurrent.futures.Executor
    io: concurrent.futures.Executor
    busy: Callable[[], bool]
    registry: "WidgetRegistry"
    rolled_back: Callable[[int], None] = lambda index: None  # the kernel marks the undone cells
    cell_name: CellName = lambda cell_id: short_id(cell_id) if cell_id else ""

    def layer_history(self) -> "LayerHistory":
        """The session's live `%layers` widget (one per session, shown by every `%layers`)."""
        return self.registry.layer_history(self)

    def file_browser(self, target: str | int | None, path: str) -> "FileBrowser":
        """A `%browse [LAYER|N] PATH` widget; RecipeError when PATH cannot be listed."""
        snap, view = self.session.find_snapshot(target)
        label = step_label(view, self.cell_name) if view else f"the base of layer {snap.layer or '?'}"
        browser = FileBrowser(self, SnapshotRef(snap.id, label), path)
        if browser.listing is None:  # a bad PATH: say so as an error, not as an empty widget
            browser.close()
            raise RecipeError(f"cannot browse {path}: {browser.status_text()}")
        return browser

    def later(self, executor: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any,
              then: Callable[[Any], None], fail: Callable[[BaseException], None]) -> None:
        """Run fn(*args) on `executor`; then(result) or fail(error) runs on the event loop,
        in the context (parent message) of this call. Without a running loop, runs inline."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            try:
                result = fn(*args)
            except BaseException as e:
                fail(e)
                return
            then(result)
            return
        ctx = contextvars.copy_context()
        future = executor.submit(fn, *args)

        def done(f: concurrent.futures.Future) -> None:
            def deliver() -> None:
                error = f.exception()
                if error is not None:
                    fail(error)
                else:
                    then(f.result())
            loop.call_soon_threadsafe(deliver, context=ctx)

        future.add_done_callback(done)


class WidgetRegistry:
    """The live layer-history widgets of a kernel, refreshed after each cell and rollback.

    A session has one LayerHistory: every `%layers` output is another view of its
    models, so a step costs one new row however many outputs show the table.
    """

    KEEP = 10  # the most recent %layers outputs stay live; older ones stop updating

    def __init__(self) -> None:
        self._layers: list[LayerHistory] = []
        self._scheduled: asyncio.TimerHandle | None = None

    def add(self, widget: "LayerHistory") -> None:
        self._layers = [x for x in self._layers if not x.closed][-(self.KEEP - 1):] + [widget]

    def layer_history(self, host: WidgetHost) -> "LayerHistory":
        """The live LayerHistory of `host`'s session, made (and registered) if there is none."""
        for widget in self._layers:
            if not widget.closed and widget.host.session is host.session:
                widget.host = host  # the newest host names cells as the kernel does now
                widget.refresh()
                return widget
        widget = LayerHistory(host)
        self.add(widget)
        return widget

    def refresh_all(self) -> None:
        """Bring every live layer widget up to date just after the cell's reply: making a
        new row's widget models is most of a `true` cell's time, and the cell need not
        wait for it. On the event loop, once for any number of calls meanwhile; inline
        when no loop runs."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.refresh_now()
            return
        if self._scheduled is None:
            # the copied context keeps the parent message the widget updates belong to
            self._scheduled = loop.call_later(0.02, self._scheduled_refresh,
                                              context=contextvars.copy_context())

    def _scheduled_refresh(self) -> None:
        self._scheduled = None
        self.refresh_now()

    def refresh_now(self) -> None:
        """Bring every live layer widget up to date (the history is read once per session,
        not once per widget)."""
        views: dict[int, list] = {}
        for widget in list(self._layers):
            if widget.closed:
                self._layers.remove(widget)
                continue
            try:
                session = widget.host.session
                if id(session) not in views:
                    views[id(session)] = session.history()
                widget.refresh(views[id(session)])
            except Exception:  # a widget must never break the kernel
                log.exception("refreshing a layer widget failed")

    def __len__(self) -> int:
        return len(self._layers)


def _error_text(error: BaseException) -> str:
    if isinstance(error, StackerKernelError):
        return str(error)
    log.error("widget action failed", exc_info=error)
    return f"internal error ({type(error).__name__}: {error}); the kernel log has the traceback"


def _close_tree(widget: w.Widget, keep: set[int] = frozenset()) -> None:
    """Close `widget`, its children and their layout and style models, except those in
    `keep` (layouts shared by the rows): closed models leave the kernel and the page."""
    for child in getattr(widget, "children", ()):
        _close_tree(child, keep)
    for part in (getattr(widget, "style", None), getattr(widget, "layout", None), widget):
        if part is not None and id(part) not in keep:
            part.close()


class _Panel:
    """Status line and closing shared by both widgets."""

    def __init__(self) -> None:
        self.status = w.HTML("")
        self.widget: w.Box
        self.closed = False
        self._said = ""

    def status_text(self) -> str:
        """The status line as plain text."""
        return self._said

    def say(self, text: str, error: bool = False) -> None:
        self._said = text
        color = "#b00020" if error else "inherit"
        self.status.value = f"<span style='color:{color}'>{html.escape(text)}</span>" if text else ""

    def failed(self, error: BaseException) -> None:
        self.say(_error_text(error), error=True)

    def guarded(self, fn: Callable[..., None]) -> Callable[..., None]:
        """A click handler that shows errors in the status line instead of losing them."""
        def handler(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:
                self.failed(e)
        return handler


def _grid(columns: str, css_class: str, max_height: str) -> w.GridBox:
    """A table as one CSS grid: aligned columns, and the one scroll area of its rows."""
    # justify_content flex-start: columns keep their width, they do not share out the spare room.
    grid = w.GridBox([], layout=w.Layout(grid_template_columns=columns, align_items="center",
                                         justify_content="flex-start",
                                         overflow="auto", max_height=max_height, width="100%"))
    grid.add_class("stacker-grid")
    grid.add_class(css_class)
    return grid


# --- the file browser -----------------------------------------------------------


@dataclass
class SnapshotRef:
    """The snapshot a browser shows, with a label in the user's words."""

    snapshot_id: str
    label: str


class FileBrowser(_Panel):
    """A directory listing of one snapshot: click directories, '..' goes up (never above /).

    A row is three grid cells: the name (a button for directories), the details
    (size, mode, owner, modified: fixed widths, one HTML) and the action."""

    DETAILS = (("size", "10ch"), ("mode", "11ch"), ("owner", "12ch"), ("modified", "17ch"))

    def __init__(self, host: WidgetHost, snapshot: SnapshotRef, path: str = "/") -> None:
        super().__init__()
        self.host, self.snapshot = host, snapshot
        self.listing: Listing | None = None
        self.page = 0
        # Shared by the rows: a row adds its own widgets, not its own layouts.
        self._layouts = {"name": w.Layout(width="auto"), "details": w.Layout(width="auto"),
                         "action": w.Layout(width="auto")}
        self.title = w.HTML("")
        self.up = w.Button(description="..", tooltip="up to the parent directory",
                           layout=w.Layout(width="4em"))
        self.up.on_click(self.guarded(lambda _: self.open(os.path.dirname(self.listing.path))))
        widths = tuple(width for _, width in self.DETAILS)
        self.header = [w.HTML("<b>name</b>"),
                       w.HTML(_cols_html([name for name, _ in self.DETAILS], widths),
                              layout=self._layouts["details"]),
                       w.HTML("")]
        for cell in self.header:
            cell.add_class("stacker-head")
        # Names as wide as the longest (up to 40em, then they wrap), never clipped.
        self.rows = _grid("minmax(8em, max-content) auto auto", "stacker-files", "32em")
        self._shown: list[list[w.Widget]] = []
        self.prev = w.Button(description="previous page", layout=w.Layout(width="10em"))
        self.next = w.Button(description="next page", layout=w.Layout(width="10em"))
        self.prev.on_click(self.guarded(lambda _: self.show_page(self.page - 1)))
        self.next.on_click(self.guarded(lambda _: self.show_page(self.page + 1)))
        self.pages = w.HTML("")
        self.pager = w.HBox([self.prev, self.pages, self.next])
        self.served = w.Output()  # download links: rendermime resolves them and runs their script
        self.widget = w.VBox([w.HTML(STYLE), self.title, w.HBox([self.up]), self.rows,
                              self.pager, self.served, self.status])
        self.widget.add_class("stacker-browser")
        self.open(path)

    # navigation

    def open(self, path: str) -> None:
        """List container directory `path` (synchronously: a listing is one quick fork)."""
        try:
            listing = self.host.session.list_dir(self.snapshot.snapshot_id, path or "/")
        except Exception as e:
            self.failed(e)
            return
        self.listing = listing
        self.say("" if listing.total <= MAX_ENTRIES else
                 f"showing the first {MAX_ENTRIES} of {listing.total} entries")
        self.title.value = (f"<b>{html.escape(listing.path)}</b> in {html.escape(self.snapshot.label)}"
                            f" <span style='opacity:.6'>snapshot {self.snapshot.snapshot_id[:12]}</span>")
        self.up.disabled = listing.path == "/"
        self.show_page(0)

    def show_page(self, page: int) -> None:
        entries = self.listing.entries if self.listing else []
        pages = max(1, -(-len(entries) // PAGE_SIZE))
        self.page = min(max(page, 0), pages - 1)
        old = self._shown
        chunk = entries[self.page * PAGE_SIZE:(self.page + 1) * PAGE_SIZE]
        self._shown = [self._row(e) for e in chunk]
        self.rows.children = self.header + [cell for row in self._shown for cell in row]
        keep = {id(x) for x in self._layouts.values()}
        for row in old:
            for cell in row:
                _close_tree(cell, keep)
        self.pager.layout.display = "none" if pages == 1 else ""
        self.prev.disabled = self.page == 0
        self.next.disabled = self.page == pages - 1
        self.pages.value = f"&nbsp;page {self.page + 1} of {pages}&nbsp;"

    def _row(self, e: Entry) -> list[w.Widget]:
        lay = self._layouts
        shown = e.name + ("/" if e.is_dir else "")
        if e.link_target is not None:
            shown += f" → {e.link_target}"
        if e.is_dir:
            target = e.link_path or e.path
            name: w.Widget = w.Button(description=shown, tooltip=f"open {target}", layout=lay["name"])
            name.add_class("stacker-dir")
            name.on_click(self.guarded(lambda _, t=target: self.open(t)))
        else:
            name = w.HTML(f"<code>{html.escape(shown)}</code>", layout=lay["name"])
            name.add_class("stacker-name")
        details = [human_size(e.size) if e.kind == REGULAR_FILE else "", e.mode, f"{e.uid}:{e.gid}",
                   time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime))]
        widths = tuple(width for _, width in self.DETAILS)
        return [name, w.HTML(_cols_html(details, widths), layout=lay["details"]), self._action(e)]

    def _action(self, e: Entry) -> w.Widget:
        lay = self._layouts["action"]
        if e.link_problem:
            why = "points outside the rootfs" if "escapes" in e.link_problem else "dangling link"
            return w.HTML(f"<i>{why}</i>", layout=lay, tooltip=e.link_problem)
        kind = e.target_kind
        if e.is_dir:
            return w.HTML("", layout=lay)
        if kind != REGULAR_FILE:
            return w.HTML(f"<i>{html.escape(kind.split(' ', 1)[-1])}: not downloadable</i>", layout=lay,
                          tooltip=why_not_downloadable(e.path, kind))
        button = w.Button(description="Download", icon="download", tooltip=f"download {e.path}",
                          layout=lay)
        button.add_class("stacker-download-button")
        button.on_click(self.guarded(lambda _, p=e.path: self.download(p)))
        return button

    # downloads

    def download(self, path: str) -> None:
        """Download container file `path`: prepared on the io thread, then saved by the browser."""
        self.say(f"preparing {path} ...")
        copy_to = self.host.notebook_dir / DOWNLOADS_DIR / self.snapshot.snapshot_id[:12]
        self.host.later(self.host.io, self.host.session.prepare_download, self.snapshot.snapshot_id,
                        path, copy_to, INLINE_LIMIT,
                        then=lambda d, p=path: self._offer(p, d), fail=self.failed)

    def _offer(self, path: str, d: Download) -> None:
        if d.data is not None:
            self._show_link(download_link_html(d.name, data_uri(d.data), d.size), f"downloading {d.name}")
            self.say(f"{path} is downloading (Save {d.name} saves it again)")
            return
        link = relative_link(d.copy, self.host.notebook_dir)
        if link is None:
            self.served.outputs = ()
            self.say(f"{path} was copied to {d.copy} (outside the notebook's directory, so"
                     " JupyterLab cannot serve it: fetch it from there)")
            return
        where = urllib.parse.unquote(link)
        self._show_link(download_link_html(d.name, link, d.size, f", copied to {where}"),
                        f"{path} ({human_size(d.size)}) was copied to {where}")
        self.say(f"{path} is downloading from {where}: files over {human_size(INLINE_LIMIT)}"
                 " are served by JupyterLab")

    def _show_link(self, link_html: str, text: str) -> None:
        self.served.outputs = ({"output_type": "display_data", "metadata": {}, "data": {
            "text/plain": text, "text/html": self_clicking(link_html)}},)

    def close(self) -> None:
        self.closed = True
        _close_tree(self.widget)  # the rows are children of self.rows
        for lay in self._layouts.values():
            lay.close()


# --- the layer history -----------------------------------------------------------

# Waits for a session's background size measurement, for the widgets to refresh
# then (not the io thread: a diff or a download must not wait behind it).
_SIZE_WAITER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="layer-sizes")

SIZE_COLUMN = LAYER_COLUMNS.index("size")
# Text column widths of a %layers row; the first line takes what the buttons leave.
LAYER_WIDTHS = ("5ch", "12ch", "6ch", "grow", "7ch", "9ch", "10ch", "7ch")


def _row_key(v: Any, cell: str) -> tuple:
    """What a row shows of step view `v` but its size (updated in place when measured)."""
    return (v.index, v.snapshot_id, v.layer, cell, v.first_line, v.status, v.duration, v.cached)


@dataclass
class _Row:
    """One step's row of a LayerHistory: its grid cells, and the parts that change later."""

    key: tuple
    cells: list[w.Widget]  # the text columns (one HTML), then the buttons
    values: list[str]

    @property
    def text(self) -> w.HTML:
        return self.cells[0]

    @property
    def rollback(self) -> w.Button:
        return self.cells[1]

    def set_size(self, shown: str) -> None:
        self.values[SIZE_COLUMN] = shown
        self.text.value = _cols_html(self.values, LAYER_WIDTHS)


class LayerHistory(_Panel):
    """`%layers` as a widget: one grid, a row per step with Roll back here, Diff and Browse.

    It shows a page of ROWS steps, the newest ones unless the user pages back:
    a row is a few widget models, and building a thousand of them would make
    the first `%layers` of a long session take seconds."""

    ROWS = 40

    def __init__(self, host: WidgetHost) -> None:
        super().__init__()
        self.host = host
        # A row is one HTML (its text columns) and three buttons, all sharing these
        # layouts and styles: a few models per step, as a step adds a row after every cell.
        self._text_layout = w.Layout(min_width="40em")
        self._html_style = HTMLStyle()
        self._button_style = w.ButtonStyle()
        self._button_layouts = {label: w.Layout(width="auto") for label in ("Roll back here", "Diff", "Browse")}
        self.header = [w.HTML(_cols_html(LAYER_COLUMNS, LAYER_WIDTHS), layout=self._text_layout),
                       w.HTML(""), w.HTML(""), w.HTML("")]
        for cell in self.header:
            cell.add_class("stacker-head")
        self.table = _grid("minmax(40em, 1fr) auto auto auto", "stacker-steps", "30em")
        self.detail = w.VBox([])
        self.browser: FileBrowser | None = None
        self._shown: list[_Row] = []  # the rows the grid shows, one per step of the page
        self._empty: w.HTML | None = None
        self._awaiting_sizes = False
        self.first = 0  # 0-based position of the page's first step
        self.following = True  # the page shows the newest steps (until the user pages back)
        self.earlier = w.Button(description="earlier steps", layout=w.Layout(width="auto"))
        self.later_steps = w.Button(description="later steps", layout=w.Layout(width="auto"))
        self.earlier.on_click(self.guarded(lambda _: self.show_from(self.first - self.ROWS)))
        self.later_steps.on_click(self.guarded(lambda _: self.show_from(self.first + self.ROWS)))
        self.pages = w.HTML("")
        self.pager = w.HBox([self.earlier, self.pages, self.later_steps], layout=w.Layout(display="none"))
        # Below the steps: the failed state kept uncommitted (%keep_failed), and where the
        # saved notebook and the image differ.
        self.notes = w.HTML("")
        self.widget = w.VBox([w.HTML(STYLE), self.table, self.notes, self.pager, self.status, self.detail])
        self.widget.add_class("stacker-layers")
        self.refresh()

    def text(self) -> str:
        """The same table as plain text (text/plain of the display)."""
        session = self.host.session
        return layers_table(session.history(), self.host.cell_name, session.kept_failure()).text

    def show_from(self, first: int) -> None:
        """Show the page that starts at 0-based step position `first`."""
        self.first = first
        self.following = False
        self.refresh()

    def refresh(self, views: list | None = None) -> None:
        """Bring the rows up to date with the session's history (`views`, if the caller
        read it already). Only what changed is touched: the rows of new or changed
        steps are built, rows that stay are kept, and a size measured meanwhile only
        updates its cell, so that a refresh after one step costs one row however
        long the history is."""
        if views is None:
            views = self.host.session.history()
        name = self.host.cell_name
        self._show_notes()
        if not views:
            if self._empty is None:
                old, self._shown = self._shown, []
                self._empty = w.HTML("<i>no steps yet: run a cell with a shell script"
                                     " to make the first snapshot</i>", layout=w.Layout(grid_column="1 / -1"))
                self.table.children = self.header + [self._empty]
                self._close_rows(old)
            self.pager.layout.display = "none"
            return
        if self._empty is not None:
            _close_tree(self._empty)
            self._empty = None
            self.table.children = self.header
        last_page = max(0, len(views) - self.ROWS)
        self.first = last_page if self.following else min(max(self.first, 0), last_page)
        self.following = self.first == last_page
        page = views[self.first:self.first + self.ROWS]
        keys = [_row_key(v, name(v.cell_id)) for v in page]
        if keys != [r.key for r in self._shown]:  # steps came, went or changed
            kept = {r.key: r for r in self._shown}
            self._shown = [kept.pop(key, None) or self._row(v) for key, v in zip(keys, page)]
            self.table.children = self.header + [cell for r in self._shown for cell in r.cells]
            self._close_rows(list(kept.values()))
        for r, v in zip(self._shown, page):
            r.rollback.disabled = v.index == len(views)  # already the head
            size = layer_row(v)[SIZE_COLUMN]
            if r.values[SIZE_COLUMN] != size:
                r.set_size(size)
        self.pager.layout.display = "none" if len(views) <= self.ROWS else ""
        self.earlier.disabled = self.first == 0
        self.later_steps.disabled = self.following
        self.pages.value = (f"&nbsp;steps {self.first + 1}–{self.first + len(page)}"
                            f" of {len(views)}&nbsp;")
        if any(v.size_delta is None for v in views):
            self._when_sizes_known()

    def _show_notes(self) -> None:
        session, name = self.host.session, self.host.cell_name
        notes = []
        failure = session.kept_failure()
        if failure is not None:
            cell = f", cell {name(failure.cell_id)}" if failure.cell_id else ""
            notes.append(f"<b>step {failure.index}</b> (layer {html.escape(failure.layer)}{html.escape(cell)}:"
                         f" <code>{html.escape(failure.first_line)}</code>): FAILED, kept uncommitted"
                         " (%rollback drops it)")
        try:
            lines = session.document_differences(full=False).lines()  # no store reads: after every cell
        except Exception:
            log.exception("comparing the notebook with the image failed")
            lines = []
        if lines:
            notes.append("the notebook and the image differ: " + html.escape("; ".join(lines)))
        value = "<br>".join(notes)
        if self.notes.value != value:
            self.notes.value = value

    def _when_sizes_known(self) -> None:
        """Refresh again once the sizes being measured in the background are known."""
        session = self.host.session
        if self._awaiting_sizes or not session.sizes_pending():
            return
        self._awaiting_sizes = True

        def known(_: Any) -> None:
            self._awaiting_sizes = False
            if not self.closed:
                self.refresh()

        def failed(e: BaseException) -> None:
            self._awaiting_sizes = False
            log.error("waiting for the step sizes failed", exc_info=e)

        self.host.later(_SIZE_WAITER, session.wait_for_sizes, then=known, fail=failed)

    def _shared(self) -> tuple:
        return (self._text_layout, self._html_style, self._button_style, *self._button_layouts.values())

    def _close_rows(self, rows: list[_Row]) -> None:
        keep = {id(x) for x in self._shared()}
        for row in rows:
            for cell in row.cells:
                _close_tree(cell, keep)

    def _row(self, v: Any) -> _Row:
        cell = self.host.cell_name(v.cell_id)
        values = layer_row(v, self.host.cell_name)
        text = w.HTML(_cols_html(values, LAYER_WIDTHS), layout=self._text_layout, style=self._html_style)
        buttons = [
            ("Roll back here", f"roll back to step {v.index}", self.rollback),
            ("Diff", f"files step {v.index} changed", self.diff),
            ("Browse", f"browse the snapshot of step {v.index}", self.browse),
        ]
        made = []
        for label, tip, action in buttons:
            button = w.Button(description=label, tooltip=tip, layout=self._button_layouts[label],
                              style=self._button_style)
            button.on_click(self.guarded(lambda _, n=v.index, a=action: a(n)))
            made.append(button)
        return _Row(_row_key(v, cell), [text, *made], values)

    def rollback(self, index: int) -> None:
        """Roll the session back to step `index`, on the engine thread, unless a cell runs."""
        if self.host.busy():
            self.say("a cell is running: roll back when it has finished (or interrupt it)", error=True)
            return
        self.say(f"rolling back to step {index} ...")

        def rolled(view: Any) -> None:
            self.say(f"rolled back to {step_label(view, self.host.cell_name)}" if view else
                     "rolled back to the start of the build: no steps left")
            self.host.registry.refresh_all()
            self.host.rolled_back(index)

        self.host.later(self.host.engine, self.host.session.rollback, index, then=rolled,
                        fail=self.failed)

    def diff(self, index: int) -> None:
        """Show the files step `index` added (A), modified (M) and removed (D)."""
        self.say(f"comparing step {index} with its parent ...")

        def show(changes: list[tuple[str, str]]) -> None:
            lines = [f"{letter} {path}" for letter, path in changes[:MAX_DIFF_LINES]]
            if len(changes) > MAX_DIFF_LINES:
                lines.append(f"... and {len(changes) - MAX_DIFF_LINES} more (%diff {index} lists all)")
            body = html.escape("\n".join(lines) or "no files changed")
            self._set_detail(w.HTML(f"<b>step {index}: {len(changes)} changes</b>"
                                    f"<pre class='stacker-diff'>{body}</pre>"))
            self.say("")

        self.host.later(self.host.io, self.host.session.diff, index, then=show, fail=self.failed)

    def browse(self, index: int) -> None:
        """Open a file browser on step `index`'s snapshot below the table."""
        browser = self.host.file_browser(index, "/")
        self._set_detail(browser.widget, browser)
        self.say("")

    def _set_detail(self, widget: w.Widget, browser: FileBrowser | None = None) -> None:
        old, old_browser = self.detail.children, self.browser
        self.detail.children = [widget]
        self.browser = browser
        if old_browser is not None:
            old_browser.close()
        for child in old:
            if old_browser is None or child is not old_browser.widget:
                _close_tree(child)

    def close(self) -> None:
        self.closed = True
        if self.browser is not None:
            self.browser.close()
        _close_tree(self.widget)  # the header and the rows are children of self.table
        for shared in self._shared():
            shared.close()
