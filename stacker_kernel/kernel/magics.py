"""The interactive magics: UI actions on the build session, never part of the recipe.

`%rollback`, `%layers`, `%diff`, `%grab`, `%export`, `%keep_failed`,
`%cache`, `%network`, `%browse`, `%help`.
Their syntax is parsed in recipe/cells.py; this module only carries them
out on a BuildSession and says what to show: plain text, plus HTML where a
table or a link reads better in JupyterLab, plus a widget (kernel/widgets.py)
for `%layers` and `%browse`. Those two run on the kernel's event loop
(ON_EVENT_LOOP), where widgets are created and their callbacks run; the
others run on the engine thread.
"""
from __future__ import annotations

import html
import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import human_size


@dataclass
class Shown:
    """What an interactive magic displays: text/plain, and text/html when set."""

    text: str
    html: str | None = None
    widget: Any = None  # an ipywidgets widget to display (front-ends without widgets show html)


# Magics that create widgets: the kernel runs them on its event loop, not the engine thread.
ON_EVENT_LOOP = frozenset({"layers", "browse"})


def needs_session(name: str) -> bool:
    """False for the magics that work without storage (help)."""
    return name != "help"


def size_change(n: int | None) -> str:
    """A step's size change for display: '+1.5 KiB', '-12 B', '…' while being measured."""
    return "…" if n is None else human_size(n, signed=True)


def _table(headers: list[str], rows: list[list[str]]) -> Shown:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    text = "\n".join([fmt.format(*headers)] + [fmt.format(*r) for r in rows])
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'><code>{html.escape(c)}</code></td>"
                                    for c in r) + "</tr>" for r in rows)
    return Shown(text, f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def layers_table(steps: list[Any]) -> Shown:
    """`%layers`: one row per step (StepView): cell, first line, status, duration, size change, cached."""
    if not steps:
        return Shown("no steps yet: run a cell with a shell script to make the first snapshot")
    rows = [[str(s.index), s.layer, s.cell_id or "", s.first_line, s.status,
             f"{s.duration:.2f} s", size_change(s.size_delta), "cached" if s.cached else ""]
            for s in steps]
    return _table(["step", "layer", "cell", "first line", "status", "duration", "size", "cached"],
                  rows)


def _step_label(view: Any) -> str:
    cell = f", cell {view.cell_id}" if view.cell_id else ""
    return f"step {view.index} (layer {view.layer}{cell}: {view.first_line})"


def _rollback(session: Any, target: int | str | None, ctx: "MagicContext") -> Shown:
    view = session.rollback(target)
    if view is None:
        return Shown("rolled back to the start of the build: no steps left")
    return Shown(f"rolled back to {_step_label(view)}")


def _diff(session: Any, index: int | None, ctx: "MagicContext") -> Shown:
    changes = session.diff(index)
    if not changes:
        return Shown("no files changed")
    return Shown("\n".join(f"{letter} {path}" for letter, path in changes))


def _beside_notebook(ctx: "MagicContext", path: str) -> Path:
    target = Path(path)
    return target if target.is_absolute() else ctx.notebook_dir / target


def _link(ctx: "MagicContext", path: Path) -> str | None:
    """A link JupyterLab serves: relative to the notebook, and only below its directory."""
    try:
        rel = os.path.relpath(path, ctx.notebook_dir)
    except ValueError:
        return None
    return None if rel.startswith("..") else rel


def _grab(session: Any, args: Any, ctx: "MagicContext") -> Shown:
    """Copy out of the current snapshot (never the live container, which a step may be
    changing) beside the notebook or to DEST; link the copy when JupyterLab can serve it."""
    from stacker_kernel.engine.grab import grab

    dest = _beside_notebook(ctx, args.dest or os.path.basename(args.path.rstrip("/")) or "rootfs")
    # DEST names the copy itself (DEST/ puts it inside), so running the cell again
    # refreshes the same tree instead of nesting DIR/DIR as `cp -r` would.
    grabbed = grab(session.snapshot_at().path, args.path, str(dest),
                   into=bool(args.dest and args.dest.endswith("/")))
    written = Path(grabbed.path)
    text = "\n".join([f"grabbed {args.path} to {written}", *grabbed.notes])
    notes = "".join(f"<br>{html.escape(n)}" for n in grabbed.notes)
    link = _link(ctx, written)
    if link is None:
        return Shown(text)
    shown_path = f"<code>{html.escape(args.path)}</code>"
    if written.is_dir():
        # The server cannot download a directory: point at it in the file browser instead.
        return Shown(text, f"grabbed {shown_path} to the directory <code>{html.escape(link)}</code>"
                           f" (JupyterLab's file browser shows it){notes}")
    # A relative href: JupyterLab resolves it against the notebook to its files/ URL,
    # and leaves an anchor with `download` to the browser (reference/jupyter.md §4).
    href = urllib.parse.quote(link)
    return Shown(text, f"grabbed {shown_path} to "
                       f"<a href=\"{html.escape(href)}\" download=\"{html.escape(written.name)}\">"
                       f"{html.escape(link)}</a>{notes}")


def _export(session: Any, args: Any, ctx: "MagicContext") -> Shown:
    rest = list(args.args or [])
    if args.format == "oci":
        from stacker_kernel.oci.layer_types import parse_layer_types

        target = _beside_notebook(ctx, rest[0] if rest else "oci")
        layer_types = parse_layer_types(getattr(args, "layer_types", None), getattr(args, "no_verity", False))
        tags = session.export_oci(str(target), layer_types=layer_types)
        return Shown(f"wrote OCI layout {target} with tags: {', '.join(tags) or '(none)'}")
    target = _beside_notebook(ctx, rest[0] if rest else "stacker.yaml")
    text = session.export_yaml(str(target))
    warnings = session.order_warnings(_notebook_cell_ids(session.session.name))
    notes = "".join(f"warning: {w}\n" for w in warnings)
    return Shown(f"{notes}wrote {target}\n\n{text}")


def _notebook_cell_ids(path: str) -> list[str]:
    """The ids of the saved notebook's code cells, in order ([] if it cannot be read)."""
    try:  # plain JSON: nbformat's validation costs most of a second
        with open(path, encoding="utf-8") as f:
            cells = json.load(f).get("cells", [])
    except (OSError, ValueError, AttributeError):  # unsaved or not a notebook: nothing to compare
        return []
    return [c["id"] for c in cells if isinstance(c, dict) and c.get("cell_type") == "code" and c.get("id")]


def _switch(attribute: str, label: str) -> Callable[..., Shown]:
    def run(session: Any, value: Any, ctx: "MagicContext") -> Shown:
        setattr(session, attribute, value)
        shown = ("on" if value else "off") if isinstance(value, bool) else value
        return Shown(f"{label} is {shown}")
    return run


def _cache(session: Any, value: Any, ctx: "MagicContext") -> Shown:
    """`%cache on|off` switches the local cache; `%cache to|from URL` the shared one."""
    if isinstance(value, bool):
        return _switch("use_cache", "cache")(session, value, ctx)
    from dataclasses import replace

    from stacker_kernel.engine.remote_cache import CacheSettings, RemoteCache

    current = session.remote_cache.settings if session.remote_cache is not None else CacheSettings()
    if value.direction == "to":
        settings = replace(current, cache_to=value.urls[0] if value.urls else None)
    else:
        settings = replace(current, cache_from=list(value.urls))
    session.remote_cache = RemoteCache.from_settings(settings)
    where = " ".join(value.urls) or "none"
    return Shown(f"steps are {'pushed to' if value.direction == 'to' else 'taken from'} {where}")


def _layers(session: Any, args: Any, ctx: "MagicContext") -> Shown:
    table = layers_table(session.history())
    if ctx.widgets is None:
        return table
    widget = ctx.widgets.registry.layer_history(ctx.widgets)
    return Shown(table.text, table.html, widget.widget)


def _browse(session: Any, args: Any, ctx: "MagicContext") -> Shown:
    if ctx.widgets is None:
        raise RecipeError("%browse needs a front-end that shows widgets (JupyterLab or"
                          " Notebook 7): here, use %diff N and %grab PATH")
    from stacker_kernel.kernel.widgets import FileBrowser, resolve_snapshot

    snapshot = resolve_snapshot(session, args.target)
    browser = FileBrowser(ctx.widgets, snapshot, args.path or "/")
    text = f"browsing {args.path or '/'} in {snapshot.label}"
    if browser.listing is None:  # a bad PATH: say so as an error, not as an empty widget
        browser.close()
        raise RecipeError(f"cannot browse {args.path}: {browser.status_text()}")
    return Shown(text, None, browser.widget)


def _help(session: Any, name: str | None, ctx: "MagicContext") -> Shown:
    specs = ctx.magics
    if name is not None:
        spec = specs[name]
        kind = "interactive (acts on the session)" if spec.interactive else "recipe (exported)"
        return Shown(f"{spec.usage}\n  {spec.help}\n  {kind}")
    rows = [[spec.usage, spec.help, "" if spec.interactive else "recipe"]
            for spec in specs.values()]
    shown = _table(["magic", "what it does", ""], rows)
    shown.text = ("Cells are shell scripts run with /bin/sh -e in the build container;"
                  " magic lines at the top of a cell change the recipe or act on the session.\n\n"
                  + shown.text)
    return shown


@dataclass
class MagicContext:
    """What the magics need from the kernel besides the session."""

    notebook_dir: Path
    magics: dict[str, Any]  # recipe.cells.MAGICS: name -> MagicSpec (usage, help, interactive)
    widgets: Any = None  # kernel.widgets.WidgetHost on the event loop (ON_EVENT_LOOP magics)


HANDLERS: dict[str, Callable[[Any, Any, MagicContext], Shown]] = {
    "rollback": _rollback,
    "layers": _layers,
    "diff": _diff,
    "grab": _grab,
    "export": _export,
    "keep_failed": _switch("keep_failed", "keep_failed"),
    "cache": _cache,
    "network": _switch("network", "network"),
    "browse": _browse,
    "help": _help,
}


def run_magic(session: Any, name: str, args: Any, ctx: MagicContext) -> Shown:
    """Carry out interactive magic `name` with its parsed `args` on `session`.

    `session` may be None only for the magics where `needs_session` is False.
    Raises RecipeError for a magic this kernel does not carry out; the engine's
    own errors (unknown rollback target, missing path) pass through.
    """
    handler = HANDLERS.get(name)
    if handler is None:
        raise RecipeError(f"%{name} is not an interactive magic: put it at the top of a cell"
                          " with the build script it belongs to")
    return handler(session, args, ctx)
