"""stacker's classic walk-through, end to end from the CLI (issue 15): a build fails
for a tool missing in the base, `chroot` into exactly the failed state to try the
fix by hand, fix the recipe, rebuild (the unchanged layer from the cache), `grab`
the artifact, `publish` the image to a real local registry, `skopeo inspect` it."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pexpect
import pytest

from net_support import serve_registry

TOOL = "#!/bin/sh\necho \"packed: $*\"\n"

BASE = """
    base:
        from:
            type: oci
            url: {busybox}
        run: |
            mkdir -p /src
            echo 'hello from the walk-through' > /src/input.txt
"""

APP_BROKEN = """
    app:
        from:
            type: built
            tag: base
        run: |
            mkdir -p /out
            pack-tool /src/input.txt > /out/artifact.txt
"""

APP_FIXED = """
    app:
        from:
            type: built
            tag: base
        imports:
            - path: pack-tool
              dest: /usr/local/bin/pack-tool
              mode: 0755
        run: |
            mkdir -p /out
            pack-tool /src/input.txt > /out/artifact.txt
"""


def _sk(storage, *args, cwd, stdin=None):
    return subprocess.run([sys.executable, "-m", "stacker_kernel", "--storage", str(storage), *args],
                          cwd=cwd, capture_output=True, text=True, stdin=stdin or subprocess.DEVNULL)


@pytest.fixture
def registry(tmp_path_factory):
    yield from serve_registry(tmp_path_factory.mktemp("registry"))


def test_fail_chroot_fix_rebuild_grab_publish(storage, busybox_oci, tmp_path, registry):
    (tmp_path / "pack-tool").write_text(TOOL)
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(textwrap.dedent(BASE.format(busybox=busybox_oci) + APP_BROKEN))

    # 1. The build fails: the tool is not in the base. The error names the layer.
    first = _sk(storage, "build", "-f", str(yaml), cwd=tmp_path)
    assert first.returncode == 1
    assert "layer app" in first.stderr and "pack-tool" in first.stderr and "/proc/self/fd" not in first.stderr
    assert "stacker-kernel chroot" in first.stderr  # it says how to look at the failed state

    # 2. chroot opens exactly the failed state; try the fix by hand there.
    child = pexpect.spawn(sys.executable, ["-m", "stacker_kernel", "--storage", str(storage),
                                           "chroot", "-f", str(yaml), "app"],
                          cwd=str(tmp_path), timeout=60, encoding="utf-8")
    child.expect("layer app: the failed state of step 1")
    child.sendline("test -d /out && echo out-$((20+1)); command -v pack-tool || echo no-tool-$((40+2))")
    child.expect("out-21")  # the failed step's own work is there
    child.expect("no-tool-42")
    child.sendline("mkdir -p /usr/local/bin; printf '#!/bin/sh\\necho \"packed: $*\"\\n' > /usr/local/bin/pack-tool; "
                   "chmod 755 /usr/local/bin/pack-tool; pack-tool by-hand-$((1+2))")
    child.expect("packed: by-hand-3")
    child.sendline("exit 0")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    # 3. Fix the recipe; the rebuild takes the unchanged layer from the cache.
    yaml.write_text(textwrap.dedent(BASE.format(busybox=busybox_oci) + APP_FIXED))
    second = _sk(storage, "build", "-f", str(yaml), "--oci-dir", str(tmp_path / "oci"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    lines = [line.strip() for line in second.stdout.splitlines()]
    assert any(line.startswith("found cached layer base") for line in lines), second.stdout
    assert any(line.startswith("app") and " ran in " in line for line in lines), second.stdout

    # 4. Grab the artifact.
    grabbed = _sk(storage, "grab", "-f", str(yaml), "app:/out/artifact.txt", str(tmp_path / "artifact.txt"),
                  cwd=tmp_path)
    assert grabbed.returncode == 0, grabbed.stderr
    assert (tmp_path / "artifact.txt").read_text() == "packed: /src/input.txt\n"
    assert not (tmp_path / "artifact.txt").stat().st_mode & 0o6000

    # 5. Publish the image to a real registry and read it back with skopeo.
    pub = _sk(storage, "publish", "--oci-dir", str(tmp_path / "oci"), "--url", f"docker://{registry}/team",
              "--image", "app", "--tag", "v1", cwd=tmp_path)
    assert pub.returncode == 0, pub.stderr
    info = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry}/team/app:v1"],
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    layers = json.loads(info.stdout)["Layers"]
    assert len(layers) >= 2  # the base's layer and the app's steps

    # 6. The published image holds the artifact: copy it back and unpack it with umoci.
    back = tmp_path / "back"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{registry}/team/app:v1",
                    f"oci:{back}:app"], check=True, capture_output=True)
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{back}:app", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / "out" / "artifact.txt").read_text() == "packed: /src/input.txt\n"
    assert os.access(rootfs / "usr" / "local" / "bin" / "pack-tool", os.X_OK)


def test_the_walkthrough_notebook_builds_headless_and_grabs_the_artifact(storage, busybox_tar, tmp_path):
    repo = Path(__file__).resolve().parent.parent
    for name in ("walkthrough.ipynb", "pack-tool"):
        (tmp_path / name).write_bytes((repo / "notebooks" / name).read_bytes())
    (tmp_path / "pack-tool").chmod(0o755)
    (tmp_path / "busybox.tar").write_bytes(busybox_tar.read_bytes())
    nb = tmp_path / "walkthrough.ipynb"
    built = _sk(storage, "build", "-f", str(nb), "--no-oci", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "packed: /src/input.txt" in built.stdout
    grabbed = _sk(storage, "grab", "-f", str(nb), "app:/out/artifact.txt", str(tmp_path / "artifact.txt"),
                  cwd=tmp_path)
    assert grabbed.returncode == 0, grabbed.stderr
    assert (tmp_path / "artifact.txt").read_text() == "packed: /src/input.txt\n"
