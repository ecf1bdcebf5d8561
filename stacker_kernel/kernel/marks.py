"""Marks on step cells: each step cell's output says whether its step is still in the image.

After a successful step the kernel displays a one-line mark under the cell
with a Jupyter display id (the messaging spec's `display_data` with
`transient.display_id`). When the step leaves the session's history (a
`%rollback`, the widget's Roll back here, re-running an earlier cell), the
kernel sends `update_display_data` for that id, and the front-end rewrites the
old output in place: "undone by %rollback 3 in cell [5]". The front-end keeps
the updated output in the notebook file, so a saved notebook shows it too.

Every execution gets a display id of its own: a cell run again gets a fresh
mark, and updating an old one never touches the new one.

This module only keeps the marks and says what to send; the kernel sends it
(with the parent message of the cell or widget click that caused it).
"""
from __future__ import annotations

import html
import uuid
from dataclasses import dataclass
from typing import Iterable

from stacker_kernel.recipe.model import first_line


@dataclass
class Mark:
    """One execution of a step cell and the display that shows its step's fate."""

    display_id: str
    execution_count: int
    cell_id: str | None
    first_line: str
    snapshot_id: str | None  # None: the step failed (nothing was committed)
    step: int  # 1-based position in the history when it was committed (0 if failed)
    layer: str
    undone_by: str | None = None
    summary: str | None = None  # the line shown while the step is in the image, if not the default

    @property
    def label(self) -> str:
        return f"cell [{self.execution_count}]"


def _content(mark: Mark) -> dict:
    """display_data / update_display_data content of `mark`."""
    where = f"step {mark.step} of layer {mark.layer}"
    short = (mark.snapshot_id or "")[:12]
    if mark.undone_by is None:
        text = mark.summary or f"in the image: {where} (snapshot {short})"
        markup = f"<span style='color:#6a737d'>&#10003; {html.escape(text)}</span>"
    else:
        text = f"undone by {mark.undone_by}: {where} (snapshot {short}) is no longer in the image"
        markup = (f"<span style='color:#b35900'>&#8630; <b>undone</b> by {html.escape(mark.undone_by)}:"
                  f" {html.escape(where)} is no longer in the image</span>")
    return {"data": {"text/plain": text, "text/html": markup},
            "metadata": {"stacker": {"undone": mark.undone_by is not None, "snapshot": mark.snapshot_id}},
            "transient": {"display_id": mark.display_id}}


def rollback_cause(code: str, execution_count: int) -> str:
    """What a cell that undid steps did, in the words of the marks it updates."""
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith("%rollback"):
            args = stripped[len("%rollback"):].strip()
            if args.isdigit():
                what = f"%rollback to step {args}"
            elif args:
                what = f"%rollback to {args}"
            else:
                what = "%rollback (one step back)"
            return f"{what} in cell [{execution_count}]"
        if stripped and not stripped.startswith("%"):
            break
    return f"re-running an earlier cell as cell [{execution_count}]"


class StepMarks:
    """The marks of this kernel's step cells, oldest first."""

    def __init__(self) -> None:
        self._marks: list[Mark] = []
        self._in_image: dict[str, Mark] = {}  # display id -> mark whose step is in the history

    def committed(self, execution_count: int, cell_id: str | None, script: str,
                  snapshot_id: str, step: int, layer: str, summary: str | None = None) -> dict:
        """Record a committed step; returns the display_data content of its mark, which
        shows `summary` (e.g. the cell's status line) until the step is undone."""
        mark = Mark(f"stacker-step-{uuid.uuid4().hex[:16]}", execution_count, cell_id,
                    first_line(script, skip_shebang=True), snapshot_id, step, layer, summary=summary)
        self._marks.append(mark)
        self._in_image[mark.display_id] = mark
        return _content(mark)

    def resummarize(self, display_id: str, summary: str) -> dict | None:
        """A new summary for a mark whose step is still in the image (e.g. its status line
        with the size measured): the update_display_data content, or None if undone."""
        mark = self._in_image.get(display_id)
        if mark is None:
            return None
        mark.summary = summary
        return _content(mark)

    def failed(self, execution_count: int, cell_id: str | None, script: str) -> None:
        """Record a step cell whose step failed (it shows no mark, but %export names it)."""
        self._marks.append(Mark("", execution_count, cell_id, first_line(script, skip_shebang=True),
                                None, 0, ""))

    def undone(self, history: Iterable[str], cause: str) -> list[dict]:
        """Marks whose step is not in `history` (snapshot ids) become undone by `cause`;
        returns the update_display_data contents to send."""
        if not self._in_image:
            return []
        live = set(history)
        updates = []
        for display_id, mark in list(self._in_image.items()):
            if mark.snapshot_id not in live:
                mark.undone_by = cause
                del self._in_image[display_id]
                updates.append(_content(mark))
        return updates

    def left_out(self, built: Iterable[str]) -> list[str]:
        """The executed step cells (latest execution of each) whose step is not among
        `built` (snapshot ids), as "[N] first line (why)"."""
        built = set(built)
        latest: dict[str, Mark] = {}
        for mark in self._marks:
            latest[mark.cell_id or f"#{mark.execution_count}"] = mark
        out = []
        for mark in sorted(latest.values(), key=lambda m: m.execution_count):
            if mark.snapshot_id in built:
                continue
            why = "failed" if mark.snapshot_id is None else f"undone by {mark.undone_by or 'a rollback'}"
            out.append(f"[{mark.execution_count}] {mark.first_line} ({why})")
        return out
