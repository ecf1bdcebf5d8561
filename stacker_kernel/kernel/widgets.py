"""The JupyterLab widgets: the layer history (`%layers`) and the file browser (`%browse`).

Both read the session's read-only snapshots, never the build container: a
directory listing or a download runs as root of a user namespace
(run_in_userns) on the snapshot subvolume, so it works while a cell runs and
cannot disturb the build shell. Widget callbacks run on the kernel's event
loop (ipykernel 7.4 serves comm messages while a cell awaits its step, see
reference/jupyter.md §2.4); anything slow (a diff, reading or copying a file)
goes to a background thread, and session changes (Roll back here) go to the
kernel's engine thread so they never overlap a cell. Session state is read
through BuildSession methods or under `session._lock`.

Downloads (reference/jupyter.md §4): a regular file up to DATA_URI_LIMIT is
offered as an `<a download>` with a data: URI in an HTML widget; a larger one
is copied to `stacker-downloads/` beside the notebook and offered as a
relative link rendered through the notebook's rendermime (an Output widget),
which JupyterLab turns into its authenticated `files/` URL.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextvars
import html
import logging
import os
import stat
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ipywidgets as w
from ipywidgets.widgets.widget_string import HTMLStyle

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.grab import GrabError, grab, open_in_snapshot
from stacker_kernel.engine.inspect import resolve_in_root
from stacker_kernel.errors import RecipeError, StackerKernelError
from stacker_kernel.recipe.model import human_size

DATA_URI_LIMIT = 4 * 1024 * 1024  # bytes: larger files are served by JupyterLab instead
DOWNLOADS_DIR = "stacker-downloads"  # beside the notebook; not hidden, or the server 404s it
PAGE_SIZE = 60  # rows per page of the file browser (each row is a handful of widget models)
MAX_ENTRIES = 5000  # entries listed per directory
MAX_DIFF_LINES = 500

log = logging.getLogger(__name__)

# --- reading snapshots (runs in the user namespace) ------------------------------


@dataclass
class Entry:
    """One directory entry of a snapshot, with ids as the container sees them."""

    name: str
    path: str  # container path
    kind: str  # directory, file, symlink, fifo, socket, character device, block device
    size: int
    mode: str  # like `ls -l`: drwxr-xr-x
    uid: int
    gid: int
    mtime: float
    link_target: str | None = None  # symlinks: what the link says
    link_kind: str | None = None  # symlinks: kind of what it resolves to inside the rootfs
    link_path: str | None = None  # symlinks: the container path it resolves to
    link_problem: str | None = None  # symlinks: why it does not resolve (escapes, dangling)


@dataclass
class Listing:
    """A directory of a snapshot: its canonical container path and entries (dirs first)."""

    path: str
    entries: list[Entry]
    total: int  # entries in the directory (more than listed when over MAX_ENTRIES)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISREG, "file"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _container_path(root: str, host: str) -> str:
    rel = os.path.relpath(host, root)
    return "/" if rel == "." else "/" + rel


def _list_in_ns(root: str, path: str) -> Listing:
    root = os.path.abspath(root)
    host = resolve_in_root(root, path)
    if not stat.S_ISDIR(os.lstat(host).st_mode):
        raise GrabError(f"{path} is not a directory: browse its directory and use its Download button")
    cpath = _container_path(root, host)
    with os.scandir(host) as it:
        names = sorted(de.name for de in it)
    entries = []
    for name in names[:MAX_ENTRIES]:
        child = os.path.join(cpath, name)
        try:
            st = os.lstat(os.path.join(host, name))
        except FileNotFoundError:  # cannot happen on a read-only snapshot; be safe anyway
            continue
        entry = Entry(name, child, _kind(st.st_mode), st.st_size, stat.filemode(st.st_mode),
                      st.st_uid, st.st_gid, st.st_mtime)
        if entry.kind == "symlink":
            entry.link_target = os.readlink(os.path.join(host, name))
            try:
                resolved = resolve_in_root(root, child)
                entry.link_kind = _kind(os.lstat(resolved).st_mode)
                entry.link_path = _container_path(root, resolved)
            except GrabError as e:
                entry.link_problem = str(e)
        entries.append(entry)
    entries.sort(key=lambda e: (not _is_dir(e), e.name))
    return Listing(cpath, entries, len(names))


def _is_dir(entry: Entry) -> bool:
    return entry.kind == "directory" or entry.link_kind == "directory"


def list_directory(snapshot_root: str | Path, path: str) -> Listing:
    """The entries of container directory `path` in a snapshot; symlinks are followed
    only inside the rootfs. Raises GrabError for a missing path, a non-directory or an escape."""
    return run_in_userns(_list_in_ns, str(snapshot_root), path)


@dataclass
class Download:
    """A file made ready for the browser: inline bytes, or a copy beside the notebook."""

    name: str
    size: int
    data: bytes | None = None  # set for files up to the data-URI limit
    copy: str | None = None  # host path of the copy otherwise


def _why_not_downloadable(path: str, kind: str) -> str:
    return (f"{path} is a {kind}: only regular files can be downloaded"
            " (its contents do not exist in the snapshot)")


def _read_in_ns(root: str, path: str, limit: int) -> tuple[str, int, bytes | None]:
    # Opened by engine/grab.py's walk: inside the snapshot, regular files only.
    fd, name, st = open_in_snapshot(root, path)
    if fd is None:
        raise GrabError(_why_not_downloadable(path, _kind(st.st_mode)))
    with os.fdopen(fd, "rb") as f:  # the snapshot is read-only: the size cannot change
        return name, st.st_size, (f.read() if st.st_size <= limit else None)


def prepare_download(snapshot_root: str | Path, snapshot_id: str, path: str,
                     notebook_dir: Path, limit: int = DATA_URI_LIMIT) -> Download:
    """Read container file `path` of a snapshot for a download: its bytes when at most
    `limit`, else a copy at notebook_dir/stacker-downloads/<snapshot>/<path>.
    Raises GrabError for a missing path, an escape or a special file."""
    name, size, data = run_in_userns(_read_in_ns, str(snapshot_root), path, limit)
    if data is not None:
        return Download(name, size, data=data)
    dest = notebook_dir / DOWNLOADS_DIR / snapshot_id[:12] / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Download(name, size, copy=grab(snapshot_root, path, dest, into=False).path)


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


def data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


# --- the kernel's side: threads and the registry ------------------------------------


@dataclass
class WidgetHost:
    """What widget callbacks may use besides the session.

    `engine` is the kernel's engine thread (session changes, serialised with
    cells); `io` a background thread for slow reads; `busy()` is true while a
    cell executes (rollback then waits for the user, not for the cell).
    """

    session: Any  # engine.session.BuildSession
    notebook_dir: Path
    engine: concurrent.futures.Executor
    io: concurrent.futures.Executor
    busy: Callable[[], bool]
    registry: "WidgetRegistry"
    rolled_back: Callable[[int], None] = lambda index: None  # the kernel marks the undone cells

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

    def add(self, widget: "LayerHistory") -> None:
        self._layers = [x for x in self._layers if not x.closed][-(self.KEEP - 1):] + [widget]

    def layer_history(self, host: WidgetHost) -> "LayerHistory":
        """The live LayerHistory of `host`'s session, made (and registered) if there is none."""
        for widget in self._layers:
            if not widget.closed and widget.host.session is host.session:
                widget.refresh()
                return widget
        widget = LayerHistory(host)
        self.add(widget)
        return widget

    def refresh_all(self) -> None:
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


# Directory names read as names, not as centred button labels.
STYLE = ("<style>.stacker-dir{justify-content:flex-start;text-align:left;"
         "font-family:var(--jp-code-font-family)}</style>")


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


# --- the file browser -----------------------------------------------------------


@dataclass
class SnapshotRef:
    """The snapshot a browser shows, with a label in the user's words."""

    snapshot_id: str
    root: str
    label: str


def _step_label(view: Any) -> str:
    cell_id = view.cell_id or ""
    # JupyterLab's cell ids are uuids: their first 8 characters identify them well enough.
    cell = f", cell {cell_id[:8] if len(cell_id) > 12 else cell_id}" if cell_id else ""
    return f"step {view.index} (layer {view.layer}{cell}: {view.first_line})"


def resolve_snapshot(session: Any, target: str | int | None) -> SnapshotRef:
    """The snapshot `%browse [LAYER|N]` means: the head (None), step N of %layers
    (negative counts from the end), or a layer's last step. RecipeError otherwise."""
    with session._lock:
        views = session.history()
        if target is None:
            snap = session.snapshot_at(None)
        elif isinstance(target, int):
            n = target if target > 0 else len(views) + 1 + target
            if not 1 <= n <= len(views) or target == 0:
                raise RecipeError(f"no step {target}: %layers lists steps 1..{len(views)}")
            snap = session.snapshot_at(n)
        else:
            tips = session.layer_tips()
            if target not in tips:
                known = ", ".join(tips) or "none yet"
                raise RecipeError(f"no step of layer {target!r} in this session (layers: {known}):"
                                  " use %browse N with a step number from %layers")
            snap = tips[target]
    view = next((v for v in views if v.snapshot_id == snap.id), None)
    label = _step_label(view) if view else f"the base of layer {snap.layer or '?'}"
    return SnapshotRef(snap.id, str(snap.path), label)


class FileBrowser(_Panel):
    """A directory listing of one snapshot: click directories, '..' goes up (never above /)."""

    COLUMNS = (("name", "24em"), ("size", "7em"), ("mode", "8em"), ("owner", "7em"),
               ("modified", "10em"), ("", "18em"))

    def __init__(self, host: WidgetHost, snapshot: SnapshotRef, path: str = "/") -> None:
        super().__init__()
        self.host, self.snapshot = host, snapshot
        self.listing: Listing | None = None
        self.page = 0
        self._layouts = [w.Layout(width=width, flex="0 0 auto", overflow="hidden",
                                  margin="2px 0.6em 2px 0") for _, width in self.COLUMNS]
        self.title = w.HTML("")
        self.up = w.Button(description="..", tooltip="up to the parent directory",
                           layout=w.Layout(width="4em"))
        self.up.on_click(self.guarded(lambda _: self.open(os.path.dirname(self.listing.path))))
        self.header = w.HBox([w.HTML(f"<b>{name}</b>", layout=lay)
                              for (name, _), lay in zip(self.COLUMNS, self._layouts)])
        self.rows = w.VBox([])
        self.prev = w.Button(description="previous page", layout=w.Layout(width="10em"))
        self.next = w.Button(description="next page", layout=w.Layout(width="10em"))
        self.prev.on_click(self.guarded(lambda _: self.show_page(self.page - 1)))
        self.next.on_click(self.guarded(lambda _: self.show_page(self.page + 1)))
        self.pages = w.HTML("")
        self.pager = w.HBox([self.prev, self.pages, self.next])
        self.saved = w.HTML("")  # data: URI links (the HTML widget keeps them as written)
        self.served = w.Output()  # files/ links (rendermime resolves them to the server)
        self.widget = w.VBox([w.HTML(STYLE), self.title, w.HBox([self.up]), self.header, self.rows,
                              self.pager, self.saved, self.served, self.status])
        self.widget.add_class("stacker-browser")
        self.open(path)

    # navigation

    def open(self, path: str) -> None:
        """List container directory `path` (synchronously: a listing is one quick fork)."""
        try:
            listing = list_directory(self.snapshot.root, path or "/")
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
        old = self.rows.children
        chunk = entries[self.page * PAGE_SIZE:(self.page + 1) * PAGE_SIZE]
        self.rows.children = [self._row(e) for e in chunk]
        for row in old:
            _close_tree(row, self._keep())
        self.pager.layout.display = "none" if pages == 1 else ""
        self.prev.disabled = self.page == 0
        self.next.disabled = self.page == pages - 1
        self.pages.value = f"&nbsp;page {self.page + 1} of {pages}&nbsp;"

    def _keep(self) -> set[int]:
        return {id(x) for x in self._layouts}

    def _row(self, e: Entry) -> w.HBox:
        lay = self._layouts
        shown = e.name + ("/" if _is_dir(e) else "")
        if e.link_target is not None:
            shown += f" → {e.link_target}"
        if _is_dir(e):
            name: w.Widget = w.Button(description=shown, tooltip=f"open {e.link_path or e.path}",
                                      layout=lay[0])
            name.add_class("stacker-dir")
            target = e.link_path or e.path
            name.on_click(self.guarded(lambda _, t=target: self.open(t)))
        else:
            name = w.HTML(f"<code>{html.escape(shown)}</code>", layout=lay[0])
        cells = [name,
                 w.HTML(human_size(e.size) if e.kind == "file" else "", layout=lay[1]),
                 w.HTML(f"<code>{e.mode}</code>", layout=lay[2]),
                 w.HTML(f"{e.uid}:{e.gid}", layout=lay[3]),
                 w.HTML(time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime)), layout=lay[4])]
        action = self._action(e)
        if action is not None:
            cells.append(action)
        return w.HBox(cells)

    def _action(self, e: Entry) -> w.Widget | None:
        lay = self._layouts[5]
        if e.kind == "symlink" and e.link_problem:
            why = "points outside the rootfs" if "escapes" in e.link_problem else "dangling link"
            return w.HTML(f"<i>{why}</i>", layout=lay, tooltip=e.link_problem)
        kind = e.link_kind if e.kind == "symlink" else e.kind
        if kind == "directory":
            return None
        if kind != "file":
            return w.HTML(f"<i>{kind}: not downloadable</i>", layout=lay,
                          tooltip=_why_not_downloadable(e.path, kind))
        button = w.Button(description="Download", icon="download", tooltip=f"download {e.path}",
                          layout=lay)
        button.add_class("stacker-download-button")
        button.on_click(self.guarded(lambda _, p=e.path: self.download(p)))
        return button

    # downloads

    def download(self, path: str) -> None:
        """Offer container file `path` for download (a data: link or a served copy)."""
        self.say(f"preparing {path} ...")
        self.host.later(self.host.io, prepare_download, self.snapshot.root,
                        self.snapshot.snapshot_id, path, self.host.notebook_dir,
                        then=lambda d, p=path: self._offer(p, d), fail=self.failed)

    def _offer(self, path: str, d: Download) -> None:
        if d.data is not None:
            self.served.outputs = ()
            self.saved.value = download_link_html(d.name, data_uri(d.data), d.size)
            self.say(f"{path} is ready: click Save {d.name}")
            return
        link = relative_link(d.copy, self.host.notebook_dir)
        self.saved.value = ""
        if link is None:
            self.say(f"{path} was copied to {d.copy} (outside the notebook's directory, so"
                     " JupyterLab cannot serve it: fetch it from there)")
            return
        text = f"{path} ({human_size(d.size)}) was copied to {link}"
        self.served.outputs = ({"output_type": "display_data", "metadata": {}, "data": {
            "text/plain": text,
            "text/html": download_link_html(d.name, link, d.size, f", copied to {urllib.parse.unquote(link)}")}},)
        self.say(f"{path} is larger than {human_size(DATA_URI_LIMIT)}: copied beside the notebook;"
                 f" click Save {d.name}")

    def close(self) -> None:
        self.closed = True
        _close_tree(self.widget)
        for lay in self._layouts:
            lay.close()


# --- the layer history -----------------------------------------------------------

# Waits for a session's background size measurement, for the widgets to refresh
# then (not the io thread: a diff or a download must not wait behind it).
_SIZE_WAITER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="layer-sizes")


def _row_key(v: Any) -> tuple:
    """What a row shows of step view `v` but its size (updated in place when measured)."""
    return (v.index, v.snapshot_id, v.layer, v.cell_id, v.first_line, v.status, v.duration, v.cached)


def _cell_html(value: str, width: str, tag: str = "code") -> str:
    return (f"<{tag} title='{html.escape(value)}' style='display:inline-block;width:{width};"
            f"overflow:hidden;white-space:nowrap;vertical-align:middle;margin:2px 0.6em 2px 0'>"
            f"{html.escape(value)}</{tag}>")


def _row_html(values: list[str], columns: tuple) -> str:
    return "".join(_cell_html(value, width) for value, (_, width) in zip(values, columns))


SIZE_COLUMN = 6  # LayerHistory.COLUMNS index of "size"


@dataclass
class _Row:
    """One step's row of a LayerHistory, with the parts that change after it is built."""

    key: tuple
    row: w.HBox
    cells: w.HTML
    rollback: w.Button
    values: list[str]
    columns: tuple

    def set_size(self, size: int | None) -> None:
        from stacker_kernel.kernel.magics import size_change

        self.values[SIZE_COLUMN] = size_change(size)
        self.cells.value = _row_html(self.values, self.columns)



class LayerHistory(_Panel):
    """`%layers` as a widget: a row per step with Roll back here, Diff and Browse."""

    COLUMNS = (("step", "3.5em"), ("layer", "8em"), ("cell", "7em"), ("first line", "17em"),
               ("status", "4em"), ("duration", "5.5em"), ("size", "6em"), ("cached", "4em"))

    def __init__(self, host: WidgetHost) -> None:
        super().__init__()
        self.host = host
        # A row is one HTML (its cells) and three buttons, all sharing these layouts
        # and styles: a few models per step, as a step adds a row after every cell.
        self._cells_layout = w.Layout(flex="0 0 auto")
        self._row_layout = w.Layout(align_items="center")
        self._html_style = HTMLStyle()
        self._button_style = w.ButtonStyle()
        self._button_layouts = {"wide": w.Layout(width="9.5em", flex="0 0 auto"),
                                "narrow": w.Layout(width="6em", flex="0 0 auto")}
        self.header = w.HBox([w.HTML("".join(_cell_html(name, width, "b") for name, width in self.COLUMNS),
                                     layout=self._cells_layout, style=self._html_style)],
                             layout=self._row_layout)
        self.rows = w.VBox([])
        self.detail = w.VBox([])
        self.browser: FileBrowser | None = None
        self._shown: list[_Row] = []  # what self.rows shows, one per step
        self._awaiting_sizes = False
        self.widget = w.VBox([self.header, self.rows, self.status, self.detail])
        self.widget.add_class("stacker-layers")
        self.refresh()

    def text(self) -> str:
        """The same table as plain text (text/plain of the display)."""
        from stacker_kernel.kernel.magics import layers_table

        return layers_table(self.host.session.history()).text

    def refresh(self, views: list | None = None) -> None:
        """Bring the rows up to date with the session's history (`views`, if the caller
        read it already). Only what changed is touched: the rows of new or changed
        steps are built, a size measured meanwhile only updates its cell, so that
        a refresh after one step costs one row however long the history is."""
        if views is None:
            views = self.host.session.history()
        if not views:
            if self._shown or not self.rows.children:
                self._shown = []
                old = self.rows.children
                self.rows.children = [w.HTML("<i>no steps yet: run a cell with a shell script"
                                             " to make the first snapshot</i>")]
                self._close_rows(old)
            return
        shown = self._shown
        same = 0
        while same < min(len(views), len(shown)) and shown[same].key == _row_key(views[same]):
            same += 1
        if same != len(shown) or same != len(views):  # steps came, went or changed
            old_rows = [r.row for r in shown[same:]] if shown else list(self.rows.children)
            if shown:
                shown[-1].rollback.disabled = False  # the old head's row, if it stays
            self._shown = shown[:same] + [self._row(v) for v in views[same:]]
            self._shown[-1].rollback.disabled = True  # already the head
            self.rows.children = [r.row for r in self._shown]
            self._close_rows(old_rows)
        from stacker_kernel.kernel.magics import size_change

        for r, v in zip(self._shown, views):
            if r.values[SIZE_COLUMN] != size_change(v.size_delta):
                r.set_size(v.size_delta)
        if any(v.size_delta is None for v in views):
            self._when_sizes_known()

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
        return (self._cells_layout, self._row_layout, self._html_style, self._button_style,
                *self._button_layouts.values())

    def _close_rows(self, rows: Any) -> None:
        keep = {id(x) for x in self._shared()}
        for row in rows:
            _close_tree(row, keep)

    def _row(self, v: Any) -> "_Row":
        from stacker_kernel.kernel.magics import size_change

        values = [str(v.index), v.layer, v.cell_id or "", v.first_line, v.status,
                  f"{v.duration:.2f} s", size_change(v.size_delta), "cached" if v.cached else ""]
        cells = w.HTML(_row_html(values, self.COLUMNS), layout=self._cells_layout, style=self._html_style)
        buttons = [
            ("Roll back here", f"roll back to step {v.index}", self.rollback),
            ("Diff", f"files step {v.index} changed", self.diff),
            ("Browse", f"browse the snapshot of step {v.index}", self.browse),
        ]
        made = []
        for label, tip, action in buttons:
            width = "wide" if label == "Roll back here" else "narrow"
            button = w.Button(description=label, tooltip=tip, layout=self._button_layouts[width],
                              style=self._button_style)
            button.on_click(self.guarded(lambda _, n=v.index, a=action: a(n)))
            made.append(button)
        return _Row(_row_key(v), w.HBox([cells, *made], layout=self._row_layout), cells, made[0], values,
                    self.COLUMNS)

    def rollback(self, index: int) -> None:
        """Roll the session back to step `index`, on the engine thread, unless a cell runs."""
        if self.host.busy():
            self.say("a cell is running: roll back when it has finished (or interrupt it)", error=True)
            return
        self.say(f"rolling back to step {index} ...")

        def rolled(view: Any) -> None:
            self.say(f"rolled back to {_step_label(view)}" if view else
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
        browser = FileBrowser(self.host, resolve_snapshot(self.host.session, index))
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
        _close_tree(self.widget)
        for shared in self._shared():
            shared.close()
