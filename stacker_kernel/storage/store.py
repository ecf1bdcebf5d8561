"""The snapshot store: read-only subvolumes on btrfs plus their records in SQLite.

Layout under the storage root (docs/architecture.md §6):

    stacker-kernel.db   records of snapshots (bases and steps), sessions, their
                        histories (a row per entry) and the step cache, WAL mode;
                        `PRAGMA user_version` is SCHEMA_VERSION
    bases/<digest>      read-only subvolumes of imported bases (content-addressed)
    snapshots/<id>      read-only subvolumes, one per successful step
    live/<session>      writable subvolumes of running containers
    logs/<id>           step output (logs/running-<session> while the step runs)
    lock                flock(2)ed for every write
    reaper.lock         flock(2)ed by the one process destroying the trash
    <folder>/.trash-*   what gc deleted, waiting for the reaper (driver.TRASH_PREFIX)

Invariant: a record exists only once its subvolume is read-only. Every write
(btrfs and SQLite) happens under the exclusive write lock, so opening a store
(which collects orphans in both directions) never deletes what another process
is in the middle of committing. The one exception is the trash: gc renames what
it deletes to .trash-* in the same folder and drops the records; a detached
reaper process destroys the trash without the write lock (no record names it,
and nothing but the reaper touches it), see `reap_trash`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from stacker_kernel.errors import SessionBusyError, StorageError
from stacker_kernel.storage import btrfs
from stacker_kernel.storage import driver as drivers
from stacker_kernel.storage.location import check_storage

DB_NAME = "stacker-kernel.db"
LOCK_NAME = "lock"
TMP_PREFIX = ".tmp-"
# logs/running-<session>: the output of a step still running in that session (the
# engine renames it to logs/<snapshot id> at commit).
RUNNING_LOG_PREFIX = "running-"
# A few MiB kept allocated so that `gc` can still open the records of a full
# storage: it deletes this file first (see `collect_garbage`).
RESERVE_NAME = "reserve"
RESERVE_SIZE = 8 << 20
REAPER_LOCK = "reaper.lock"


class StorageFullError(StorageError):
    """The user's storage has no space left (their bound, set by setup-storage --size)."""


def storage_error(root: Path, e: BaseException) -> StorageError:
    """One clear sentence for an OSError or sqlite3 error while using the store at `root`."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, sqlite3.Error):
        # SQLite reports a failed write of its -shm file as "disk I/O error".
        try:
            st = os.statvfs(root)
            nearly_full = st.f_bavail * st.f_frsize < RESERVE_SIZE
        except OSError:
            nearly_full = False
        full = "full" in str(e) or ("I/O error" in str(e) and nearly_full)
    if full:
        return StorageFullError(f"storage {root} is full: run 'stacker-kernel gc --wait' to delete snapshots no "
                                "session uses, or ask the admin for more space (setup-storage --size)")
    return StorageError(f"the store in {root} could not be used ({e}): check the storage and try again")


def _keep_reserve(root: Path) -> None:
    """Allocate the reserve file if it is missing and there is room for it."""
    path = root / RESERVE_NAME
    if path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, RESERVE_SIZE)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)  # no room now; the next open tries again
        return
    os.close(fd)


Progress = Callable[[str], None]


def collect_garbage(root: os.PathLike | str, *, progress: Progress | None = None,
                    held: Callable[["Store", list["Snapshot"]], int] | None = None,
                    settle: float = 10.0, wait: bool = False) -> tuple[list["Snapshot"], int | None]:
    """`stacker-kernel gc`: delete what no session references. Returns the removed
    snapshots and, with `wait`, the bytes freed (else None).

    The snapshots leave the user's sight and records at once (Store.gc) and a
    background reaper destroys them; btrfs frees their space after that, in the
    background too. With `wait`, gc destroys them itself and waits until btrfs
    freed them, and reports the drop of the filesystem's usage: btrfs frees a
    deleted subvolume not before the last process with a file of it open closes
    it, so with `held` (the store and the snapshots to remove -> the bytes they
    hold, measured before they go) gc waits up to `settle` seconds for the usage
    to drop by most of that (unless another writer makes it grow meanwhile),
    instead of reporting a figure taken before btrfs got to it.

    Works on a full storage (and then always waits: the room is what the user
    needs): opening lets btrfs finish freeing deleted snapshots, and if the
    records still cannot be opened gc gives up the reserve file for the room to
    do so. `progress` gets one line per stage.
    """
    say = progress or (lambda line: None)
    root = Path(os.path.realpath(root))
    drv = drivers.of_root(root)
    check_storage(root, drv.name)
    before = drv.usage(root) if wait else 0
    try:
        try:
            store = Store.open(root, reap=not wait)
        except StorageFullError:
            if not (root / RESERVE_NAME).exists():
                raise
            (root / RESERVE_NAME).unlink()
            if not wait:
                wait, before = True, drv.usage(root)
            reap_trash(root, wait=True)
            drv.wait_reclaimed(root)
            store = Store.open(root, reap=False)
    except StorageFullError as e:
        raise StorageFullError(f"storage {root} is full and gc cannot open its records: delete files of "
                               "your own you put there, or ask the admin for more space (setup-storage --size)") from e
    with store:
        with store.write_lock():
            drop = store.unreferenced()
            expected = 0
            if drop and held is not None and wait:
                say(f"measuring what {len(drop)} unreferenced snapshot(s) hold")
                expected = held(store, drop)
            if drop:
                say(f"deleting {len(drop)} snapshot(s)")
            store.gc(reap=not wait)
        if not wait:
            return drop, None
        if drop or drivers.trash_entries(root):
            say("waiting for btrfs to free their space" if drv.name == "btrfs" else "deleting their layers")
        reap_trash(root, wait=True)
        drv.wait_reclaimed(root)
        deadline = time.monotonic() + settle
        low = drv.usage(root)
        while before - low < expected * 0.9 and time.monotonic() < deadline:
            time.sleep(0.2)
            drv.sync(root)
            now = drv.usage(root)
            if now > low + (1 << 20):
                break  # another writer fills the storage meanwhile: no figure would settle
            low = min(low, now)
        _keep_reserve(root)
    return drop, before - drv.usage(root)


# The background reaper: a fresh interpreter (the caller may run threads, a fork
# without exec could inherit a lock another thread holds), like engine/history.py's
# size measurement.
_REAP = ("import sys\n"
         "from stacker_kernel.storage.store import reaper_main\n"
         "reaper_main(sys.argv[1])")


def start_reaper(root: Path) -> None:
    """Start a reaper for storage root `root` (reap_trash) and return at once: a process
    of its own session, detached (setsid --fork: its parent exits at once, so it is
    nobody's child to wait for and outlives this one), at nice 19."""
    import subprocess
    import sys

    import stacker_kernel

    if _reaper_at_work(root):
        return  # it looks at the trash again once it lets go of its lock: what is there now is its
    top = os.path.dirname(os.path.dirname(stacker_kernel.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [top, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-P", "-c", _REAP, str(root)]
    quiet = dict(env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 close_fds=True)
    try:
        subprocess.run(["setsid", "--fork", *cmd], check=False, **quiet)
        return
    except FileNotFoundError:  # no util-linux: our own child, in a session of its own
        pass
    proc = subprocess.Popen(cmd, start_new_session=True, **quiet)
    threading.Thread(target=proc.wait, daemon=True).start()  # no zombie in a long-lived kernel


def _reaper_at_work(root: Path) -> bool:
    try:
        fd = os.open(root / REAPER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the lock, if it was taken here


def reaper_main(root: str) -> None:
    """The background reaper's body (see start_reaper): nothing to report to, so a
    failure leaves the trash for the next reaper."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except OSError:
        pass
    try:
        reap_trash(Path(root))
    except Exception:
        pass


def reap_trash(root: Path, *, wait: bool = False) -> None:
    """Destroy what waits in the trash of storage root `root` (driver.TRASH_PREFIX), one
    reaper at a time per store (flock on REAPER_LOCK), until the trash is empty.

    Without `wait` (the background reaper) it returns at once when another reaper
    holds the lock: that one looks again once it lets go. With `wait` (gc --wait, a
    full storage) it waits for that one, then destroys what is left itself, and
    raises StorageError when something could not be destroyed (it stays in the trash
    for the next reaper)."""
    try:
        fd = os.open(root / REAPER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return  # the storage is gone
    drv = drivers.of_root(root)
    failed: dict[Path, BaseException] = {}

    def pending() -> list[Path]:
        return [p for p in drivers.trash_entries(root) if p not in failed]

    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return
            try:
                while trash := pending():
                    _destroy_trash(drv, trash, failed)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            # A gc that moved more into the trash while the lock was held started no
            # reaper of its own (it found the lock taken): look once more, unlocked.
            if not pending():
                break
    finally:
        os.close(fd)
    if failed and wait:
        first = next(iter(failed.values()))
        raise StorageError(f"{len(failed)} deleted snapshot(s) of storage {root} could not be destroyed "
                           f"({first}): gc tries again next time")


def _destroy_trash(drv: drivers.Driver, trash: list[Path], failed: dict[Path, BaseException]) -> None:
    try:
        drv.remove_many(trash)  # the overlay driver enters a user namespace once for all
        return
    except (StorageError, OSError):
        pass
    for path in trash:
        try:
            drv.remove(path)
        except (StorageError, OSError) as e:
            if os.path.lexists(path):
                failed[path] = e


def new_id() -> str:
    """A fresh snapshot or session id: a random uuid4 in hex (made here: the uuid module
    loads platform, and every command makes ids)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


@dataclass
class Snapshot:
    """One read-only subvolume: an imported base or the result of a step."""

    id: str = field(default_factory=new_id)
    kind: str = "step"  # "base" | "step"
    parent: str | None = None
    session: str | None = None
    layer: str = ""
    cell_id: str | None = None
    source: str = ""  # the step script, or a description of the base
    cache_key: str | None = None
    state: str = "{}"  # shell state after the step, opaque JSON text
    status: str = "ok"
    started: float = 0.0
    duration: float = 0.0
    size_delta: int | None = None
    created: float = field(default_factory=time.time)
    # The step's layer as it was defined when the step ran (its base, directives,
    # config; not its steps), opaque JSON text: an export needs it (None: unknown).
    layer_def: str | None = None
    root: Path | None = field(default=None, compare=False, repr=False)

    @property
    def path(self) -> Path:
        """The subvolume: root/bases/<id> for bases, root/snapshots/<id> for steps."""
        if self.root is None:
            raise ValueError(f"snapshot {self.id} is not attached to a store")
        return self.root / ("bases" if self.kind == "base" else "snapshots") / self.id


@dataclass
class Session:
    """A kernel, build or chroot working on one notebook / stacker.yaml."""

    id: str
    kind: str  # "kernel" | "build" | "chroot"
    name: str
    owner_pid: int
    owner_start: int
    head: str | None = None
    layer: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # layer name -> last snapshot id
    history: list[str] = field(default_factory=list)  # active history, oldest first
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    # The recipe the session builds: its layer definitions in recipe order, without
    # their steps (engine/session.py writes and reads it), opaque JSON text.
    recipe: str = "[]"
    # The cells the session ran, in the order they were first run in (a row each).
    cell_order: list[str] = field(default_factory=list)
    # History entry -> the cell it belongs to in this session, where that is not the
    # snapshot's own (a cache hit first built by another cell); kept with its history row.
    entry_cells: dict[str, str] = field(default_factory=dict)
    stored_cell_order: list[str] | None = field(default=None, compare=False, repr=False)
    # The history as the store last read or wrote it: a write then only adds (and
    # deletes) the rows that differ, so a step's write does not grow with the history.
    stored_history: list[str] | None = field(default=None, compare=False, repr=False)
    # False for a session made with new_session(record=False) until record_session
    # writes it: until then its changes stay in memory (update_session writes nothing).
    recorded: bool = field(default=True, compare=False, repr=False)

    def same_position(self, other: "Session") -> bool:
        """Whether `other` records what this session holds: head, layer, tags, history
        and each entry's cell, recipe and cells (not its id, owner or times)."""
        def cells(s: Session) -> dict[str, str]:
            return {h: s.entry_cells[h] for h in s.history if s.entry_cells.get(h) is not None}
        return ((self.kind, self.name, self.head, self.layer, self.tags, self.history, self.recipe,
                 self.cell_order, cells(self))
                == (other.kind, other.name, other.head, other.layer, other.tags, other.history, other.recipe,
                    other.cell_order, cells(other)))


_SNAP_COLS = ("id", "kind", "parent", "session", "layer", "cell_id", "source", "cache_key",
              "state", "status", "started", "duration", "size_delta", "created", "layer_def")
_SESS_COLS = ("id", "kind", "name", "owner_pid", "owner_start", "head", "layer", "tags",
              "created", "updated", "recipe")

# The schema's version, in `PRAGMA user_version`. 1: snapshots and sessions (stores
# made before versioning say 0); 2: the cache table; 3: the history table (a row per
# entry, instead of one JSON list in the session record). Opening an older store
# migrates it (_MIGRATIONS); a newer one is refused.
SCHEMA_VERSION = 3

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, parent TEXT, session TEXT, layer TEXT NOT NULL,
    cell_id TEXT, source TEXT NOT NULL, cache_key TEXT, state TEXT NOT NULL,
    status TEXT NOT NULL, started REAL NOT NULL, duration REAL NOT NULL,
    size_delta INTEGER, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS snapshots_cache_key ON snapshots(cache_key);
CREATE INDEX IF NOT EXISTS snapshots_session ON snapshots(session);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, owner_pid INTEGER NOT NULL,
    owner_start INTEGER NOT NULL, head TEXT, layer TEXT NOT NULL, tags TEXT NOT NULL,
    history TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_name ON sessions(name);
"""

# One snapshot per cache key: the first one committed (see Store.commit).
_CACHE_TABLE = "CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, snapshot TEXT NOT NULL)"
# The oldest existing step snapshot of each key becomes its entry (first writer wins).
_CACHE_FILL = ("INSERT OR IGNORE INTO cache (key, snapshot) SELECT cache_key, id FROM snapshots "
               "WHERE cache_key IS NOT NULL AND kind = 'step' {where} ORDER BY created, rowid")

# Entry `pos` (0-based, oldest first) of each session's history.
_HISTORY_TABLE = ("CREATE TABLE IF NOT EXISTS history (session TEXT NOT NULL, pos INTEGER NOT NULL, "
                  "snapshot TEXT NOT NULL, PRIMARY KEY (session, pos)) WITHOUT ROWID")

# _MIGRATIONS[n] turns schema n into n + 1.
_MIGRATIONS = {
    1: [_CACHE_TABLE, _CACHE_FILL.format(where="")],
    2: [_HISTORY_TABLE,
        "INSERT INTO history (session, pos, snapshot) SELECT s.id, CAST(j.key AS INTEGER), j.value "
        "FROM sessions s, json_each(s.history) j",
        "ALTER TABLE sessions DROP COLUMN history"],
}

# Additions a version of the same schema ignores (a column with a default, a table of
# its own): made when missing, without a new schema version, so that an older
# stacker-kernel of this schema still opens a store a newer one used. Each is
# (table, column or None for the table itself, the statement).
_ADDITIONS = [
    # the recipe a session builds, and the layer definition each step ran with
    ("sessions", "recipe", "ALTER TABLE sessions ADD COLUMN recipe TEXT NOT NULL DEFAULT '[]'"),
    ("snapshots", "layer_def", "ALTER TABLE snapshots ADD COLUMN layer_def TEXT"),
    # the cell of a history entry in its session; the cells a session ran, in first-run order
    ("history", "cell_id", "ALTER TABLE history ADD COLUMN cell_id TEXT"),
    ("cells", None, "CREATE TABLE IF NOT EXISTS cells (session TEXT NOT NULL, pos INTEGER NOT NULL, "
                    "cell TEXT NOT NULL, PRIMARY KEY (session, pos)) WITHOUT ROWID"),
]


def _missing_additions(conn: sqlite3.Connection) -> list[str]:
    missing = []
    for table, column, stmt in _ADDITIONS:
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
        if (column is None and not columns) or (column is not None and column not in columns):
            missing.append(stmt)
    return missing


def _prepare_schema(conn: sqlite3.Connection, root: Path) -> None:
    """Create the schema in a new database, migrate an older one, refuse a newer one
    (one transaction; the caller holds the write lock)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StorageError(f"storage {root} was written by a newer stacker-kernel (schema {version}): "
                           "upgrade, or use another --storage")
    if version == SCHEMA_VERSION and not _missing_additions(conn):
        return  # nothing to write: a full disk must not stop the store from opening
    conn.execute("BEGIN IMMEDIATE")
    try:
        has_tables = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'snapshots'").fetchone()
        if version == 0 and has_tables:
            version = 1  # written before the schema had a version
        if version == 0:
            for stmt in _SCHEMA_V1.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            version = 1
        for n in range(version, SCHEMA_VERSION):
            for stmt in _MIGRATIONS[n]:
                conn.execute(stmt)
        for stmt in _missing_additions(conn):
            conn.execute(stmt)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(e, sqlite3.OperationalError):
            raise StorageError(f"the store's database in {root} could not be set up for schema "
                               f"{SCHEMA_VERSION} ({e}): free space on it and try again") from e
        raise


def process_start_time(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22),
    None if gone or dead (a zombie that its parent has not reaped yet is dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


# Temporary folders a process makes in the store (a cache pull's downloads, a
# generate_labels run's labels, a session's secrets, bind copies and staged
# imports) are named after it, PREFIX<pid>-<start time>-…, so that opening the
# store and gc delete those of processes gone (a kill -9).
# Where they are: (folder below the root, prefix).
TMP_DIRS = (("cache/remote", "tmp-"), (".", "oci-labels-"), ("tmp", "mounts-"), ("imports", ""))
_LEGACY_TMP_AGE = 3600  # seconds: a folder of a version that did not name its owner


def _any_owner(fn: Callable[..., None], path: Path, *args) -> None:
    """fn(path, *args) on a subvolume, also one whose top belongs to one of the user's
    subordinate ids (a base whose tar said `./` is someone's, a step that chowned `/`):
    the user may not change or delete that from outside, so then it is done from
    inside the user namespace, where those ids are the user's."""
    try:
        fn(path, *args)
    except (StorageError, PermissionError):
        if os.geteuid() == 0 or not os.path.lexists(path):
            raise
        from stacker_kernel.container.userns import run_in_userns  # only then: the store needs no namespace

        run_in_userns(fn, str(path), *args)


def _chown_top(path: str | Path) -> None:
    os.lchown(path, 0, 0)  # raises outside the namespace: then _any_owner does it inside


def remove_any_owner(path: Path) -> None:
    """btrfs.remove_tree(path), whoever owns its top (see _any_owner)."""
    _any_owner(btrfs.remove_tree, path)


def process_tmp_name(prefix: str) -> str:
    """The start of a name in one of TMP_DIRS that says this process owns it."""
    pid = os.getpid()
    return f"{prefix}{pid}-{process_start_time(pid)}-"


def make_tmp_dir(parent: Path, prefix: str) -> Path:
    """A fresh folder in `parent` (one of TMP_DIRS) named after this process."""
    import tempfile

    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=process_tmp_name(prefix), dir=parent))


def _tmp_owner_gone(entry: Path, prefix: str) -> bool:
    pid, _, rest = entry.name[len(prefix):].partition("-")
    start, _, _ = rest.partition("-")
    if not (pid.isdigit() and start.isdigit()):
        try:
            return time.time() - entry.lstat().st_mtime > _LEGACY_TMP_AGE
        except FileNotFoundError:
            return False
    return process_start_time(int(pid)) != int(start)


def collect_tmp_dirs(root: Path) -> list[Path]:
    """Delete the temporary folders of processes gone (see TMP_DIRS); returns them."""
    gone = []
    for where, prefix in TMP_DIRS:
        try:
            entries = list((root / where).iterdir())
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith(prefix) and _tmp_owner_gone(entry, prefix):
                remove_any_owner(entry)  # a bind's copy keeps the container's ids
                gone.append(entry)
    return gone


def _busy_message(other: Session) -> str:
    what = {"kernel": "shut that kernel down, then run the cell again",
            "build": "wait for that build to finish, or stop it, then build again"}.get(other.kind, "try again later")
    return f"{other.name} is already building (pid {other.owner_pid}, a {other.kind}): {what}"


class _ProcessLock:
    """The write lock of one storage root within this process: an RLock over one flock."""

    def __init__(self, lock_file: Path):
        self.fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.rlock = threading.RLock()
        self.depth = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self.rlock:
            if self.depth == 0:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)


# One lock object per root and process, so that two Store objects on the same
# root in one process share reentrancy instead of deadlocking on each other.
_LOCKS: dict[Path, _ProcessLock] = {}
_LOCKS_GUARD = threading.Lock()


def _process_lock(root: Path) -> _ProcessLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(root)
        if lock is None:
            lock = _LOCKS[root] = _ProcessLock(root / LOCK_NAME)
        return lock


class Store:
    """Snapshots and sessions of one storage root. Thread-safe; many processes may share a root."""

    def __init__(self, root: Path, conn: sqlite3.Connection, driver: drivers.Driver | None = None):
        """Use `Store.open`."""
        self.root = root
        self.driver = driver or drivers.BtrfsDriver()
        self._conn = conn
        self._db_lock = threading.Lock()
        self._lock = _process_lock(root)
        self.trash_seen = False  # recover found a trash (what gc deleted, not destroyed yet)

    # --- opening --------------------------------------------------------------

    @classmethod
    def open(cls, root: os.PathLike | str, driver: str | None = None, *, reap: bool = True) -> "Store":
        """Open (creating the layout if needed) the store at `root` and run crash recovery.

        `driver` ("btrfs" or "overlay", storage/driver.py) is the one a new root
        gets (default: btrfs on btrfs, overlay elsewhere); an existing root keeps
        its own and refuses another. Raises StorageError when `root` is not a
        usable storage root for its driver. A trash that a gc or reaper left
        (killed, or the machine stopped) gets a reaper (unless not `reap`).
        """
        root = Path(os.path.realpath(root))
        check_storage(root, drivers.of_root(root, driver).name)
        drv = drivers.choose(root, driver)
        for attempt in (1, 2):
            try:
                store = cls._open(root, drv)
                break
            except (OSError, sqlite3.Error) as e:
                err = storage_error(root, e)
                if attempt == 2 or not isinstance(err, StorageFullError):
                    raise err from e
            # Often only subvolumes deleted a moment ago (a failed step's, gc's trash) still hold the space.
            reap_trash(root, wait=True)
            drv.wait_reclaimed(root)
        _keep_reserve(root)
        if reap and store.trash_seen:
            start_reaper(root)
        return store

    @classmethod
    def _open(cls, root: Path, driver: drivers.Driver) -> "Store":
        for sub in ("bases", "snapshots", "live", "logs"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
        store = cls(root, None, driver)  # type: ignore[arg-type]
        with store.write_lock():
            for suffix in ("-wal", "-shm"):
                driver.prepare_db_file(root / (DB_NAME + suffix))
            conn = sqlite3.connect(root / DB_NAME, timeout=60, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA journal_mode = WAL")
            # A process crash cannot lose a committed transaction in WAL mode
            # with NORMAL; power loss may, and recovery then drops the orphan.
            conn.execute("PRAGMA synchronous = NORMAL")
            _prepare_schema(conn, root)
            store._conn = conn
            store.recover()
        return store

    def close(self) -> None:
        """Close the database connection (the store is unusable afterwards)."""
        # Under the write lock: the last close deletes the WAL files, which must not
        # happen between another process's `open` preparing them and connecting.
        with self.write_lock(), self._db_lock:
            self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the exclusive write lock of this root (flock; reentrant within the process)."""
        with self._lock.hold():
            yield

    # --- SQL helpers ------------------------------------------------------------

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db_lock:
            return self._conn.execute(sql, args).fetchall()

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        """Run `statements` in one transaction (the caller holds the write lock)."""
        with self._db_lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._conn.execute(sql, args)
                self._conn.execute("COMMIT")
            except BaseException as e:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.OperationalError):
                    raise storage_error(self.root, e) from None
                raise

    def _snap(self, row: tuple) -> Snapshot:
        return Snapshot(**dict(zip(_SNAP_COLS, row)), root=self.root)

    def _sess(self, row: tuple) -> Session:
        d = dict(zip(_SESS_COLS, row))
        d["tags"] = json.loads(d["tags"])
        rows = self._query("SELECT snapshot, cell_id FROM history WHERE session = ? ORDER BY pos", (d["id"],))
        history = [r[0] for r in rows]
        order = [r[0] for r in self._query("SELECT cell FROM cells WHERE session = ? ORDER BY pos", (d["id"],))]
        return Session(**d, history=history, stored_history=list(history),
                       entry_cells={r[0]: r[1] for r in rows if r[1] is not None},
                       cell_order=order, stored_cell_order=list(order))

    @staticmethod
    def _snap_values(s: Snapshot) -> tuple:
        return tuple(getattr(s, c) for c in _SNAP_COLS)

    @staticmethod
    def _sess_values(s: Session) -> tuple:
        return (s.id, s.kind, s.name, s.owner_pid, s.owner_start, s.head, s.layer,
                json.dumps(s.tags, sort_keys=True), s.created, s.updated, s.recipe)

    # --- snapshots ------------------------------------------------------------------

    def get(self, id: str) -> Snapshot | None:
        """The record of snapshot or base `id`, or None."""
        rows = self._query(f"SELECT {','.join(_SNAP_COLS)} FROM snapshots WHERE id = ?", (id,))
        return self._snap(rows[0]) if rows else None

    def snapshots(self, session: str | None = None) -> list[Snapshot]:
        """All snapshot records (or those made by `session`), oldest first."""
        cols = ",".join(_SNAP_COLS)
        if session is None:
            rows = self._query(f"SELECT {cols} FROM snapshots ORDER BY created, rowid")
        else:
            rows = self._query(f"SELECT {cols} FROM snapshots WHERE session = ? ORDER BY created, rowid",
                               (session,))
        return [self._snap(r) for r in rows]

    def chain(self, id: str) -> list[Snapshot]:
        """Snapshot `id` and its ancestors, base first; empty if `id` is unknown."""
        out: list[Snapshot] = []
        seen: set[str] = set()
        cur = self.get(id)
        while cur is not None and cur.id not in seen:
            seen.add(cur.id)
            out.append(cur)
            cur = self.get(cur.parent) if cur.parent else None
        out.reverse()
        return out

    def find_cache(self, key: str) -> Snapshot | None:
        """The snapshot the cache holds for `key` (the first one committed with it that
        still exists), or None."""
        rows = self._query(f"SELECT {','.join('s.' + c for c in _SNAP_COLS)} FROM cache c "
                           "JOIN snapshots s ON s.id = c.snapshot WHERE c.key = ?", (key,))
        if rows:
            snap = self._snap(rows[0])
            if snap.path.is_dir():
                return snap
        return None

    def forget_cache(self, key: str) -> None:
        """Drop the cache entry of `key` (its snapshot stays while something uses it)."""
        self._write([("DELETE FROM cache WHERE key = ?", (key,))])

    def log_path(self, id: str) -> Path:
        """Where the output of step `id` is (or will be) stored."""
        return self.root / "logs" / id

    def commit(self, live: os.PathLike | str, snap: Snapshot, *, reuse_cached: bool = False) -> Snapshot:
        """Freeze subvolume `live` as read-only snapshot `snap.id` and record `snap`.

        The snapshot is taken read-only atomically and the record inserted
        under the write lock, so a crash in between leaves only an orphan
        subvolume that the next `Store.open` deletes. Returns `snap` attached
        to this store (kind "step").

        With a `cache_key`, the record and the cache entry are written in one
        transaction; the first snapshot committed for a key stays its entry
        while it exists. With `reuse_cached`, a key that already has an entry
        (another session built the same step meanwhile) commits nothing and
        returns that entry's snapshot instead, so both sessions go on from the
        same snapshot.
        """
        snap = replace(snap, kind="step", root=self.root)
        with self.write_lock():
            if self.get(snap.id) is not None:
                raise StorageError(f"snapshot {snap.id} already exists; use a fresh id")
            if reuse_cached and snap.cache_key:
                first = self.find_cache(snap.cache_key)
                if first is not None:
                    return first
            self.driver.commit(Path(live), snap.path, snap.id)
            try:
                self._insert_snapshot(snap)
            except BaseException:
                self.driver.uncommit(Path(live), snap.path, snap.id)
                raise
        self.driver.after_commit(self.write_lock, snap.path)
        return snap

    def _insert_snapshot(self, snap: Snapshot) -> None:
        marks = ",".join("?" * len(_SNAP_COLS))
        stmts = [(f"INSERT INTO snapshots ({','.join(_SNAP_COLS)}) VALUES ({marks})", self._snap_values(snap))]
        if snap.cache_key and snap.kind == "step" and self.find_cache(snap.cache_key) is None:
            # No entry, or its snapshot is gone: this one is the key's entry now.
            stmts.append(("INSERT OR REPLACE INTO cache (key, snapshot) VALUES (?, ?)", (snap.cache_key, snap.id)))
        self._write(stmts)

    def add_base(self, digest: str, populate: Callable[[Path], None], source: str) -> Snapshot:
        """The read-only base subvolume for content digest `digest`, populating it if new.

        When the base is already stored it is returned at once. Otherwise
        `populate(path)` fills a fresh writable subvolume (outside the write
        lock, it may take long); the subvolume is then made read-only, renamed
        to bases/<digest> and recorded. If `populate` raises, the temporary
        subvolume is deleted and the exception propagates. A concurrent import
        of the same digest is harmless: the first one wins.
        """
        if "/" in digest or digest.startswith("."):
            raise StorageError(f"base digest {digest!r} is not a valid name")
        existing = self.get(digest)
        if existing is not None and existing.path.is_dir():
            return existing
        tmp = self.root / "bases" / f"{TMP_PREFIX}{new_id()}"
        # The flock on tmp's lock file tells recovery in other processes that
        # this temporary base is being populated (works across pid namespaces).
        lock_fd = os.open(f"{tmp}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self.driver.create(tmp)
            try:
                populate(tmp)
                if os.geteuid() != 0 and os.lstat(tmp).st_uid != os.geteuid():
                    # A tar said its `./` is another id's: the top of a rootfs stays the
                    # container's root (the user), or the user could not snapshot it.
                    _any_owner(_chown_top, tmp)
                with self.write_lock():
                    existing = self.get(digest)
                    if existing is not None and existing.path.is_dir():
                        self.driver.remove(tmp)
                        return existing
                    snap = Snapshot(id=digest, kind="base", source=source, root=self.root)
                    if existing is not None:  # record left without subvolume: replace it
                        self._write([("DELETE FROM snapshots WHERE id = ?", (digest,))])
                    self.driver.adopt(tmp, snap.path, digest)
                    try:
                        self._insert_snapshot(snap)
                    except BaseException:
                        self.driver.remove(snap.path)
                        raise
                    return snap
            except BaseException:
                self.driver.remove(tmp)  # whoever the tar said owns its root
                raise
        finally:
            Path(f"{tmp}.lock").unlink(missing_ok=True)
            os.close(lock_fd)

    def set_size_delta(self, id: str, size_delta: int | None) -> None:
        """Record how much step `id` changed the filesystem's usage (known only after its snapshot)."""
        self.set_size_deltas({id: size_delta})

    def set_size_deltas(self, deltas: dict[str, int | None]) -> None:
        """set_size_delta of several steps, in one transaction."""
        with self.write_lock():
            self._write([("UPDATE snapshots SET size_delta = ? WHERE id = ?", (d, sid)) for sid, d in deltas.items()])

    def delete_snapshot(self, id: str) -> None:
        """Delete snapshot or base `id`: its subvolume, log and record.

        Children are re-parented to its parent and sessions pointing at it
        move to its parent, so every chain stays walkable.
        """
        with self.write_lock():
            snap = self.get(id)
            if snap is None:
                return
            self.driver.remove(snap.path)
            self.log_path(id).unlink(missing_ok=True)
            self._drop_records({id})
            self.driver.collect(self.root, self._trees)

    def _drop_records(self, ids: set[str]) -> None:
        """Delete the records `ids`, re-pointing children and sessions to the nearest kept ancestor."""
        parents = {row[0]: row[1] for row in self._query("SELECT id, parent FROM snapshots")}

        def survivor(sid: str | None) -> str | None:
            seen = set()
            while sid is not None and sid in ids and sid not in seen:
                seen.add(sid)
                sid = parents.get(sid)
            return sid

        stmts: list[tuple[str, tuple]] = []
        for sid, parent in parents.items():
            if sid not in ids and parent in ids:
                stmts.append(("UPDATE snapshots SET parent = ? WHERE id = ?", (survivor(parent), sid)))
        for sess in self.find_sessions():
            head = survivor(sess.head)
            tags = {k: v for k, v in ((k, survivor(v)) for k, v in sess.tags.items()) if v is not None}
            history = [h for h in sess.history if h not in ids]
            if (head, tags, history) != (sess.head, sess.tags, sess.history):
                sess.head, sess.tags, sess.history = head, tags, history
                stmts.extend(self._session_update(sess))
        stmts.extend(("DELETE FROM snapshots WHERE id = ?", (sid,)) for sid in ids)
        # A key whose entry is dropped falls to its oldest remaining snapshot, if any.
        stmts.extend(("DELETE FROM cache WHERE snapshot = ?", (sid,)) for sid in ids)
        stmts.append((_CACHE_FILL.format(where=""), ()))
        self._write(stmts)

    # --- sessions -------------------------------------------------------------

    def new_session(self, kind: str, name: str, *, exclusive: bool = False, record: bool = True) -> Session:
        """Record a new session of `kind` for `name`, owned by this process.

        With `exclusive`, a session of the same kind and name whose owner is
        alive (this process included) means SessionBusyError instead: one
        build, or one kernel, of a notebook or stacker.yaml at a time.

        With `record=False` the session is checked but not written (a build that
        may change nothing writes nothing: engine/build.py): `record_session`
        writes it, with everything it holds by then, once it must be in the store.
        """
        pid = os.getpid()
        sess = Session(id=new_id(), kind=kind, name=name, owner_pid=pid,
                       owner_start=process_start_time(pid) or 0, recorded=False)
        sess.stored_history = []
        sess.stored_cell_order = []
        if record:
            self.record_session(sess, exclusive=exclusive)
        elif exclusive:
            with self.write_lock():
                self._check_free(sess)
        return sess

    def _check_free(self, sess: Session) -> None:
        for other in self.find_sessions(name=sess.name, kind=sess.kind):
            if other.id != sess.id and self.session_alive(other):
                raise SessionBusyError(_busy_message(other))

    def record_session(self, sess: Session, *, exclusive: bool = False) -> None:
        """Write session `sess` (made with record=False) with what it holds now; from then
        on it is a session like any other. `exclusive` as for new_session. What it points
        at must still exist: gc kept none of it for an unrecorded session."""
        marks = ",".join("?" * len(_SESS_COLS))
        with self.write_lock():
            if exclusive:
                self._check_free(sess)
            points_at = {i for i in [sess.head, *sess.tags.values(), *sess.history] if i}
            gone = sorted(i for i in points_at if (snap := self.get(i)) is None or not snap.path.is_dir())
            if gone:
                raise StorageError(f"snapshot {gone[0][:12]} was deleted while {sess.name} was being built "
                                   "(a gc beside the build?): build again")
            self._write([(f"INSERT INTO sessions ({','.join(_SESS_COLS)}) VALUES ({marks})",
                          self._sess_values(sess)),
                         ("DELETE FROM history WHERE session = ?", (sess.id,)),
                         ("DELETE FROM cells WHERE session = ?", (sess.id,)),
                         *self._session_update(sess)])
            sess.recorded = True
        sess.stored_history = list(sess.history)
        sess.stored_cell_order = list(sess.cell_order)

    def _session_update(self, sess: Session) -> list[tuple[str, tuple]]:
        """The statements that store `sess`: its record, and the history rows that differ
        from what the store holds (after a step: one row added)."""
        sets = ",".join(f"{c} = ?" for c in _SESS_COLS[1:])
        vals = self._sess_values(sess)
        stmts = [(f"UPDATE sessions SET {sets} WHERE id = ?", vals[1:] + (vals[0],))]
        old, new = sess.stored_history, sess.history
        same = 0
        if old is not None:
            while same < min(len(old), len(new)) and old[same] == new[same]:
                same += 1
        if old is None or same < len(old):
            stmts.append(("DELETE FROM history WHERE session = ? AND pos >= ?", (sess.id, same)))
        stmts.extend(("INSERT OR REPLACE INTO history (session, pos, snapshot, cell_id) VALUES (?, ?, ?, ?)",
                      (sess.id, pos, new[pos], sess.entry_cells.get(new[pos]))) for pos in range(same, len(new)))
        # The cells' order only grows (a cell keeps its first run's place).
        old_cells, cells = sess.stored_cell_order, sess.cell_order
        if old_cells is None or cells[:len(old_cells)] != old_cells:
            stmts.append(("DELETE FROM cells WHERE session = ?", (sess.id,)))
            old_cells = []
        stmts.extend(("INSERT OR REPLACE INTO cells (session, pos, cell) VALUES (?, ?, ?)",
                      (sess.id, pos, cells[pos])) for pos in range(len(old_cells), len(cells)))
        return stmts

    def update_session(self, session: Session) -> None:
        """Store every field of `session` (its `updated` becomes now)."""
        session.updated = time.time()
        if not session.recorded:
            return  # kept in memory until record_session
        with self.write_lock():
            self._write(self._session_update(session))
        session.stored_history = list(session.history)
        session.stored_cell_order = list(session.cell_order)

    def get_session(self, id: str) -> Session | None:
        """The session record `id`, or None."""
        rows = self._query(f"SELECT {','.join(_SESS_COLS)} FROM sessions WHERE id = ?", (id,))
        return self._sess(rows[0]) if rows else None

    def find_sessions(self, name: str | None = None, kind: str | None = None) -> list[Session]:
        """Sessions, newest first, optionally only those with this `name` and/or `kind`."""
        sql, args = f"SELECT {','.join(_SESS_COLS)} FROM sessions WHERE 1", []
        if name is not None:
            sql += " AND name = ?"
            args.append(name)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        rows = self._query(sql + " ORDER BY created DESC, rowid DESC", tuple(args))
        return [self._sess(r) for r in rows]

    def session_names(self, kind: str | None = None) -> dict[str, str]:
        """Session id -> name (optionally of `kind` only), without their histories: what
        a cell may read about every other session, whatever their histories hold."""
        sql, args = "SELECT id, name FROM sessions", ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        return dict(self._query(sql, args))

    @staticmethod
    def session_alive(session: Session) -> bool:
        """True while the process that owns `session` runs (same pid and same start time)."""
        return session.owner_pid > 0 and process_start_time(session.owner_pid) == session.owner_start

    def live_path(self, session_id: str) -> Path:
        """Where session `session_id` keeps its writable rootfs subvolume (the engine creates it)."""
        return self.root / "live" / session_id

    def end_session(self, session_id: str) -> None:
        """Delete the live subvolume of `session_id` and give up its ownership (its name
        is free for another session to open or resume); its records stay (for gc and
        history)."""
        with self.write_lock():
            self.driver.remove(self.live_path(session_id))
            self._write([("UPDATE sessions SET owner_pid = 0, owner_start = 0 WHERE id = ?", (session_id,))])

    def forget_session(self, session_id: str) -> None:
        """Delete session `session_id` entirely (live subvolume and record); gc may then drop its snapshots."""
        with self.write_lock():
            self.driver.remove(self.live_path(session_id))
            self._write([("DELETE FROM sessions WHERE id = ?", (session_id,)),
                         ("DELETE FROM history WHERE session = ?", (session_id,)),
                         ("DELETE FROM cells WHERE session = ?", (session_id,))])

    # --- recovery and gc ------------------------------------------------------

    def recover(self) -> None:
        """Make disk and records agree after a crash (runs on open, under the write lock).

        Deletes subvolumes in snapshots/ and bases/ without a record (and
        temporary bases whose importer is gone), records without a subvolume
        (re-pointing children and sessions to the nearest existing ancestor),
        live subvolumes whose session is unknown or whose owner is dead, and
        logs of neither a snapshot nor a step running in a live session. The
        trash is the reaper's: it only notes that there is one (`trash_seen`).
        """
        with self.write_lock():
            # Ids and kinds only, and one listing per folder: opening a store of thousands
            # of snapshots stays a few milliseconds (every build and kernel opens it).
            known = dict(self._query("SELECT id, kind FROM snapshots"))
            present = set()
            for sub, kind in (("snapshots", "step"), ("bases", "base")):
                for entry in os.scandir(self.root / sub):
                    name = entry.name
                    if name.startswith(drivers.TRASH_PREFIX):
                        self.trash_seen = True
                    elif kind == "base" and name.startswith(TMP_PREFIX):
                        self._recover_tmp_base(Path(entry.path))
                    elif known.get(name) != kind:
                        self.driver.remove(Path(entry.path))
                    elif entry.is_dir():
                        present.add(name)
            missing = set(known) - present
            if missing:
                self._drop_records(missing)
            sessions = {s.id: s for s in self.find_sessions()}
            left = [entry for entry in (self.root / "live").iterdir()
                    if (sess := sessions.get(entry.name)) is None or not self.session_alive(sess)]
            if left:
                # A rootfs its session left (it ended without closing): its container may
                # still run (PDEATHSIG should have ended it). Only then are the processes
                # looked through: a container's rootfs is a session's live/<id>.
                from stacker_kernel.container.runtime import Container

                Container.kill_orphans(str(self.root / "live"))
            for entry in left:
                self.driver.remove(entry)
            kept = set(known) - missing
            for entry in (self.root / "logs").iterdir():
                name = entry.name
                if name.startswith(RUNNING_LOG_PREFIX):
                    sess = sessions.get(name[len(RUNNING_LOG_PREFIX):])
                    if sess is None or not self.session_alive(sess):
                        entry.unlink(missing_ok=True)
                elif name not in kept:
                    entry.unlink(missing_ok=True)
            collect_tmp_dirs(self.root)
            if self.driver.collect(self.root, self._trees):
                self.trash_seen = True

    def _trees(self) -> list[Path]:
        """Every tree in the store: bases, snapshots and live rootfs (what the driver must
        keep), not the trash."""
        return [Path(e.path) for sub in ("bases", "snapshots", "live")
                for e in os.scandir(self.root / sub)
                if e.is_dir(follow_symlinks=False) and not e.name.startswith(drivers.TRASH_PREFIX)]

    def _recover_tmp_base(self, entry: Path) -> None:
        if entry.name.endswith(".lock"):
            # A lone lock file may belong to an importer about to create its
            # subvolume; it is empty, so leaving it is harmless.
            return
        lock = Path(f"{entry}.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            self._drop_tmp_base(entry)  # its importer is gone (it unlinks the lock last)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # still being populated by a live process
        finally:
            os.close(fd)
        self._drop_tmp_base(entry)
        lock.unlink(missing_ok=True)

    def _drop_tmp_base(self, entry: Path) -> None:
        """Delete a temporary base its importer left; one that cannot be deleted is left
        for the next open: a stale temporary never stops the store from opening."""
        try:
            self.driver.remove(entry)
        except (StorageError, OSError):
            pass

    def referenced(self) -> set[str]:
        """Ids that gc keeps: the chains of every session's head, tags and history,
        and every snapshot made by a session whose owner is still alive."""
        keep: set[str] = set()
        sessions = self.find_sessions()
        roots: list[str] = []
        for sess in sessions:
            roots.extend(x for x in [sess.head, *sess.tags.values(), *sess.history] if x)
        alive = {s.id for s in sessions if self.session_alive(s)}
        # A live session may have committed a step it has not pointed at yet.
        roots.extend(s.id for s in self.snapshots() if s.session in alive)
        for rid in roots:
            if rid not in keep:
                keep.update(s.id for s in self.chain(rid))
        return keep

    def unreferenced(self) -> list[Snapshot]:
        """The snapshots and bases gc deletes now (nothing references them)."""
        with self.write_lock():
            keep = self.referenced()
            return [s for s in self.snapshots() if s.id not in keep]

    def gc(self, *, reap: bool = True) -> list[str]:
        """Delete every snapshot and base nothing references (see `referenced`); return their ids.

        They are moved into the trash (a rename each, in their own folder) and their
        records dropped; a background reaper destroys them (not with `reap` False:
        then the caller does, reap_trash). Nothing referenced is ever moved, and a
        crash leaves either the records of trees already in the trash (opening the
        store drops them, as it drops any record without its tree) or trash that the
        next gc, or the next opening of the store, gives to a reaper.
        """
        with self.write_lock():
            collect_tmp_dirs(self.root)  # e.g. a pull killed since this store was opened
            drop = self.unreferenced()
            for snap in drop:
                if os.path.lexists(snap.path):
                    self.driver.trash(snap.path)
                self.log_path(snap.id).unlink(missing_ok=True)
            if drop:
                try:
                    self._drop_records({s.id for s in drop})
                except StorageFullError:
                    reap_trash(self.root, wait=True)  # destroyed, the trash makes the room
                    self.driver.wait_reclaimed(self.root)
                    self._drop_records({s.id for s in drop})
                self.driver.collect(self.root, self._trees, later=True)
        if reap and (drop or drivers.trash_entries(self.root)):
            start_reaper(self.root)
        return [s.id for s in drop]
