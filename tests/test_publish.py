"""oci/publish.py: skopeo copies of exported tags to a real registry (Debian's
docker-registry, started on 127.0.0.1 for the test) and to OCI layouts."""
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from stacker_kernel.errors import ImageError, RecipeError
from stacker_kernel.oci.export import ImageSpec, StepSnapshot, export_image
from stacker_kernel.oci.publish import Published, destinations, publish

from test_export import Cfg, Chain, _extract


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registry(tmp_path):
    """A docker-registry on 127.0.0.1 with its own storage; yields HOST:PORT."""
    port = _free_port()
    conf = tmp_path / "registry.yml"
    conf.write_text(f"""version: 0.1
log: {{level: error}}
storage:
  filesystem: {{rootdirectory: {tmp_path / 'data'}}}
http:
  addr: 127.0.0.1:{port}
""")
    proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):  # wait until it listens (or died)
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


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
