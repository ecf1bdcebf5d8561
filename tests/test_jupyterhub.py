"""The team JupyterHub of deploy/jupyterhub, for real: two users, two notebooks, no peeking.

The test starts the real JupyterHub (PyPI) with configurable-http-proxy (npm)
as root, from deploy/jupyterhub/jupyterhub_config.py unchanged but for its
addresses, its state directory and an admin API token for the test (PAM stays
the authenticator: users are created and started through the REST API, not by
password). For sktest and sktest2 (system users with subuid ranges,
scripts/setup-host.sh) it starts their single-user servers through the hub,
which runs the pre-spawn hook (`stacker-kernel setup-storage`), then opens a
`stacker` kernel in each through the hub's proxy with the user's own token and
builds a busybox layer over the kernel websocket. Then it checks that sktest2
can neither reach sktest's server, nor list, read or grab sktest's storage.
A throwaway user logs in with their password through the login form: refused
outside the group stacker-users, admitted in it, with storage on first start.

Prerequisite: deploy/jupyterhub/install.sh (setup-host.sh runs it), which
puts jupyterhub, configurable-http-proxy and the system-wide kernel spec here.
"""
from __future__ import annotations

import http.cookiejar
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import websocket

from net_support import api_request, execute_over_websocket, free_port as _free_port

pytestmark = pytest.mark.rootful

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "deploy" / "jupyterhub" / "jupyterhub_config.py"
OWNER, OTHER = "sktest", "sktest2"
CELL_TIMEOUT = 180


def _as_user(user: str, *argv: str) -> subprocess.CompletedProcess:
    """Run `argv` as `user` with a login-like environment (no root's variables)."""
    home = os.path.expanduser(f"~{user}")
    env = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME={home}", f"USER={user}",
           "LANG=C.UTF-8", f"PYTHONPATH={REPO}"]
    return subprocess.run(["runuser", "-u", user, "--", *env, *argv],
                          capture_output=True, text=True, timeout=120)


def _storage_of(user: str) -> Path:
    out = subprocess.run([sys.executable, "-m", "stacker_kernel", "storage-path", "--user", user],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip())


class Hub:
    """JupyterHub with its proxy on 127.0.0.1, from the shipped config; `stop()` ends both and the servers."""

    def __init__(self, state: Path) -> None:
        self.port, self.token = _free_port(), uuid.uuid4().hex
        config = state / "test_config.py"
        config.write_text(f"""
load_subconfig({str(CONFIG)!r})
c.JupyterHub.bind_url = "http://127.0.0.1:{self.port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {_free_port()}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{_free_port()}"
c.JupyterHub.services = [{{"name": "stacker-test", "api_token": {self.token!r}}}]
c.JupyterHub.load_roles = [{{"name": "stacker-test", "services": ["stacker-test"],
                            "scopes": ["admin:users", "admin:servers", "tokens"]}}]
""")
        # PYTHONPATH reaches the servers and kernels (JupyterHub keeps it), so they run this checkout.
        env = dict(os.environ, STACKER_KERNEL_HUB_STATE=str(state), PYTHONPATH=str(REPO))
        env.pop("STACKER_KERNEL_STORAGE", None)
        self.log_path = state / "jupyterhub.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(config)],
                                     cwd=state, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/hub/api/", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"JupyterHub did not start:\n{self.log_text()}") from None
                time.sleep(0.3)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def api(self, method: str, path: str, token: str | None = None, body: dict | None = None):
        """(status, decoded JSON or None) of a request through the proxy."""
        return api_request(f"{self.url}{path}", token or self.token, method, body)

    def request_server(self, user: str) -> None:
        status, _ = self.api("POST", f"/hub/api/users/{user}/server")
        assert status in (201, 202), f"starting {user}'s server: HTTP {status}\n{self.log_text()}"

    def wait_server(self, user: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            _, model = self.api("GET", f"/hub/api/users/{user}")
            server = (model or {}).get("servers", {}).get("")
            if server and server.get("ready"):
                return
            assert time.monotonic() < deadline, f"{user}'s server did not start:\n{self.log_text()}"
            time.sleep(0.5)

    def stop_server(self, user: str, timeout: float = 60) -> None:
        """Stop `user`'s server through the API and wait until it is gone."""
        self.api("DELETE", f"/hub/api/users/{user}/server")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, model = self.api("GET", f"/hub/api/users/{user}")
            if status != 200 or not model.get("servers"):
                return
            time.sleep(0.5)

    def stop(self) -> None:
        # SIGTERM: the hub stops the single-user servers and the proxy it started.
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


class RemoteKernel:
    """A kernel session on a user's server, reached through the hub's proxy with that user's token."""

    def __init__(self, hub: Hub, user: str, token: str, notebook: str) -> None:
        self.hub, self.user, self.token = hub, user, token
        status, model = hub.api("POST", f"/user/{user}/api/sessions", token,
                                {"path": notebook, "type": "notebook", "name": notebook,
                                 "kernel": {"name": "stacker"}})
        assert status == 201, f"creating a stacker kernel session for {user}: HTTP {status}\n{hub.log_text()}"
        self.session_id, self.kernel_id = model["id"], model["kernel"]["id"]
        self.client_session = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{hub.port}/user/{user}/api/kernels/{self.kernel_id}/channels"
            f"?session_id={self.client_session}",
            header=[f"Authorization: token {token}"], timeout=CELL_TIMEOUT)

    def execute(self, code: str) -> tuple[str, str, str]:
        """Run one cell; returns (status, the text it showed, the error text)."""
        return execute_over_websocket(self.ws, self.client_session, self.user, code)

    def close(self) -> None:
        self.ws.close()
        self.hub.api("DELETE", f"/user/{self.user}/api/sessions/{self.session_id}", self.token)


@pytest.fixture(scope="module")
def shared_dir():
    """A directory both users can read, holding the busybox base."""
    path = Path(tempfile.mkdtemp(prefix="stacker-hub-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, shared_dir, busybox_tar):
    assert shutil.which("configurable-http-proxy"), "configurable-http-proxy is missing: run deploy/jupyterhub/install.sh"
    shutil.copyfile(busybox_tar, shared_dir / "busybox.tar")
    (shared_dir / "busybox.tar").chmod(0o644)
    h = Hub(tmp_path_factory.mktemp("hub"))
    yield h
    h.stop()


@pytest.fixture(scope="module")
def users(hub):
    """Each user's API token, with their server started through the hub."""
    status, _ = hub.api("POST", "/hub/api/users", body={"usernames": [OWNER, OTHER]})
    assert status == 201, f"creating hub users: HTTP {status}\n{hub.log_text()}"
    tokens = {}
    for user in (OWNER, OTHER):
        status, model = hub.api("POST", f"/hub/api/users/{user}/tokens",
                                body={"note": "stacker-kernel test", "expires_in": 3600})
        assert status == 201, f"token for {user}: HTTP {status}"
        tokens[user] = model["token"]
        hub.request_server(user)
    for user in (OWNER, OTHER):
        hub.wait_server(user)
    return tokens


def _build_cell(shared_dir: Path, user: str) -> str:
    return (f"%layer hubtest\n%from tar {shared_dir}/busybox.tar\n"
            f"echo 'built by {user}' > /owner.txt\ncat /owner.txt\n")


@pytest.fixture(scope="module")
def kernels(hub, users, shared_dir):
    """A stacker kernel per user on their own server, each having built the busybox layer."""
    opened = {}
    try:
        for user in (OWNER, OTHER):
            opened[user] = RemoteKernel(hub, user, users[user], f"hub-test-{uuid.uuid4().hex[:8]}.ipynb")
            status, text, error = opened[user].execute(_build_cell(shared_dir, user))
            assert status == "ok", f"{user}'s build cell failed: {error}\n{text}"
            assert f"built by {user}" in text
        yield opened
    finally:
        for k in opened.values():
            k.close()


@pytest.fixture
def newcomer(hub):
    """(name, password) of a new system user not yet in stacker-users; removed with their storage afterwards."""
    name, password = f"skhub{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    subprocess.run(["useradd", "--create-home", "-K", "HOME_MODE=0700", "--shell", "/bin/bash", name], check=True)
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        yield name, password
    finally:
        hub.stop_server(name)
        subprocess.run([sys.executable, "-m", "stacker_kernel", "setup-storage", "--user", name, "--teardown"],
                       capture_output=True)
        subprocess.run(["userdel", "--remove", name], capture_output=True)


def _login(hub: Hub, name: str, password: str) -> int:
    """HTTP status of logging in through the hub's login form (redirects followed: a login starts the server)."""
    jar = http.cookiejar.CookieJar()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with browser.open(f"{hub.url}/hub/login", timeout=30) as resp:
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', resp.read().decode()).group(1)
    form = urllib.parse.urlencode({"_xsrf": xsrf, "username": name, "password": password}).encode()
    try:
        with browser.open(f"{hub.url}/hub/login", data=form, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_team_member_logs_in_with_their_password_and_gets_storage_on_first_start(hub, newcomer):
    name, password = newcomer
    assert _login(hub, name, password) == 403, "a user outside stacker-users logged in"
    subprocess.run(["usermod", "-aG", "stacker-users", name], check=True)
    assert _login(hub, name, "not-" + password) == 403
    assert _login(hub, name, password) == 200
    hub.wait_server(name)
    storage = _storage_of(name)
    st = storage.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam(name).pw_uid, 0o700)


def test_spawn_hook_set_up_each_users_own_storage(hub, users):
    for user in (OWNER, OTHER):
        storage = _storage_of(user)
        st = storage.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (int(_as_user(user, "id", "-u").stdout), 0o700)
        assert f"stacker-kernel storage for {user}: {storage}" in hub.log_path.read_text()


def test_system_wide_kernel_spec_is_readable_by_every_user(hub, users):
    for user in (OWNER, OTHER):
        status, model = hub.api("GET", f"/user/{user}/api/kernelspecs", users[user])
        assert status == 200 and "stacker" in model["kernelspecs"], f"{user} sees no stacker kernel spec"


def test_each_user_builds_a_layer_in_their_own_storage_through_the_hub(kernels):
    for user in (OWNER, OTHER):
        listing = _as_user(user, "stacker-kernel", "layers")
        assert listing.returncode == 0, listing.stderr
        assert "layer hubtest" in listing.stdout
        assert f"echo 'built by {user}' > /owner.txt" in listing.stdout


def test_a_user_cannot_reach_another_users_server(hub, users):
    status, _ = hub.api("GET", f"/user/{OWNER}/api/sessions", users[OTHER])
    assert status == 403
    status, _ = hub.api("GET", f"/user/{OWNER}/api/contents", users[OTHER])
    assert status == 403


def test_a_user_cannot_list_another_users_layers(kernels):
    result = _as_user(OTHER, "stacker-kernel", "--storage", str(_storage_of(OWNER)), "layers")
    assert result.returncode != 0
    assert "permission" in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "built by" not in result.stdout


def test_a_user_cannot_list_another_users_storage_directory(kernels):
    result = _as_user(OTHER, "ls", "-R", str(_storage_of(OWNER)))
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert "snapshots" not in result.stdout


def test_a_users_notebook_cannot_grab_another_users_storage(kernels):
    # %grab reads the notebook's own snapshot: the owner's host path is not in it.
    owner_storage = _storage_of(OWNER)
    status, text, error = kernels[OTHER].execute(f"%grab {owner_storage}/snapshots stolen")
    assert status == "error", text
    assert "does not exist in the rootfs" in error, error
    stolen = Path(os.path.expanduser(f"~{OTHER}")) / "stolen"
    assert not stolen.exists()


def test_a_users_build_cannot_read_another_users_storage_through_a_bind(kernels):
    # The bind itself may be made, but the user's namespace maps none of the owner's ids.
    owner_storage = _storage_of(OWNER)
    status, text, error = kernels[OTHER].execute(
        f"%layer peek\n%from built hubtest\n%binds {owner_storage} -> /peek\nls /peek/snapshots")
    assert status == "error", text
    assert "Permission denied" in text + error, text + error
    assert "built by" not in text
