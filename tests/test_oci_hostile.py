"""Hostile and broken OCI layouts, as `from: oci` bases and as export bases:
one clear line each, nothing read forever, nothing written outside (oci/cas.py).
Also: the export takes the base image that was imported, not what its tag
says now (oci/export.py, engine/export.py)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.export import image_specs
from stacker_kernel.errors import ImageError
from stacker_kernel.oci.bases import base_layers, import_base
from stacker_kernel.oci.export import OciBase, export_image
from stacker_kernel.storage.store import Snapshot, Store

from test_bases import Src, store  # noqa: F401 (fixture)

MTIME = 1600000000
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
# A regression of the bounded read hangs; this bound turns the hang into a failure.
HANG_BOUND_S = 120




def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tar.addfile(ti, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def put(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def add_image(layout: Path, tag: str, layers: list[dict], diff_ids: list[str] | None = None) -> dict:
    """Config, manifest and a tag for `layers` (descriptors, written or not); the manifest descriptor."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config = {"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids or []}}
    cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", **put(layout, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cfg, "layers": [{"mediaType": LAYER_TYPE, **d} for d in layers]}
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **put(layout, json.dumps(manifest).encode())}
    set_tag(layout, tag, desc)
    return desc


def set_tag(layout: Path, tag: str, desc: dict) -> None:
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
    index["manifests"].append({**desc, "annotations": {REF_NAME: tag}})
    index_path.write_text(json.dumps(index))


def good_image(layout: Path, tag: str, files: dict[str, bytes]) -> dict:
    """A tagged one-layer image of `files`; the layer's descriptor."""
    data = tar_gz(files)
    layer = put(layout, data)
    add_image(layout, tag, [layer], ["sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()])
    return layer


def blob_file(layout: Path, desc: dict) -> Path:
    return layout / "blobs/sha256" / desc["digest"].split(":")[1]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_bounded(script: str, what: str) -> subprocess.CompletedProcess:
    """`script` run by a fresh Python in its own process group, all of which (skopeo too)
    is killed after HANG_BOUND_S: a regression then fails instead of hanging."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=HANG_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what} did not finish within {HANG_BOUND_S}s: a blob was read without bound")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def import_in_subprocess(store_root: Path, url: str) -> subprocess.CompletedProcess:
    """`from: oci url` imported by a separate process, killed after HANG_BOUND_S."""
    script = textwrap.dedent(f"""
        import sys
        from stacker_kernel.errors import ImageError
        from stacker_kernel.oci.bases import import_base
        from stacker_kernel.storage.store import Store
        class Src:
            type, url, tag, insecure = "oci", {url!r}, None, False
        store = Store.open({str(store_root)!r})
        try:
            import_base(store, Src())
        except ImageError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
    """)
    return run_bounded(script, f"importing {url}")


def one_clear_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


# --- hostile bases ---------------------------------------------------------------------

def test_index_digest_with_dot_dot_is_refused_and_reads_nothing_outside(store, tmp_path):
    layout = tmp_path / "oci"
    good_image(layout, "t", {"f": b"x"})
    outside = tmp_path / "x"
    outside.write_text("{}")
    set_tag(layout, "t", {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "digest": "sha256:../../x", "size": 2})
    with pytest.raises(ImageError, match=r"malformed digest 'sha256:\.\./\.\./x'.*re-create it"):
        import_base(store, Src("oci", f"{layout}:t"))
    assert store.snapshots() == []


def test_layer_blob_that_is_a_symlink_to_dev_zero_fails_at_once(store, tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"x" * 100})
    blob_file(layout, layer).unlink()
    os.symlink("/dev/zero", blob_file(layout, layer))
    line = one_clear_line(import_in_subprocess(store.root, f"{layout}:t"))
    assert f"layer {layer['digest']} of {layout}:t is a symlink" in line
    assert store.snapshots() == []


def test_build_from_a_layout_whose_blob_is_dev_zero_says_so_in_one_line(storage, tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"x" * 100})
    blob_file(layout, layer).unlink()
    os.symlink("/dev/zero", blob_file(layout, layer))
    (tmp_path / "stacker.yaml").write_text(textwrap.dedent(f"""\
        app:
            from:
                type: oci
                url: {layout}:t
            run: echo built > /built
        """))
    script = textwrap.dedent(f"""
        import sys
        from stacker_kernel.cli import main
        sys.argv = ["stacker-kernel", "--storage", {str(storage)!r}, "build", "-f",
                    {str(tmp_path / "stacker.yaml")!r}, "--no-oci"]
        sys.exit(main())
    """)
    res = run_bounded(script, "stacker-kernel build")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("stacker-kernel: ") and f"layer {layer['digest']} of {layout}:t is a symlink" in lines[0]


def test_layer_blob_that_is_a_fifo_fails_at_once(store, tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"x"})
    blob_file(layout, layer).unlink()
    os.mkfifo(blob_file(layout, layer))
    line = one_clear_line(import_in_subprocess(store.root, f"{layout}:t"))
    assert f"layer {layer['digest']} of {layout}:t is not a regular file" in line


def test_blobs_directory_that_is_a_symlink_is_refused(store, tmp_path):
    layout = tmp_path / "oci"
    good_image(layout, "t", {"f": b"x"})
    (layout / "blobs").rename(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", layout / "blobs")
    with pytest.raises(ImageError, match=r"blobs/sha256 is not a directory \(a symlink or a file\)"):
        import_base(store, Src("oci", f"{layout}:t"))


def test_layer_blob_whose_content_differs_from_its_digest_is_refused(store, tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"x"})
    data = bytearray(blob_file(layout, layer).read_bytes())
    data[-1] ^= 0xFF
    blob_file(layout, layer).write_bytes(bytes(data))
    line = one_clear_line(import_in_subprocess(store.root, f"{layout}:t"))
    assert f"layer {layer['digest']} of {layout}:t does not match its digest" in line
    assert not (base_layers(store) / "blobs/sha256" / layer["digest"].split(":")[1]).exists()


def test_truncated_layer_blob_is_refused(store, tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"x"})
    data = blob_file(layout, layer).read_bytes()
    blob_file(layout, layer).write_bytes(data[:-7])
    line = one_clear_line(import_in_subprocess(store.root, f"{layout}:t"))
    assert (f"layer {layer['digest']} of {layout}:t does not match its digest: it has {layer['size'] - 7} "
            f"bytes but its descriptor declares {layer['size']} (truncated or replaced)") in line


def test_layer_blob_longer_than_its_descriptor_is_not_read_past_it(store, tmp_path):
    layout = tmp_path / "oci"
    data = tar_gz({"f": b"x"})
    layer = put(layout, data)
    add_image(layout, "t", [{**layer, "size": 10}])
    line = one_clear_line(import_in_subprocess(store.root, f"{layout}:t"))
    assert (f"layer {layer['digest']} of {layout}:t does not match its digest: it is longer than the 10 bytes "
            "its descriptor declares") in line


# --- export: the base that was imported, never what the tag says now ----------------------

def _step(store: Store, base: Snapshot, layer: str, script: str) -> Snapshot:
    """One step on `base` committed to the store, as the engine does it."""
    live = store.live_path(f"test-{layer}")
    store.driver.writable_copy(base.path, live)
    try:
        run_in_userns(lambda root: subprocess.run(["/bin/sh", "-ec", script], cwd=root, check=True), str(live))
        return store.commit(live, Snapshot(parent=base.id, layer=layer, source=script))
    finally:
        store.driver.remove(live)


def _export(store: Store, steps: list[Snapshot], out: Path) -> list[str]:
    return export_image(str(out), image_specs(store, steps, {}, {}))


def _tree(root: str) -> dict[str, tuple]:
    """Every path below `root` with its type, permission bits and content or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(f.read()).hexdigest())
    return out


def _unpack(tmp_path: Path, layout: Path, tag: str) -> Path:
    bundle = tmp_path / f"bundle-{tag}"
    res = subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return bundle / "rootfs"


def test_export_after_the_base_tag_moved_gives_the_built_rootfs(store, tmp_path, busybox_oci):
    src_layout, tag = busybox_oci.split(":", 1)
    layout = tmp_path / "oci"
    subprocess.run(["cp", "-a", src_layout, str(layout)], check=True)
    base = import_base(store, Src("oci", f"{layout}:{tag}"))
    step = _step(store, base, "app", "echo built > built; echo 'app:x:1000:1000::/:/bin/sh' >> etc/passwd")
    # the tag now names another image in the same layout (as a `%from docker` re-import or
    # a re-tagged layout does); the export must still stack the step on busybox
    good_image(layout, "other", {"etc/passwd": b"other\n", "only-in-other": b"o"})
    subprocess.run(["umoci", "tag", "--image", f"{layout}:other", tag], check=True, capture_output=True)
    out = tmp_path / "out"
    assert _export(store, [step], out) == ["app"]
    rootfs = _unpack(tmp_path, out, "app")
    assert not (rootfs / "only-in-other").exists()
    assert run_in_userns(_tree, str(rootfs)) == run_in_userns(_tree, str(step.path))


def test_export_after_the_tag_moved_to_a_hostile_manifest_writes_nothing_outside(store, tmp_path):
    layout = tmp_path / "src" / "oci"
    good_image(layout, "t", {"f": b"base"})
    base = import_base(store, Src("oci", f"{layout}:t"))
    step = _step(store, base, "app", "echo built > built")
    # a planted file and a manifest whose layer digest walks out of the blobs directory
    (tmp_path / "src" / "escape").write_bytes(b"planted")
    add_image(layout, "evil", [{"digest": "sha256:../../../escape", "size": 7}])
    set_tag(layout, "t", json.loads((layout / "index.json").read_text())["manifests"][-1])
    out = tmp_path / "dst" / "oci"
    out.parent.mkdir()
    _export(store, [step], out)
    assert all(p == "oci" or p.startswith("oci/") for p in listing(tmp_path / "dst"))
    assert (_unpack(tmp_path, out, "app") / "f").read_bytes() == b"base"


def test_export_needs_no_source_layout(store, tmp_path):
    layout = tmp_path / "oci"
    good_image(layout, "t", {"f": b"base"})
    base = import_base(store, Src("oci", f"{layout}:t"))
    step = _step(store, base, "app", "echo built > built")
    subprocess.run(["rm", "-rf", str(layout)], check=True)
    out = tmp_path / "out"
    _export(store, [step], out)
    rootfs = _unpack(tmp_path, out, "app")
    assert (rootfs / "f").read_bytes() == b"base" and (rootfs / "built").exists()


def test_export_fails_in_one_line_when_a_base_layer_is_gone_everywhere(store, tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"base"})
    base = import_base(store, Src("oci", f"{layout}:t"))
    step = _step(store, base, "app", "echo built > built")
    blob_file(layout, layer).unlink()
    (base_layers(store) / "blobs/sha256" / layer["digest"].split(":")[1]).unlink()
    with pytest.raises(ImageError, match=rf"layer app: base {layout}:t layer {layer['digest']} is gone from "
                                         r".*rebuild the layer to import its base again"):
        _export(store, [step], tmp_path / "out")


def test_export_refuses_a_corrupt_copy_of_a_base_layer(store, tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"base"})
    base = import_base(store, Src("oci", f"{layout}:t"))
    step = _step(store, base, "app", "echo built > built")
    cached = base_layers(store) / "blobs/sha256" / layer["digest"].split(":")[1]
    cached.write_bytes(cached.read_bytes()[:-1] + b"!")
    with pytest.raises(ImageError, match=rf"layer {layer['digest']} of base {layout}:t of layer app .* "
                                         "does not match its digest"):
        _export(store, [step], tmp_path / "out")
    assert not (tmp_path / "out/blobs/sha256" / layer["digest"].split(":")[1]).exists()


def test_export_base_from_a_layout_with_a_dot_dot_layer_digest_is_refused(tmp_path):
    layout = tmp_path / "src" / "oci"
    good_image(layout, "t", {"f": b"base"})
    (tmp_path / "src" / "escape").write_bytes(b"planted")
    add_image(layout, "evil", [{"digest": "sha256:../../../escape", "size": 7}])
    with pytest.raises(ImageError, match=r"malformed digest 'sha256:\.\./\.\./\.\./escape'"):
        OciBase.from_layout(str(layout), "evil")


def test_export_base_layer_symlinked_to_dev_zero_fails_at_once(tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"x" * 100})
    base = OciBase.from_layout(str(layout), "t")
    blob_file(layout, layer).unlink()
    os.symlink("/dev/zero", blob_file(layout, layer))
    script = textwrap.dedent(f"""
        import pickle, sys
        from stacker_kernel.errors import ImageError
        from stacker_kernel.oci.export import ImageSpec, export_image
        base = pickle.loads({pickle.dumps(base)!r})
        try:
            export_image({str(tmp_path / "out")!r}, [ImageSpec("app", None, base_rootfs="/nonexistent", base_oci=base)])
        except ImageError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
    """)
    line = one_clear_line(run_bounded(script, "the export"))
    assert f"layer {layer['digest']} of base {layout}:t of layer app (in {layout}) is a symlink" in line


# --- publish: the layout is checked before skopeo reads it --------------------------------

def publish_in_subprocess(layout: Path, url: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys
        from stacker_kernel.errors import ImageError
        from stacker_kernel.oci.publish import publish
        try:
            publish({str(layout)!r}, {url!r})
        except ImageError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
    """)
    return run_bounded(script, f"publishing {layout}")


def test_publish_of_a_layer_blob_symlinked_to_dev_zero_fails_at_once(tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"x" * 100})
    blob_file(layout, layer).unlink()
    os.symlink("/dev/zero", blob_file(layout, layer))
    line = one_clear_line(publish_in_subprocess(layout, f"oci:{tmp_path / 'dest'}"))
    assert f"layer {layer['digest']} of {layout}:t is a symlink" in line
    assert not (tmp_path / "dest").exists()


def test_publish_of_a_dot_dot_layer_digest_fails_and_writes_nothing(tmp_path):
    layout = tmp_path / "src" / "oci"
    good_image(layout, "t", {"f": b"x"})
    (tmp_path / "src" / "escape").write_bytes(b"planted")
    add_image(layout, "evil", [{"digest": "sha256:../../../escape", "size": 7}])
    before = listing(tmp_path)
    line = one_clear_line(publish_in_subprocess(layout, f"oci:{tmp_path / 'dest'}"))
    assert "malformed digest 'sha256:../../../escape'" in line
    assert listing(tmp_path) == before


def test_publish_of_a_truncated_layer_blob_fails_before_copying(tmp_path):
    layout = tmp_path / "oci"
    layer = good_image(layout, "t", {"f": b"x"})
    blob_file(layout, layer).write_bytes(blob_file(layout, layer).read_bytes()[:-3])
    line = one_clear_line(publish_in_subprocess(layout, f"oci:{tmp_path / 'dest'}"))
    assert (f"layer {layer['digest']} of {layout}:t does not match its digest: it has {layer['size'] - 3} "
            "bytes but its descriptor declares") in line
    assert not (tmp_path / "dest").exists()
