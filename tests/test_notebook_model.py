"""The notebook is the recipe, whatever the user does in JupyterLab (issue 22): a model-based test.

A hypothesis state machine drives the real kernel over the Jupyter protocol, with
JupyterLab-shaped execute requests (each cell's id in the request's metadata), through
random sequences of what users do: run a cell, edit a cell, insert a cell, a cell that
fails and is fixed after the cells below it ran (Shift-Enter past it), `%rollback`,
restart the kernel, rename the notebook (JupyterLab moves the .ipynb and keeps the
kernel; a later restart gets the new path in JPY_SESSION_NAME), a new notebook under a
name another one had (new cell ids), switching back to an older notebook, Run All
(every cell in document order, stopping at the first error). After every edit the
notebook is saved as JupyterLab saves it (nbformat 4.5, with cell ids).

The model keeps each notebook's document and what its build should hold:
- a build belongs to a notebook by its cells: a rename keeps it, a new notebook under a
  used name starts empty and leaves the other notebook's build alone;
- the recipe survives restarts;
- a cell keeps its slot: running a cell rolls the build back to where the cell stands in
  the document (the later cells leave the image, and their marks say so);
- an edited cell that was not run again keeps its old source in the image.

After every action `%layers` lists the model's steps and `%export` writes
NOTEBOOK.stacker.yaml, named after the notebook's current name, equal (parsed) to the
model's recipe, naming the cells where the document and the image differ (edited, never
run, failed). At checkpoints and at the end of each sequence, the exported stacker.yaml
and, when the document and the image agree, the saved notebook are built headless
(`stacker-kernel build -f`, on a storage of their own) and give the kernel's rootfs
(paths, types, modes, owners, contents).

CI runs 8 sequences of up to 10 actions (derandomized when $CI is set). A longer run:

    STACKER_KERNEL_MODEL_EXAMPLES=200 STACKER_KERNEL_MODEL_STEPS=30 pytest tests/test_notebook_model.py

Failing sequences are printed as hypothesis found them; STACKER_KERNEL_MODEL_SHRINK=1 also
shrinks them (every try starts kernels, so it takes a while).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import os
import queue
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from kernel_support import install_spec, notebook_dir, start_kernel, write_notebook

pytestmark = pytest.mark.slow

LAYER = "app"
BASE_CELL = f"%layer {LAYER}\n%from tar busybox.tar\n%build_only"
NAMES = ["Untitled.ipynb", "debbuild.ipynb", "Untitled1.ipynb", "renamed.ipynb"]
TIMEOUT = 120

EXAMPLES = int(os.environ.get("STACKER_KERNEL_MODEL_EXAMPLES", "8"))
STEPS = int(os.environ.get("STACKER_KERNEL_MODEL_STEPS", "10"))
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("STACKER_KERNEL_MODEL_SHRINK"):
    PHASES.append(Phase.shrink)
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                    derandomize=bool(os.environ.get("CI")), database=None, phases=PHASES,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# --- the Jupyter side: requests as JupyterLab sends them ------------------------------

@dataclass
class Reply:
    """What one execute_request gave: the reply and every iopub message of the cell."""

    status: str
    count: int | None
    error: str
    shown: str                 # stream text, text/plain of displays, the error with its traceback
    marks: list[str]           # display ids of the display_data the cell showed
    updated: set[str]          # display ids an update_display_data rewrote
    snapshot: str | None       # the committed step's snapshot (reply metadata)
    cached: bool               # the step came from the cache (reply metadata)


def execute(kernel, code: str, cell_id: str) -> Reply:
    """One execute_request with JupyterLab's metadata; waits for its reply and its outputs."""
    kc = kernel.kc
    msg = kc.session.msg("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": cell_id, "tags": []})
    kc.shell_channel.send(msg)
    msg_id = msg["header"]["msg_id"]
    deadline = time.monotonic() + TIMEOUT
    reply = None
    while reply is None:
        try:
            got = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no reply to {code!r} within {TIMEOUT} s") from None
        if got["parent_header"].get("msg_id") == msg_id:
            reply = got
    shown, marks, updated = [], [], set()
    while True:
        m = kc.get_iopub_msg(timeout=60)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = m["msg_type"], m["content"]
        if kind == "status" and content["execution_state"] == "idle":
            break
        if kind == "stream":
            shown.append(content["text"])
        elif kind in ("display_data", "execute_result"):
            shown.append(content.get("data", {}).get("text/plain", "") + "\n")
            display_id = (content.get("transient") or {}).get("display_id")
            if display_id:
                marks.append(display_id)
        elif kind == "update_display_data":
            updated.add((content.get("transient") or {}).get("display_id"))
        elif kind == "error":
            shown.append("\n".join([f"{content['ename']}: {content['evalue']}", *content["traceback"]]) + "\n")
    body = reply["content"]
    error = f"{body.get('ename')}: {body.get('evalue')}" if body["status"] == "error" else ""
    step = reply.get("metadata", {}).get("stacker") or {}
    return Reply(body["status"], body.get("execution_count"), error, "".join(shown), marks, updated,
                 step.get("snapshot"), bool(step.get("cached")))


# --- trees ---------------------------------------------------------------------------

def _tree(root: str) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, sha256 of the content or the link target): run in the
    user namespace, where the subordinate owners read as the container sees them."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                what = "-> " + os.readlink(p)
            elif stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            else:
                what = ""
            out["/" + os.path.relpath(p, root)] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode),
                                                    st_.st_uid, st_.st_gid, what)
    return out


def rootfs_tree(storage: Path, snapshot: str) -> dict[str, tuple]:
    """The tree of a step's snapshot (a full id or the 12-digit prefix status lines show)."""
    from stacker_kernel.container.userns import run_in_userns

    found = list((storage / "snapshots").glob(f"{snapshot}*"))
    assert len(found) == 1, f"snapshot {snapshot} is not in {storage} ({found})"
    return run_in_userns(_tree, str(found[0]))


def tree_difference(a: dict, b: dict) -> list[str]:
    """The paths where two trees differ, for an assertion message."""
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))[:20]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def grab_log(storage: Path, notebook: Path) -> str:
    """`stacker-kernel grab -f NOTEBOOK app:/log`: the file, as the CLI finds the notebook's build."""
    dest = notebook.parent / "grabbed-log"
    dest.unlink(missing_ok=True)
    run = subprocess.run([sys.executable, "-m", "stacker_kernel.cli", "--storage", str(storage), "grab",
                          "-f", str(notebook), f"{LAYER}:/log", str(dest)],
                         cwd=notebook.parent, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"grab -f {notebook.name} failed:\n{run.stdout}{run.stderr}"
    return dest.read_text()


def headless_build(storage: Path, path: Path) -> str | None:
    """`stacker-kernel build -f PATH --no-oci` on `storage`; the last step's snapshot id
    (None when the recipe has no step)."""
    run = subprocess.run([sys.executable, "-m", "stacker_kernel.cli", "--storage", str(storage),
                          "build", "-f", str(path), "--no-oci"],
                         cwd=path.parent, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"headless build of {path.name} failed:\n{run.stdout}{run.stderr}"
    snapshots = re.findall(r"snapshot ([0-9a-f]{12})", run.stdout)
    return snapshots[-1] if snapshots else None


# --- the model -----------------------------------------------------------------------

def first_line(source: str) -> str:
    return source.strip().splitlines()[0]


def step_source(tag: str, version: int, fails: bool) -> str:
    """A cell writing a file of its own and appending to /log (so the order of the steps
    shows in the rootfs); a failing version ends with `false`."""
    value = f"{tag}.v{version}"
    return f"echo {value} > /c_{tag}\necho {value} >> /log" + ("\nfalse" if fails else "")


@dataclass
class Cell:
    id: str
    source: str

    @property
    def is_step(self) -> bool:
        return self.source != BASE_CELL

    @property
    def fails(self) -> bool:
        return self.source.endswith("\nfalse")


@dataclass
class Built:
    """A step of the image: the cell that made it, its source then, its snapshot."""

    cell: str
    source: str
    snapshot: str


@dataclass
class Notebook:
    name: str
    cells: list[Cell]
    image: list[Built] = field(default_factory=list)
    based: bool = False  # the build has the base cell's directives (%layer, %from, %build_only)

    def position(self, cell_id: str) -> int:
        return next(i for i, c in enumerate(self.cells) if c.id == cell_id)

    def steps(self) -> list[Cell]:
        return [c for c in self.cells if c.is_step]

    def recipe(self) -> dict | None:
        """The stacker.yaml `%export` should write: what the image holds (None: no step and
        no base in this build, e.g. a new one; its default layer is no cell's)."""
        if not self.based:
            return None
        layer: dict = {"from": {"type": "tar", "url": "busybox.tar"}, "build_only": True}
        if self.image:
            layer["run"] = "\n".join(b.source for b in self.image)
        return {LAYER: layer}

    def differences(self, above_last_step: bool = False) -> list[tuple[Cell, str]]:
        """The cells where the document and the image differ, with why (`above_last_step`:
        leaving out the cells below the image's last step, which are only not run yet)."""
        built = {b.cell: b.source for b in self.image}
        last = max((self.position(b.cell) for b in self.image), default=-1)
        out = []
        for c in self.steps():
            if c.id not in built:
                if not above_last_step or self.position(c.id) < last:
                    out.append((c, "failed" if c.fails else "never run"))
            elif built[c.id] != c.source:
                out.append((c, "edited since it ran"))
        return out


def normalized(recipe: dict) -> dict:
    """A parsed stacker.yaml with each `run` as its non-blank lines (the blank line
    between two cells' scripts is layout)."""
    out = {}
    for name, layer in (recipe or {}).items():
        layer = dict(layer)
        run = layer.pop("run", "") or ""
        if run.strip():
            layer["run"] = [ln.strip() for ln in run.splitlines() if ln.strip()]
        out[name] = layer
    return out


def action(fn):
    """A rule: `ok` is False while it runs, so teardown checks only after sequences whose
    actions all went through (a failed one is reported by hypothesis as it is)."""
    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        self.ok = False
        fn(self, *args, **kwargs)
        self.ok = True
    return run


class NotebookModel(RuleBasedStateMachine):
    """The user's actions (rules) on the real kernel, checked against the model."""

    # Set by the test: shared by every sequence (the storage's cache makes re-runs cheap).
    kernels: Path
    storage: Path
    headless: Path
    busybox: Path
    workdir: Path
    sequences = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.dir = notebook_dir(self.workdir / f"seq{next(self.sequences)}", self.busybox)
        self.notebooks: list[Notebook] = []
        self.nb: Notebook | None = None
        self.kernel = None
        self.used_names: set[str] = set()
        self.versions = itertools.count(1)
        self.prompts: dict[str, int] = {}        # cell id -> its last prompt number in this kernel
        self.mark_of: dict[str, str] = {}        # cell id -> the display id of its step's mark
        self.ok = True

    # --- helpers ---------------------------------------------------------------

    def new_cell(self, fails: bool = False) -> Cell:
        cell_id = str(uuid.uuid4())
        return Cell(cell_id, step_source(cell_id[:6], next(self.versions), fails))

    def save(self) -> None:
        """What JupyterLab's save writes: nbformat 4.5 with the cells' ids."""
        write_notebook(self.dir / self.nb.name, [(c.id, c.source) for c in self.nb.cells])

    def start(self) -> None:
        """Open the current notebook in a new kernel, as JupyterLab starts one."""
        self.stop()
        self.kernel = start_kernel(self.dir / self.nb.name, self.kernels,
                                   STACKER_KERNEL_STORAGE=str(self.storage))
        self.prompts, self.mark_of = {}, {}
        # What a build keeps across kernels is its committed steps, each with its layer's
        # directives: a build without steps comes back without its base.
        self.nb.based = bool(self.nb.image)

    def stop(self) -> None:
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None

    def execute(self, code: str, cell_id: str | None = None) -> Reply:
        """A cell; a magic the user types goes in a cell of its own (a new id, never saved)."""
        reply = execute(self.kernel, code, cell_id or str(uuid.uuid4()))
        if reply.count is not None and cell_id is not None:
            self.prompts[cell_id] = reply.count
        return reply

    def named(self, text: str, cell: Cell, old_source: str | None = None) -> bool:
        """Whether `text` names the cell as the notebook shows it: its prompt in this kernel
        (`[7]`), else its place in the saved notebook (`#3`), then its first line (now or
        when it ran)."""
        if cell.id in self.prompts:
            name = re.escape(f"[{self.prompts[cell.id]}]")
        else:
            name = f"#{self.nb.position(cell.id) + 1}"
        lines = {first_line(cell.source)} | ({first_line(old_source)} if old_source else set())
        return re.search(f"{name} (?:{'|'.join(map(re.escape, lines))})", text) is not None

    def run(self, cell: Cell) -> Reply:
        """Run one cell of the document (Shift-Enter) and move the model as the kernel must."""
        nb = self.nb
        before = list(nb.image)
        was_built = any(b.cell == cell.id for b in before)
        slot = nb.position(cell.id)
        # A cell keeps its slot: the steps of cells at or below it leave the image.
        keep = [b for b in before if nb.position(b.cell) < slot] if cell.is_step else []
        reply = self.execute(cell.source, cell.id)
        context = f"cell {slot} ({first_line(cell.source)!r}):\n{reply.shown}"
        if cell.is_step and not nb.based:
            # A build that came back without its base runs no step until the base cell runs.
            assert reply.status == "error" and "%from" in reply.error, context
            return reply
        if cell.fails:
            assert reply.status == "error", context
            logs = sorted((self.dir / "stacker-logs").glob("*"), key=lambda p: p.stat().st_mtime_ns)
            assert logs and logs[-1].name.startswith(Path(nb.name).stem + "-"), \
                f"the failed step's log is {logs[-1].name if logs else None} beside {nb.name}"
        else:
            assert reply.status == "ok", context
        nb.image = keep
        if not cell.is_step:
            nb.based = True
        if cell.is_step and reply.status == "ok":
            assert reply.snapshot, context
            nb.image.append(Built(cell.id, cell.source, reply.snapshot))
            assert reply.marks, context
            self.mark_of[cell.id] = reply.marks[-1]
            for other, why in nb.differences(above_last_step=True):
                # The step's status line says where the notebook and the image differ.
                built = next((b.source for b in nb.image if b.cell == other.id), None)
                assert self.named(reply.shown, other, built), \
                    f"{context}\ndoes not name the cell {first_line(other.source)!r} ({why})"
        dropped = [b for b in before if b not in keep and b.cell != cell.id]
        self.check_undone(reply, dropped, context)
        if cell.is_step and not was_built and dropped:
            # A cell run above steps committed after it (a failed cell being fixed, a cell
            # never run): the message names the cells it drops.
            for b in dropped:
                dropped_cell = nb.cells[nb.position(b.cell)]
                assert self.named(reply.shown, dropped_cell, b.source), \
                    f"running {context}\ndoes not name the dropped cell {first_line(b.source)!r}"
        return reply

    def check_undone(self, reply: Reply, dropped: list[Built], context: str) -> None:
        """The marks of steps that left the image (shown by this kernel) say so."""
        for b in dropped:
            mark = self.mark_of.pop(b.cell, None)
            if mark is not None:
                assert mark in reply.updated, \
                    f"the mark of {first_line(b.source)!r} was not rewritten as undone by {context}"

    # --- checks ------------------------------------------------------------------

    def check_layers(self) -> None:
        """`%layers` lists the model's image, step by step."""
        reply = self.execute("%layers")
        assert reply.status == "ok", reply.shown
        rows = [ln for ln in reply.shown.splitlines() if re.match(r"\s*\d+\s", ln)]
        want = [first_line(b.source) for b in self.nb.image]
        assert len(rows) == len(want) and all(w in r for w, r in zip(want, rows)), \
            f"%layers:\n{reply.shown}\nthe model's steps: {want}"

    def check_export(self) -> Path:
        """`%export` writes CURRENT-NAME.stacker.yaml, the model's recipe, touches no other
        notebook's export and names the cells where the document and the image differ."""
        nb = self.nb
        def exports() -> dict[str, tuple[int, bytes]]:
            return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in self.dir.glob("*.stacker.yaml")}

        before = exports()
        reply = self.execute("%export")
        assert reply.status == "ok", reply.shown
        target = self.dir / (Path(nb.name).stem + ".stacker.yaml")
        assert target.is_file(), f"%export did not write {target.name}:\n{reply.shown}"
        after = exports()
        changed = {n for n in after if before.get(n) != after[n]}  # written, even with the same text
        assert changed <= {target.name}, f"%export of {nb.name} wrote {sorted(changed)}"
        got = normalized(yaml.safe_load(target.read_text()))
        if nb.recipe() is None:
            assert not any("run" in layer for layer in got.values()), f"%export of {nb.name}:\n{reply.shown}"
        else:
            assert got == normalized(nb.recipe()), f"%export of {nb.name}:\n{reply.shown}"
        for cell, why in nb.differences():
            built = next((b.source for b in nb.image if b.cell == cell.id), None)
            assert self.named(reply.shown, cell, built), \
                f"%export does not name the cell {first_line(cell.source)!r} ({why}):\n{reply.shown}"
        return target

    def check_builds(self) -> None:
        """The image holds what the model's cells wrote, the CLI finds it by the notebook's
        current name, and the exported stacker.yaml and (when the document and the image
        agree) the saved notebook, built headless on a storage of their own, give its rootfs."""
        exported = self.check_export()
        nb = self.nb
        if not nb.image:
            return  # nothing built to compare
        kernel_tree = rootfs_tree(self.storage, nb.image[-1].snapshot)
        values = [b.source.split()[1] for b in nb.image]  # `echo VALUE > /c_TAG`
        log = "".join(v + "\n" for v in values)
        assert kernel_tree["/log"][4] == _sha(log), values
        for b, value in zip(nb.image, values):
            assert kernel_tree[f"/c_{b.cell[:6]}"][4] == _sha(value + "\n"), b.source
        assert grab_log(self.storage, self.dir / nb.name) == log
        sources = [exported] + ([self.dir / nb.name] if not nb.differences() else [])
        for source in sources:
            built = headless_build(self.headless, source)
            assert built is not None, f"the headless build of {source.name} made no step"
            tree = rootfs_tree(self.headless, built)
            assert tree == kernel_tree, f"{source.name}: {tree_difference(tree, kernel_tree)}"

    # --- the user's actions ----------------------------------------------------------

    @initialize(cells=st.integers(1, 3))
    @action
    def new_notebook(self, cells: int) -> None:
        """JupyterLab's New notebook: Untitled.ipynb, a base cell and a few cells, run."""
        self.nb = Notebook("Untitled.ipynb", [Cell(str(uuid.uuid4()), BASE_CELL)]
                           + [self.new_cell() for _ in range(cells)])
        self.notebooks.append(self.nb)
        self.used_names.add(self.nb.name)
        self.save()
        self.start()
        for cell in self.nb.cells:
            self.run(cell)

    @rule(i=st.integers(0, 99))
    @action
    def run_cell(self, i: int) -> None:
        self.run(self.nb.cells[i % len(self.nb.cells)])

    @rule(i=st.integers(0, 99), fails=st.sampled_from([False, False, True]))
    @action
    def edit_cell(self, i: int, fails: bool) -> None:
        steps = self.nb.steps()
        if not steps:
            return
        cell = steps[i % len(steps)]
        cell.source = step_source(cell.id[:6], next(self.versions), fails)
        self.save()

    @rule(i=st.integers(0, 99), fails=st.sampled_from([False, False, True]))
    @action
    def insert_cell(self, i: int, fails: bool) -> None:
        self.nb.cells.insert(1 + i % len(self.nb.cells), self.new_cell(fails))
        self.save()

    @rule(i=st.integers(0, 99), below=st.integers(1, 3))
    @action
    def fail_then_fix(self, i: int, below: int) -> None:
        """A cell fails; the user goes on with Shift-Enter (the cells below commit), then
        fixes the cell and runs it again."""
        steps = self.nb.steps()
        if not steps:
            return
        cell = steps[i % len(steps)]
        cell.source = step_source(cell.id[:6], next(self.versions), True)
        self.save()
        self.run(cell)
        slot = self.nb.position(cell.id)
        for later in self.nb.cells[slot + 1:slot + 1 + below]:
            self.run(later)
        cell.source = step_source(cell.id[:6], next(self.versions), False)
        self.save()
        self.run(cell)

    @precondition(lambda self: self.nb is not None and self.nb.image)
    @rule(back=st.integers(1, 4))
    @action
    def rollback(self, back: int) -> None:
        """`%rollback` (one step back) or `%rollback N` (keep steps 1..N)."""
        image = self.nb.image
        keep = max(0, len(image) - back)
        reply = self.execute("%rollback" if back == 1 else f"%rollback {keep}")
        assert reply.status == "ok", reply.shown
        dropped, self.nb.image = image[keep:], image[:keep]
        self.check_undone(reply, dropped, "%rollback")

    @rule()
    @action
    def restart(self) -> None:
        """Kernel > Restart: a new kernel process for the notebook as it is now named."""
        self.start()

    @rule(name=st.sampled_from(NAMES))
    @action
    def rename(self, name: str) -> None:
        """File > Rename Notebook: the .ipynb moves, the kernel keeps running.

        Not drawn when the build came back from a restart without a step (the kernel
        ran no cell to find the file by)."""
        if (self.dir / name).exists() or not self.nb.based:
            return
        os.rename(self.dir / self.nb.name, self.dir / name)
        self.nb.name = name
        self.used_names.add(name)

    @precondition(lambda self: any(not (self.dir / n).exists() for n in self.used_names))
    @rule(cells=st.integers(1, 2))
    @action
    def new_notebook_under_a_used_name(self, cells: int) -> None:
        """A new notebook where another one was (JupyterLab names new ones Untitled.ipynb
        again once it is renamed): new cell ids, an empty build of its own."""
        name = sorted(n for n in self.used_names if not (self.dir / n).exists())[0]
        self.stop()
        self.nb = Notebook(name, [Cell(str(uuid.uuid4()), BASE_CELL)] + [self.new_cell() for _ in range(cells)])
        self.notebooks.append(self.nb)
        self.save()
        self.start()
        for cell in self.nb.cells:
            self.run(cell)

    @rule()
    @action
    def duplicate(self) -> None:
        """File browser > Duplicate, open the copy (same cell ids) and Run All: it builds on
        its own, its unchanged steps from the cache, and the original's build is left alone."""
        name = Path(self.nb.name).stem + "-Copy1.ipynb"
        if (self.dir / name).exists():
            return
        original = self.nb
        shutil.copyfile(self.dir / original.name, self.dir / name)
        self.nb = Notebook(name, [Cell(c.id, c.source) for c in original.cells])
        self.notebooks.append(self.nb)
        self.used_names.add(name)
        self.start()
        # The steps the original built in the copy's order are cache hits.
        same = 0
        for built, cell in zip(original.image, self.nb.steps()):
            if built.source != cell.source:
                break
            same += 1
        replies = []
        for cell in list(self.nb.cells):
            reply = self.run(cell)
            if cell.is_step:
                replies.append(reply)
            if reply.status != "ok":
                break
        assert all(r.cached for r in replies[:same]), [r.shown for r in replies[:same]]

    @precondition(lambda self: len(self.notebooks) > 1)
    @rule(i=st.integers(0, 99))
    @action
    def open_another_notebook(self, i: int) -> None:
        """Close this notebook's kernel and open another one of the folder."""
        others = [n for n in self.notebooks if n is not self.nb]
        self.nb = others[i % len(others)]
        self.start()

    @rule()
    @action
    def run_all(self) -> None:
        """Run > Run All Cells: in document order, stopping at the first error."""
        for cell in list(self.nb.cells):
            if self.run(cell).status != "ok":
                break

    @rule()
    @action
    def checkpoint(self) -> None:
        self.check_builds()

    @invariant()
    def layers_and_export_follow_the_model(self) -> None:
        if self.nb is not None and self.ok:
            self.check_layers()
            self.check_export()

    def teardown(self) -> None:
        try:
            if self.nb is not None and self.ok:
                self.check_builds()
        finally:
            self.stop()


@pytest.fixture
def model(tmp_path, busybox_tar, storage):
    """NotebookModel set up on a kernels dir, the storage and a headless storage of its own."""
    from stacker_kernel.storage import btrfs

    headless = storage.parent / f"{storage.name}-headless"
    headless.mkdir()
    NotebookModel.kernels = install_spec(tmp_path / "jupyter")
    NotebookModel.storage, NotebookModel.headless = storage, headless
    NotebookModel.busybox, NotebookModel.workdir = busybox_tar, tmp_path
    try:
        yield NotebookModel
    finally:
        btrfs.remove_tree(headless)


def test_the_notebook_the_image_and_the_export_stay_one_recipe(model):
    run_state_machine_as_test(model, settings=SETTINGS)


# Sequences worth keeping whatever hypothesis draws (each found a bug once).

def _replay(model, *actions) -> None:
    state = model()
    try:
        for name, kwargs in actions:
            getattr(state, name)(**kwargs)
            state.layers_and_export_follow_the_model()
    finally:
        state.teardown()


def test_a_notebook_renamed_beside_its_copy_keeps_its_own_export(model):
    # The copy is newer and holds the same cells: the renamed original is still the one.
    _replay(model, ("new_notebook", {"cells": 2}), ("duplicate", {}), ("open_another_notebook", {"i": 0}),
            ("rename", {"name": "renamed.ipynb"}), ("run_cell", {"i": 1}))


def test_a_build_rolled_back_to_its_start_renamed_and_restarted_runs_all_again(model):
    # No step left: the restarted kernel has no base until Run All runs the base cell.
    _replay(model, ("new_notebook", {"cells": 1}), ("rollback", {"back": 4}), ("rename", {"name": "renamed.ipynb"}),
            ("restart", {}), ("run_all", {}))


def test_the_four_ways_of_issue_22_in_one_sequence(model):
    # A fixed failed cell below which two cells ran, a restart, a rename while the kernel
    # runs, a new notebook under the old name, then back to the renamed one.
    _replay(model, ("new_notebook", {"cells": 3}), ("fail_then_fix", {"i": 0, "below": 2}), ("restart", {}),
            ("checkpoint", {}), ("rename", {"name": "debbuild.ipynb"}), ("run_cell", {"i": 2}),
            ("new_notebook_under_a_used_name", {"cells": 1}), ("open_another_notebook", {"i": 0}),
            ("edit_cell", {"i": 1, "fails": False}), ("run_all", {}))
