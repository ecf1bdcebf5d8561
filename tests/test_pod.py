"""The single-user server of deploy/kubernetes in a container, as a Kubernetes pod runs it.

The image is built from deploy/kubernetes/image/stacker.yaml by stacker-kernel
itself (a Debian bookworm minbase from scripts/debian-rootfs.sh, the package as
a wheel built from this checkout, JupyterLab), once per run, copied into
podman's storage with skopeo and run by Debian's podman as root with a user
namespace of its own of 65536 ids (`--userns=auto:size=65536`, what
`hostUsers: false` gives a pod): default seccomp profile and capabilities, no
--privileged, no devices, a volume for the home (notebooks and the kernel's
storage, on ext4: the overlay driver). The one setting the pod adds is an
unmasked /proc (`--security-opt unmask=/proc/*`, `procMount: Unmasked`).
Through the Jupyter server's REST and websocket API a `stacker` kernel builds
the Debian demo notebook (notebooks/deb-build.ipynb) and exports it: files of
apt's `_apt` (uid 42) keep their owner in the image.

Then deploy/kubernetes/pod.yaml runs through `podman kube play`.

Two settings here belong to this host, not to the pod (`host_conf`): when the
session lacks CAP_SYS_RESOURCE, podman's default rlimits (nofile 1048576)
cannot be set and the container's are this process's own; on a cgroup v1 host
crun refuses to start ("cgroups in hybrid mode not supported"), runc does not.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import websocket
import yaml

from net_support import api_request, execute_over_websocket, free_port as _free_port
from stacker_kernel.container.userns import IdMap, IdRange, libc_call, run_in_userns

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "deploy" / "kubernetes" / "image" / "stacker.yaml"
POD_YAML = REPO / "deploy" / "kubernetes" / "pod.yaml"
DEMO = REPO / "notebooks" / "deb-build.ipynb"
IMAGE = f"localhost/stacker-singleuser:test-{uuid.uuid4().hex[:8]}"
CELL_TIMEOUT = 600
APT_UID = 42  # Debian's _apt: apt-get update leaves it files (var/lib/apt/lists/auxfiles)
# The settings the pod needs beyond podman's defaults (README, Kubernetes).
POD_SETTINGS = ["--userns=auto:size=65536", "--security-opt", "unmask=/proc/*"]


def _run(*argv: str, env: dict | None = None, timeout: float = 1800) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(argv[:4])} … failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _has_cap(bit: int) -> bool:
    with open("/proc/self/status") as f:
        eff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return bool(int(eff, 16) >> bit & 1)


def _maps() -> tuple[list[str], list[str]]:
    with open("/proc/self/uid_map") as u, open("/proc/self/gid_map") as g:
        return u.read().split(), g.read().split()


def _nested_maps() -> tuple[list[str], list[str]]:
    # Dumpable again, as a process of the pod that was exec'd: the change of ids on
    # entering made /proc/PID of this process and its children root's of the host.
    libc_call("prctl", ctypes.c_int(4), ctypes.c_ulong(1), 0, 0, 0)  # PR_SET_DUMPABLE
    return run_in_userns(_maps, views=False)


@pytest.mark.rootful
def test_root_of_a_namespace_of_65536_ids_maps_those_ids_one_to_one():
    """As root of a pod: the ids its namespace holds, not all 2^32 (which it may not map)."""
    pod = (IdRange(0, 1_000_000, 65536),)
    assert run_in_userns(_nested_maps, idmap=IdMap(pod, pod, rootful=True), views=False) == \
        (["0", "0", "65536"], ["0", "0", "65536"])


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory) -> dict:
    """The environment for podman: a containers.conf for what this host lacks."""
    assert shutil.which("podman"), "podman is missing: apt-get install podman (scripts/setup-host.sh)"
    lines = []
    if not _has_cap(24):  # CAP_SYS_RESOURCE: podman raises nofile/nproc for its containers
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        # podman lowers its own RLIMIT_NPROC to 32768 when it cannot raise it, and a
        # container may only lower what podman has.
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
        lines += ["[containers]", f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]']
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # not a cgroup v2 host
        assert shutil.which("runc"), "runc is missing: apt-get install runc (scripts/setup-host.sh)"
        lines += ["[engine]", 'runtime = "runc"']
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("\n".join(lines) + "\n")
    return dict(os.environ, CONTAINERS_CONF=str(conf))


@pytest.fixture(scope="module")
def singleuser_image(tmp_path_factory, podman_env) -> str:
    """The single-user image, built by stacker-kernel from the repository's recipe and
    copied into podman's storage."""
    work = tmp_path_factory.mktemp("singleuser")
    wheels = work / "wheels"
    # The wheels are made here (pip reaches PyPI from the host); the build installs them offline.
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--use-pep517", "-w", str(wheels),
         str(REPO), "jupyterlab>=4", "jupyterhub>=5")
    debian = _run(str(REPO / "scripts/debian-rootfs.sh")).strip()
    oci = work / "oci"
    _run(sys.executable, "-m", "stacker_kernel", "build", "-f", str(RECIPE), "--oci-dir", str(oci),
         "--substitute", f"DEBIAN_TAR={debian}", "--substitute", f"WHEELS={wheels}")
    _run("skopeo", "copy", "-q", f"oci:{oci}:stacker-singleuser", f"containers-storage:{IMAGE}", env=podman_env)
    yield IMAGE
    subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True, env=podman_env)


class Server:
    """A Jupyter server on 127.0.0.1:`port` in the container `name`."""

    def __init__(self, name: str, port: int, token: str, env: dict) -> None:
        self.name, self.port, self.token, self.env = name, port, token, env

    def logs(self) -> str:
        res = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True, env=self.env)
        return (res.stdout + res.stderr)[-4000:]

    def api(self, method: str, path: str, body: dict | None = None):
        return api_request(f"http://127.0.0.1:{self.port}{path}", self.token, method, body)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.api("GET", "/api/status")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the server in {self.name} did not start:\n{self.logs()}"
            time.sleep(0.5)

    def exec(self, *argv: str) -> str:
        return _run("podman", "exec", self.name, *argv, env=self.env)


class Kernel:
    """A `stacker` kernel session on `server` for `notebook`, driven over its websocket."""

    def __init__(self, server: Server, notebook: str) -> None:
        self.server = server
        # As JupyterLab: the path from the server's root, the name the file's.
        status, model = server.api("POST", "/api/sessions", {"path": notebook, "type": "notebook",
                                                             "name": Path(notebook).name,
                                                             "kernel": {"name": "stacker"}})
        assert status == 201, f"creating a stacker kernel session: HTTP {status}\n{server.logs()}"
        self.session_id, kernel_id = model["id"], model["kernel"]["id"]
        self.client_session = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id={self.client_session}",
            header=[f"Authorization: token {server.token}"], timeout=CELL_TIMEOUT)

    def execute(self, code: str) -> tuple[str, str, str]:
        """Run one cell: (status, the text it showed, the error text)."""
        return execute_over_websocket(self.ws, self.client_session, "jovyan", code)

    def close(self) -> None:
        self.ws.close()
        self.server.api("DELETE", f"/api/sessions/{self.session_id}")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The volume mounted at /home/jovyan, with the demo notebook and its base beside it."""
    path = tmp_path_factory.mktemp("home")
    demo = path / "demo"
    demo.mkdir()
    shutil.copyfile(DEMO, demo / DEMO.name)
    _run(str(REPO / "scripts/debian-rootfs.sh"), str(demo / "debian-bookworm-minbase.tar"))
    return path


@pytest.fixture(scope="module")
def server(singleuser_image, home, podman_env):
    """`podman run` of the image: podman's defaults, plus only POD_SETTINGS."""
    name, port, token = f"stacker-pod-{uuid.uuid4().hex[:8]}", _free_port(), uuid.uuid4().hex
    # :U gives the volume to the container's root (podman's equivalent of a pod's fsGroup).
    _run("podman", "run", "-d", "--name", name, *POD_SETTINGS, "-v", f"{home}:/home/jovyan:U",
         "-p", f"127.0.0.1:{port}:8888", "-e", f"JUPYTER_TOKEN={token}", singleuser_image, env=podman_env)
    s = Server(name, port, token, podman_env)
    try:
        s.wait_ready()
        yield s
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "2", name], capture_output=True, env=podman_env)


@pytest.mark.rootful
def test_the_server_runs_as_root_of_65536_ids_with_podmans_default_seccomp_and_capabilities(server):
    status = server.exec("cat", "/proc/self/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "0"
    assert fields["Seccomp"].strip() == "2", "the runtime's seccomp filter is on"
    assert not int(fields["CapEff"], 16) >> 21 & 1, "no CAP_SYS_ADMIN"
    extents = [line.split() for line in server.exec("cat", "/proc/self/uid_map").splitlines()]
    assert len(extents) == 1 and extents[0][0] == "0" and extents[0][2] == "65536" and extents[0][1] != "0"


def _apt_owned(oci: Path) -> list[str]:
    """Paths in the image layers of the OCI layout `oci` owned by _apt."""
    found = []
    index = json.loads((oci / "index.json").read_text())
    for m in index["manifests"]:
        manifest = json.loads((oci / "blobs/sha256" / m["digest"].split(":")[1]).read_text())
        for layer in manifest["layers"]:
            if not layer["mediaType"].startswith("application/vnd.oci.image.layer.v1.tar"):
                continue  # the SBOM and provenance attached beside the images
            blob = oci / "blobs/sha256" / layer["digest"].split(":")[1]
            # GNU tar reads gzip and zstd alike
            listing = subprocess.run(["tar", "-tv", "--numeric-owner", "-f", str(blob)],
                                     capture_output=True, text=True, check=True).stdout
            found += [line.split()[-1] for line in listing.splitlines()
                      if line.split()[1].split("/")[0] == str(APT_UID)]
    return found


@pytest.mark.rootful
def test_the_server_builds_the_debian_demo_notebook_with_the_full_id_range(server, home):
    nb = json.loads((home / "demo" / DEMO.name).read_text())
    kernel = Kernel(server, f"demo/{DEMO.name}")
    try:
        for cell in nb["cells"]:
            if cell["cell_type"] != "code":
                continue
            code = "".join(cell["source"])
            status, text, error = kernel.execute(code)
            expected = "error" if "raises-exception" in cell.get("metadata", {}).get("tags", []) else "ok"
            assert status == expected, f"cell {code.splitlines()[0]!r}: {status}\n{error}\n{text[-3000:]}"
        status, text, error = kernel.execute("%export oci /home/jovyan/demo/oci")
        assert status == "ok", f"%export oci: {error}\n{text[-2000:]}"
    finally:
        kernel.close()
    # The storage is the overlay driver, on the volume (ext4 here, as a pod's volume).
    assert (home / ".local/share/stacker-kernel/driver").read_text().strip() == "overlay"
    assert any(p.name.startswith("hello_") for p in (home / "demo" / "debs").iterdir())
    owned = _apt_owned(home / "demo" / "oci")
    assert any("var/lib/apt/lists" in p for p in owned), f"nothing owned by _apt in the image: {owned[:5]}"


@pytest.fixture
def kube_pod(singleuser_image, podman_env, tmp_path, busybox_tar):
    """deploy/kubernetes/pod.yaml through `podman kube play`, with the test's image, a
    host port and a claim of its own. podman 4.3 reads no `hostUsers`: --userns says it."""
    spec = yaml.safe_load(POD_YAML.read_text())
    port, token, claim = _free_port(), uuid.uuid4().hex, f"stacker-test-{uuid.uuid4().hex[:8]}"
    ctr = spec["spec"]["containers"][0]
    ctr["image"] = singleuser_image
    ctr["ports"] = [{"containerPort": 8888, "hostPort": port, "hostIP": "127.0.0.1"}]
    ctr.setdefault("env", []).append({"name": "JUPYTER_TOKEN", "value": token})
    for vol in spec["spec"]["volumes"]:
        if "persistentVolumeClaim" in vol:
            vol["persistentVolumeClaim"]["claimName"] = claim
    spec["metadata"]["name"] = name = f"stacker-kube-{uuid.uuid4().hex[:8]}"
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(spec))
    # The Localhost seccomp profile the pod names: podman's default profile (README, Kubernetes).
    profile = spec["spec"]["securityContext"]["seccompProfile"]["localhostProfile"]
    (tmp_path / "seccomp" / profile).parent.mkdir(parents=True)
    shutil.copyfile("/usr/share/containers/seccomp.json", tmp_path / "seccomp" / profile)
    _run("podman", "kube", "play", "--userns=auto:size=65536", "--seccomp-profile-root", str(tmp_path / "seccomp"),
         str(tmp_path / "pod.yaml"), env=podman_env)
    s = Server(f"{name}-{ctr['name']}", port, token, podman_env)
    try:
        s.wait_ready()
        _run("podman", "cp", str(busybox_tar), f"{s.name}:/home/jovyan/busybox.tar", env=podman_env)
        yield s
    finally:
        subprocess.run(["podman", "pod", "rm", "-f", "-t", "2", name], capture_output=True, env=podman_env)
        subprocess.run(["podman", "volume", "rm", "-f", claim], capture_output=True, env=podman_env)


@pytest.mark.rootful
def test_the_pod_manifest_runs_in_podman_kube_play(kube_pod):
    """The manifest's server starts with 65536 ids and the seccomp profile it names. A build
    needs /proc unmasked: where this podman applies `procMount: Unmasked` it builds, where it
    ignores it (podman 4.3 does) the cell says what the pod lacks, in one line."""
    status = kube_pod.exec("cat", "/proc/self/status")
    assert "Seccomp:\t2" in status
    extents = kube_pod.exec("cat", "/proc/self/uid_map").split()
    assert extents[0] == "0" and extents[2] == "65536"
    masked = [line.split()[4] for line in kube_pod.exec("cat", "/proc/self/mountinfo").splitlines()
              if line.split()[4].startswith("/proc/")]
    kernel = Kernel(kube_pod, "kube.ipynb")
    try:
        status, text, error = kernel.execute(
            "%layer kube\n%from tar busybox.tar\ntouch /owned\nchown 4242:4242 /owned\nls -ln /owned\n")
    finally:
        kernel.close()
    if any(p in ("/proc/kcore", "/proc/keys", "/proc/timer_list") for p in masked):
        assert status == "error"
        assert "procMount: Unmasked" in error + text, f"{error}\n{text}"
        assert "Traceback" not in text
    else:
        assert status == "ok", f"{error}\n{text}"
        assert "4242 4242" in text


def test_the_zero_to_jupyterhub_values_ask_for_the_pod_of_the_manifest():
    """values.yaml makes KubeSpawner create the pod of pod.yaml (the one podman runs above)."""
    values = yaml.safe_load((REPO / "deploy/kubernetes/values.yaml").read_text())["singleuser"]
    pod = yaml.safe_load(POD_YAML.read_text())["spec"]
    ctr = pod["containers"][0]
    assert values["extraPodConfig"]["hostUsers"] is pod["hostUsers"] is False
    assert values["extraPodConfig"]["securityContext"]["seccompProfile"] == pod["securityContext"]["seccompProfile"]
    for key in ("runAsUser", "procMount", "appArmorProfile", "privileged"):
        assert values["extraContainerConfig"]["securityContext"][key] == ctr["securityContext"][key], key
    assert values["uid"] == ctr["securityContext"]["runAsUser"] == 0
    assert values["storage"]["homeMountPath"] == ctr["volumeMounts"][0]["mountPath"] == "/home/jovyan"
    assert values["image"]["name"].rsplit("/", 1)[1] == ctr["image"].rsplit("/", 1)[1].split(":")[0]
    # The image's command serves the same port and runs as root.
    recipe = yaml.safe_load(RECIPE.read_text())["stacker-singleuser"]
    assert "--allow-root" in recipe["cmd"] and "--allow-root" in values["cmd"]
    assert ctr["ports"][0]["containerPort"] == 8888 and "--port=8888" in recipe["cmd"]
