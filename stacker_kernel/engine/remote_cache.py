"""The shared step cache (docs/architecture.md §3).

After a step commits, `RemoteCache.push` stores its result in the cache-to
target: the step's diff as an OCI layer (as the export writes it) plus the
record a hit needs (format, cache key, parent key, shell state, output log,
duration, snapshot id). On a local miss, `RemoteCache.lookup` asks the
cache-from sources for the step's cache key; a hit is checked by digest,
applied onto the exact parent it was made from (the live rootfs, a fresh
snapshot of the head), committed as a step snapshot and its output replayed,
without running the step.

A hit keeps the snapshot id it had where it was built: the cache key of the
next step names its parent by id, so keeping the id is what lets the next
step hit too. Any failure (down, slow, refused, wrong or truncated blob,
an entry for another parent) leaves the step to run locally, after one
warning line; a source or target that failed is not asked again in this
session, so a dead registry costs one timeout, not one per step.
Whoever can push to a cache decides what its hits contain, unless the user
trusts signing keys: then only entries they signed are taken (oci/signing.py).
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Callable

from stacker_kernel.container.step import ShellState
from stacker_kernel.engine.cache_settings import CacheSettings, configured  # noqa: F401 (used from here too)
from stacker_kernel.engine.cache_record import (
    BadRecord, check_fetched, redact_log, redact_state, restore_state, secret_env)
from stacker_kernel.engine.live import build_environment
from stacker_kernel.errors import ImageError, StorageError
from stacker_kernel.recipe.model import human_size
from stacker_kernel.oci.registry import CacheStore, CacheUnavailable, cache_tag, open_cache, remove_quietly
from stacker_kernel.oci.signing import Trust
from stacker_kernel.storage.store import Snapshot, make_tmp_dir

if TYPE_CHECKING:
    from stacker_kernel.engine.session import BuildSession, StepOutcome

FORMAT = 1  # of the record; an entry of another format is a miss
LOG_CAP = 2_000_000  # bytes of output kept in an entry (the replay shows as much)
PUSH_QUEUE = 4  # steps made but not yet pushed, at most: a build further ahead waits for its uploads

OutputFn = Callable[[str], None]


def parent_key(parent: Snapshot | None) -> str:
    """What a step's parent is called in an entry: the parent step's cache key, or
    the base's digest (its id) for a layer's first step."""
    if parent is None:
        return ""
    if parent.kind == "step" and parent.cache_key:
        return parent.cache_key
    return parent.id


def _as_container_root(fn: Callable[..., Any], *args: Any) -> Any:
    """File work on snapshots, as the container's root (their files belong to
    subordinate ids); real root does it in-process."""
    if os.geteuid() == 0:
        return fn(*args)
    from stacker_kernel.container.userns import run_in_userns

    return run_in_userns(fn, *args)


def layer_cache(store) -> str:
    """Where the layers made from the store's snapshots are remembered (engine/export.py's)."""
    from stacker_kernel.engine.export import layer_cache as of_store

    return of_store(store)


# The pushing thread's layer maker: one fresh interpreter for the session
# (engine/layer_maker.py), fed a JSON line (parent, new, out_dir) per layer,
# answering a JSON line. Its own stdout goes to stderr, so that nothing else can
# be taken for an answer.
_MAKER = ("import os, sys\n"
          "answers = os.fdopen(os.dup(1), 'w')\n"
          "os.dup2(2, 1)\n"
          "from stacker_kernel.engine.layer_maker import serve\n"
          "serve(sys.stdin, answers)\n")


class _LayerMaker:
    """Layers made in a fresh interpreter that stays for the session: the pushing
    thread runs beside the engine's, and a child forked from it without exec
    (run_in_userns) could inherit a lock another thread holds and wait for it
    forever (as engine/history.measure_sizes). Started once (not per step: an
    interpreter's start was most of a small step's push), in one user namespace
    where a step's walk serves the next step's layer (engine/layer_maker.py)."""

    def __init__(self) -> None:
        import subprocess
        import sys
        import tempfile

        import stacker_kernel

        top = os.path.dirname(os.path.dirname(stacker_kernel.__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [top, os.environ.get("PYTHONPATH")])))
        self._errors = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-c", _MAKER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._errors, env=env, text=True)

    def make(self, parent: str, new: str, out_dir: str):
        from stacker_kernel.oci.tarwriter import LayerBlob

        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps([parent, new, out_dir]) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except OSError:
            line = ""
        if not line:  # it ended: its last words say why
            self._errors.seek(0)
            last = (self._errors.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            raise ImageError(f"the step's layer could not be made: {last}")
        answer = json.loads(line)
        if "error" in answer:
            raise ImageError(f"the step's layer could not be made: {answer['error']}")
        return LayerBlob(**answer["ok"])

    def close(self) -> None:
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._errors.close()


def _apply(layer_path: str, rootfs: str) -> list[str]:
    from stacker_kernel.oci.tarlayer import apply_layer

    return apply_layer(layer_path, rootfs, name="the cached layer").warnings


class RemoteCache:
    """The cache-from sources and the cache-to target of one session."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        # Opened now: a malformed URL is the user's error at once, not a warning later.
        self.sources: list[CacheStore] = [open_cache(u, insecure=settings.insecure, authfile=settings.authfile)
                                          for u in settings.cache_from]
        self.target: CacheStore | None = (open_cache(settings.cache_to, insecure=settings.insecure,
                                                     authfile=settings.authfile)
                                          if settings.cache_to else None)
        self._failed: set[str] = set()
        self.trust = Trust.configured()  # signing key and trusted keys (oci/signing.py)
        # Pushes run while the next steps run, on two threads: one makes the layers
        # (in order: a step's walk serves the next), the other uploads them, so a
        # layer goes up while the next is made. At most PUSH_QUEUE steps wait.
        self._maker_thread: ThreadPoolExecutor | None = None
        self._uploader: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(PUSH_QUEUE)
        self._pushes: list[Future] = []  # layers being made
        self._uploads: list[Future] = []  # entries being put
        self._fail_lock = threading.Lock()
        self._pushed = 0
        self._push_messages: list[str] = []
        self._maker: _LayerMaker | None = None  # started with the first push
        # What --cache-to did, for the build's summary line.
        self.pushed_bytes, self.skipped = 0, 0

    def summary(self) -> str | None:
        """One line: what went to the cache-to target (None without one)."""
        if self.target is None:
            return None
        failed = "; pushing stopped at an error (see the warning)" if self.target.url in self._failed else ""
        return (f"cache-to {self.target.url}: {self._pushed} entr{'y' if self._pushed == 1 else 'ies'} pushed "
                f"({human_size(self.pushed_bytes)}), {self.skipped} skipped (already there){failed}")

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> "RemoteCache | None":
        """None when the settings name no cache."""
        if not settings.cache_from and not settings.cache_to:
            return None
        return cls(settings)

    def _warn(self, on_output: OutputFn | None, url: str, why: str, what: str) -> None:
        self._failed.add(url)
        if on_output is not None:
            on_output(f"warning: {why}; {what}\n")

    @staticmethod
    def _tmp(session: "BuildSession") -> str:
        # named after this process: the store collects it if the process dies (storage/store.py)
        return str(make_tmp_dir(session.store.root / "cache" / "remote", "tmp-"))

    # --- a hit -----------------------------------------------------------------------------

    def lookup(self, session: "BuildSession", key: str, script: str, cell_id: str | None,
               on_output: OutputFn | None) -> "StepOutcome | None":
        """On a local miss for `key`: the replayed outcome of a hit from a cache-from
        source, or None (the step then runs). The caller holds the session lock and
        the live rootfs is a writable snapshot of the head."""
        head = session.head
        sources = [s for s in self.sources if s.url not in self._failed]
        if head is None or not sources:
            return None
        tag = cache_tag(key)
        for source in sources:
            tmp = self._tmp(session)
            try:
                t0 = time.monotonic()
                fetched = source.fetch(tag, tmp)
                if fetched is None:
                    continue
                if (why := self.trust.refusal(source, fetched)) is not None:
                    self._warn(on_output, source.url, why, "running the step")
                    continue
                try:
                    record = check_fetched(fetched.record)
                    record["state"] = restore_state(record["state"], record.get("env_refs", {}),
                                                    build_environment(session.layer))
                except BadRecord as e:
                    self._warn(on_output, source.url, f"the entry of {source.url} for this step is "
                               f"malformed ({e})", "running the step")
                    continue
                if (record.get("format") != FORMAT or record.get("key") != key
                        or record.get("parent_key") != parent_key(head) or record.get("parent") != head.id):
                    self._warn(on_output, source.url, f"the entry of {source.url} for this step was made "
                               "on another parent or by another version", "running the step")
                    continue
                snap = self._apply_hit(session, record, fetched.layer_path, key, script, cell_id, on_output)
                if on_output is not None:
                    on_output(f"[cache hit from {source.url}]\n")
                return session.adopt_fetched(snap, record.get("log", ""), cell_id, on_output, t0)
            except CacheUnavailable as e:
                self._warn(on_output, source.url, str(e), "running the step without it")
            except (ImageError, StorageError, OSError) as e:
                session.back_to_head()
                self._warn(on_output, source.url, f"the layer from {source.url} could not be applied ({e})",
                           "running the step")
            finally:
                remove_quietly(tmp)
        return None

    def _apply_hit(self, session: "BuildSession", record: dict[str, Any], layer_path: str, key: str,
                   script: str, cell_id: str | None, on_output: OutputFn | None) -> Snapshot:
        """Apply the verified layer onto a fresh snapshot of the head; the record of the
        step it makes (the session commits and adopts it: BuildSession.adopt_fetched)."""
        store, head = session.store, session.head
        state, log = record.get("state"), record.get("log", "")
        try:
            ShellState.of_snapshot(state)  # the session reads it back when it advances
            if not isinstance(log, str):
                raise TypeError("log")
        except (TypeError, ValueError, AttributeError):
            raise CacheUnavailable("the entry's record has no valid shell state or output") from None
        session.fresh_live()  # exactly the parent the entry was made on
        started = time.time()
        for line in _as_container_root(_apply, layer_path, str(session.live)):
            if on_output is not None:
                on_output(f"warning: {line}\n")
        sid = str(record.get("snapshot") or "")
        if not (len(sid) == 32 and all(c in "0123456789abcdef" for c in sid)) or store.get(sid) is not None:
            sid = uuid.uuid4().hex  # the next steps will miss, but this one is right
        snap = Snapshot(id=sid, parent=head.id, session=session.session.id, layer=session.layer.name,
                        cell_id=cell_id, source=script, cache_key=key, state=state, status="ok",
                        started=started, duration=float(record.get("duration") or 0.0),
                        layer_def=session.layer_definition())
        return snap

    # --- pushing ----------------------------------------------------------------------------

    def push(self, session: "BuildSession", snapshot_id: str, on_output: OutputFn | None) -> None:
        """Queue step `snapshot_id` (just committed, or a local or remote hit) for the
        cache-to target, which gets it unless it is there, while the next steps run.
        What the push needs from the store is read now; a full queue waits here.
        Failures are one warning line, shown with the next step (or by `finish`)."""
        self._report(on_output)
        target = self.target
        if target is None or target.url in self._failed or session.layer.binds:
            return  # a step that saw bind mounts depends on more than its key says
        store = session.store
        snap = store.get(snapshot_id)
        parent = store.get(snap.parent) if snap is not None and snap.parent else None
        if snap is None or parent is None or snap.kind != "step" or not snap.cache_key:
            return
        log = b""
        try:
            with open(store.log_path(snap.id), "rb") as f:
                log = f.read(LOG_CAP)
        except FileNotFoundError:
            pass
        # build_env values stay here: the record names their variables (engine/cache_record.py)
        secrets = secret_env(build_environment(session.layer))
        state, env_refs = redact_state(snap.state, secrets)
        record = {"format": FORMAT, "key": snap.cache_key, "parent_key": parent_key(parent),
                  "parent": parent.id, "snapshot": snap.id, "layer": snap.layer,
                  "source": snap.source, "state": state, "duration": snap.duration,
                  "log": redact_log(log.decode("utf-8", errors="replace"), secrets)}
        if env_refs:
            record["env_refs"] = env_refs
        tmp = self._tmp(session)
        if self._maker_thread is None:
            self._maker_thread = ThreadPoolExecutor(1, thread_name_prefix="cache-push-layers")
            self._uploader = ThreadPoolExecutor(1, thread_name_prefix="cache-push-upload")
        self._pushes = [f for f in self._pushes if not f.done()]
        self._slots.acquire()
        try:
            self._pushes.append(self._maker_thread.submit(self._push_one, target, record, str(parent.path),
                                                          str(snap.path), tmp, layer_cache(store)))
        except BaseException:
            self._slots.release()
            remove_quietly(tmp)
            raise

    def _push_one(self, target: CacheStore, record: dict[str, Any], parent: str, new: str, tmp: str,
                  layers: str) -> None:
        """On the layer thread: make the step's layer (or take the one an export
        made), remember it for the export of the build, which takes it in turn,
        and hand the entry to the upload thread."""
        from stacker_kernel.oci.export import layer_made_before, remember_made_layer

        handed = False
        try:
            if target.url in self._failed:
                return
            if target.has(cache_tag(record["key"])):
                self.skipped += 1
                return
            self._push_messages.append(f"[cache-to: pushing step of layer {record['layer']} to {target.url}]\n")
            blob = layer_made_before(layers, parent, new, tmp)
            if blob is None:
                if self._maker is None:
                    self._maker = _LayerMaker()
                blob = self._maker.make(parent, new, tmp)
                remember_made_layer(layers, parent, new, tmp, blob)
            assert self._uploader is not None
            # only this thread changes the list while layers are being made (finish waits for them first)
            self._uploads = [f for f in self._uploads if not f.done()]
            self._uploads.append(self._uploader.submit(self._put_one, target, record, tmp, blob))
            handed = True
        except Exception as e:  # noqa: BLE001 (one warning line, as for a step's own push before)
            self._push_failed(target, e)
        finally:
            if not handed:
                remove_quietly(tmp)
                self._slots.release()

    def _put_one(self, target: CacheStore, record: dict[str, Any], tmp: str, blob) -> None:
        """On the upload thread: put the entry (its layer in `tmp`) and sign it."""
        try:
            if target.url in self._failed:
                return
            record = {**record, "diff_id": blob.diff_id}
            target.put(cache_tag(record["key"]), record, tmp, blob.digest, blob.size)
            self.trust.sign(target, record, blob.digest, blob.size)
            self._pushed += 1
            self.pushed_bytes += blob.size
            self._push_messages.append(f"[cache-to: pushed {human_size(blob.size)} ({self._pushed} so far)]\n")
        except Exception as e:  # noqa: BLE001
            self._push_failed(target, e)
        finally:
            remove_quietly(tmp)
            self._slots.release()

    def _push_failed(self, target: CacheStore, e: Exception) -> None:
        """Pushing to `target` stops: one warning line, whichever thread failed first."""
        with self._fail_lock:
            if target.url in self._failed:
                return
            self._failed.add(target.url)
        self._push_messages.append(f"warning: a step could not be pushed to {target.url} ({e}); "
                                   "the build goes on without pushing\n")

    def _report(self, on_output: OutputFn | None) -> None:
        while self._push_messages:
            line = self._push_messages.pop(0)
            if on_output is not None:
                on_output(line)

    def finish(self, on_output: OutputFn | None = None) -> int:
        """Wait for the queued pushes (before the build ends); their warnings go to
        `on_output`. The number of steps pushed so far."""
        self.wait_for_layers()
        pending, self._uploads = self._uploads, []
        wait(pending)
        self._report(on_output)
        return self._pushed

    def wait_for_layers(self) -> None:
        """Wait until every queued step's layer is made and remembered (the uploads
        may still go on): an export then takes these layers, beside the uploads."""
        pending, self._pushes = self._pushes, []
        wait(pending)

    def close(self) -> None:
        """End the layer maker (after `finish`); a later push starts another."""
        self.wait_for_layers()  # a push still going uses it
        wait(self._uploads)
        if self._maker is not None:
            self._maker.close()
            self._maker = None
