"""What the magics and the widgets both show: step tables, step labels, cell names.

Shared by kernel/magics.py (plain-text and HTML output) and kernel/widgets.py
(the JupyterLab widgets), which do not import each other.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stacker_kernel.recipe.model import human_size

CellName = Callable[[str | None], str]  # a cell id -> how the notebook shows that cell


@dataclass
class Shown:
    """What an interactive magic displays: text/plain, and text/html when set."""

    text: str
    html: str | None = None
    widget: Any = None  # an ipywidgets widget to display (front-ends without widgets show html)
    mime: dict[str, Any] | None = None  # more representations (the JupyterLab extension's)


def size_change(n: int | None) -> str:
    """A step's size change for display: '+1.5 KiB', '-12 B', '…' while being measured."""
    return "…" if n is None else human_size(n, signed=True)


def table(headers: list[str], rows: list[list[str]]) -> Shown:
    """Aligned plain text and an HTML table of the same rows."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    text = "\n".join([fmt.format(*headers)] + [fmt.format(*r) for r in rows])
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'><code>{html.escape(c)}</code></td>"
                                    for c in r) + "</tr>" for r in rows)
    return Shown(text, f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def short_id(cell_id: str) -> str:
    """A cell id as shown when nothing better is known: JupyterLab's are uuids, whose
    first 8 characters identify them well enough; hand-written ids stay whole."""
    return cell_id[:8] if len(cell_id) > 12 else cell_id


def _by_id(cell_id: str | None) -> str:
    return short_id(cell_id) if cell_id else ""


LAYER_COLUMNS = ["step", "layer", "cell", "first line", "status", "duration", "size", "cached"]


def layer_row(s: Any, cell_name: CellName = _by_id) -> list[str]:
    """The `%layers` columns of step view `s` (engine.history.StepView)."""
    return [str(s.index), s.layer, cell_name(s.cell_id), s.first_line, s.status,
            f"{s.duration:.2f} s", size_change(s.size_delta), "cached" if s.cached else ""]


def layers_table(steps: list[Any], cell_name: CellName = _by_id, failure: Any = None) -> Shown:
    """`%layers`: one row per step (StepView): cell, first line, status, duration, size change,
    cached; then the uncommitted failed state the container keeps (session.KeptFailure), if any."""
    if not steps and failure is None:
        return Shown("no steps yet: run a cell with a shell script to make the first snapshot")
    rows = [layer_row(s, cell_name) for s in steps]
    if failure is not None:
        rows.append([str(failure.index), failure.layer, cell_name(failure.cell_id), failure.first_line,
                     "FAILED, kept uncommitted (%rollback drops it)", f"{failure.duration:.2f} s", "", ""])
    return table(LAYER_COLUMNS, rows)


def step_label(view: Any, cell_name: CellName = _by_id) -> str:
    """'step 3 (layer web, cell [4]: apt-get install ...)' for a StepView."""
    cell = f", cell {cell_name(view.cell_id)}" if view.cell_id else ""
    return f"step {view.index} (layer {view.layer}{cell}: {view.first_line})"


class CellNames:
    """Names cells as the notebook shows them, never by their uuid: `[3]` is the cell's
    prompt (the execution count this kernel gave it, else the one the saved notebook
    shows: a step resumed from an earlier kernel); a cell the saved notebook holds
    without a prompt is `#4`, its place there; else its short id.

    The kernel calls `ran` for each cell it executes; calling the object names a cell.
    """

    def __init__(self, notebook: Path | None = None) -> None:
        self.notebook = notebook
        self.counts: dict[str, int] = {}
        self._saved: tuple[float, dict[str, int], dict[str, int]] = (-1.0, {}, {})

    def ran(self, cell_id: str | None, execution_count: int) -> None:
        if cell_id:
            self.counts[cell_id] = execution_count

    def _saved_cells(self) -> tuple[dict[str, int], dict[str, int]]:
        """Cell id -> 1-based place in the saved notebook, and -> the prompt it shows there
        (re-read when the file changes)."""
        try:
            mtime = os.stat(self.notebook).st_mtime if self.notebook else -1.0
        except OSError:
            return {}, {}
        if mtime != self._saved[0]:
            try:  # plain JSON: nbformat's validation costs most of a second
                with open(self.notebook, encoding="utf-8") as f:
                    cells = json.load(f).get("cells", [])
                cells = [c for c in cells if isinstance(c, dict) and isinstance(c.get("id"), str)]
                places = {c["id"]: i for i, c in enumerate(cells, 1)}
                prompts = {c["id"]: c["execution_count"] for c in cells
                           if isinstance(c.get("execution_count"), int)}
            except (OSError, ValueError, AttributeError, TypeError):  # not a notebook (yet)
                places, prompts = {}, {}
            self._saved = (mtime, places, prompts)
        return self._saved[1], self._saved[2]

    def __call__(self, cell_id: str | None) -> str:
        if not cell_id:
            return ""
        if cell_id in self.counts:
            return f"[{self.counts[cell_id]}]"
        places, prompts = self._saved_cells()
        if cell_id in prompts:
            return f"[{prompts[cell_id]}]"
        place = places.get(cell_id)
        return f"#{place}" if place else short_id(cell_id)
