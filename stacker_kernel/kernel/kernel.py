"""The Jupyter face: an ipykernel wrapper kernel whose code cells are build steps.

Each execute_request is one cell: its magic lines (recipe/cells.py) change the
recipe or act on the session, its script runs as one step through the engine
(engine/session.py). The step runs in a worker thread while `do_execute`
awaits it, so the event loop keeps serving comm (widget) messages, and the
step's output is published every few tens of milliseconds as it arrives.

Reply discipline (the Jupyter messaging spec, "Request-Reply"): every request gets a
reply. A failed, interrupted or dead step, a bad magic line, unusable
storage, or a bug of ours all become an `error` reply with an `error` iopub
message, so Run All stops at that cell.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.metadata
import os
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import comm
from ipykernel.kernelbase import Kernel

from stacker_kernel.errors import StackerKernelError
from stacker_kernel.kernel import completion, magics
from stacker_kernel.kernel.marks import StepMarks, rollback_cause
from stacker_kernel.kernel.output import OutputSink
from stacker_kernel.kernel.syntax import shell_completeness
from stacker_kernel.kernel.tables import CellNames, size_change
from stacker_kernel.kernel.widgets import WidgetHost, WidgetRegistry

try:
    __version__ = importlib.metadata.version("stacker-kernel")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

FLUSH_INTERVAL = 0.05  # seconds between two stream messages of a running cell
RED, RESET = "\x1b[0;31m", "\x1b[0m"


@dataclass
class CellError(Exception):
    """A cell's failure as the notebook shows it: ename, the one-line evalue, extra lines."""

    ename: str
    evalue: str
    details: tuple[str, ...] = ()


def notebook_path() -> Path:
    """The notebook this kernel serves, as an absolute path (it names the session).

    JupyterLab sets JPY_SESSION_NAME to the notebook's path relative to the
    server root and starts the kernel in the notebook's directory; without it
    (a console, a plain jupyter_client) the kernel's cwd gives a stable name.
    """
    name = os.environ.get("JPY_SESSION_NAME", "").strip()
    if not name:
        return Path.cwd() / "stacker-console"
    path = Path(name)
    return path if path.is_absolute() else Path.cwd() / path.name


class StackerKernel(Kernel):
    """Cells are build steps in a persistent unprivileged container (docs/architecture.md)."""

    implementation = "stacker-kernel"
    implementation_version = __version__
    banner = ("stacker-kernel: each cell is a build step in an unprivileged container,"
              " frozen as a btrfs snapshot. %help lists the magics.")
    language_info = {
        # Never "bash": front-ends would fall back to a host bash kernel.
        "name": "stacker",
        "version": __version__,
        "mimetype": "text/x-sh",
        "file_extension": ".sh",
        "codemirror_mode": "shell",
        "pygments_lexer": "bash",
    }
    help_links = [{"text": "stacker.yaml reference",
                   "url": "https://stackerbuild.io/main/reference/stacker_yaml/"}]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Comms for widgets: the base Kernel does not wire them (ipykernel's IPythonKernel does).
        self.comm_manager = comm.get_comm_manager()
        for msg_type in ("comm_open", "comm_msg", "comm_close"):
            self.shell_handlers[msg_type] = getattr(self.comm_manager, msg_type)
        self.widget_frontend = False  # set once a widget manager connects
        try:
            import ipywidgets

            ipywidgets.register_comm_target()
            self._watch_widget_frontend()
        except Exception as e:  # widgets are optional for building; say why they are off
            self.log.warning("ipywidgets comm target not registered: %s", e)
        # One engine thread: the session is used from it only (plus thread-safe
        # interrupt()), so engine calls never overlap.
        self._engine = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stacker-engine")
        self.build: Any = None  # engine.session.BuildSession once opened
        self.notebook = notebook_path()
        self.cell_names = CellNames(self.notebook)  # cells named by their prompt, [3], not their uuid
        self._step_running = False
        self._cell_running = False  # widgets refuse to roll back under a running cell
        self._reply_metadata: dict[str, dict] = {}
        self._failed_log: Path | None = None  # the copy of the last failed step's log (%log failed)
        # Widget callbacks: slow reads (diffs, downloads) on their own thread, so a
        # click never waits for a step; live %layers widgets refresh after each cell.
        self._widget_io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stacker-widgets")
        self.widgets = WidgetRegistry()
        self.marks = StepMarks()  # each step cell's "in the image" / "undone by ..." display

    def _watch_widget_frontend(self) -> None:
        """Note when a front-end that renders widgets connects.

        JupyterLab's and Notebook 7's widget manager opens a comm on
        `jupyter.widget.control` whenever it connects to the kernel (to restore
        widget state). Until one has, %layers shows a plain table and %browse
        says it needs widgets: a console, nbclient or our headless runner would
        only get widget models nobody renders.
        """
        control = self.comm_manager.targets["jupyter.widget.control"]

        def opened(comm_obj: Any, msg: dict) -> None:
            self.widget_frontend = True
            control(comm_obj, msg)

        self.comm_manager.register_target("jupyter.widget.control", opened)

    # --- kernel_info, subshells ------------------------------------------------

    @property
    def kernel_info(self) -> dict:
        info = super().kernel_info
        # One build shell: no concurrent subshells; no debugger (kernel_info's supported_features).
        info["supported_features"] = [f for f in info.get("supported_features", [])
                                      if f not in ("debugger", "kernel subshells")]
        return info

    async def create_subshell_request(self, socket, ident, parent) -> None:
        # The base class logs and sends nothing when it declines; we always reply.
        self.session.send(socket, "create_subshell_reply", {
            "status": "error", "ename": "No subshells",
            "evalue": "stacker-kernel runs one build shell: it has no subshells",
            "traceback": []}, parent, ident)

    # --- execute ------------------------------------------------------------------

    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, *, cell_meta=None, cell_id=None):
        parent = self.get_parent()
        publish = _Publisher(self, parent, silent)
        try:
            if parent.get("header", {}).get("subshell_id"):
                raise CellError("No subshells",
                                "stacker-kernel runs cells only in its main shell:"
                                " run this cell in the notebook, not in a subshell console")
            if not silent:
                self.cell_names.ran(cell_id, self.execution_count)
            self._cell_running = True
            try:
                outcome = await self._execute_cell(code, cell_id, cell_meta or {}, publish)
            finally:
                self._cell_running = False
                self._refresh_widgets()
                self._mark_undone(publish.send, rollback_cause(code, self.execution_count))
        except CellError as e:
            return publish.error(self.execution_count, e.ename, self._plain(e.evalue), e.details)
        except StackerKernelError as e:
            # The headline is a few plain words (e.title), never the exception's class.
            return publish.error(self.execution_count, e.title, self._plain(str(e)))
        except Exception as e:  # our bug: keep the traceback, still reply
            self.log.exception("cell failed with an internal error")
            return publish.error(self.execution_count, "Internal error",
                                 f"{self._plain(str(e) or type(e).__name__)} (a bug in stacker-kernel:"
                                 " please report it with the lines below)",
                                 tuple(traceback.format_exc().splitlines()))
        if outcome is not None:
            self._reply_metadata[parent.get("header", {}).get("msg_id", "")] = outcome
        return {"status": "ok", "execution_count": self.execution_count,
                "payload": [], "user_expressions": {}}

    def _plain(self, text: str) -> str:
        """`text` without the live rootfs's host path (a storage internal): the
        container's root is what the user knows it as."""
        build = self.build
        if build is not None:
            live = str(build.live)
            text = (text.replace(f"the rootfs {live}", "the layer's rootfs")
                    .replace(live + "/", "/").replace(live, "the layer's rootfs"))
        return text

    def finish_metadata(self, parent, metadata, reply_content):
        metadata = super().finish_metadata(parent, metadata, reply_content)
        step = self._reply_metadata.pop(parent.get("header", {}).get("msg_id", ""), None)
        if step is not None:
            metadata["stacker"] = step
        return metadata

    async def _execute_cell(self, code: str, cell_id: str | None, cell_meta: dict,
                            publish: "_Publisher") -> dict | None:
        """Run one cell; returns the step's reply metadata, raises CellError/StackerKernelError."""
        from stacker_kernel.recipe.cells import parse_cell
        from stacker_kernel.recipe.stacker_yaml import substitute

        # ${{NAME:default}} (kept by `import`) runs with its default, as stacker builds it
        cell = parse_cell(substitute(code, {}, in_kernel=True))  # a bad magic line runs nothing
        script = cell.script if cell.script.strip() else ""
        needs = bool(script) or any(not d.interactive or magics.needs_session(d.name)
                                    for d in cell.directives)
        deleted = [c for c in cell_meta.get("deletedCells", []) or [] if isinstance(c, str)]
        if needs:
            await self._ensure_session(publish, cell_id)
        if deleted and self.build is not None:
            await self._in_engine(self.build.forget_cells, deleted)
        pending: list = []  # consecutive recipe directives go to the engine together
        for directive in cell.directives:
            if not directive.interactive:
                pending.append(directive)
                continue
            await self._apply(pending, cell_id, publish)
            pending = []
            self._locate_notebook()  # %export, %log name files after it
            progress = OutputSink()  # thread-safe: long magics (%export oci) report as they go
            ctx = magics.MagicContext(self.notebook.parent, self._magic_specs(),
                                      self._widget_host(), left_out=self.marks.left_out,
                                      cell_name=self.cell_names,
                                      progress=lambda line: progress.write(line + "\n"),
                                      failed_log=self._failed_log, notebook_name=self.notebook.stem)
            if directive.name in magics.ON_EVENT_LOOP:
                # Widgets live on the event loop, where their comm messages are handled.
                shown = magics.run_magic(self.build, directive.name, directive.args, ctx)
            else:
                shown = await self._in_engine(magics.run_magic, self.build, directive.name,
                                              directive.args, ctx, sink=progress, publish=publish)
            publish.show(shown)
        # A %generate_labels cell's script is the layer's generate_labels, not a step:
        # it runs at export, in a throwaway copy of the layer's last snapshot.
        labels_cell = any(d.name == "generate_labels" for d in cell.directives)
        await self._apply(pending, cell_id, publish, script if labels_cell else "")
        if labels_cell:
            publish.stream("generate_labels set: it runs when the layer is exported (%export oci)\n")
            return None
        if not script:
            return None
        return await self._run_step(script, cell_id, publish)

    async def _apply(self, directives: list, cell_id: str | None, publish: "_Publisher",
                     script: str = "") -> None:
        if directives:
            for line in await self._in_engine(self.build.apply_directives, directives, cell_id, script):
                publish.stream(line + "\n")

    def _widget_host(self) -> WidgetHost | None:
        if self.build is None or not self.widget_frontend:
            return None
        return WidgetHost(self.build, self.notebook.parent, self._engine, self._widget_io,
                          lambda: self._cell_running, self.widgets, rolled_back=self._widget_rolled_back,
                          cell_name=self.cell_names)

    def _update_mark_when_measured(self, outcome: Any, display_id: str, publish: "_Publisher") -> None:
        """Show the step's size in its status line once the background measure has it."""
        loop = asyncio.get_running_loop()

        def update() -> None:
            content = self.marks.resummarize(display_id, status_line(outcome))
            if content is not None:  # None: undone meanwhile, its mark says so instead
                publish.send("update_display_data", content)

        def measured(size: int | None) -> None:  # on the measuring thread
            if size is not None:
                outcome.size_delta = size
                try:
                    loop.call_soon_threadsafe(update)
                except RuntimeError:  # the kernel is shutting down: nobody to tell
                    pass

        self.build.when_size_known(outcome.snapshot_id, measured)

    def _mark_undone(self, send: Callable[[str, dict], None], cause: str) -> None:
        """Rewrite the marks of steps that left the history: they say they were undone by `cause`."""
        if self.build is None:
            return
        try:
            for content in self.marks.undone(list(self.build.session.history), cause):
                send("update_display_data", content)
        except Exception:  # a mark must never break the cell
            self.log.exception("marking undone cells failed")

    def _widget_rolled_back(self, index: int) -> None:
        """The %layers widget rolled back to step `index` (on the event loop, in the click's context)."""
        parent = self.get_parent()

        def send(msg_type: str, content: dict) -> None:
            self.session.send(self.iopub_socket, msg_type, content, parent=parent,
                              ident=self._topic(msg_type))

        self._mark_undone(send, f"Roll back here (to step {index}) in the %layers table")

    def _refresh_widgets(self) -> None:
        """Bring the live %layers widgets up to date (after a cell, a rollback, a re-run)."""
        if self.build is not None:
            try:
                self.widgets.refresh_all()
            except Exception:
                self.log.exception("refreshing the layer widgets failed")

    @staticmethod
    def _magic_specs() -> dict:
        from stacker_kernel.recipe.cells import MAGICS

        return MAGICS

    async def _run_step(self, script: str, cell_id: str | None, publish: "_Publisher") -> dict:
        sink = OutputSink()
        announced = []

        def on_hit(outcome: Any) -> None:
            # A cache hit says so above the output it replays (engine thread: via the sink).
            announced.append(outcome)
            sink.write(status_line(outcome) + "\n")

        self._step_running = True
        try:
            # a slow base import says so; a cache hit says so above its replayed output
            run = functools.partial(self.build.run_step, on_progress=sink.write, on_hit=on_hit)
            outcome = await self._in_engine(run, script, cell_id, sink.write, sink=sink, publish=publish)
        finally:
            self._step_running = False
        publish.stream(sink.take(final=True))
        if not outcome.ok:
            self.marks.failed(self.execution_count, cell_id, script)
            self._locate_notebook()  # the log is named after it
            self._failed_log = await self._in_engine(
                magics.save_log, self.notebook.parent, self.notebook.stem, outcome.log_path,
                outcome.index, outcome.layer, True)
            # In the error itself: a failed cell's only output of ours is its error.
            details = (status_line(outcome),)
            if self._failed_log is not None:
                details += (f"its whole output: {magics.relative(self.notebook.parent, self._failed_log)}"
                            " (%log failed shows it)",)
            raise CellError("Interrupted" if outcome.interrupted else "Step failed",
                            outcome.message, details)
        if outcome.snapshot_id is not None:
            self._failed_log = None  # %log without N: the latest step's log
        if sink.capped:
            which = f"%log {outcome.index}" if outcome.snapshot_id else "the log"
            publish.line(f"[the output above was cut: {which} shows all of it]")
        if outcome.snapshot_id is None:  # ran in a kept failed state: nothing to mark
            publish.line(status_line(outcome))
        else:
            # The cell's mark: its status line (a cache hit said it above its output), which
            # a rollback rewrites to say what undid the step (kernel.marks).
            summary = None if announced else status_line(outcome)
            content = self.marks.committed(self.execution_count, cell_id, script,
                                           outcome.snapshot_id, outcome.index, outcome.layer, summary)
            publish.send("display_data", content)
            if summary is not None and outcome.size_delta is None:
                # The size is measured in the background: the line is updated in place.
                self._update_mark_when_measured(outcome, content["transient"]["display_id"], publish)
            differ = await self._in_engine(self._differences)
            if differ:
                publish.line(f"[the notebook and the image differ: {'; '.join(differ)}]")
        return {"cached": outcome.cached, "snapshot": outcome.snapshot_id,
                "duration": outcome.duration, "log": outcome.log_path, "step": outcome.index,
                "layer": outcome.layer}

    async def _in_engine(self, fn: Callable, *args: Any, sink: OutputSink | None = None,
                         publish: "_Publisher | None" = None) -> Any:
        """Run `fn(*args)` on the engine thread, publishing `sink` output while it runs."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._engine, fn, *args)
        while True:
            done, _ = await asyncio.wait({future}, timeout=FLUSH_INTERVAL)
            if sink is not None and publish is not None:
                publish.stream(sink.take())
            if done:
                return future.result()

    async def _ensure_session(self, publish: "_Publisher", cell_id: str | None = None) -> None:
        """Open the notebook's build session on first use, found by its cells (the one
        being run and the saved notebook's: engine/identity.py); StorageError leaves it
        closed."""
        from stacker_kernel.container.userns import single_id_notice
        from stacker_kernel.engine.identity import locate_notebook, notebook_cells

        if self.build is not None:
            return
        if cell_id:
            # JupyterLab keeps JPY_SESSION_NAME across a rename and a restart: the
            # notebook is the saved one holding the cell being run.
            self._moved_to(locate_notebook(self.notebook, {cell_id}))
        cells = {cell_id} if cell_id else set()
        cells.update(notebook_cells(self.notebook) or ())
        self.build = await self._in_engine(open_session, self.notebook, cells)
        self.build.cell_name = self.cell_names
        self.build.document = self._document
        line = identity_line(self.build, self.notebook)
        if line:
            publish.line(line)
        notice = single_id_notice()
        if notice:
            publish.line(notice)

    def _moved_to(self, path: Path) -> None:
        if path != self.notebook:
            self.notebook = path
            self.cell_names.notebook = path
            if self.build is not None:
                self.build.rename(str(path))

    def _locate_notebook(self) -> None:
        """Find the notebook again by the cells this kernel ran, in case it was renamed or
        moved while the kernel runs (before writing a file named after it, or comparing
        with it)."""
        from stacker_kernel.engine.identity import locate_notebook

        ids = set(self.cell_names.counts)
        if self.build is not None:
            ids.update(self.build.cell_order)
        build = self.build

        def taken() -> set[str]:  # the notebooks of other builds (a copy holds the same cells)
            if build is None:
                return set()
            return {s.name for s in build.store.find_sessions(kind="kernel") if s.id != build.session.id}
        try:
            self._moved_to(locate_notebook(self.notebook, ids, taken))
        except Exception:  # finding the file again must never break a cell
            self.log.exception("locating the notebook failed")

    def _differences(self) -> list[str]:
        """Where the saved notebook and the image differ (engine thread); never fails a cell."""
        try:
            return self.build.document_differences(full=False).lines()
        except Exception:
            self.log.exception("comparing the notebook with the image failed")
            return []

    def _document(self) -> Any:
        """The saved notebook (engine.identity.Document; None: not saved)."""
        from stacker_kernel.engine.identity import read_document

        self._locate_notebook()
        return read_document(self.notebook)

    # --- interrupts -------------------------------------------------------------

    def interrupt_step(self) -> None:
        """Interrupt the running step, if any (the engine escalates to SIGKILL)."""
        build = self.build
        if build is not None and self._step_running:
            build.interrupt()

    async def interrupt_request(self, stream, ident, parent):
        content: dict = {"status": "ok"}
        try:
            self.interrupt_step()
        except Exception as e:
            self.log.exception("interrupt failed")
            content = {"status": "error", "ename": type(e).__name__, "evalue": str(e),
                       "traceback": traceback.format_exc().splitlines()}
        self.session.send(stream, "interrupt_reply", content, parent, ident=ident)

    def pre_handler_hook(self):
        # A client that signals (interrupt_mode ignored) interrupts the step
        # instead of raising KeyboardInterrupt somewhere in the event loop.
        self.saved_sigint_handler = signal.signal(signal.SIGINT,
                                                  lambda signum, frame: self.interrupt_step())

    # --- completion, inspection, is_complete -------------------------------------

    async def do_complete(self, code, cursor_pos):
        try:
            return self._complete(code, len(code) if cursor_pos is None else cursor_pos).reply()
        except Exception:
            self.log.exception("completion failed")
            return completion.Completion([], cursor_pos or 0, cursor_pos or 0).reply()

    def _rootfs(self) -> str | None:
        try:
            return self.build.rootfs_path() if self.build is not None else None
        except Exception:
            return None

    def _cwd(self) -> str:
        """The build shell's working directory after the last step (relative paths start there)."""
        state = self.build.state if self.build is not None else None
        return (state.cwd if state is not None else None) or "/"

    def _complete(self, code: str, cursor_pos: int) -> completion.Completion:
        from stacker_kernel.recipe.cells import complete_magic

        line_start = code.rfind("\n", 0, cursor_pos) + 1
        line = code[line_start:cursor_pos]
        if line.lstrip().startswith("%"):
            matches = complete_magic(line)
            start = cursor_pos
            if matches:
                word = line.rsplit(None, 1)[-1] if not line[-1:].isspace() else ""
                start = cursor_pos - len(word)
            elif " " in line.strip():
                argument = completion.complete_magic_argument(line, cursor_pos, str(self.notebook.parent),
                                                              self._layer_names)
                if argument is not None:
                    return argument
                # Arguments that are paths: %grab, %diff, %import, %binds ...
                return completion.complete_shell(self._rootfs(), code, cursor_pos, self._cwd(),
                                                 self._shell_variables())
            return completion.Completion(matches, start, cursor_pos)
        return completion.complete_shell(self._rootfs(), code, cursor_pos, self._cwd(),
                                         self._shell_variables())

    def _layer_names(self) -> set[str]:
        """The layers this notebook's session has built, and the current one."""
        build = self.build
        if build is None:
            return set()
        return set(build.session.tags) | ({build.layer.name} if build.layer is not None else set())

    def _shell_variables(self) -> set[str]:
        """The variables the next step's shell starts with: what earlier steps of the layer
        set (exported or not) and the build environment (read, never the running shell)."""
        from stacker_kernel.engine.live import build_environment

        build = self.build
        if build is None:
            return set()
        state = build.state
        names = set(build_environment(build.layer))
        if state is not None:
            names |= set(state.exported) | set(state.plain)
        return names

    async def do_inspect(self, code, cursor_pos, detail_level=0, omit_sections=()):
        try:
            # A command's --help runs in a helper process (bounded): off the event loop.
            text = await asyncio.get_running_loop().run_in_executor(
                None, self._inspect, code, len(code) if cursor_pos is None else cursor_pos)
        except Exception:
            self.log.exception("inspect failed")
            text = None
        return {"status": "ok", "found": text is not None,
                "data": {"text/plain": text} if text else {}, "metadata": {}}

    def _inspect(self, code: str, cursor_pos: int) -> str | None:
        from stacker_kernel.recipe.cells import MAGICS

        start = cursor_pos
        while start > 0 and not code[start - 1].isspace():
            start -= 1
        end = cursor_pos
        while end < len(code) and not code[end].isspace():
            end += 1
        word = code[start:end]
        if word.startswith("%") and word[1:] in MAGICS:
            spec = MAGICS[word[1:]]
            return f"{spec.usage}\n\n{spec.help}"
        rootfs = self._rootfs()
        if not word or rootfs is None:
            return None
        found = completion.find_command(rootfs, word)
        if found is None:
            return f"{word}: not found on the container's PATH ({':'.join(completion.CONTAINER_PATH)})"
        return "\n".join([f"{word} is {found} in the container", *self._command_help(word, found)])

    def _command_help(self, name: str, path: str) -> list[str]:
        """The whatis line and the first lines of `--help` of command `name` (at `path`),
        from the last committed snapshot (read-only; never the build shell)."""
        from stacker_kernel.engine.command_help import help_text, whatis

        head = self.build.head if self.build is not None else None
        if head is None:
            return []
        snapshot = str(head.path)
        lines = []
        summary = whatis(snapshot, name)
        if summary:
            lines.append(summary)
        usage = help_text(snapshot, path)
        if usage:
            lines += ["", f"$ {name} --help", usage]
        return lines

    async def do_is_complete(self, code):
        try:
            from stacker_kernel.recipe.cells import parse_cell

            try:
                script = parse_cell(code).script
            except StackerKernelError:
                return {"status": "invalid"}
            verdict = shell_completeness(script)
        except Exception:
            self.log.exception("is_complete failed")
            return {"status": "unknown"}
        if verdict.status == "incomplete":
            return {"status": "incomplete", "indent": ""}
        return {"status": verdict.status}

    # --- shutdown ------------------------------------------------------------------

    async def do_shutdown(self, restart):
        # Must be quick (the manager kills us after a few seconds): stop the
        # container, keep every snapshot; no exporting here.
        build, self.build = self.build, None
        if build is not None:
            try:
                build.interrupt()
                build.close()
            except Exception:
                self.log.exception("closing the build session failed")
        return {"status": "ok", "restart": restart}


def status_line(outcome: Any) -> str:
    """The one line a step's cell ends with (a cache hit's starts with it), like
    `docker build`'s step header and DONE line: where the step is in the build,
    whether it ran, how long, what it added, and which snapshot holds it."""
    where = f"step {outcome.index}, layer {outcome.layer}"
    committed = outcome.index - 1  # for a step that committed nothing
    last = f"the last committed step is {committed}" if committed else "no step is committed yet"
    if not outcome.ok:
        what = "interrupted" if outcome.interrupted else "failed"
        if outcome.kept_failed:
            return (f"[{where}: {what} after {outcome.duration:.1f} s; its state is kept to inspect,"
                    f" not committed ({last}; %rollback drops it)]")
        return f"[{where}: {what} after {outcome.duration:.1f} s; nothing committed ({last})]"
    if outcome.snapshot_id is None:
        return (f"[layer {outcome.layer}: ran in {outcome.duration:.1f} s in the kept failed state of"
                f" step {outcome.index}, not committed ({last}; %rollback drops it)]")
    size = "size being measured" if outcome.size_delta is None else size_change(outcome.size_delta)
    snap = f"snapshot {outcome.snapshot_id[:12]}"
    if outcome.cached:
        replay = ("; its output below is from when it was built"
                  if outcome.log_path and _nonempty(outcome.log_path) else "")
        return f"[{where}: cached (unchanged, not run again), {size}, {snap}{replay}]"
    return f"[{where}: ran in {outcome.duration:.1f} s, {size}, {snap}]"


def _nonempty(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def identity_line(build: Any, notebook: Path) -> str | None:
    """The line a kernel's first cell says about which build it goes on with, and why."""
    found, resumed = build.identity, build.resumed
    how = found.how if found is not None else "new"
    other = Path(found.other).name if found is not None and found.other else ""
    if resumed is not None:
        where = (f"at step {resumed.index} (layer {resumed.layer}: {resumed.first_line}), found by its cells")
        rest = (" Cells run again are not rebuilt when unchanged: they come from the cache,"
                " marked cached, with the output they had; a changed cell and the cells"
                " after it run. %layers lists the steps]")
        if how == "renamed":
            return f"[this notebook's build goes on where it stopped, {where}; it was {other}.{rest}"
        return f"[the kernel restarted: this notebook's build goes on where it stopped, {where}.{rest}"
    if how == "copy":
        return (f"[a new build for this notebook: its cells are also those of {other}, whose build stays"
                " its own]")
    if how == "new-name-reused":
        return (f"[a new build: the earlier build named {notebook.name} has none of this notebook's"
                " cells, so it stays the build of the notebook it belongs to]")
    return None


def open_session(notebook: Path, cells: set[str] | None = None) -> Any:
    """The notebook's BuildSession on the user's storage, resuming its previous one
    (found by `cells`: engine/identity.py).

    Raises StorageError (one line with the fix) when the storage is unusable.
    """
    from stacker_kernel.engine.remote_cache import RemoteCache, configured
    from stacker_kernel.engine.session import BuildSession
    from stacker_kernel.storage.location import resolve_driver, resolve_storage
    from stacker_kernel.storage.store import Store

    remote = RemoteCache.from_settings(configured())  # the config file's shared cache, if any
    store = Store.open(resolve_storage(), resolve_driver())
    session = BuildSession.open(store, str(notebook), kind="kernel", resume=True,
                                default_layer=notebook.stem, base_dir=str(notebook.parent),
                                cells=cells if cells is not None else set())
    session.remote_cache = remote
    return session


class _Publisher:
    """iopub output of one execute_request, addressed to its parent message.

    The parent is captured when the request starts: ipykernel keeps it in a
    ContextVar, and output must reach this cell even if it is sent while
    another message (a comm message of a widget) is being handled.
    """

    def __init__(self, kernel: StackerKernel, parent: dict, silent: bool) -> None:
        self.kernel, self.parent, self.silent = kernel, parent, silent
        self._line_open = False  # the last stream text did not end its line

    def send(self, msg_type: str, content: dict) -> None:
        if not self.silent:
            k = self.kernel
            k.session.send(k.iopub_socket, msg_type, content, parent=self.parent,
                           ident=k._topic(msg_type))

    def stream(self, text: str, name: str = "stdout") -> None:
        if text:
            self.send("stream", {"name": name, "text": text})
            self._line_open = not text.endswith(("\n", "\r"))

    def line(self, text: str) -> None:
        """`text` as a line of its own, even after output that did not end its line."""
        self.stream(("\n" if self._line_open else "") + text + "\n")

    def show(self, shown: magics.Shown) -> None:
        data = {"text/plain": shown.text}
        if shown.html:
            data["text/html"] = shown.html
        if shown.widget is not None:
            # The widget view ranks above html; the table stays for
            # renderers without widgets (a saved notebook on GitHub, nbconvert).
            data.update(shown.widget._repr_mimebundle_())
            data["text/plain"] = shown.text
        data.update(shown.mime or {})
        self.send("display_data", {"data": data, "metadata": {}, "transient": {}})

    def error(self, execution_count: int, ename: str, evalue: str,
              details: tuple[str, ...] = ()) -> dict:
        content = {"ename": ename, "evalue": evalue,
                   "traceback": [f"{RED}{ename}{RESET}: {evalue}", *details]}
        self.send("error", content)
        return {"status": "error", "execution_count": execution_count, **content}


def launch() -> None:
    """Start the kernel (`python -m stacker_kernel -f CONNECTION_FILE`)."""
    from ipykernel.kernelapp import IPKernelApp

    # Helper processes (btrfs, tar, newuidmap) must not write into cells through
    # the process's fds 1/2: the engine captures what it needs itself.
    # ignore_cwd: the notebook's folder (the kernel's cwd) never joins sys.path, even
    # without the spec's `python -P` (kernel/install.py).
    IPKernelApp.launch_instance(kernel_class=StackerKernel, capture_fd_output=False, ignore_cwd=True)
