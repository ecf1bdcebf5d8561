"""Registry credentials where skopeo and podman keep them, never on a command line.

A password on argv (`--dest-creds user:pw`) is readable by every local user in
`ps`; the containers auth file is private to its owner. The lookup order is
the one of containers/image (pkg/docker/config), which skopeo, podman and
buildah share: `--authfile` alone when given; otherwise `REGISTRY_AUTH_FILE`
(or `${XDG_RUNTIME_DIR}/containers/auth.json`, or
`${XDG_CONFIG_HOME:-~/.config}/containers/auth.json`), then
`${XDG_CONFIG_HOME:-~/.config}/containers/auth.json`, then docker's
`${DOCKER_CONFIG:-~/.docker}/config.json`. The first file with an entry for
the repository wins; entries are looked up most specific first
(`host/ns/repo`, `host/ns`, `host`). Credential helpers (`credHelpers`,
`credsStore`) are not run here: skopeo runs them itself.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from stacker_kernel.errors import ImageError


@dataclass(frozen=True)
class RegistryCredentials:
    """A user name and password for a registry, and the auth file they came from."""
    username: str
    password: str
    source: Path

    def __repr__(self) -> str:  # never print the password in a traceback or log
        return f"RegistryCredentials(username={self.username!r}, source={str(self.source)!r})"


def auth_file_paths(authfile: str | None = None, env: Mapping[str, str] | None = None) -> list[Path]:
    """The auth files to read, in order (see the module docstring); they may not exist."""
    env = os.environ if env is None else env
    if authfile:
        return [Path(authfile)]
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    user_file = config_home / "containers" / "auth.json"
    if env.get("REGISTRY_AUTH_FILE"):
        first = Path(env["REGISTRY_AUTH_FILE"])
    elif env.get("XDG_RUNTIME_DIR") and os.path.isdir(env["XDG_RUNTIME_DIR"]):
        first = Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
    else:
        first = user_file
    docker = Path(env["DOCKER_CONFIG"]) / "config.json" if env.get("DOCKER_CONFIG") \
        else home / ".docker" / "config.json"
    return list(dict.fromkeys([first, user_file, docker]))


def _normalise_key(key: str) -> str:
    # docker writes "https://index.docker.io/v1/"; containers/image strips scheme and path
    # for such keys as it reads them.
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    return key.rstrip("/")


def _scopes(repository: str) -> list[str]:
    """`host/ns/repo` -> [`host/ns/repo`, `host/ns`, `host`]."""
    parts = repository.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _read(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ImageError(f"cannot read the registry auth file {path}: {e.strerror}: "
                         "fix its permissions or point --authfile elsewhere") from e
    except ValueError as e:
        raise ImageError(f"the registry auth file {path} is not valid JSON ({e}): "
                         "fix it or log in again with 'skopeo login'") from e
    return data if isinstance(data, dict) else None


def find_credentials(repository: str, authfile: str | None = None,
                     env: Mapping[str, str] | None = None) -> RegistryCredentials | None:
    """The credentials for `repository` (`host[:port][/path]`, no scheme) from the
    first auth file that has an entry for it, or None.

    Raises ImageError for an auth file that exists but cannot be read, and for
    an explicit `authfile` that does not exist.
    """
    if authfile and not os.path.exists(authfile):
        raise ImageError(f"the auth file {authfile} does not exist: give the file "
                         "'skopeo login --authfile' wrote, or drop --authfile")
    for path in auth_file_paths(authfile, env):
        data = _read(path)
        if not data:
            continue
        auths = {_normalise_key(k): v for k, v in (data.get("auths") or {}).items()
                 if isinstance(v, dict)}
        for scope in _scopes(repository):
            entry = auths.get(scope)
            if entry and entry.get("auth"):
                try:
                    user, sep, password = base64.b64decode(entry["auth"], validate=True) \
                        .decode("utf-8").partition(":")
                except (binascii.Error, UnicodeDecodeError) as e:
                    raise ImageError(f"the entry for {scope} in {path} is not base64 of "
                                     "USER:PASSWORD: log in again with 'skopeo login'") from e
                if sep:
                    return RegistryCredentials(user, password, path)
    return None


@contextlib.contextmanager
def private_auth_file(registry: str, username: str, password: str) -> Iterator[str]:
    """A temporary auth file (mode 0600, in a 0700 directory) holding only these
    credentials for `registry`, removed on exit: how a password reaches skopeo
    without argv or the environment, both of which other users can see."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    parent = runtime if runtime and os.access(runtime, os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="stacker-kernel-auth-", dir=parent)  # mode 0700
    try:
        path = os.path.join(tmp, "auth.json")
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": {registry: {"auth": token}}}, f)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
