"""The shared step cache (engine/remote_cache.py, oci/registry.py): user A builds a
notebook with --cache-to a real registry (Debian's docker-registry on a free
localhost port), user B with empty storage builds it with --cache-from and runs
no step. Each failure of the registry (down, silent, 401, 403, 500, a blob with
the wrong digest, a truncated blob) makes the step run locally after one
warning line; for those, a small HTTP server in the test imitates the registry
or sits between B and the real one."""
import base64
import hashlib
import http.server
import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

from kernel_support import BASE, kernels, notebook_dir, start_kernel  # noqa: F401 (fixtures)
from net_support import free_port as _free_port, serve_registry
from stacker_kernel.cli import main
from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.build import build, layer_snapshot
from stacker_kernel.engine.remote_cache import CacheSettings, configured
from stacker_kernel.errors import ImageError
from stacker_kernel.oci.registry import auth_for, cache_tag
from stacker_kernel.recipe.cells import CacheSource, parse_magic
from stacker_kernel.storage import btrfs, driver
from stacker_kernel.storage.store import Store
from conftest import BTRFS_STORAGE, in_tree, overlay_root

REPO = Path(__file__).resolve().parent.parent
CELLS = [
    "mkdir -p /app && echo one > /app/one && chmod 600 /app/one\necho made one",
    "echo two > /app/two && chown 1:2 /app/two && ln -s one /app/link && rm /etc/group",
    "cd /app\nexport GREETING=hello",
    "echo $GREETING > greeting && pwd > where",
]


def _notebook(path: Path, base: str, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"%from oci {base}", id="from")]
    nb.cells += [nbformat.v4.new_code_cell(src, id=f"c{i}") for i, src in enumerate(cells)]
    nbformat.write(nb, path)
    return path


def _new_storage(driver_storage: Path) -> Path:
    """A fresh storage of the module's driver (conftest's driver_storage): a directory
    on the btrfs storage, or an overlay storage folder of its own."""
    if driver.recorded(driver_storage) == "overlay":
        return overlay_root()
    root = Path(BTRFS_STORAGE) / f"t-{uuid.uuid4().hex}"
    root.mkdir()
    return root


def _remove_storage(root: Path) -> None:
    if driver.recorded(root) == "overlay":
        driver.OverlayDriver().remove(root)
    else:
        btrfs.remove_tree(root)


def _build(root: Path, nb: Path, **cache):
    out: list[str] = []
    with Store.open(root) as store:
        result = build(store, str(nb), out=out.append, stream=out.append, cache=CacheSettings(**cache),
                       replay_cached=True)
        tip = layer_snapshot(store, str(nb), None)
    return result, "".join(o if o.endswith("\n") else o + "\n" for o in out), str(tip.path)


def _listing(rootfs: str) -> list[tuple]:
    """Every path with its type, mode, owner and content (or link target)."""
    out = []
    for dirpath, dirs, files in os.walk(rootfs):
        for name in sorted(dirs + files):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if os.path.islink(full):
                what = os.readlink(full)
            elif os.path.isfile(full):
                what = hashlib.sha256(Path(full).read_bytes()).hexdigest()
            else:
                what = None
            out.append((os.path.relpath(full, rootfs), st.st_mode, st.st_uid, st.st_gid, what))
    return sorted(out)


def _tree(rootfs: str) -> list[tuple]:
    return run_in_userns(_listing, rootfs)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A docker-registry on 127.0.0.1 with its own storage; yields HOST:PORT."""
    yield from serve_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def built_a(registry, busybox_oci, tmp_path_factory, driver_storage):
    """User A built the notebook with --cache-to the registry: (notebook, A's rootfs tree, output)."""
    nb = _notebook(tmp_path_factory.mktemp("a") / "nb.ipynb", busybox_oci, CELLS)
    root = _new_storage(driver_storage)
    try:
        result, out, tip = _build(root, nb, cache_to=f"docker://{registry}/team/cache")
        assert result.steps_run == len(CELLS) and "warning" not in out
        yield nb, _tree(tip), out
    finally:
        _remove_storage(root)


@pytest.fixture
def storage_b(driver_storage):
    """User B's storage, empty, of the module's driver."""
    root = _new_storage(driver_storage)
    yield root
    _remove_storage(root)


def _copy(nb: Path, tmp_path: Path) -> Path:
    """The same notebook on B's machine (another directory)."""
    dest = tmp_path / "b" / nb.name
    dest.parent.mkdir()
    dest.write_bytes(nb.read_bytes())
    return dest


# --- the main path, on the real registry ----------------------------------------------

def test_b_with_empty_storage_runs_no_step_and_gets_a_equal_rootfs(built_a, registry, storage_b, tmp_path):
    nb, tree_a, out_a = built_a
    result, out, tip = _build(storage_b, _copy(nb, tmp_path), cache_from=[f"docker://{registry}/team/cache"])
    assert result.steps_run == 0 and result.steps_cached == len(CELLS)
    assert out.count(f"[cache hit from docker://{registry}/team/cache]") == len(CELLS)
    assert "made one" in out  # the step's output is replayed
    assert _tree(tip) == tree_a
    entries = dict((p, (m, u, g, w)) for p, m, u, g, w in tree_a)
    assert entries["app/greeting"][3] == hashlib.sha256(b"hello\n").hexdigest()  # shell state carried
    assert entries["app/two"][1:3] == (1, 2) and "etc/group" not in entries


def test_a_changed_cell_runs_only_it_and_the_steps_after_it(built_a, registry, storage_b, tmp_path):
    nb, _, _ = built_a
    changed = CELLS[:2] + ["cd /app\nexport GREETING=bonjour"] + CELLS[3:]
    nb_b = _notebook(tmp_path / "nb.ipynb", nbformat.read(nb, as_version=4).cells[0].source.split(" ", 2)[2],
                     changed)
    result, out, tip = _build(storage_b, nb_b, cache_from=[f"docker://{registry}/team/cache"])
    assert (result.steps_cached, result.steps_run) == (2, 2)
    assert "warning" not in out
    greeting = dict((p, w) for p, m, u, g, w in _tree(tip))["app/greeting"]
    assert greeting == hashlib.sha256(b"bonjour\n").hexdigest()


def test_pushing_what_the_registry_has_uploads_nothing(built_a, registry, storage_b, tmp_path):
    nb, _, _ = built_a
    with _Proxy(registry) as proxy:
        url = f"docker://127.0.0.1:{proxy.port}/team/cache"
        result, out, _ = _build(storage_b, _copy(nb, tmp_path), cache_from=[url], cache_to=url)
    assert result.steps_run == 0 and "warning" not in out
    assert [r for r in proxy.requests if r[0] in ("POST", "PUT", "PATCH")] == []


def test_an_oci_layout_is_a_cache_too(busybox_oci, storage, storage_b, tmp_path):
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS[:2])
    cache = f"oci:{tmp_path / 'cache'}"
    _, _, tip_a = _build(storage, nb, cache_to=cache)
    result, out, tip_b = _build(storage_b, _copy(nb, tmp_path), cache_from=[cache])
    assert result.steps_run == 0 and "warning" not in out
    assert _tree(tip_b) == _tree(tip_a)


def test_cli_build_takes_cache_flags(built_a, registry, storage_b, tmp_path, capsys):
    nb, _, _ = built_a
    assert main(["--storage", str(storage_b), "build", "-f", str(_copy(nb, tmp_path)), "--no-oci",
                 "--cache-from", f"docker://{registry}/team/cache"]) == 0
    assert f"0 step(s) ran, {len(CELLS)} cached" in capsys.readouterr().out


# --- failure modes: the step runs, one warning line ---------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _any(self):
        server = self.server
        server.requests.append((self.command, self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server.behave(self, body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _any


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behave):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behave = behave
        self.requests: list[tuple[str, str]] = []
        self.port = self.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def _status(code: int, headers: dict | None = None):
    def behave(h, body):
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return behave


def _silent(h, body):
    time.sleep(30)  # never answers within the client's timeout


_BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()


def _json(h, obj) -> None:
    data = json.dumps(obj).encode()
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


class _Proxy(_Server):
    """Forwards to the real registry; `mangle(data) -> data` changes layer blobs."""

    def __init__(self, upstream: str, mangle=None, truncate=False, auth: str | None = None,
                 redirect_blobs: bool = False):
        self.upstream, self.mangle, self.truncate, self.auth = upstream, mangle, truncate, auth
        self.redirect_blobs = redirect_blobs
        super().__init__(self._forward)

    def _forward(self, h, body):
        path = h.path
        if path.startswith("/storage/"):  # "object storage" on another host name: no credentials
            if h.headers.get("Authorization"):
                return _status(400)(h, b"")
            path = path[len("/storage"):]
        elif self.auth is not None and not self._authorized(h):
            return
        elif self.redirect_blobs and h.command == "GET" and "/blobs/sha256:" in path:
            return _status(307, {"Location": f"http://localhost:{self.port}/storage{path}"})(h, b"")
        req = urllib.request.Request(f"http://{self.upstream}{path}", data=body if h.command in ("POST", "PUT", "PATCH") else None,
                                     method=h.command, headers={k: v for k, v in h.headers.items() if k.lower() != "host"})
        try:
            resp = urllib.request.urlopen(req, timeout=10)
        except urllib.error.HTTPError as e:
            resp = e
        data = resp.read()
        layer = h.command == "GET" and "/blobs/" in h.path and data[:2] == b"\x1f\x8b"
        h.send_response(resp.status if hasattr(resp, "status") else resp.code)
        for k, v in resp.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                if k.lower() == "location":
                    v = v.replace(self.upstream, f"127.0.0.1:{self.port}")
                h.send_header(k, v)
        if layer and self.mangle:
            data = self.mangle(data)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if layer and self.truncate:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if h.command != "HEAD":
            h.wfile.write(data)

    def _authorized(self, h) -> bool:
        """Basic: the credentials themselves; Bearer: a token from /token, given for them."""
        if self.auth == "bearer" and h.path.startswith("/token"):
            if h.headers.get("Authorization") == _BASIC:
                _json(h, {"token": "t0ken"})
            else:
                _status(401)(h, b"")
            return False
        expected = _BASIC if self.auth == "basic" else "Bearer t0ken"
        if h.headers.get("Authorization") == expected:
            return True
        challenge = ('Basic realm="cache"' if self.auth == "basic" else
                     f'Bearer realm="http://127.0.0.1:{self.port}/token",service="cache"')
        _status(401, {"WWW-Authenticate": challenge})(h, b"")
        return False


def _runs_locally_with_one_warning(nb, storage_b, tmp_path, url, expect: str, tree_a=None):
    result, out, tip = _build(storage_b, _copy(nb, tmp_path), cache_from=[url])
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert result.steps_run == len(CELLS) and result.steps_cached == 0
    assert len(warnings) == 1 and expect in warnings[0], warnings
    if tree_a is not None:
        assert _tree(tip) == tree_a
    return warnings[0]


def test_a_registry_that_is_down_costs_one_warning(built_a, storage_b, tmp_path):
    nb, tree_a, _ = built_a
    _runs_locally_with_one_warning(nb, storage_b, tmp_path, f"docker://127.0.0.1:{_free_port()}/team/cache",
                                   "cannot reach", tree_a)


def test_a_registry_that_never_answers_costs_one_bounded_wait(built_a, storage_b, tmp_path, monkeypatch):
    nb, _, _ = built_a
    monkeypatch.setenv("STACKER_KERNEL_CACHE_TIMEOUT", "1")
    with _Server(_silent) as server:
        _runs_locally_with_one_warning(nb, storage_b, tmp_path, f"docker://127.0.0.1:{server.port}/team/cache",
                                       "did not answer within 1s")


@pytest.mark.parametrize("code", [401, 403])
def test_a_registry_that_refuses_access_costs_one_warning(built_a, storage_b, tmp_path, code):
    nb, _, _ = built_a
    headers = {"WWW-Authenticate": 'Basic realm="cache"'} if code == 401 else None
    with _Server(_status(code, headers)) as server:
        _runs_locally_with_one_warning(nb, storage_b, tmp_path, f"docker://127.0.0.1:{server.port}/team/cache",
                                       f"refused access (HTTP {code})")


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_credentials_from_the_auth_file_open_a_registry_that_asks_for_them(
        built_a, registry, storage_b, tmp_path, monkeypatch, scheme):
    nb, _, _ = built_a
    with _Proxy(registry, auth=scheme) as proxy:
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": {f"127.0.0.1:{proxy.port}": {"auth": _BASIC.split()[1]}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
        result, out, _ = _build(storage_b, _copy(nb, tmp_path),
                                cache_from=[f"docker://127.0.0.1:{proxy.port}/team/cache"])
    assert result.steps_run == 0 and "warning" not in out


def test_credentials_do_not_follow_a_redirect_to_another_host(built_a, registry, storage_b, tmp_path, monkeypatch):
    nb, _, _ = built_a
    with _Proxy(registry, auth="basic", redirect_blobs=True) as proxy:
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": {f"127.0.0.1:{proxy.port}": {"auth": _BASIC.split()[1]}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
        result, out, _ = _build(storage_b, _copy(nb, tmp_path),
                                cache_from=[f"docker://127.0.0.1:{proxy.port}/team/cache"])
    assert result.steps_run == 0 and "warning" not in out
    assert any(path.startswith("/storage/") for _, path in proxy.requests)


def test_a_registry_error_costs_one_warning(built_a, storage_b, tmp_path):
    nb, _, _ = built_a
    with _Server(_status(500)) as server:
        _runs_locally_with_one_warning(nb, storage_b, tmp_path, f"docker://127.0.0.1:{server.port}/team/cache",
                                       "HTTP 500")


def test_a_layer_with_the_wrong_digest_is_never_applied(built_a, registry, storage_b, tmp_path):
    nb, tree_a, _ = built_a

    def flip(data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 0xFF])

    with _Proxy(registry, mangle=flip) as proxy:
        _runs_locally_with_one_warning(nb, storage_b, tmp_path, f"docker://127.0.0.1:{proxy.port}/team/cache",
                                       "does not match its digest", tree_a)


def test_a_truncated_layer_is_never_applied(built_a, registry, storage_b, tmp_path):
    nb, tree_a, _ = built_a
    with _Proxy(registry, truncate=True) as proxy:
        _runs_locally_with_one_warning(nb, storage_b, tmp_path, f"docker://127.0.0.1:{proxy.port}/team/cache",
                                       "was cut short", tree_a)


def _tamper_oci_cache(cache: Path, change) -> None:
    """Rewrite the record of the only entry of OCI layout `cache` with `change(record)`."""
    index = json.loads((cache / "index.json").read_text())
    manifest_path = cache / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(manifest_path.read_text())
    config_path = cache / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]
    record = json.loads(config_path.read_text())
    change(record)
    data = json.dumps(record).encode()
    digest = hashlib.sha256(data).hexdigest()
    (cache / "blobs" / "sha256" / digest).write_bytes(data)
    manifest["config"].update(digest=f"sha256:{digest}", size=len(data))
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (cache / "blobs" / "sha256" / digest).write_bytes(data)
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(data))
    (cache / "index.json").write_text(json.dumps(index))


def _set_state(record, exported):
    state = json.loads(record["state"])
    state["exported"] = exported
    record["state"] = json.dumps(state)


@pytest.mark.parametrize("change, why", [
    (lambda r: r.update(state="not json"), "its shell state is not JSON"),
    (lambda r: r.update(duration="abc"), "its duration is not a number"),
    (lambda r: r.update(duration=[1]), "its duration is not a number"),
    (lambda r: r.update(log=[1]), "its log is not text"),
    (lambda r: r.update(snapshot=7), "its snapshot id"),
    (lambda r: _set_state(r, {"GREETING": 1}), "its shell state's exported are not all strings"),
    (lambda r: _set_state(r, ["x"]), "its shell state's exported are not all strings"),
])
def test_an_entry_with_a_broken_record_is_a_miss(busybox_oci, storage, storage_b, tmp_path, change, why):
    """Issue 23 point 9: any malformed field is one warning and a local run, and the
    step's later builds (without --cache-from) run too."""
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, ["mkdir -p /app && cd /app\nexport GREETING=hello", CELLS[3]])
    cache = tmp_path / "cache"
    _build(storage, nb, cache_to=f"oci:{cache}")
    _tamper_oci_cache(cache, change)
    mine = _copy(nb, tmp_path)
    result, out, _ = _build(storage_b, mine, cache_from=[f"oci:{cache}"])
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert result.steps_run >= 1 and len(warnings) == 1, warnings
    assert "malformed" in warnings[0] and why in warnings[0] and "Traceback" not in out
    again, out, tip = _build(storage_b, mine)
    assert again.steps_run == 0 and in_tree(Path(tip), "app/greeting").read_text() == "hello\n"


def test_a_bad_entry_committed_before_is_a_miss_then_replaced(busybox_oci, storage_b, tmp_path):
    """An entry an older version committed from a bad record (an exported variable that
    is not a string) does not crash later builds: it is a miss, the step runs, and the
    new snapshot is the entry."""
    import sqlite3

    from stacker_kernel.storage.store import DB_NAME

    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, ["mkdir -p /app && cd /app\nexport GREETING=hello", CELLS[3]])
    _build(storage_b, nb)
    with Store.open(storage_b) as store:
        snap = next(s for s in store.snapshots() if s.kind == "step" and "GREETING" in s.state)
    state = json.loads(snap.state)
    state["exported"]["GREETING"] = 1
    db = sqlite3.connect(storage_b / DB_NAME)
    with db:
        db.execute("UPDATE snapshots SET state = ?, duration = 'abc' WHERE id = ?", (json.dumps(state), snap.id))
    db.close()
    result, out, tip = _build(storage_b, nb)
    assert result.steps_run == 2 and "Traceback" not in out
    assert in_tree(Path(tip), "app/greeting").read_text() == "hello\n"
    again, _, _ = _build(storage_b, nb)
    assert again.steps_run == 0


def test_steps_are_pushed_on_their_own_thread_while_the_next_steps_run_and_all_before_the_end(
        busybox_oci, storage, storage_b, tmp_path, monkeypatch):
    from stacker_kernel.engine import remote_cache

    started = threading.Event()
    release = threading.Event()
    threads = []
    real = remote_cache._LayerMaker.make
    real_init = remote_cache._LayerMaker.__init__
    makers = []

    def held_first(self, parent, new, out_dir):  # the first push waits until a later step has run
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            started.set()
            assert release.wait(120)
        return real(self, parent, new, out_dir)

    def counted(self):
        makers.append(self)
        real_init(self)
    monkeypatch.setattr(remote_cache._LayerMaker, "make", held_first)
    monkeypatch.setattr(remote_cache._LayerMaker, "__init__", counted)
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS)
    cache = tmp_path / "cache"
    out: list[str] = []

    def stream(text: str) -> None:
        out.append(text)
        if started.is_set() and not release.is_set() and "step 3/" in text:
            release.set()  # step 3 finished while step 1 was still being pushed
    from stacker_kernel.oci import export as export_mod
    made = []
    real_made = export_mod._made_in_userns
    monkeypatch.setattr(export_mod, "_made_in_userns", lambda jobs, *a: made.extend(jobs) or real_made(jobs, *a))
    with Store.open(storage) as store:
        result = build(store, str(nb), out=stream, stream=out.append, cache=CacheSettings(cache_to=f"oci:{cache}"),
                       oci_dir=str(tmp_path / "oci"))
    text = "\n".join(out)
    # The export took the layers the pushes made (none was diffed and compressed again),
    # and the step that changed nothing is still no layer of the image.
    assert made == [] and "wrote nb to" in text, (made, text)
    layout = tmp_path / "oci"
    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: json.loads((layout / "blobs" / "sha256" / d["digest"].split(":")[1]).read_text())  # noqa: E731
    image = blob(index["manifests"][0])
    steps = [h for h in blob(image["config"])["history"] if "step" in h.get("created_by", "")]
    empty = [h["created_by"] for h in steps if h.get("empty_layer")]
    assert len(steps) == len(CELLS) and len(empty) == 1 and "step 3 " in empty[0], steps
    for d in image["layers"][-(len(CELLS) - 1):]:  # each step's layer whole, as its digest says
        data = (layout / "blobs" / "sha256" / d["digest"].split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]
    assert release.is_set(), text
    assert result.steps_run == len(CELLS) and "warning" not in text
    assert threads and all(name.startswith("cache-push") for name in threads)
    # one interpreter made every step's layer (not one per step), and it ended with the build
    assert len(makers) == 1 and len(threads) == len(CELLS) and makers[0]._proc.poll() == 0
    assert any(line.startswith(f"cache-to oci:{cache}: {len(CELLS)} entries pushed (")
               for line in text.splitlines()), text
    result, out_b, _ = _build(storage_b, _copy(nb, tmp_path), cache_from=[f"oci:{cache}"])
    assert result.steps_run == 0 and result.steps_cached == len(CELLS), out_b


def _layer_digests(layout: Path, manifest: dict) -> list[str]:
    blob = json.loads((layout / "blobs" / "sha256" / manifest["digest"].split(":")[1]).read_text())
    return [d["digest"] for d in blob["layers"]]


def test_the_export_runs_beside_the_last_uploads_and_takes_the_layers_they_push(
        busybox_oci, storage, storage_b, tmp_path, monkeypatch):
    from stacker_kernel.oci import registry as reg

    wrote = threading.Event()
    held: list[bool] = []
    real_put = reg.LayoutCache.put

    def held_put(self, *args):  # the first upload waits until the export has written the image
        if not held:
            held.append(wrote.wait(60))
        return real_put(self, *args)
    monkeypatch.setattr(reg.LayoutCache, "put", held_put)
    out: list[str] = []

    def say(line: str) -> None:
        out.append(line)
        if line.startswith("wrote "):
            wrote.set()
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS)
    cache, layout = tmp_path / "cache", tmp_path / "oci"
    with Store.open(storage) as store:
        result = build(store, str(nb), out=say, stream=out.append, cache=CacheSettings(cache_to=f"oci:{cache}"),
                       oci_dir=str(layout))
    text = "\n".join(out)
    assert held == [True], text  # released by the export's end: the upload was still going then
    assert result.steps_run == len(CELLS) and "warning" not in text, text
    lines = text.splitlines()
    summary = [i for i, ln in enumerate(lines) if ln.startswith(f"cache-to oci:{cache}: {len(CELLS)} entries pushed")]
    assert len(summary) == 1 and summary[0] > next(i for i, ln in enumerate(lines) if ln.startswith("wrote ")), text
    # The image's step layers are the pushed entries' layers, byte for byte (the step that
    # changed nothing is an entry, with an empty layer, but no layer of the image).
    pushed = {d for m in json.loads((cache / "index.json").read_text())["manifests"]
              for d in _layer_digests(cache, m)}
    image = _layer_digests(layout, json.loads((layout / "index.json").read_text())["manifests"][0])
    assert len(pushed) == len(CELLS) and set(image[-(len(CELLS) - 1):]) <= pushed, (pushed, image)
    for d in image:
        data = (layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d
    result, out_b, _ = _build(storage_b, _copy(nb, tmp_path), cache_from=[f"oci:{cache}"])
    assert result.steps_run == 0 and result.steps_cached == len(CELLS), out_b


class _FailsAfter(_Proxy):
    """Forwards to the registry until `entries` entries were stored, then answers
    HTTP 500 to every request: a registry that fails in the middle of a build."""

    def __init__(self, upstream: str, entries: int):
        self.entries, self.stored = entries, 0
        super().__init__(upstream)

    def _forward(self, h, body):
        if self.stored >= self.entries:
            return _status(500)(h, b"")
        if h.command == "PUT" and "/manifests/" in h.path:
            self.stored += 1
        return super()._forward(h, body)


def test_a_registry_failing_mid_build_is_one_warning_and_the_build_ends_with_its_image(
        registry, busybox_oci, storage, tmp_path):
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS)
    layout = tmp_path / "oci"
    with _FailsAfter(registry, 1) as proxy:
        out: list[str] = []
        with Store.open(storage) as store:
            result = build(store, str(nb), out=out.append, stream=out.append, oci_dir=str(layout),
                           cache=CacheSettings(cache_to=f"docker://127.0.0.1:{proxy.port}/team/midway"))
            leftovers = list((store.root / "cache" / "remote").glob("tmp-*"))
    text = "".join(o if o.endswith("\n") else o + "\n" for o in out)
    assert result.steps_run == len(CELLS), text
    warnings = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "could not be pushed" in warnings[0] and "HTTP 500" in warnings[0], warnings
    assert "1 entry pushed" in text and "pushing stopped at an error" in text, text
    assert "wrote nb to" in text and leftovers == [], (text, leftovers)
    image = _layer_digests(layout, json.loads((layout / "index.json").read_text())["manifests"][0])
    for d in image:  # every layer of the image is there, whole
        data = (layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d


def _chain_layers(pairs: list[tuple[str, str]], out_dir: str, shared: bool):
    """In the user namespace: the layers of a chain of steps made as the layer maker
    makes them (one `walks` for the chain, or none) and the trees walked."""
    from stacker_kernel.engine.layer_maker import make_layer
    from stacker_kernel.oci import diff

    walked: list[str] = []
    real = diff.walk
    diff.walk = lambda root: walked.append(root) or real(root)
    walks: dict = {}
    blobs = [make_layer(old, new, out_dir, walks if shared else {}, False) for old, new in pairs]
    return [(b.digest, b.diff_id) for b in blobs], walked, sorted(walks)


def test_the_layer_maker_walks_each_snapshot_of_a_chain_once_for_the_same_layers(busybox_oci, storage, tmp_path):
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS)
    result, _, _ = _build(storage, nb)
    assert result.steps_run == len(CELLS)
    with Store.open(storage) as store:
        steps = sorted((s for s in store.snapshots() if s.kind == "step"), key=lambda s: s.started)
        pairs = [(str(store.get(s.parent).path), str(s.path)) for s in steps]
    overlay = driver.recorded(storage) == "overlay"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shared, walked, kept = run_in_userns(_chain_layers, pairs, str(tmp_path / "a"), True, views=overlay)
    alone, walked_alone, _ = run_in_userns(_chain_layers, pairs, str(tmp_path / "b"), False, views=overlay)
    assert shared == alone  # the same blobs and diff ids
    if overlay:  # a step's own layer is read: no tree is walked
        assert walked == walked_alone == []
    else:
        assert sorted(walked) == sorted({p for pair in pairs for p in pair}) and len(walked_alone) == 2 * len(pairs)
        assert kept == [pairs[-1][1]]  # only the walk the next step may share stays


def test_the_layer_maker_walks_again_a_tree_made_anew_at_a_path_it_walked(tmp_path):
    # (a cache hit keeps the snapshot id it had where it was built: a path can come back)
    from stacker_kernel.engine.layer_maker import make_layer

    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    (b / "f").write_text("one")
    (c / "f").write_text("one")
    (c / "g").write_text("two")
    walks: dict = {}
    make_layer(str(a), str(b), str(tmp_path / "lent"), walks, False)
    shutil.rmtree(b)
    b.mkdir()  # another tree at b's path, with a file c has not: c's layer removes it
    (b / "f").write_text("one")
    (b / "h").write_text("three")
    lent = make_layer(str(b), str(c), str(tmp_path / "lent"), walks, False)
    fresh = make_layer(str(b), str(c), str(tmp_path / "fresh"), {}, False)
    assert lent == fresh


def test_a_registry_that_is_down_for_pushing_costs_one_warning(busybox_oci, storage, tmp_path):
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS[:2])
    result, out, _ = _build(storage, nb, cache_to=f"docker://127.0.0.1:{_free_port()}/team/cache")
    assert result.steps_run == 2
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "could not be pushed" in warnings[0], warnings


# --- two real users: sktest pushes, sktest2 (empty storage) pulls --------------------------

_DRIVER = """
import json, sys
from stacker_kernel.engine.build import build, layer_snapshot
from stacker_kernel.engine.remote_cache import CacheSettings
from stacker_kernel.storage.store import Store
root, nb, direction, url = sys.argv[1:]
cache = CacheSettings(cache_to=url) if direction == "to" else CacheSettings(cache_from=[url])
out = []
with Store.open(root) as store:
    r = build(store, nb, out=out.append, stream=out.append, cache=cache)
    tip = str(layer_snapshot(store, nb, None).path)
print(json.dumps({"ran": r.steps_run, "cached": r.steps_cached, "tip": tip, "out": "".join(out)}))
"""


def _as_user(user: str, nb: Path, direction: str, url: str) -> dict:
    storage = subprocess.run([sys.executable, "-m", "stacker_kernel", "storage-path", "--user", user],
                             capture_output=True, text=True, check=True).stdout.strip()
    root = f"{storage}/t-{uuid.uuid4().hex}"
    env = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME={pwd.getpwnam(user).pw_dir}",
           f"USER={user}", "LANG=C.UTF-8", f"PYTHONPATH={REPO}"]
    subprocess.run(["runuser", "-u", user, "--", "mkdir", root], check=True)
    res = subprocess.run(["runuser", "-u", user, "--", *env, sys.executable, "-c", _DRIVER, root, str(nb),
                          direction, url], capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    result["tree"] = _container_tree(result["tip"], user)
    btrfs.remove_tree(Path(root))
    return result


def _container_tree(rootfs: str, user: str) -> list[tuple]:
    """The listing of a user's rootfs with owners as the container sees them."""
    from stacker_kernel.container.userns import _subordinate_start

    uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
    sub_u, sub_g = _subordinate_start("/etc/subuid", user, uid), _subordinate_start("/etc/subgid", user, uid)
    return [(p, m, 0 if u == uid else u - sub_u, 0 if g == gid else g - sub_g, w)
            for p, m, u, g, w in _listing(rootfs)]


@pytest.fixture
def shared_dir():
    """A directory both test users can read (pytest's tmp dirs are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="sk-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.rootful
def test_two_users_share_steps_through_the_registry(registry, busybox_tar, shared_dir):
    shared = shared_dir
    shutil.copyfile(busybox_tar, shared / "busybox.tar")
    nb = _notebook(shared / "nb.ipynb", "", CELLS)
    nb.write_text(nb.read_text().replace("%from oci ", "%from tar busybox.tar"))
    for f in shared.iterdir():
        f.chmod(0o644)
    url = f"docker://{registry}/team/shared"
    a = _as_user("sktest", nb, "to", url)
    b = _as_user("sktest2", nb, "from", url)
    assert (a["ran"], b["ran"], b["cached"]) == (len(CELLS), 0, len(CELLS)), b["out"]
    assert b["tree"] == a["tree"]
    assert ("app/two", 0o100644, 1, 2) in [t[:4] for t in b["tree"]]


# --- units: naming, credentials, settings --------------------------------------------------

def test_cache_tags_are_valid_registry_tags():
    tag = cache_tag("sha256:" + "ab" * 32)
    assert tag.startswith("sk-cache-") and len(tag) <= 128 and tag.replace("-", "").isalnum()
    assert tag != cache_tag("sha256:" + "ab" * 31 + "ac")


def test_credentials_come_from_the_auth_file(tmp_path, monkeypatch):
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {
        "reg.example:5000": {"auth": base64.b64encode(b"alice:s3cret").decode()},
        "reg.example:5000/team/cache": {"auth": base64.b64encode(b"bob:pw").decode()}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_for("reg.example:5000", "other") == ("alice", "s3cret")
    assert auth_for("reg.example:5000", "team/cache") == ("bob", "pw")
    assert auth_for("elsewhere", "x") is None
    with pytest.raises(ImageError, match="does not exist"):
        auth_for("reg.example:5000", "x", authfile=str(tmp_path / "missing.json"))


def test_cache_magic_parses_sources_and_targets():
    assert parse_magic("%cache off").args is False
    assert parse_magic("%cache to docker://localhost:5000/c").args == CacheSource("to", ["docker://localhost:5000/c"])
    assert parse_magic("%cache from oci:/srv/c docker://h/c").args == CacheSource("from", ["oci:/srv/c", "docker://h/c"])


def test_the_config_file_sets_cache_defaults(tmp_path):
    conf = tmp_path / ".config" / "stacker-kernel" / "config.json"
    conf.parent.mkdir(parents=True)
    conf.write_text(json.dumps({"storage": "/x", "cache_from": "docker://h/c", "cache_to": "oci:/srv/c"}))
    assert configured(tmp_path) == CacheSettings(["docker://h/c"], "oci:/srv/c")


def test_a_malformed_cache_url_is_a_clear_error(storage, busybox_oci, tmp_path):
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS[:1])
    with Store.open(storage) as store, pytest.raises(ImageError, match="docker://HOST"):
        build(store, str(nb), out=lambda s: None, stream=lambda s: None,
              cache=CacheSettings(cache_from=["http://h/c"]))


# --- the kernel: %cache to / from, and the config file's defaults ----------------------------

def _kernel_cells(k, cells: list[str]) -> list:
    runs = [k.execute(BASE, "base", timeout=120)]
    runs += [k.execute(src, f"c{i}", timeout=120) for i, src in enumerate(cells)]
    assert all(r.status == "ok" for r in runs), [r.error for r in runs]
    return runs[1:]


def test_a_kernel_pushes_with_cache_to_and_another_hits_with_the_config_default(
        kernels, busybox_tar, storage, storage_b, tmp_path):
    cache = f"oci:{tmp_path / 'cache'}"
    a = start_kernel(notebook_dir(tmp_path / "a", busybox_tar) / "nb.ipynb", kernels,
                     STACKER_KERNEL_STORAGE=str(storage))
    try:
        assert a.execute(f"%cache to {cache}").text() == f"steps are pushed to {cache}"
        _kernel_cells(a, CELLS[:2])
    finally:
        a.close()
    home = tmp_path / "home"
    (home / ".config" / "stacker-kernel").mkdir(parents=True)
    (home / ".config" / "stacker-kernel" / "config.json").write_text(json.dumps({"cache_from": [cache]}))
    b = start_kernel(notebook_dir(tmp_path / "b", busybox_tar) / "nb.ipynb", kernels,
                     STACKER_KERNEL_STORAGE=str(storage_b), HOME=str(home))
    try:
        runs = _kernel_cells(b, CELLS[:2])
        assert b.execute("%cache from none").text() == "steps are taken from none"
    finally:
        b.close()
    assert all(r.cached and f"[cache hit from {cache}]" in r.text() for r in runs)
    assert "made one" in runs[0].text()


def _layer_makers(storage: Path) -> list[int]:
    """Pids of the pushing thread's layer makers (engine/remote_cache.py _LayerMaker) running
    now for storage `storage` (another build on the machine has makers of its own)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"answers = os.fdopen(os.dup(1)" not in cmdline:  # its program (_MAKER), nothing older
                continue
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"STACKER_KERNEL_STORAGE={storage}".encode() in environ:
            found.append(int(pid))
    return found


def test_a_kernel_whose_cache_target_changes_ends_the_old_layer_maker(kernels, busybox_tar, storage, tmp_path):
    before = set(_layer_makers(storage))
    k = start_kernel(notebook_dir(tmp_path / "a", busybox_tar) / "nb.ipynb", kernels,
                     STACKER_KERNEL_STORAGE=str(storage))
    try:
        assert k.execute(f"%cache to oci:{tmp_path / 'one'}", "to1", timeout=120).status == "ok"
        _kernel_cells(k, CELLS[:1])
        first = set(_layer_makers(storage)) - before
        assert len(first) == 1  # one maker for the session's pushes, kept between cells
        assert k.execute(f"%cache to oci:{tmp_path / 'two'}", "to2", timeout=120).status == "ok"
        assert not first & set(_layer_makers(storage))  # the old target's maker has ended
        run = k.execute(CELLS[1], "c9", timeout=120)
        assert run.status == "ok" and "warning" not in run.text(), run.text()
        assert len(set(_layer_makers(storage)) - before) == 1
    finally:
        k.close()
    assert any((tmp_path / "two").iterdir()) and any((tmp_path / "one").iterdir())


def _registry_entries(registry: str, repo: str) -> list[bytes]:
    """The manifest and config bytes of every entry under docker://REGISTRY/REPO."""
    def get(path: str, accept: str = "") -> bytes:
        req = urllib.request.Request(f"http://{registry}/v2/{repo}/{path}", headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    out = []
    for tag in json.loads(get("tags/list"))["tags"]:
        manifest = get(f"manifests/{tag}", "application/vnd.oci.image.manifest.v1+json")
        out += [manifest, get(f"blobs/{json.loads(manifest)['config']['digest']}")]
    return out


def test_build_env_values_stay_out_of_pushed_entries_and_image_annotations(registry, busybox_oci, storage,
                                                                         storage_b, tmp_path):
    """Issue 23 point 3: a build_env value is in no pushed cache record (state, log) and
    not in the image's stacker.yaml annotation nor its provenance; the entries still hit,
    with the value back in the shell state from the consumer's own build_env."""
    token = f"s3cr3t-{uuid.uuid4().hex}"
    repo = f"team/secrets-{uuid.uuid4().hex[:8]}"
    cells = [f"%build_env API_TOKEN={token}",
             'export COPY="$API_TOKEN"; echo "using $API_TOKEN"; echo done > /done',
             "echo ok > /ok"]
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, cells)
    oci = tmp_path / "oci"
    out: list[str] = []
    with Store.open(storage) as store:
        build(store, str(nb), out=out.append, stream=out.append, oci_dir=str(oci),
              cache=CacheSettings(cache_to=f"docker://{registry}/{repo}"))
    assert any(f"using {token}" in o for o in out)  # the step really saw it
    entries = _registry_entries(registry, repo)
    assert len(entries) == 4 and all(token.encode() not in e for e in entries)
    records = [json.loads(e) for e in entries[1::2]]
    assert any(r.get("env_refs", {}).get("exported", {}).get("COPY") == "API_TOKEN" for r in records)
    assert any("using [build_env API_TOKEN]" in r["log"] for r in records)
    # The image: no file of the layout holds it (annotation, provenance, SBOM), the annotation names it.
    for f in oci.rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f
    index = json.loads((oci / "index.json").read_text())
    manifest = json.loads((oci / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    assert "API_TOKEN: ${{API_TOKEN}}" in manifest["annotations"]["io.stackeroci.stacker.stacker_yaml"]
    # B hits both steps, and a step of B's own after them sees the state with the value.
    mine = _copy(nb, tmp_path)
    book = nbformat.read(mine, as_version=4)
    book.cells.append(nbformat.v4.new_code_cell(f'test "$COPY" = "{token}"', id="check"))
    nbformat.write(book, mine)
    result, out_b, _ = _build(storage_b, mine, cache_from=[f"docker://{registry}/{repo}"])
    assert result.steps_cached == 2 and result.steps_run == 1 and "warning" not in out_b, out_b


def test_a_pull_killed_leaves_no_temporary_folder_once_the_store_opens(busybox_oci, storage, tmp_path):
    """Issue 23 point 10: kill -9 while a cache pull waits on the registry; opening the
    store again (and gc) deletes its cache/remote/tmp-* folder."""
    import signal

    root = storage
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS[:1])
    tool = str(Path(sys.executable).parent / "stacker-kernel")
    with _Server(_silent) as server:
        child = subprocess.Popen([tool, "--storage", str(root), "build", "-f", str(nb), "--no-oci",
                                  "--cache-from", f"docker://127.0.0.1:{server.port}/team/cache"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        remote = root / "cache" / "remote"
        deadline = time.monotonic() + 120
        while not (remote.is_dir() and any(remote.iterdir())) and time.monotonic() < deadline:
            assert child.poll() is None
            time.sleep(0.05)
        tmp = list(remote.iterdir())
        assert [p.name.startswith("tmp-") for p in tmp] == [True]
        (tmp[0] / "partial-blob").write_bytes(b"x" * (1 << 20))  # what a download left
        child.send_signal(signal.SIGKILL)
        child.wait()
    legacy = remote / "tmp-abc123"  # a folder of a version that did not name its owner
    legacy.mkdir()
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    young = remote / "tmp-def456"
    young.mkdir()
    with Store.open(root) as store:
        assert list(remote.iterdir()) == [young]  # an owner of unknown age may still be running
        dead = remote / "tmp-999999999-1-x"  # a pull killed while this store is open
        dead.mkdir()
        store.gc()
        assert list(remote.iterdir()) == [young]


def test_a_step_whose_layer_cannot_be_made_is_one_warning_naming_the_path(busybox_oci, storage, tmp_path):
    # the layer maker (one interpreter for the build) answers with the reason, in one line
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, ["touch /.wh.odd", "echo after > /after"])
    result, out, _ = _build(storage, nb, cache_to=f"oci:{tmp_path / 'cache'}")
    assert result.steps_run == 2
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "could not be pushed" in warnings[0], warnings
    assert "/.wh.odd cannot go into an OCI layer" in warnings[0] and "Traceback" not in out, warnings
