"""`from` sources imported as read-only base subvolumes (oci/bases.py, oci/layout.py)."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import lzma
import os
import socket
import stat
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import in_tree, is_frozen, reaped

from stacker_kernel.container.userns import IdMap, run_in_userns
from stacker_kernel.errors import ImageError
from stacker_kernel.oci.bases import base_config, base_image, import_base
from stacker_kernel.oci.layout import OCILayout, parse_oci_ref
from stacker_kernel.storage import btrfs, overlay
from stacker_kernel.storage.store import Store

MTIME = 1600000000


@dataclass
class Src:
    """Stands in for recipe.model.ImageSource (import_base accepts any object with these fields)."""

    type: str
    url: str | None = None
    tag: str | None = None
    insecure: bool = False


@pytest.fixture
def store(storage):
    s = Store.open(storage)
    yield s
    s.close()


def tar_bytes(entries: list[tuple[str, bytes | None]]) -> bytes:
    """A tar of files (bytes) and directories (None), owned by 0:0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = MTIME
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_layout(layout: Path, tag: str, layers: list[bytes], env: list[str] | None = None,
                as_index: bool = False) -> dict:
    """An OCI layout written by hand: gzip layers, config, manifest, index.json; returns the manifest descriptor."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": env or ["PATH=/bin"], "Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(ly).hexdigest() for ly in layers]}}
    cfg = _blob(layout, json.dumps(config).encode())
    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_blob(layout, gzip.compress(ly))}
             for ly in layers]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg}, "layers": descs}
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(layout, json.dumps(manifest).encode())}
    top = mdesc
    if as_index:
        other = {**mdesc, "digest": "sha256:" + "0" * 64, "platform": {"os": "linux", "architecture": "s390x"}}
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [other, {**mdesc, "platform": {"os": "linux", "architecture": "amd64"}}]}
        top = {"mediaType": "application/vnd.oci.image.index.v1+json", **_blob(layout, json.dumps(index).encode())}
    idx_path = layout / "index.json"
    idx = json.loads(idx_path.read_text()) if idx_path.exists() else {"schemaVersion": 2, "manifests": []}
    idx["manifests"].append({**top, "annotations": {"org.opencontainers.image.ref.name": tag}})
    idx_path.write_text(json.dumps(idx))
    return mdesc


def listdir(path: Path) -> list[str]:
    """The names in directory `path` of a base, as the container sees them (an overlay
    base is shown as its union)."""
    return run_in_userns(os.listdir, str(path))


def made(tree: Path) -> tuple:
    """What tells one making of base `tree` from another: its btrfs subvolume's uuid, or
    the inode and change time of its overlay layer directory."""
    stack = overlay.read_stack(tree)
    if stack is None:
        return btrfs.subvolume_info(tree).uuid
    st = os.stat(stack.layers[0])
    return stack.layers, st.st_ino, st.st_ctime_ns


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def container_root() -> tuple[int, int]:
    idmap = IdMap.for_current_user()
    return idmap.to_outside_uid(0), idmap.to_outside_gid(0)


# --- scratch and tar --------------------------------------------------------------------------

def test_scratch_is_an_empty_read_only_subvolume(store):
    snap = import_base(store, Src("scratch"))
    assert snap.id == "scratch" and listdir(snap.path) == []
    assert is_frozen(snap.path)


@pytest.mark.parametrize("compress", ["none", "gzip", "xz", "zstd"])
def test_busybox_tar_imports_in_every_compression(store, busybox_tar, tmp_path, compress):
    raw = busybox_tar.read_bytes()
    packed = {"none": lambda b: b, "gzip": gzip.compress, "xz": lzma.compress,
              "zstd": lambda b: subprocess.run(["zstd", "-q", "-c"], input=b, capture_output=True,
                                               check=True).stdout}[compress](raw)
    path = tmp_path / f"busybox.{compress}"
    path.write_bytes(packed)
    snap = import_base(store, Src("tar", str(path)))
    assert snap.id == "tar-sha256-" + hashlib.sha256(packed).hexdigest()
    assert is_frozen(snap.path)
    assert os.readlink(in_tree(snap.path, "bin/sh")) == "/bin/busybox"
    assert owner(in_tree(snap.path, "bin/busybox")) == container_root()


def test_same_tar_twice_reuses_the_snapshot_without_extracting(store, busybox_tar):
    first = import_base(store, Src("tar", str(busybox_tar)))
    made_before = made(first.path)
    second = import_base(store, Src("tar", str(busybox_tar)))
    assert second.id == first.id
    assert made(second.path) == made_before
    assert [s.id for s in store.snapshots() if s.kind == "base"] == [first.id]


def test_a_tar_base_is_hashed_once_until_the_file_changes(store, busybox_tar, tmp_path, monkeypatch):
    from stacker_kernel.oci import bases

    tar = tmp_path / "base.tar"
    tar.write_bytes(busybox_tar.read_bytes())
    read = []
    real = bases._sha256_file
    monkeypatch.setattr(bases, "_sha256_file", lambda p: read.append(p) or real(p))
    first = import_base(store, Src("tar", str(tar)))
    assert import_base(store, Src("tar", str(tar))).id == first.id
    assert len(read) == 1  # the second import knew the file's digest
    data = bytearray(tar.read_bytes())
    data[-1] ^= 0xFF  # same size, same mtime: only the ctime says it was written
    mtime = tar.stat().st_mtime_ns
    tar.write_bytes(bytes(data))
    os.utime(tar, ns=(mtime, mtime))
    assert bases._remembered_sha256(store, tar) == hashlib.sha256(bytes(data)).hexdigest()
    assert len(read) == 2


def test_tar_from_http_url_is_downloaded_and_imported(store, busybox_tar):
    directory = str(busybox_tar.parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=directory, **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{busybox_tar.name}"
        snap = import_base(store, Src("tar", url))
    finally:
        server.shutdown()
    assert snap.id == "tar-sha256-" + hashlib.sha256(busybox_tar.read_bytes()).hexdigest()
    assert in_tree(snap.path, "etc/passwd").exists()


def test_unreachable_tar_url_is_one_clear_error(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/rootfs.tar"
    with pytest.raises(ImageError, match=f"cannot download the base tar {url}"):
        import_base(store, Src("tar", url))


def test_missing_tar_is_a_clear_error(store, tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        import_base(store, Src("tar", str(tmp_path / "nope.tar")))


def test_hostile_tar_leaves_no_base_behind(store, tmp_path):
    ti = tarfile.TarInfo("../../escape")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(ti, io.BytesIO(b""))
    (tmp_path / "evil.tar").write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match=r"'\.\./\.\./escape'"):
        import_base(store, Src("tar", str(tmp_path / "evil.tar")))
    assert store.snapshots() == []
    assert [p.name for p in (store.root / "bases").iterdir()] == []


def test_device_node_in_base_tar_becomes_an_empty_file_with_a_warning(store, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("null")
        ti.type, ti.devmajor, ti.devminor, ti.mode = tarfile.CHRTYPE, 1, 3, 0o666
        tar.addfile(ti)
    (tmp_path / "dev.tar").write_bytes(buf.getvalue())
    warnings: list[str] = []
    snap = import_base(store, Src("tar", str(tmp_path / "dev.tar")), warn=warnings.append)
    assert stat.S_ISREG(os.lstat(in_tree(snap.path, "null")).st_mode)
    assert len(warnings) == 1 and "null" in warnings[0]


@pytest.mark.rootful
def test_device_node_in_base_tar_is_an_empty_file_even_as_real_root(store, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("null")
        ti.type, ti.devmajor, ti.devminor, ti.mode = tarfile.CHRTYPE, 1, 3, 0o666
        tar.addfile(ti)
    (tmp_path / "dev.tar").write_bytes(buf.getvalue())
    snap = import_base(store, Src("tar", str(tmp_path / "dev.tar")))
    assert stat.S_ISREG(os.lstat(in_tree(snap.path, "null")).st_mode)  # never a device from a layer (issue 13)


@pytest.mark.rootful
def test_busybox_tar_imports_as_real_root_owned_by_root(store, busybox_tar):
    snap = import_base(store, Src("tar", str(busybox_tar)))
    assert owner(in_tree(snap.path, "etc/passwd")) == (0, 0)


# --- oci layouts -----------------------------------------------------------------------------

def test_busybox_oci_layout_made_by_umoci_imports(store, busybox_tar, tmp_path):
    layout, bundle = tmp_path / "oci", tmp_path / "bundle"
    run = lambda *a: subprocess.run(["umoci", *a], check=True, capture_output=True)  # noqa: E731
    run("init", "--layout", str(layout))
    run("new", "--image", f"{layout}:busybox")
    run("unpack", "--rootless", "--image", f"{layout}:busybox", str(bundle))
    with tarfile.open(busybox_tar) as tar:
        for m in tar.getmembers():
            tar.extract(m, bundle / "rootfs")
    run("repack", "--image", f"{layout}:busybox", str(bundle))
    run("config", "--image", f"{layout}:busybox", "--config.env", "GREETING=hi", "--config.cmd", "/bin/sh")
    snap = import_base(store, Src("oci", f"{layout}:busybox"))
    digest = OCILayout(layout).resolve("busybox").manifest_digest
    assert snap.id == "oci-" + digest.split(":")[1]
    assert os.readlink(in_tree(snap.path, "bin/ls")) == "/bin/busybox"
    assert owner(in_tree(snap.path, "bin/busybox")) == container_root()
    assert "GREETING=hi" in base_config(store, snap)["config"]["Env"]


def test_whiteouts_and_opaque_directories_apply_across_layers(store, tmp_path):
    lower = tar_bytes([("etc", None), ("etc/gone", b"1"), ("etc/keep", b"2"), ("opq", None),
                       ("opq/old", b"3"), ("olddir", None), ("olddir/x", b"4")])
    upper = tar_bytes([("etc/.wh.gone", b""), (".wh.olddir", b""), ("opq", None),
                       ("opq/.wh..wh..opq", b""), ("opq/new", b"5")])
    make_layout(tmp_path / "oci", "two", [lower, upper])
    snap = import_base(store, Src("oci", f"{tmp_path / 'oci'}:two"))
    assert sorted(listdir(snap.path)) == ["etc", "opq"]
    assert listdir(snap.path / "etc") == ["keep"]
    assert listdir(snap.path / "opq") == ["new"]


def test_same_manifest_twice_reuses_the_snapshot(store, tmp_path):
    make_layout(tmp_path / "oci", "t", [tar_bytes([("f", b"x")])])
    first = import_base(store, Src("oci", f"{tmp_path / 'oci'}:t"))
    made_before = made(first.path)
    second = import_base(store, Src("oci", f"{tmp_path / 'oci'}:t"))
    assert second.id == first.id and made(second.path) == made_before


def test_oci_base_config_is_kept_for_the_engine(store, tmp_path):
    make_layout(tmp_path / "oci", "t", [tar_bytes([("f", b"x")])], env=["PATH=/usr/bin", "A=1"])
    snap = import_base(store, Src("oci", f"{tmp_path / 'oci'}:t"))
    assert base_config(store, snap)["config"]["Env"] == ["PATH=/usr/bin", "A=1"]
    assert base_image(store, snap).tag == "t"


def test_tar_base_has_no_image_config(store, busybox_tar):
    snap = import_base(store, Src("tar", str(busybox_tar)))
    assert base_config(store, snap) is None


def test_image_index_picks_the_host_platform(store, tmp_path):
    mdesc = make_layout(tmp_path / "oci", "multi", [tar_bytes([("f", b"amd64")])], as_index=True)
    ref = OCILayout(tmp_path / "oci").resolve("multi")
    assert ref.manifest_digest == mdesc["digest"]


def test_layer_blob_with_wrong_digest_is_refused(store, tmp_path):
    make_layout(tmp_path / "oci", "t", [tar_bytes([("f", b"x")])])
    layer = OCILayout(tmp_path / "oci").resolve("t").layers[0]
    blob = OCILayout(tmp_path / "oci").blob_path(layer.digest)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=f"layer {layer.digest} of .*:t does not match its digest"):
        import_base(store, Src("oci", f"{tmp_path / 'oci'}:t"))
    assert store.snapshots() == []


def test_malformed_digest_cannot_traverse_out_of_the_layout(tmp_path):
    make_layout(tmp_path / "oci", "t", [tar_bytes([("f", b"x")])])
    with pytest.raises(ImageError, match="malformed digest"):
        OCILayout(tmp_path / "oci").blob_path("sha256:../../../../etc/passwd")


def test_unknown_tag_lists_the_known_ones(tmp_path):
    make_layout(tmp_path / "oci", "present", [tar_bytes([("f", b"x")])])
    with pytest.raises(ImageError, match="tags: present"):
        OCILayout(tmp_path / "oci").resolve("absent")


def test_directory_that_is_not_a_layout_is_refused(tmp_path):
    with pytest.raises(ImageError, match="not an OCI image layout"):
        OCILayout(tmp_path)


def test_oci_reference_splits_at_the_first_colon_like_stacker():
    assert parse_oci_ref("dest:busybox:0.1.1") == ("dest", "busybox:0.1.1")
    assert parse_oci_ref("oci:base") == ("oci", "base")
    assert parse_oci_ref("/abs/layout:tag") == ("/abs/layout", "tag")


def test_oci_reference_without_tag_is_refused():
    with pytest.raises(ImageError, match="LAYOUT_DIR:TAG"):
        parse_oci_ref("just-a-dir")


# --- docker (skopeo) and built -------------------------------------------------------------------

def test_docker_source_with_oci_url_goes_through_skopeo(store, tmp_path):
    make_layout(tmp_path / "src", "img", [tar_bytes([("hello", b"from skopeo")])], env=["X=1"])
    snap = import_base(store, Src("docker", f"oci:{tmp_path / 'src'}:img"))
    assert in_tree(snap.path, "hello").read_bytes() == b"from skopeo"
    assert base_config(store, snap)["config"]["Env"] == ["X=1"]
    assert (store.root / "cache/images/index.json").exists()


def test_unreachable_registry_is_one_clear_error_naming_the_url(store, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no credentials file of the machine's
    url = "docker://127.0.0.1:1/library/busybox:latest"
    with pytest.raises(ImageError, match=f"cannot pull {url}: 127.0.0.1:1 refused the connection: check the host and port"):
        import_base(store, Src("docker", url))


def test_built_source_returns_the_resolved_snapshot(store, busybox_tar):
    other = import_base(store, Src("tar", str(busybox_tar)))
    assert import_base(store, Src("built", tag="first"), resolve_built={"first": other}.get).id == other.id


def test_built_source_without_resolver_is_not_built_yet(store):
    with pytest.raises(ImageError, match="layer first is not built yet"):
        import_base(store, Src("built", tag="first"))


def test_tar_from_another_layer_via_stacker_url(store, tmp_path):
    inner = tar_bytes([("payload", b"made by layer one")])
    outer = tmp_path / "outer.tar"
    outer.write_bytes(tar_bytes([("out", None), ("out/inner.tar", inner)]))
    one = import_base(store, Src("tar", str(outer)))
    snap = import_base(store, Src("tar", "stacker://one/out/inner.tar"), resolve_built={"one": one}.get)
    assert snap.id == "tar-sha256-" + hashlib.sha256(inner).hexdigest()
    assert in_tree(snap.path, "payload").read_bytes() == b"made by layer one"


def _owned_root_tar(path: Path, uid: int, bad: bool) -> Path:
    """A tar whose `./` entry belongs to `uid` (mode 0755), a file, and (if `bad`) an
    entry the import refuses after them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        root = tarfile.TarInfo("./")
        root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, 0o755, uid, uid
        tar.addfile(root)
        f = tarfile.TarInfo("./file")
        f.size, f.uid, f.gid = 2, uid, uid
        tar.addfile(f, io.BytesIO(b"hi"))
        if bad:
            tar.addfile(tarfile.TarInfo("../../escape"), io.BytesIO(b""))
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("uid", [0, 1000, 65534])
def test_a_tar_whose_root_belongs_to_any_id_leaves_nothing_and_blocks_nothing(store, tmp_path, uid):
    """Issue 23 point 11: whoever the tar says owns `./`, a failed import deletes its
    temporary subvolume, and a successful base is deleted by gc."""
    with pytest.raises(ImageError, match=r"'\.\./\.\./escape'"):
        import_base(store, Src("tar", str(_owned_root_tar(tmp_path / "bad.tar", uid, bad=True))))
    assert [p.name for p in (store.root / "bases").iterdir()] == []
    snap = import_base(store, Src("tar", str(_owned_root_tar(tmp_path / "good.tar", uid, bad=False))))
    assert in_tree(snap.path, "file").read_bytes() == b"hi"
    assert os.lstat(snap.path).st_uid == os.geteuid()  # the container's root: the user can snapshot it
    assert snap.id in store.gc()
    reaped(store.root)  # the reaper destroys it (from inside the user namespace when the top is not ours)
    assert [p.name for p in (store.root / "bases").iterdir()] == []
    assert not (store.root / "layers").exists() or os.listdir(store.root / "layers") == [".empty"]


def test_a_stale_temporary_base_of_a_foreign_owner_never_blocks_opening(storage, tmp_path):
    """A bases/.tmp-* left by an older version, its root owned by a subordinate id (mode
    0755): opening the store deletes it from inside the user namespace."""
    from stacker_kernel.container.userns import run_in_userns
    from stacker_kernel.storage import driver
    from stacker_kernel.storage.store import Store

    Store.open(storage).close()
    stale = Path(storage) / "bases" / ".tmp-0123456789abcdef0123456789abcdef"
    driver.of_root(storage).create(stale)
    (stale / "f").write_text("x")
    run_in_userns(os.chown, str(stale), 1000, 1000)
    with Store.open(storage) as s:
        assert [p.name for p in (s.root / "bases").iterdir()] == []
