"""The interactive magics: UI actions on the build session, never part of the recipe.

`%rollback`, `%layers`, `%diff`, `%grab`, `%sbom`, `%export`, `%keep_failed`,
`%cache`, `%network`, `%browse`, `%log`, `%help`.
Their syntax is parsed in recipe/cells.py; this module only carries them
out on a BuildSession and says what to show: plain text, plus HTML where a
table or a link reads better in JupyterLab, plus a widget for `%layers` and
`%browse`, made by the kernel's widget host (kernel/widgets.py, reached
through MagicContext.widgets: the two modules do not import each other; what
both show is in kernel/tables.py). Those two run on the kernel's event loop
(ON_EVENT_LOOP), where widgets are created and their callbacks run; the
others run on the engine thread.
"""
from __future__ import annotations

import html
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stacker_kernel.engine import beside
from stacker_kernel.engine.terminal import safe_text
from stacker_kernel.errors import RecipeError, StorageError
from stacker_kernel.kernel.tables import CellName, Shown, layers_table, short_id, step_label, table

__all__ = ["MagicContext", "ON_EVENT_LOOP", "Shown", "needs_session", "run_magic"]

# Magics that create widgets: the kernel runs them on its event loop, not the engine thread.
ON_EVENT_LOOP = frozenset({"layers", "browse"})


def needs_session(name: str) -> bool:
    """False for the magics that work without storage (help)."""
    return name != "help"


def _rollback(session: Any, target: int | str | None, ctx: "MagicContext") -> Shown:
    view = session.rollback(target)
    if view is None:
        return Shown("rolled back to the start of the build: no steps left")
    return Shown(f"rolled back to {step_label(view, ctx.cell_name)}")


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

    from stacker_kernel.engine.grab import has_glob

    name = os.path.basename(args.path.rstrip("/")) or "rootfs"
    # A wildcard without DEST (%grab /build/*.deb): the matches go beside the notebook.
    dest = _beside_notebook(ctx, args.dest or ("./" if has_glob(name) else name))
    # DEST names the copy itself (DEST/ puts it inside), so running the cell again
    # refreshes the same tree instead of nesting DIR/DIR as `cp -r` would.
    grabbed = grab(session.snapshot_at().path, args.path, str(dest),
                   into=bool(args.dest and args.dest.endswith("/")) or (not args.dest and has_glob(name)))
    if grabbed.copied:
        return _grabbed_several(args.path, grabbed, ctx)
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
    # and leaves an anchor with `download` to the browser (HTML's `download` attribute).
    href = urllib.parse.quote(link)
    return Shown(text, f"grabbed {shown_path} to "
                       f"<a href=\"{html.escape(href)}\" download=\"{html.escape(written.name)}\">"
                       f"{html.escape(link)}</a>{notes}")


def _grabbed_several(pattern: str, grabbed: Any, ctx: "MagicContext") -> Shown:
    """What `%grab PATTERN` shows when its wildcard matched several paths: each copy,
    linked for download when JupyterLab can serve it."""
    text = "\n".join([f"grabbed {pattern} ({len(grabbed.copied)} matches) to {grabbed.path}",
                      *grabbed.copied, *grabbed.notes])
    items = []
    for copy in map(Path, grabbed.copied):
        link = _link(ctx, copy)
        shown = html.escape(link or str(copy))
        items.append(f"<li><a href=\"{html.escape(urllib.parse.quote(link))}\" download=\"{html.escape(copy.name)}\">"
                     f"{shown}</a></li>" if link and copy.is_file() else f"<li><code>{shown}</code></li>")
    notes = "".join(f"<br>{html.escape(n)}" for n in grabbed.notes)
    return Shown(text, f"grabbed <code>{html.escape(pattern)}</code> ({len(items)} matches):"
                       f"<ul>{''.join(items)}</ul>{notes}")


def default_export_names(notebook: str) -> tuple[str, str]:
    """The default `%export` outputs of `notebook`: NAME.stacker.yaml and NAME-oci beside
    it, so two notebooks in one directory never overwrite each other's export (the
    name `jupyter nbconvert --to stacker` gives the yaml too)."""
    stem = Path(notebook).stem or "notebook"
    return f"{stem}.stacker.yaml", f"{stem}-oci"


_ATTESTATION_FLAGS = ("--no-sbom", "--no-provenance")  # `%export oci`: leave the SBOM/provenance out


def _export_target(args: Any, default: str) -> str:
    paths = [a for a in args.args or [] if not a.startswith("-")]
    options = [a for a in args.args or [] if a.startswith("-")]
    if options or len(paths) > 1:
        what = " ".join(options or paths[1:])
        raise RecipeError(f"%export takes one output path, not {what!r}: write "
                          f"%export {'oci ' if args.format == 'oci' else ''}[PATH]"
                          f"{' [--no-sbom] [--no-provenance]' if args.format == 'oci' else ''}"
                          " (stacker-kernel export has --per-cell)")
    return paths[0] if paths else default


def _left_out_warning(session: Any, ctx: "MagicContext") -> list[str]:
    """The cells run in this kernel whose steps the export does not have."""
    if ctx.left_out is None:
        return []
    left = ctx.left_out([s.id for s in session.built_steps()])
    if not left:
        return []
    return [f"{len(left)} executed cell(s) are not in this export: " + "; ".join(left)]


def _export(session: Any, args: Any, ctx: "MagicContext") -> Shown:
    yaml_name, oci_name = default_export_names(session.session.name)
    notes = "".join(f"warning: {w}\n" for w in _left_out_warning(session, ctx))
    if args.format == "oci":
        from dataclasses import replace

        from stacker_kernel.engine.attest import Attestations
        from stacker_kernel.oci.layer_types import parse_layer_types

        flags = {a for a in args.args or [] if a in _ATTESTATION_FLAGS}
        args = replace(args, args=[a for a in args.args or [] if a not in flags])
        target = _beside_notebook(ctx, _export_target(args, oci_name))
        beside.check_target(target, "dir")  # a link planted there would take the layout elsewhere
        layer_types = parse_layer_types(getattr(args, "layer_types", None), getattr(args, "no_verity", False),
                                        getattr(args, "compression", None))
        tags = session.export_oci(str(target), progress=ctx.progress, layer_types=layer_types,
                                  attestations=Attestations(sbom="--no-sbom" not in flags,
                                                            provenance="--no-provenance" not in flags))
        notes += _differences_notes(session)
        return Shown(f"{notes}wrote OCI layout {target} with tags: {', '.join(tags) or '(none)'}")
    if args.format == "dockerfile":
        return _export_dockerfile(session, args, ctx, notes)
    target = _beside_notebook(ctx, _export_target(args, yaml_name))
    text = session.export_yaml(str(target))
    notes += _differences_notes(session)
    return Shown(f"{notes}wrote {target}: {_what_is_written(session)}\n\n{text}")


def _differences_notes(session: Any) -> str:
    """What the export leaves out or has otherwise than the saved notebook shows."""
    diffs = session.document_differences()
    notes = "".join(f"warning: the notebook and the image differ: {line}\n" for line in diffs.lines())
    if diffs.below:
        many = len(diffs.below) > 1
        notes += (f"note: not in this export: cell{'s' if many else ''} {'; '.join(diffs.below)} below the"
                  f" last step ({'they have' if many else 'it has'} not run)\n")
    return notes


def _what_is_written(session: Any) -> str:
    """'3 steps of layer build (build only), 2 of layer app': what a stacker.yaml export holds."""
    recipe = session.export_recipe()
    parts = [f"{len(layer.steps)} step{'' if len(layer.steps) == 1 else 's'} of layer {name}"
             + (" (build only)" if layer.build_only else "") for name, layer in recipe.layers.items()]
    return ", ".join(parts) or "no layer yet"


def _export_dockerfile(session: Any, args: Any, ctx: "MagicContext", notes: str) -> Shown:
    """`%export dockerfile [PATH]`: NAME.Dockerfile beside the notebook (context: its folder)."""
    from stacker_kernel.recipe.dockerfile_out import recipe_to_dockerfile

    target = _beside_notebook(ctx, _export_target(args, Path(session.session.name).stem + ".Dockerfile"))
    text = recipe_to_dockerfile(session.export_recipe())
    beside.write_bytes(target, text.encode())  # never through a link planted in a shared folder
    return Shown(f"{notes}wrote {target} (build it with: buildah bud -f {target.name} .)\n\n{text}")


#: the extension (labextension/) opens a terminal when it renders this, once and only while fresh
SHELL_MIME = "application/vnd.stacker-kernel.shell+json"
_SHELL_FRESH_SECONDS = 60  # a saved notebook reopened later must not open terminals


def _shell(session: Any, _args: Any, ctx: "MagicContext") -> Shown:
    """`%shell`: the JupyterLab extension opens a terminal running `stacker-kernel chroot`
    into this notebook's state (the kept failed state under keep_failed, frozen now);
    other front-ends show the command to run."""
    import secrets
    import shlex
    import time

    kept = session.kept_failure()
    if kept is not None:  # freeze it where `chroot` finds a failed build's state
        session.keep_failed_state(kept.first_line, kept.cell_id)
    notebook = session.session.name
    command = f"stacker-kernel chroot -f {shlex.quote(notebook)}"
    return Shown(f"a terminal in a throwaway copy of this notebook's current state (nothing done "
                 f"there is kept); without the JupyterLab extension run: {command}",
                 mime={SHELL_MIME: {"notebook": notebook, "command": command,
                                    "nonce": secrets.token_hex(8),
                                    "expires": time.time() + _SHELL_FRESH_SECONDS}})


def _sbom(session: Any, target: int | str | None, ctx: "MagicContext") -> Shown:
    """`%sbom [LAYER|N]`: the packages of a step, then which cell of its layer changed which."""
    from stacker_kernel.engine.sbom import step_changes

    chosen, at = session.find_snapshot(target)
    if at is None:
        raise RecipeError(f"the base of layer {chosen.layer or '?'} is no step: give %sbom a step number "
                          "from %layers")
    steps = [v for v in session.history(measure=False) if v.layer == at.layer and v.index <= at.index]
    snaps = [session.store.get(v.snapshot_id) for v in steps]
    inv, changes = step_changes(session.store, snaps)
    rows = [[p.name, p.version, p.arch, p.manager] for p in inv.packages]
    packages = table(["package", "version", "arch", "from"], rows)
    diff_rows = [[str(v.index), ctx.cell_name(v.cell_id), c.change, c.package.name,
                  c.old if c.change == "removed" else (f"{c.old} -> {c.new}" if c.old else c.new)]
                 for v, (_, cs) in zip(steps, changes) for c in cs]
    head = f"{len(rows)} packages after step {at.index} (layer {at.layer})"
    head += "".join(f"\nnote: {n}" for n in inv.notes)
    if not diff_rows:
        return Shown(f"{head}\n{packages.text}\n\nno step of layer {at.layer} changed a package",
                     f"<p>{html.escape(head)}</p>{packages.html}")
    diff = table(["step", "cell", "change", "package", "version"], diff_rows)
    return Shown(f"{head}\n{packages.text}\n\npackage changes by step:\n{diff.text}",
                 f"<p>{html.escape(head)}</p>{packages.html}<p>package changes by step:</p>{diff.html}")


def _switch(attribute: str, label: str) -> Callable[..., Shown]:
    def run(session: Any, value: Any, ctx: "MagicContext") -> Shown:
        session.set_option(attribute, value)
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
    if session.remote_cache is not None:
        session.remote_cache.close()  # its layer maker ends (a kernel's pushes are done with each cell)
    session.remote_cache = RemoteCache.from_settings(settings)
    where = " ".join(value.urls) or "none"
    return Shown(f"steps are {'pushed to' if value.direction == 'to' else 'taken from'} {where}")


def _layers(session: Any, args: Any, ctx: "MagicContext") -> Shown:
    # Never waits for a diff: sizes not measured yet show as '…' and fill in later.
    shown = layers_table(session.history(), ctx.cell_name, session.kept_failure())
    lines = session.document_differences().lines()
    if lines:
        note = "the notebook and the image differ: " + "; ".join(lines)
        shown = Shown(f"{shown.text}\n{note}", f"{shown.html}<p>{html.escape(note)}</p>")
    if ctx.widgets is None:
        return shown
    return Shown(shown.text, shown.html, ctx.widgets.layer_history().widget)


def _browse(session: Any, args: Any, ctx: "MagicContext") -> Shown:
    if ctx.widgets is None:
        raise RecipeError("%browse needs a front-end that shows widgets (JupyterLab or"
                          " Notebook 7): here, use %diff N and %grab PATH")
    browser = ctx.widgets.file_browser(args.target, args.path or "/")  # RecipeError for a bad PATH
    return Shown(f"browsing {args.path or '/'} in {browser.snapshot.label}", None, browser.widget)


LOG_DIR = "stacker-logs"  # beside the notebook: copies of step logs, which JupyterLab serves
LOG_SHOWN = 64 << 10  # characters of a log %log puts in the notebook (the copy has all)


def relative(notebook_dir: Path, path: Path) -> str:
    """`path` relative to the notebook's directory when below it (else as it is)."""
    rel = os.path.relpath(path, notebook_dir)
    return str(path) if rel.startswith("..") else rel


def save_log(notebook_dir: Path, notebook: str, log: str | None, index: int, layer: str,
             failed: bool) -> Path | None:
    """Copy a step's log beside the notebook, named after the notebook, the step and its
    layer (stacker-logs/NOTEBOOK-step7-LAYER[-failed].log); None if it cannot be."""
    if not log:
        return None
    layer = re.sub(r"[^\w.-]", "_", layer)
    dest = notebook_dir / LOG_DIR / f"{notebook}-step{index}-{layer}{'-failed' if failed else ''}.log"
    try:  # written safely: the notebook's folder may be shared (engine/beside.py)
        beside.own_dir(dest.parent)
        beside.copy_file(log, dest)
    except (OSError, StorageError):
        return None
    return dest


def log_link(notebook_dir: Path, path: Path, what: str) -> Shown:
    """A line naming a saved log, linked where JupyterLab can serve it."""
    rel = relative(notebook_dir, path)
    href = html.escape(urllib.parse.quote(rel))
    return Shown(f"{what}: {rel}", f"{html.escape(what)}: <a href=\"{href}\" target=\"_blank\">"
                                  f"{html.escape(rel)}</a>")


def _log(session: Any, target: int | str | None, ctx: "MagicContext") -> Shown:
    """`%log [N|failed]`: a step's whole output (default: the latest step's, failed or not),
    saved beside the notebook and shown, its end if it is long."""
    if target == "failed" or (target is None and ctx.failed_log is not None):
        if ctx.failed_log is None or not ctx.failed_log.is_file():
            raise RecipeError("no step has failed since the last one that worked: %log N shows"
                              " the log of step N (%layers numbers them)")
        path, what = ctx.failed_log, "the log of the failed step"
    else:
        index = target if target is not None else len(session.history(measure=False))
        if target is None and index == 0:
            raise RecipeError("no step yet: run a cell with a shell script first")
        snap = session.snapshot_at(index)  # RecipeError naming the steps there are
        log = session.store.log_path(snap.id)
        if not log.is_file():
            return Shown(f"step {index} wrote no output")
        path = save_log(ctx.notebook_dir, ctx.notebook_name, str(log), index, snap.layer, False)
        if path is None:
            path = log  # the notebook's directory is not writable: show it from the storage
        what = f"the log of step {index}"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - LOG_SHOWN))
        text = f.read().decode("utf-8", "replace")
    text = safe_text(text, keep_colours=False)  # shown as text and in html: no escape is rendered
    head = log_link(ctx.notebook_dir, path, what)
    if size > LOG_SHOWN:
        head.text += f" (its last {LOG_SHOWN >> 10} KiB below)"
        head.html += f" (its last {LOG_SHOWN >> 10} KiB below)"
    return Shown(f"{head.text}\n{text}", f"{head.html}<pre>{html.escape(text)}</pre>")


def _help(session: Any, name: str | None, ctx: "MagicContext") -> Shown:
    specs = ctx.magics
    if name is not None:
        spec = specs[name]
        kind = "interactive (acts on the session)" if spec.interactive else "recipe (exported)"
        return Shown(f"{spec.usage}\n  {spec.help}\n  {kind}")
    rows = [[spec.usage, spec.help, "" if spec.interactive else "recipe"]
            for spec in specs.values()]
    shown = table(["magic", "what it does", ""], rows)
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
    # snapshot ids of the export -> the executed step cells it leaves out (kernel.marks)
    left_out: Callable[[list[str]], list[str]] | None = None
    cell_name: CellName = field(default=lambda cell_id: short_id(cell_id) if cell_id else "")
    progress: Any = None  # line -> None: progress of long work (%export oci), from any thread
    failed_log: Path | None = None  # the copy of the last failed step's log, if the latest failed
    notebook_name: str = "notebook"  # the notebook's file name without .ipynb (names saved logs)


HANDLERS: dict[str, Callable[[Any, Any, MagicContext], Shown]] = {
    "rollback": _rollback,
    "layers": _layers,
    "diff": _diff,
    "grab": _grab,
    "shell": _shell,
    "sbom": _sbom,
    "export": _export,
    "keep_failed": _switch("keep_failed", "keep_failed"),
    "cache": _cache,
    "network": _switch("network", "network"),
    "browse": _browse,
    "log": _log,
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
