"""oci/publish.py: skopeo copies of exported tags to a real registry (Debian's
docker-registry, started on 127.0.0.1 for the test) and to OCI layouts."""
import base64
import json
import os
import secrets
import sys
import threading
import subprocess
from pathlib import Path

import pytest

from stacker_kernel.errors import ImageError, RecipeError
from stacker_kernel.oci.export import ImageSpec, StepSnapshot, export_image
from stacker_kernel.oci.publish import Published, destinations, publish
from stacker_kernel.oci.registry_auth import auth_file_paths, find_credentials

from net_support import free_port as _free_port, serve_registry as _serve_registry
from test_export import Cfg, Chain, _extract


@pytest.fixture
def registry(tmp_path):
    """A docker-registry on 127.0.0.1 with its own storage; yields HOST:PORT."""
    yield from _serve_registry(tmp_path)


@pytest.fixture
def auth_registry(tmp_path):
    """A docker-registry that wants a user and password (htpasswd, bcrypt); yields
    (HOST:PORT, user, password). Plain HTTP: the registry and skopeo allow it on localhost."""
    password = secrets.token_hex(16)
    htpasswd = tmp_path / "htpasswd"
    # -i: the password from stdin, so not even the test puts it on a command line.
    htpasswd.write_text(subprocess.run(["htpasswd", "-iBn", "alice"], input=password, check=True,
                                       capture_output=True, text=True).stdout)
    for host in _serve_registry(tmp_path, f"auth:\n  htpasswd: {{realm: test, path: {htpasswd}}}\n"):
        yield host, "alice", password


def _auth_json(path: Path, registry: str, user: str, password: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    path.chmod(0o600)
    return path


@pytest.fixture
def layout(storage, busybox_tar) -> Path:
    """A layout with tags `base` and `app`."""
    c = Chain(storage)
    c.change(_extract, str(busybox_tar))
    base = c.snap()
    c.sh("touch app")
    tip = c.snap()
    out = storage / "oci"
    export_image(str(out), [ImageSpec("base", Cfg(), [], base_rootfs=base),
                            ImageSpec("app", Cfg(), [StepSnapshot(tip, "touch app")], parent="base")])
    return out


def test_publish_pushes_every_tag_to_the_registry(layout, registry):
    done = publish(str(layout), f"docker://{registry}/proj", ["v1"])
    assert done == [Published("base", f"docker://{registry}/proj/base:v1"),
                    Published("app", f"docker://{registry}/proj/app:v1")]
    info = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry}/proj/app:v1"],
                                     check=True, capture_output=True, text=True).stdout)
    assert len(info["Layers"]) == 2


def test_publish_to_a_url_with_a_tag_pushes_one_image(layout, registry):
    publish(str(layout), f"docker://{registry}/single:1.0", images=["app"])
    res = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry}/single:1.0"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_unreachable_registry_is_a_clear_error(layout):
    with pytest.raises(ImageError, match="cannot reach the registry"):
        publish(str(layout), f"docker://127.0.0.1:{_free_port()}/proj")


def test_publish_to_an_oci_layout_names_tags_like_stacker(layout, storage):
    dest = storage / "published"
    publish(str(layout), f"oci:{dest}", ["t1"], images=["app"])
    refs = [d["annotations"]["org.opencontainers.image.ref.name"]
            for d in json.loads((dest / "index.json").read_text())["manifests"]]
    assert refs == ["app_t1"]


def test_unknown_image_is_refused(layout):
    with pytest.raises(ImageError, match="not in"):
        publish(str(layout), "oci:/tmp/x", images=["nope"])


def test_a_tagged_url_with_several_images_is_refused():
    with pytest.raises(RecipeError, match="pick one"):
        destinations("docker://h:5000/r:1", ["a", "b"], None)


def test_cli_publish_pushes_a_built_layer(storage, busybox_oci, registry, tmp_path, capsys):
    from stacker_kernel.cli import main

    yaml = tmp_path / "stacker.yaml"
    yaml.write_text("app:\n  from:\n    type: oci\n    url: ${{B}}\n  run: echo published > /p\n")
    oci = tmp_path / "oci"
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--oci-dir", str(oci),
                 "--substitute", f"B={busybox_oci}", "--annotations-namespace", "org.example"]) == 0
    index = json.loads((oci / "index.json").read_text())
    manifest = json.loads((oci / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    assert "org.example.stacker.stacker_yaml" in manifest["annotations"]
    capsys.readouterr()
    assert main(["publish", "--oci-dir", str(oci), "--url", f"docker://{registry}/cli", "--tag", "t1"]) == 0
    assert f"docker://{registry}/cli/app:t1" in capsys.readouterr().out
    subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry}/cli/app:t1"],
                   check=True, capture_output=True)


# --- credentials: never on a command line -------------------------------------------

SKOPEO_SHIM = """#!/bin/sh
# Records what skopeo was given, then runs the real one.
log="{log}.$$"
printf '%s\\0' "$@" > "$log.argv"
env -0 > "$log.env"
for a in "$@"; do
  case "$a" in --dest-authfile=*)
    f=${{a#--dest-authfile=}}
    stat -c '%a' "$f" "$(dirname "$f")" > "$log.mode";;
  esac
done
exec {skopeo} "$@"
"""


def _watch_cmdlines(needle: bytes, stop: threading.Event, hits: list[str]) -> None:
    """Until `stop`, look at every process's argv (and, where readable, environment) for `needle`."""
    while not stop.wait(0.002):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            for what in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{pid}/{what}", "rb") as f:
                        if needle in f.read():
                            hits.append(f"{pid} {what}")
                except OSError:
                    pass


def test_password_stdin_reaches_the_registry_but_no_command_line(layout, auth_registry, tmp_path):
    host, user, password = auth_registry
    log = tmp_path / "skopeo-calls"
    shim = tmp_path / "bin" / "skopeo"
    shim.parent.mkdir()
    shim.write_text(SKOPEO_SHIM.format(log=log, skopeo=subprocess.run(
        ["sh", "-c", "command -v skopeo"], check=True, capture_output=True, text=True).stdout.strip()))
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"}
    stop, hits = threading.Event(), []
    watcher = threading.Thread(target=_watch_cmdlines, args=(password.encode(), stop, hits))
    watcher.start()
    try:
        res = subprocess.run([sys.executable, "-m", "stacker_kernel", "publish", "--oci-dir", str(layout),
                              "--url", f"docker://{host}/sec", "--tag", "v1", "--username", user,
                              "--password-stdin"], input=password + "\n", env=env,
                             capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        watcher.join()
    assert res.returncode == 0, res.stderr
    assert hits == []
    calls = sorted(tmp_path.glob("skopeo-calls.*.argv"))
    assert len(calls) == 2  # base and app
    for argv in calls:
        assert password.encode() not in argv.read_bytes()
        assert password.encode() not in Path(str(argv)[:-len("argv")] + "env").read_bytes()
        assert Path(str(argv)[:-len("argv")] + "mode").read_text().split() == ["600", "700"]
        authfile = next(a for a in argv.read_bytes().decode().split("\0") if a.startswith("--dest-authfile="))
        assert not os.path.exists(authfile.split("=", 1)[1])  # removed afterwards
    mine = _auth_json(tmp_path / "check" / "auth.json", host, user, password)
    inspect = ["skopeo", "inspect", "--tls-verify=false", f"docker://{host}/sec/app:v1"]
    assert subprocess.run(inspect, capture_output=True).returncode != 0  # the registry wants the password
    info = json.loads(subprocess.run(inspect[:2] + ["--authfile", str(mine)] + inspect[2:],
                                     check=True, capture_output=True, text=True).stdout)
    assert len(info["Layers"]) == 2


def test_password_on_the_command_line_is_refused(layout, auth_registry, capsys):
    from stacker_kernel.cli import main

    host, user, password = auth_registry
    assert main(["publish", "--oci-dir", str(layout), "--url", f"docker://{host}/p", "--username", user,
                 "--password", password]) == 1
    err = capsys.readouterr().err
    assert "--password-stdin" in err and len(err.strip().splitlines()) == 1
    assert subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--authfile",
                           str(_auth_json(layout.parent / "a.json", host, user, password)),
                           f"docker://{host}/p/app:latest"], capture_output=True).returncode != 0


def test_publish_reads_the_auth_file_given_with_authfile(layout, auth_registry, tmp_path, capsys):
    from stacker_kernel.cli import main

    host, user, password = auth_registry
    auth = _auth_json(tmp_path / "elsewhere" / "auth.json", host, user, password)
    assert main(["publish", "--oci-dir", str(layout), "--url", f"docker://{host}/f", "--image", "app",
                 "--authfile", str(auth)]) == 0
    assert f"docker://{host}/f/app:latest" in capsys.readouterr().out


def test_publish_reads_the_containers_auth_file_of_the_runtime_dir(layout, auth_registry, tmp_path, monkeypatch):
    host, user, password = auth_registry
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    _auth_json(tmp_path / "run" / "containers" / "auth.json", host, user, password)
    done = publish(str(layout), f"docker://{host}/rt", images=["app"])
    assert done == [Published("app", f"docker://{host}/rt/app:latest")]


def test_a_registry_refusing_without_credentials_says_how_to_log_in(layout, auth_registry, tmp_path, monkeypatch):
    host, _, _ = auth_registry
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ImageError, match="skopeo login.*--password-stdin"):
        publish(str(layout), f"docker://{host}/no", images=["app"])


def test_auth_files_are_read_in_skopeos_order(tmp_path):
    env = {"HOME": str(tmp_path / "h"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    assert auth_file_paths(env=env) == [tmp_path / "run/containers/auth.json",
                                        tmp_path / "h/.config/containers/auth.json",
                                        tmp_path / "h/.docker/config.json"]
    assert auth_file_paths(env={**env, "REGISTRY_AUTH_FILE": "/x.json"})[0] == Path("/x.json")
    assert auth_file_paths("/given.json", env) == [Path("/given.json")]


def test_credentials_come_from_the_first_file_with_an_entry_most_specific_first(tmp_path):
    env = {"HOME": str(tmp_path / "h"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    _auth_json(tmp_path / "run/containers/auth.json", "other:5000", "o", "o")
    user_file = tmp_path / "h/.config/containers/auth.json"
    token = lambda u: base64.b64encode(f"{u}:pw-{u}".encode()).decode()  # noqa: E731
    user_file.parent.mkdir(parents=True)
    user_file.write_text(json.dumps({"auths": {"reg:5000": {"auth": token("host")},
                                               "reg:5000/team": {"auth": token("team")}}}))
    docker = tmp_path / "h/.docker/config.json"
    docker.parent.mkdir(parents=True)
    docker.write_text(json.dumps({"auths": {"https://dock.example/v1/": {"auth": token("d")}}}))
    team = find_credentials("reg:5000/team/app", env=env)
    assert (team.username, team.password, team.source) == ("team", "pw-team", user_file)
    assert find_credentials("reg:5000/solo/app", env=env).username == "host"
    assert find_credentials("dock.example/x", env=env).username == "d"
    assert find_credentials("nowhere:1/x", env=env) is None
    assert "pw-" not in repr(team)
