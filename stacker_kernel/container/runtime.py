"""The persistent unprivileged container, engine side.

`Container.start` spawns `python -m stacker_kernel.container.init` on a pty
(pexpect) and returns once init has pivoted into the rootfs. `run_step` sends
one step and reads its output and sentinel straight from the pty fd (no
pexpect expect(): its buffer search is quadratic on large outputs).
"""
from __future__ import annotations

import base64
import codecs
import json
import os
import re
import select
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable

from stacker_kernel.container import limits
from stacker_kernel.container.step import (
    ROOT_HOME, SCRIPT_FD, SENTINEL_RE, WRAPPER_FD, OutputFilter, ShellState, StepResult, build_wrapper, carry_functions,
    encode_command, failure_message, format_sentinel, functions_to_check, is_shebang, parse_state_dump, step_user,
)
from stacker_kernel.errors import ContainerError
from stacker_kernel.storage.store import process_start_time

if TYPE_CHECKING:  # imported where a container starts: a fully cached build starts none
    import pexpect

START_TIMEOUT = 60.0
INIT_MODULE = "stacker_kernel.container.init"


@dataclass
class Mount:
    """A host path bound into the container at `dest` during every step; with a
    `key`, only during the steps that ask for it (`run_step`'s mounts), at their dest."""
    source: str
    dest: str
    readonly: bool = True
    key: str | None = None


def _overlay_spec(rootfs: str) -> dict | None:
    """The layers, upper and work dir of an overlay-driver rootfs, None for any other."""
    from stacker_kernel.storage.overlay import read_stack

    stack = read_stack(rootfs)
    if stack is None:
        return None
    return {"layers": list(stack.layers), "upper": stack.upper, "work": stack.work}


@dataclass
class ContainerConfig:
    """What a container is made of. `rootfs` is a writable directory (a btrfs
    subvolume in the engine); `network` is "host" (stacker's default) or "none";
    `max_processes` caps its processes and threads (None: limits.max_processes())."""
    rootfs: str
    mounts: list[Mount] = field(default_factory=list)
    network: str = "host"
    hostname: str = "stacker"
    interrupt_grace: float = 3.0
    max_processes: int | None = None


def _reset_signals() -> None:
    # ipykernel ignores SIGINT and Python ignores SIGPIPE; ignored dispositions
    # survive exec, so give the container the defaults (init sets its own).
    for sig in (signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)


class Container:
    """A running container: one init (pid 1 of its own pid namespace) that runs
    steps one at a time. Not reusable after `stop` or after it died."""

    def __init__(self, config: ContainerConfig, child: pexpect.spawn, init_pid: int,
                 cgroup: str | None = None, max_processes: int = limits.DEFAULT_MAX_PROCESSES) -> None:
        self.config = config
        self.cgroup = cgroup  # its own pids cgroup, removed at stop (None: RLIMIT_NPROC)
        self.max_processes = max_processes
        self.child = child
        self.host_pid: int = child.pid
        self.init_pid = init_pid  # P1 as the host sees it
        self.alive = True
        self.parked = False  # see park
        self._starting = False  # resumed: its ready sentinel not read yet (see settle)
        self._write_lock = threading.Lock()
        self._running = False
        self._interrupted = False

    @classmethod
    def start(cls, config: ContainerConfig) -> "Container":
        """Start a container on `config.rootfs`; returns when it is ready for steps.

        Raises ContainerError with the fix when it cannot start (no user
        namespaces, no /bin/sh in the rootfs, a missing bind source). Call it from a thread that outlives the container: the
        container dies with the thread that started it (PR_SET_PDEATHSIG).
        """
        if config.network not in ("host", "none"):
            raise ContainerError(f"unknown network mode {config.network!r}: use 'host' or 'none'")
        if not os.path.isdir(config.rootfs):
            raise ContainerError(f"the rootfs {config.rootfs} does not exist: create the layer's subvolume first")
        limit = config.max_processes or limits.max_processes()
        cgroup = limits.make_cgroup(limit)
        payload = json.dumps({
            "max_processes": limit, "cgroup": cgroup,
            "rootfs": os.path.abspath(config.rootfs),
            # A rootfs of the overlay storage driver: init mounts its stack over it.
            "overlay": _overlay_spec(config.rootfs),
            "mounts": [asdict(m) for m in config.mounts],
            "network": config.network, "hostname": config.hostname,
            "interrupt_grace": config.interrupt_grace, "engine_pid": os.getpid(),
        })
        import pexpect

        try:
            child = pexpect.spawn(sys.executable, ["-P", "-m", INIT_MODULE, payload], echo=False,
                                  cwd="/", env=dict(os.environ), preexec_fn=_reset_signals)
        except BaseException:
            limits.remove_cgroup(cgroup)
            raise
        try:
            init_pid = _await_ready(child)
        except BaseException:
            child.close(force=True)
            limits.remove_cgroup(cgroup)
            raise
        return cls(config, child, init_pid, cgroup, limits.effective(limit, cgroup))

    # -- steps -------------------------------------------------------------

    def run_step(self, script: str, env: dict[str, str], state: ShellState | None,
                 on_output: Callable[[str], None] | None = None, log_path: str | None = None,
                 stream_cap: int = 2_000_000, flush_interval: float = 0.05,
                 interrupted: Callable[[], bool] | None = None, script_name: str | None = None,
                 mounts: list[dict] | None = None) -> StepResult:
        """Run one step and block until it ended and everything it started is dead.

        `mounts` are this step's own: {"key": K, "dest": D, "readonly": B} binds the
        container's mount K (plus "uid", "gid", "mode" set on an empty directory);
        {"tmpfs": D, "size": S} mounts a tmpfs.

        `script_name` (e.g. "layer web run") replaces the fd paths the shell calls the
        step's script in its error lines.

        `state=None` starts a fresh layer (cwd /, only `env`). Output goes to
        `on_output` as text, at most every `flush_interval` seconds while it
        arrives, and up to `stream_cap` bytes (then one truncation line); the
        log at `log_path` gets all of it. Trace lines never appear in either.
        `interrupted()` true when the step starts means the caller was
        interrupted before the step reached the container: it is interrupted
        at once.
        """
        t0 = time.monotonic()
        if self.alive and not self.parked:
            try:
                self.settle()
            except ContainerError:
                pass  # dead now: answered below like any container that died
        if not self.alive or self.parked:
            return _died_result(0.0, 0)
        nonce, trace = os.urandom(8).hex(), os.urandom(8).hex()
        user, body = step_user(script)
        shebang = is_shebang(script)
        cmd = {"op": "run", "nonce": nonce, "script": body, "shebang": shebang}
        # HOME as Docker gives a RUN after USER: the user's, unless the environment sets
        # another (root's HOME, every step's default, is not the user's)
        user_home = user is not None and env.get("HOME", ROOT_HOME) == ROOT_HOME
        if user is not None:
            cmd["user"], cmd["home"] = user, user_home
        if mounts:
            cmd["mounts"] = mounts
        if shebang:
            cmd["env"] = state.environment(env) if state else dict(env)
            cmd["cwd"] = state.cwd if state else "/"
        else:
            cmd["env"] = dict(env)
            defined, functions, unclear = functions_to_check(body, state)
            cmd["wrapper"] = build_wrapper(state, env, trace, functions, unclear,
                                           user_home=user_home)
        filt = OutputFilter(nonce, None if shebang else trace, user_trace=bool(state and state.user_trace))
        sink = _OutputSink(on_output, log_path, stream_cap, flush_interval,
                           _ScriptNamer(script_name) if script_name else None)
        self._interrupted = False
        self._running = True  # from here interrupt() reaches this step
        try:
            self._send(cmd)
            if interrupted is not None and interrupted():
                self._interrupted = True
            if self._interrupted:
                self._send({"op": "int"})
            died = self._pump(filt, sink)
        finally:
            self._running = False
            sink.close()
        duration = time.monotonic() - t0
        if sink.error is not None:
            raise sink.error
        if died:
            return _died_result(duration, sink.total)
        sentinel = filt.sentinel
        status = sentinel.status
        if shebang:
            after = (state or ShellState(exported=dict(env))) if status == 0 else None
            has_state = True
        else:
            after = parse_state_dump(sentinel.state)
            after = after and carry_functions(after.with_user_trace(filt.user_trace), state, defined)
            has_state = after is not None
        ok = status == 0 and has_state
        failed = None if ok or shebang else filt.last_trace
        interrupted = self._interrupted and not ok
        message = "" if ok else failure_message(status, has_state, failed, interrupted, False)
        if not ok and not interrupted and "pids" in sentinel.flags:
            message = limits.limit_message(self.max_processes)
        return StepResult(
            status=status, ok=ok, state=after if ok else None, failed_command=failed,
            interrupted=interrupted, container_died=False, duration=duration,
            output_bytes=sink.total,
            message=message,
        )

    def _pump(self, filt: OutputFilter, sink: "_OutputSink") -> bool:
        """Read the pty until the step's sentinel; True if the container died."""
        while filt.sentinel is None:
            try:
                if not self._pump_once(filt, sink):
                    return True
            except KeyboardInterrupt:
                # SIGINT in this thread (a kernel's interrupt): interrupt the
                # step and keep reading, so the protocol stays in step.
                self.interrupt()
        return False

    def _pump_once(self, filt: OutputFilter, sink: "_OutputSink") -> bool:
        """One wait and read of the pty; False when the container is gone."""
        fd = self.child.child_fd
        if select.select([fd], [], [], sink.time_to_flush())[0]:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                sink.write(filt.flush())
                self._mark_dead()
                return False
            sink.write(filt.feed(data))
        sink.maybe_flush()
        return True

    def interrupt(self) -> None:
        """Interrupt the running step (SIGINT to its process group, SIGKILL to
        everything after the grace period). Safe from another thread; a no-op
        when no step runs."""
        if self._running and self.alive:
            self._interrupted = True
            self._send({"op": "int"})

    def interact(self, env: dict[str, str], state: ShellState | None, argv: list[str] | None = None) -> int:
        """An interactive /bin/sh (or `argv`, an absolute path first) in the container
        on this process's terminal (for `chroot`), with `state`'s cwd and exported
        variables. Returns its exit status once it exits; what it started is killed then."""
        if self.alive and not self.parked:
            self.settle()
        if not self.alive or self.parked:
            raise ContainerError("the container is not running: start a new one")
        stdin = sys.stdin.fileno()
        is_tty = os.isatty(stdin)
        if not is_tty and (argv is None or argv == ["/bin/sh"] or argv[:2] == ["/bin/sh", "-c"]):
            return self._run_piped(env, state, argv)
        import termios  # here: only an interactive shell sets the terminal
        import tty

        nonce = os.urandom(8).hex()
        shell_env = state.environment(env) if state else dict(env)
        shell_env.setdefault("TERM", os.environ.get("TERM", "xterm"))
        if is_tty:
            rows, cols = os.get_terminal_size(stdin)
            self.child.setwinsize(rows, cols)
        filt = OutputFilter(nonce, None)
        self._send({"op": "shell", "nonce": nonce, "env": shell_env, "cwd": state.cwd if state else "/",
                    "argv": argv})
        saved = termios.tcgetattr(stdin) if is_tty else None
        if is_tty:
            tty.setraw(stdin, termios.TCSANOW)  # TCSAFLUSH would drop typed-ahead input
        fd = self.child.child_fd
        # Typing is forwarded only once init says the shell owns the pty (the marker):
        # before that it would land in init's command reader.
        marker = format_sentinel(nonce + "-ready", 0, b"")
        early = b""
        stdin_open = True
        try:
            while filt.sentinel is None:
                ready = select.select([fd, stdin] if early is None and stdin_open else [fd], [], [])[0]
                if early is None and stdin_open and stdin in ready:
                    data = os.read(stdin, 4096)
                    if not data:
                        # Input ended (not a terminal, e.g. CI): the shell reads EOF
                        # (^D on its cooked pty) instead of waiting forever.
                        stdin_open, data = False, b"\x04"
                    with self._write_lock:
                        _write_all(fd, data)
                if fd in ready:
                    try:
                        data = os.read(fd, 1 << 16)
                    except OSError:
                        data = b""
                    if not data:
                        self._mark_dead()
                        raise ContainerError("the container died during the interactive shell")
                    if early is not None:
                        early += data
                        if marker in early:
                            data, early = early.replace(marker, b""), None
                        elif f"{nonce};".encode() in early:  # no shell (e.g. a bind failed)
                            data, early = early, None
                        else:
                            continue
                    _write_all(sys.stdout.fileno(), filt.feed(data))
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        return filt.sentinel.status

    def _run_piped(self, env: dict[str, str], state: ShellState | None, argv: list[str] | None) -> int:
        """`interact` when stdin is no terminal (a pipe, a file): as `echo CMD |
        stacker chroot`, the shell runs the commands read from stdin (or the
        `sh -c` command line) without a prompt and ends with their status."""
        script = argv[2] if argv and len(argv) > 2 else sys.stdin.buffer.read().decode("utf-8", "replace")
        out = sys.stdout

        def write(text: str) -> None:
            out.write(text)
            out.flush()

        result = self.run_step("#!/bin/sh\n" + script, env, state, on_output=write, stream_cap=1 << 62)
        if result.container_died:
            raise ContainerError("the container died while running the commands read from stdin")
        return result.status

    # -- lifetime ----------------------------------------------------------

    def park(self) -> None:
        """End the container's root between steps, keeping the container: once this
        returns, every process of the root is dead and its rootfs is no longer
        mounted (an overlay upper can be committed). `resume` builds the root
        again, a few ms where `stop` and `start` take a new interpreter, user
        namespace and cgroup. Raises ContainerError (the container is dead then)
        when it does not answer."""
        self.settle()
        if not self.alive or self._running:
            raise ContainerError("the container cannot be parked: it is not waiting between steps")
        try:
            pidfd = os.pidfd_open(self.init_pid)
        except OSError:
            self._mark_dead()
            raise ContainerError("the container died before it was parked") from None
        try:
            self._send({"op": "park"})
            # P1's exit is the park: the kernel releases an exiting task's namespaces (and
            # so the root's mounts) before it says the task exited. P0's "parked" line
            # comes later; resume's wait for "ready" passes over it.
            if not select.select([pidfd], [], [], START_TIMEOUT)[0]:
                raise ContainerError("the container did not park")
        except (OSError, ContainerError):
            self._mark_dead()
            raise ContainerError("the container died while it was parked") from None
        finally:
            os.close(pidfd)
        self.parked = True
        self.init_pid = self.host_pid  # what is left of it: stop waits for this one

    def resume(self, rootfs: str | None = None) -> None:
        """Build the parked container's root again, on `rootfs` (default: the one it
        was started on) as it is now: for the overlay driver, its stack after a
        commit. Returns at once; the next step (or `settle`) waits for it to be ready."""
        if not self.parked:
            return
        rootfs = rootfs or self.config.rootfs
        self._send({"op": "resume", "overlay": _overlay_spec(rootfs)})
        self.parked, self._starting = False, True

    def settle(self) -> None:
        """Wait until a resumed container is ready for steps (a no-op otherwise). Raises
        ContainerError with init's message when its root could not be built."""
        if not self._starting:
            return
        self._starting = False
        try:
            self.init_pid = _await_ready(self.child)
        except BaseException:
            self._mark_dead()
            raise

    def stop(self) -> None:
        """Kill the container and everything in it; returns once all of it is
        gone (so its rootfs can be deleted). Idempotent."""
        if self.child is None:
            return
        # An init between steps is asked to exit; a resumed one whose root is still being
        # built is not waited for (it reads no command yet): only its P1's pid is.
        ask = self.alive and not self._running and not self._starting
        if self._starting:
            self._starting = False
            try:
                self.init_pid = _await_ready(self.child, b"pid")
            except ContainerError:
                self._mark_dead()
        pidfds = []
        for pid in dict.fromkeys((self.init_pid, self.host_pid)):  # P1, and P0 (see the close below)
            try:
                pidfds.append(os.pidfd_open(pid))
            except OSError:
                pass
        if ask:
            import pexpect

            try:  # init exits and P0 reaps it, so no zombie outlives stop()
                self._send({"op": "exit"})
                self.child.expect(pexpect.EOF, timeout=2)
            except (OSError, pexpect.ExceptionPexpect):
                pass
        try:
            os.kill(self.host_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pidfd in pidfds:
            select.select([pidfd], [], [], 10)
            os.close(pidfd)
        # P0 is dead by now, so pexpect's close needs none of its sleeps
        # (delayafterclose/delayafterterminate, 0.1 s each by default).
        self.child.delayafterclose = self.child.delayafterterminate = 0
        self.child.ptyproc.delayafterclose = self.child.ptyproc.delayafterterminate = 0
        self.child.close(force=True)
        self.alive = False
        self.child = None
        limits.remove_cgroup(self.cgroup)

    @staticmethod
    def kill_orphans(rootfs_prefix: str) -> list[int]:
        """Kill every container of this user whose rootfs is under `rootfs_prefix` and
        whose engine is gone (PDEATHSIG normally sees to it; this is the cleanup on
        the next start). Returns the pids killed."""
        killed = []
        prefix = os.path.join(os.path.abspath(rootfs_prefix), "")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                config = json.loads(argv[argv.index(INIT_MODULE.encode()) + 1])
                rootfs, engine = str(config["rootfs"]), int(config["engine_pid"])
            except (OSError, ValueError, IndexError, KeyError, TypeError):
                continue  # not one of our containers (or not readable: not ours)
            if not os.path.join(os.path.abspath(rootfs), "").startswith(prefix) or process_start_time(engine) is not None:
                continue
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
        return killed

    def _send(self, cmd: dict) -> None:
        with self._write_lock:
            _write_all(self.child.child_fd, encode_command(cmd))

    def _mark_dead(self) -> None:
        self.alive = False

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _await_ready(child: pexpect.spawn, want: bytes = b"ready") -> int:
    """Wait for init's ready sentinel (or sentinel `want`); return P1's host pid (0 if
    it said none). Raises ContainerError with init's own message if it failed."""
    fd, buf, init_pid = child.child_fd, b"", 0
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ContainerError(f"the container did not start within {START_TIMEOUT:.0f} s: check the system load")
        if select.select([fd], [], [], left)[0]:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                text = buf.decode(errors="replace").strip()
                raise ContainerError(f"the container exited while starting: {text or 'no message'}")
            buf += data
        for m in SENTINEL_RE.finditer(buf):
            kind = m.group(1)
            if kind == b"pid":
                init_pid = int(m.group(2))
            elif kind == b"error":
                raise ContainerError(base64.b64decode(m.group(3)).decode(errors="replace"))
            elif kind == want:
                return init_pid
        if want == b"pid" and init_pid:
            return init_pid


def _died_result(duration: float, total: int) -> StepResult:
    return StepResult(status=-1, ok=False, state=None, failed_command=None, interrupted=False,
                      container_died=True, duration=duration, output_bytes=total,
                      message=failure_message(-1, False, None, False, True))


_FD_PATH = b"/proc/self/fd/"


class _ScriptNamer:
    """Names the step's script in the shell's error lines instead of the fd paths it
    runs as: busybox's "/proc/self/fd/10: /proc/self/fd/11: line 3: git: not found",
    bash's "/proc/self/fd/11: line 3: ..." and dash's "/proc/self/fd/10: 2:
    /proc/self/fd/11: ..." (2 is a line of our wrapper) all become "NAME: ...".
    An unfinished line that may begin such a path is held until it ends."""

    def __init__(self, name: str) -> None:
        wrapper, script = (re.escape(_FD_PATH + str(fd).encode()) for fd in (WRAPPER_FD, SCRIPT_FD))
        self.pattern = re.compile(rb"(?:" + wrapper + rb": (?:\d+: )?)?(?:" + script + b"|" + wrapper + rb")\b")
        self.name = name.encode("utf-8", "replace").replace(b"\\", b"\\\\")
        self.held = b""

    def feed(self, data: bytes) -> bytes:
        data, self.held = self.held + data, b""
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if tail and len(tail) < 4096 and (_FD_PATH.startswith(tail) or tail.startswith(_FD_PATH)):
            data, self.held = data[:cut], tail
        return self.pattern.sub(self.name, data)

    def flush(self) -> bytes:
        data, self.held = self.held, b""
        return self.pattern.sub(self.name, data)


class _OutputSink:
    """Delivers a step's output: decoded and batched to the callback up to a
    cap, raw to the log file (both with the script named by `namer`)."""

    def __init__(self, on_output: Callable[[str], None] | None, log_path: str | None,
                 cap: int, interval: float, namer: _ScriptNamer | None = None) -> None:
        self.namer = namer
        self.on_output = on_output
        self.log: BinaryIO | None = open(log_path, "wb") if log_path else None
        self.log_path = log_path
        self.cap, self.interval = cap, interval
        self.total = 0
        self.streamed = 0
        self.truncated = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending: list[str] = []
        self.last_flush = 0.0
        self.error: BaseException | None = None

    def write(self, data: bytes) -> None:
        self._write(self.namer.feed(data) if self.namer else data)

    def _write(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        if self.log:
            self.log.write(data)
        if self.on_output is None or self.truncated:
            return
        room = self.cap - self.streamed
        part = data[:room]
        self.streamed += len(part)
        text = self.decoder.decode(part)
        if text:
            self.pending.append(text)
        if len(part) < len(data):
            self.truncated = True
            tail = self.decoder.decode(b"", final=True)
            where = self.log_path or "no log kept"
            self.pending.append(tail + f"\n[output truncated: full log in {where}]\n")

    def time_to_flush(self) -> float | None:
        if not self.pending:
            return None
        return max(0.0, self.last_flush + self.interval - time.monotonic())

    def maybe_flush(self, force: bool = False) -> None:
        if not self.pending or self.on_output is None:
            return
        now = time.monotonic()
        if force or now - self.last_flush >= self.interval:
            text, self.pending = "".join(self.pending), []
            self.last_flush = now
            try:
                self.on_output(text)
            except BaseException as e:  # re-raised once the step has ended
                self.error, self.on_output = e, None

    def close(self) -> None:
        if self.namer is not None:
            self._write(self.namer.flush())
        if self.on_output is not None and not self.truncated:
            tail = self.decoder.decode(b"", final=True)
            if tail:
                self.pending.append(tail)
        self.maybe_flush(force=True)
        if self.log:
            self.log.close()

