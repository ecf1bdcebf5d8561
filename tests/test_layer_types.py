"""stacker's layer types (issue 17): `--layer-type tar|squashfs|erofs`, dm-verity,
and images with squashfs/erofs layers as bases (oci/layer_types.py).

Everything here runs unprivileged: the layers are made and read inside the user
namespace, and checked against the real tools (`unsquashfs`, `fsck.erofs
--extract`, `veritysetup verify`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.cli import main
from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.build import build
from stacker_kernel.errors import ImageError, RecipeError
from stacker_kernel.oci import layout_write as lw
from stacker_kernel.oci.bases import import_base
from stacker_kernel.oci.layer_types import (VERITY_ROOT_HASH_ANNOTATION, erofs_metadata, parse_layer_types,
                                            verity_data_offset)
from stacker_kernel.recipe.cells import ExportArgs, parse_cell
from stacker_kernel.storage.store import Store

from test_bases import Src  # noqa: F401

SQUASHFS_MT = "application/vnd.stacker.image.layer.squashfs+zstd"
EROFS_MT = "application/vnd.stacker.image.layer.erofs+lz4hc"
TAR_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
VERITYSETUP = shutil.which("veritysetup") or shutil.which("veritysetup", path="/usr/sbin:/sbin")

RECIPE = """\
base:
  from:
    type: tar
    url: {busybox}
  run: |
    mkdir -p /data/sub /data/gone/deep /data/keep/old
    echo hello > /data/a
    chmod 4755 /data/a
    ln /data/a /data/hard
    ln -s ../data/a /data/link
    ln -s /nowhere /data/dangling
    echo x > /data/gone/deep/f
    echo old > /data/keep/old/o
    echo s > /data/sub/s
    chown 1000:1001 /data/sub
    chown 5:6 /data/sub/s
    chmod 600 /data/sub/s
    mkfifo /data/fifo
    printf 'bin\\000ary' > /data/bin
    echo old > /etc/removeme
top:
  from:
    type: built
    tag: base
  run: |
    rm -rf /data/gone /etc/removeme
    rm -rf /data/keep && mkdir /data/keep && echo new > /data/keep/n
    chmod 0710 /data/sub
    echo more > /data/more
"""


def _built(storage: Path, tmp_path: Path, busybox_tar: Path, *types: str, no_verity: bool = False) -> Path:
    recipe = tmp_path / "stacker.yaml"
    recipe.write_text(RECIPE.format(busybox=busybox_tar))
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(recipe), oci_dir=str(oci), layer_types=parse_layer_types(types, no_verity),
              out=lambda s: None, stream=lambda s: None)
    return oci


def _image(oci: Path, tag: str) -> tuple[dict, dict]:
    index = json.loads((oci / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag)
    manifest = json.loads((oci / "blobs/sha256" / desc["digest"][7:]).read_text())
    config = json.loads((oci / "blobs/sha256" / manifest["config"]["digest"][7:]).read_text())
    return manifest, config


def _blob(oci: Path, desc: dict) -> Path:
    return oci / "blobs/sha256" / desc["digest"][7:]


def _tree(root: str) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, content sha or link target, hard-link group) of a
    tree, read inside the user namespace; whiteouts and opaque marks of a layer
    in overlay form show as ("whiteout",) and an "opaque" type suffix."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out[rel] = ("whiteout",)
                continue
            what = ""
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(Path(full).read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(full)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what)
    for paths in inodes.values():
        for p in paths:
            out[p] = out[p] + (tuple(sorted(paths)) if len(paths) > 1 else (),)
    return out


def _unpacked_by_us(storage: Path, oci: Path, tag: str) -> dict[str, tuple]:
    with Store.open(storage) as store:
        snap = import_base(store, Src("oci", f"{oci}:{tag}"), warn=lambda s: None)
        return run_in_userns(_tree, str(snap.path))


# --- the same recipe, three layer types -------------------------------------------

def test_tar_squashfs_and_erofs_images_unpack_to_the_same_rootfs(storage, tmp_path, busybox_tar):
    oci = _built(storage, tmp_path, busybox_tar, "tar", "squashfs", "erofs")
    tags = [m["annotations"][REF_NAME] for m in json.loads((oci / "index.json").read_text())["manifests"]
            if "artifactType" not in m]  # the images, not their SBOM and provenance
    assert sorted(tags) == ["base", "base-erofs", "base-squashfs", "top", "top-erofs", "top-squashfs"]
    for suffix, media_type in (("-squashfs", SQUASHFS_MT), ("-erofs", EROFS_MT)):
        manifest, config = _image(oci, "top" + suffix)
        assert {d["mediaType"] for d in manifest["layers"]} == {media_type}
        # not compressed further: the DiffID is the blob's digest (stacker's NoopCompressor)
        assert config["rootfs"]["diff_ids"] == [d["digest"] for d in manifest["layers"]]
        assert len(manifest["layers"]) == len(_image(oci, "top")[0]["layers"])
    want = _unpacked_by_us(storage, oci, "top")
    assert want["data/sub/s"][1:4] == (0o600, 5, 6) and "data/gone" not in want and "data/keep/old" not in want
    assert want["data/a"][-1] == ("data/a", "data/hard")
    assert _unpacked_by_us(storage, oci, "top-squashfs") == want
    assert _unpacked_by_us(storage, oci, "top-erofs") == want


def _tar_layer_entries(blob: str) -> dict[str, tuple]:
    """A tar layer's entries in the overlay form (`.wh.x` -> x whiteout, opaque dirs marked)."""
    out: dict[str, tuple] = {}
    links: dict[str, list[str]] = {}
    opaque: set[str] = set()
    with tarfile.open(blob) as tar:
        for m in tar:
            parent, _, name = m.name.rstrip("/").rpartition("/")
            if name == ".wh..wh..opq":
                opaque.add(parent)
            elif name.startswith(".wh."):
                out[f"{parent}/{name[4:]}" if parent else name[4:]] = ("whiteout",)
            elif m.islnk():
                links.setdefault(m.linkname, [m.linkname]).append(m.name)
                out[m.name] = out[m.linkname]
            else:
                kind = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK,
                        tarfile.FIFOTYPE: stat.S_IFIFO}.get(m.type, stat.S_IFREG)
                what = m.linkname if m.issym() else (hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                                                     if m.isreg() else "")
                out[m.name.rstrip("/")] = (kind, m.mode, m.uid, m.gid, what)
    for first, paths in links.items():
        for p in paths:
            out[p] = out[p] + (tuple(sorted(paths)),)
    for path, entry in out.items():
        if entry[0] != "whiteout" and entry[0] == stat.S_IFREG and len(entry) == 5:
            out[path] = entry + ((),)
    return {p: (e + ("opaque",) if p in opaque else e) for p, e in out.items()}


def _extracted_by_tool(tool: str, blob: str, dest: str) -> dict[str, tuple]:
    """The layer as `unsquashfs` / `fsck.erofs --extract` lays it out (as the namespace's root)."""
    try:
        if tool == "unsquashfs":
            subprocess.run(["unsquashfs", "-no-progress", "-d", dest, blob], check=True, capture_output=True)
        else:
            subprocess.run(["fsck.erofs", f"--extract={dest}", "--preserve", blob], check=True, capture_output=True)
        tree = _tree(dest)
        for path, entry in tree.items():
            full = os.path.join(dest, path)
            if entry[0] == stat.S_IFDIR and tool == "unsquashfs" and "user.overlay.opaque" in os.listxattr(full):
                tree[path] = entry + ("opaque",)
            elif entry[0] == stat.S_IFREG and len(entry) == 5:
                tree[path] = entry + ((),)
        return tree
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@pytest.mark.parametrize("kind,tool", [("squashfs", "unsquashfs"), ("erofs", "fsck.erofs")])
def test_each_filesystem_layer_holds_the_tar_layers_entries_as_its_tool_extracts_them(
        storage, tmp_path, busybox_tar, kind, tool):
    oci = _built(storage, tmp_path, busybox_tar, "tar", kind)
    tar_layers = _image(oci, "top")[0]["layers"]
    fs_layers = _image(oci, f"top-{kind}")[0]["layers"]
    for i, (t, f) in enumerate(zip(tar_layers, fs_layers)):
        want = _tar_layer_entries(str(_blob(oci, t)))
        got = run_in_userns(_extracted_by_tool, tool, str(_blob(oci, f)), str(tmp_path / f"x{i}"))
        if tool == "fsck.erofs":
            # fsck.erofs (1.5) restores no xattrs and copies hard links: take both from the image
            meta = erofs_metadata(str(_blob(oci, f)))
            # ...and it sets the mode before the owner, which drops setuid/setgid (and
            # dump.erofs 1.5 prints only the rwx bits): those bits come from the inode
            for path in [p for p in got if got[p][0] != "whiteout"]:
                mode = stat.S_IMODE(meta[path].mode)
                assert mode & 0o777 == got[path][1] & 0o777, path
                got[path] = got[path][:1] + (mode,) + got[path][2:]
            for path, entry in meta.items():
                if entry.xattrs.get("user.overlay.opaque") == b"y":
                    got[path] = got[path] + ("opaque",)
                if got[path][0] == stat.S_IFREG:
                    group = tuple(sorted(p for p, e in meta.items() if e.nid == entry.nid))
                    got[path] = got[path][:5] + ((group if len(group) > 1 else ()),)
        assert got == want, f"layer {i}"
    # the step layer of `top` has both kinds of whiteout
    last = _tar_layer_entries(str(_blob(oci, tar_layers[-1])))
    assert last["data/gone"] == ("whiteout",) and last["etc/removeme"] == ("whiteout",)
    assert last["data/keep"][-1] == "opaque"


# --- dm-verity ---------------------------------------------------------------------

def _verify(blob: Path, kind: str, root_hash: str) -> subprocess.CompletedProcess:
    offset = verity_data_offset(str(blob), kind)
    return subprocess.run([VERITYSETUP, "verify", str(blob), str(blob), root_hash, f"--hash-offset={offset}"],
                          capture_output=True, text=True)


@pytest.mark.parametrize("kind", ["squashfs", "erofs"])
def test_the_verity_root_hash_annotation_verifies_with_veritysetup(storage, tmp_path, busybox_tar, kind):
    oci = _built(storage, tmp_path, busybox_tar, kind)
    manifest, _ = _image(oci, f"top-{kind}")
    for desc in manifest["layers"]:
        root_hash = desc["annotations"][VERITY_ROOT_HASH_ANNOTATION]
        blob = _blob(oci, desc)
        assert verity_data_offset(str(blob), kind) < blob.stat().st_size  # the hash tree is appended
        result = _verify(blob, kind, root_hash)
        assert result.returncode == 0, result.stderr
    # a changed byte in the filesystem no longer verifies
    blob = _blob(oci, manifest["layers"][-1])
    bad = tmp_path / "bad"
    data = bytearray(blob.read_bytes())
    data[verity_data_offset(str(blob), kind) - 1] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert _verify(bad, kind, manifest["layers"][-1]["annotations"][VERITY_ROOT_HASH_ANNOTATION]).returncode != 0


def test_no_verity_leaves_the_hash_tree_and_annotation_out(storage, tmp_path, busybox_tar):
    oci = _built(storage, tmp_path, busybox_tar, "squashfs", no_verity=True)
    for desc in _image(oci, "top-squashfs")[0]["layers"]:
        assert VERITY_ROOT_HASH_ANNOTATION not in (desc.get("annotations") or {})
        blob = _blob(oci, desc)
        assert verity_data_offset(str(blob), "squashfs") == blob.stat().st_size


# --- as bases -------------------------------------------------------------------------

def test_a_squashfs_image_built_here_is_a_base_for_a_following_build(storage, tmp_path, busybox_tar):
    oci = _built(storage, tmp_path, busybox_tar, "squashfs")
    recipe = tmp_path / "next.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        next:
          from:
            type: oci
            url: {oci}:top-squashfs
          run: |
            test ! -e /data/gone && test ! -e /etc/removeme && test ! -e /data/keep/old
            test "$(cat /data/keep/n)" = new
            test "$(stat -c '%u:%g %a' /data/sub/s)" = "5:6 600"
            test "$(readlink /data/link)" = ../data/a
            echo next > /next
        """))
    out = tmp_path / "out"
    assert main(["--storage", str(storage), "build", "-f", str(recipe), "--oci-dir", str(out),
                 "--layer-type", "squashfs", "--layer-type", "tar"]) == 0
    base_layers = _image(oci, "top-squashfs")[0]["layers"]
    same_type = _image(out, "next-squashfs")[0]["layers"]
    # squashfs onto squashfs: the base's layers are reused as they are
    assert [d["digest"] for d in same_type[:-1]] == [d["digest"] for d in base_layers]
    # tar output: the squashfs base becomes one tar layer (stacker converts bases to the output type)
    manifest, config = _image(out, "next")
    assert [d["mediaType"] for d in manifest["layers"]] == [TAR_MT, TAR_MT]
    assert _unpacked_by_us(storage, out, "next")["next"][0] == stat.S_IFREG
    assert _unpacked_by_us(storage, out, "next") == _unpacked_by_us(storage, out, "next-squashfs")


def test_a_squashfs_image_is_a_docker_type_base_through_skopeo(storage, tmp_path, busybox_tar):
    oci = _built(storage, tmp_path, busybox_tar, "squashfs", no_verity=True)
    recipe = tmp_path / "dock.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        dock:
          from:
            type: docker
            url: oci:{oci}:top-squashfs
          run: |
            test "$(cat /data/keep/n)" = new && test ! -e /data/gone
        """))
    assert main(["--storage", str(storage), "build", "-f", str(recipe), "--oci-dir", str(tmp_path / "out")]) == 0
    # the base as one tar layer; the step changes no file, so it adds none (as stacker)
    assert [d["mediaType"] for d in _image(tmp_path / "out", "dock")[0]["layers"]] == [TAR_MT]


# --- hostile layers ------------------------------------------------------------------

def _mksquashfs(src: Path, out: Path, *extra: str) -> bytes:
    subprocess.run(["mksquashfs", str(src), str(out), "-all-root", "-no-progress", "-noappend", *extra],
                   check=True, capture_output=True)
    return out.read_bytes()


def _fs_image(layout: Path, tag: str, blobs: list[bytes], media_type: str = SQUASHFS_MT) -> str:
    lw.init_layout(str(layout))
    layers = [lw.put_blob(str(layout), b, media_type) for b in blobs]
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layers]}}
    cfg = lw.put_json(str(layout), config, lw.MEDIA_TYPE_CONFIG)
    manifest = lw.put_json(str(layout), {"schemaVersion": 2, "mediaType": lw.MEDIA_TYPE_MANIFEST,
                                         "config": cfg.to_json(), "layers": [d.to_json() for d in layers]},
                           lw.MEDIA_TYPE_MANIFEST)
    lw.set_tags(str(layout), [(tag, manifest)])
    return f"{layout}:{tag}"


def test_a_squashfs_symlink_cannot_lead_a_later_layer_outside_the_rootfs(storage, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    (one / "esc").symlink_to(outside)
    (two / "esc").mkdir(parents=True)
    (two / "esc" / "pwned").write_text("pwned")
    ref = _fs_image(tmp_path / "oci", "evil", [_mksquashfs(one, tmp_path / "1.sqfs"),
                                               _mksquashfs(two, tmp_path / "2.sqfs")])
    with Store.open(storage) as store:
        try:
            snap = import_base(store, Src("oci", ref), warn=lambda s: None)
        except ImageError:
            snap = None
        if snap is not None:  # if it was applied, it landed inside the rootfs
            assert run_in_userns(os.path.exists, str(snap.path / "esc" / "pwned")) or \
                run_in_userns(os.path.exists, str(snap.path) + str(outside / "pwned"))
    assert not (outside / "pwned").exists()


def test_a_squashfs_device_node_becomes_an_empty_file_with_a_warning(storage, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f")
    blob = _mksquashfs(src, tmp_path / "d.sqfs", "-p", "evil c 666 0 0 1 3")
    assert "evil" in subprocess.run(["unsquashfs", "-lln", str(tmp_path / "d.sqfs")],
                                    capture_output=True, text=True).stdout
    warnings: list[str] = []
    with Store.open(storage) as store:
        snap = import_base(store, Src("oci", _fs_image(tmp_path / "oci", "dev", [blob])), warn=warnings.append)
        st = run_in_userns(os.lstat, str(snap.path / "evil"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert any("evil" in w and "device" in w for w in warnings)


@pytest.mark.parametrize("kind", ["squashfs", "erofs"])
def test_a_layer_with_a_dotdot_name_is_refused(storage, tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    (src / "AA_escape").write_text("pwned")
    img = tmp_path / "img"
    if kind == "squashfs":  # uncompressed tables, so the name can be rewritten in place
        data = _mksquashfs(src, img, "-noI", "-noD", "-noF", "-noX")
    else:
        subprocess.run(["mkfs.erofs", "--quiet", str(img), str(src)], check=True)
        data = img.read_bytes()
    assert data.count(b"AA_escape") == 1
    evil = data.replace(b"AA_escape", b"../escape")
    ref = _fs_image(tmp_path / "oci", "evil", [evil], SQUASHFS_MT if kind == "squashfs" else EROFS_MT)
    with Store.open(storage) as store:
        with pytest.raises(ImageError, match="hostile or corrupt|corrupt or hostile"):
            import_base(store, Src("oci", ref), warn=lambda s: None)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "oci" / "escape").exists()


# --- flags --------------------------------------------------------------------------

def test_layer_type_flags_parse_as_stackers():
    assert [str(t) for t in parse_layer_types(None)] == ["tar"]
    assert [str(t) for t in parse_layer_types(["squashfs", "tar", "squashfs", "erofs"])] == \
        ["squashfs+verity", "tar", "erofs+verity"]
    assert [str(t) for t in parse_layer_types(["erofs"], no_verity=True)] == ["erofs"]
    assert [t.tag("app") for t in parse_layer_types(["tar", "squashfs", "erofs"])] == \
        ["app", "app-squashfs", "app-erofs"]


def test_export_magic_takes_layer_types_and_no_verity():
    cell = parse_cell("%export oci out --layer-type squashfs --layer-type=erofs --no-verity\n")
    args = cell.directives[0].args
    assert args == ExportArgs("oci", ["out"], ["squashfs", "erofs"], True)


@pytest.mark.rootful
def test_as_real_root_the_three_layer_types_unpack_to_the_same_rootfs(storage, tmp_path, busybox_tar):
    # real root extracts bases in-process (no user namespace): the same rules, the same result
    test_tar_squashfs_and_erofs_images_unpack_to_the_same_rootfs(storage, tmp_path, busybox_tar)


@pytest.mark.rootful
def test_as_real_root_a_squashfs_device_node_is_still_no_device(storage, tmp_path):
    test_a_squashfs_device_node_becomes_an_empty_file_with_a_warning(storage, tmp_path)


def test_an_unknown_layer_type_is_one_clear_line():
    with pytest.raises(RecipeError, match=r"%export on line 1: invalid layer type 'zip': use --layer-type tar, squashfs or erofs"):
        parse_cell("%export oci --layer-type zip\n")
    with pytest.raises(RecipeError, match="invalid layer type 'zip'"):
        parse_layer_types(["zip"])


def test_fsck_erofs_reads_an_erofs_base_as_nobody_who_can_write_nowhere_else(tmp_path, monkeypatch):
    """fsck.erofs parses a base's erofs layer a second time: whatever it makes of a
    hostile image, it can write only its own scratch folder. A stand-in fsck.erofs
    records who runs it and tries to write beside its folder and into the caller's."""
    _fsck_stand_in(tmp_path, monkeypatch)


@pytest.mark.rootful
def test_as_root_fsck_erofs_cannot_signal_a_host_process_running_as_nobody(tmp_path, monkeypatch):
    # Issue 23 point 5: it once ran as the host's own nobody, in the host's pid namespace.
    victim = subprocess.Popen(["sleep", "300"], user=65534, group=65534)
    try:
        _fsck_stand_in(tmp_path, monkeypatch, f"kill -9 {victim.pid}\n")
        assert victim.poll() is None, "fsck.erofs killed a host process"
    finally:
        victim.kill()
        victim.wait()


def _fsck_stand_in(tmp_path, monkeypatch, extra: str = "") -> None:
    import tempfile

    from stacker_kernel.oci.layer_types import MEDIA_TYPE_EROFS, fs_layer_to_tar

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    blob = tmp_path / "layer.erofs"
    subprocess.run(["mkfs.erofs", str(blob), str(src)], check=True, capture_output=True)
    shared = Path(tempfile.mkdtemp(dir="/var/tmp"))  # nobody must reach the stand-in
    try:
        shared.chmod(0o755)
        (shared / "probe").mkdir(mode=0o777)
        (shared / "probe").chmod(0o777)
        fake = shared / "fsck.erofs"
        fake.write_text("#!/bin/sh\n"
                        f"id -u > {shared}/probe/uid\n"
                        f"grep -c : /proc/net/dev > {shared}/probe/interfaces\n"
                        f"echo escaped > {tmp_path}/escaped 2>/dev/null\n"
                        "echo escaped > ../escaped 2>/dev/null\n"
                        + extra + "exit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{shared}:{os.environ['PATH']}")
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        with pytest.raises(ImageError, match="reading erofs layer"):
            run_in_userns(fs_layer_to_tar, str(blob), MEDIA_TYPE_EROFS + "+lz4hc",
                          str(tmp_path / "out.tar"), str(scratch))
        assert (shared / "probe/uid").read_text().strip() == "65534"
        assert (shared / "probe/interfaces").read_text().strip() == "1"  # lo only: no network
        assert not (tmp_path / "escaped").exists() and not (scratch / "escaped").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def crafted_erofs(inodes: list[tuple[int, int, int, int]]) -> bytes:
    """A 4 KiB erofs image (kernel include/uapi erofs_fs.h): 4 KiB blocks, metadata
    from block 0, root nid 0; `inodes` as (mode, size, layout, blkaddr), extended
    (64-byte, nids 0, 2, 4, ...) so a size can be 64 bits."""
    img = bytearray(4096)
    img[1024:1028] = (0xE0F5E1E2).to_bytes(4, "little")
    img[1024 + 12] = 12  # blkszbits
    for i, (mode, size, layout, blkaddr) in enumerate(inodes):
        off = 1024 + 128 + i * 64  # nid = off / 32, past the superblock
        img[off:off + 2] = (1 | layout << 1).to_bytes(2, "little")
        img[off + 4:off + 6] = mode.to_bytes(2, "little")
        img[off + 8:off + 16] = size.to_bytes(8, "little")
        img[off + 16:off + 20] = blkaddr.to_bytes(4, "little")
    img[1024 + 14:1024 + 16] = ((1024 + 128) // 32).to_bytes(2, "little")  # root nid
    return bytes(img)


def test_an_erofs_root_inode_claiming_2_to_the_62_bytes_is_refused_in_one_line(tmp_path):
    # Issue 23 point 8: this 4 KiB image once made the directory walk spin for ever.
    from test_oci_hostile import run_bounded

    img = tmp_path / "huge-root.erofs"
    img.write_bytes(crafted_erofs([(stat.S_IFDIR | 0o755, 1 << 62, 0, 0)]))
    res = run_bounded("import sys\n"
                      "from stacker_kernel.errors import ImageError\n"
                      "from stacker_kernel.oci.layer_types import erofs_metadata\n"
                      f"try: erofs_metadata({str(img)!r})\n"
                      "except ImageError as e: print(e); sys.exit(2)\n", "reading a 4 KiB erofs image")
    assert res.returncode == 2, res.stderr
    assert res.stdout == (f"erofs layer {img} has an inode whose size ({1 << 62} bytes) exceeds the image's own "
                          "(4096 bytes): it is hostile or corrupt; do not use it\n")


def test_erofs_directories_sharing_blocks_cannot_multiply_the_walk(tmp_path):
    # Distinct directory inodes over the same block: each is within the image, together not.
    root = bytearray(4096)
    names = [b"d%d" % i for i in range(40)]
    nids = [(1024 + 128 + 64 * (i + 1)) // 32 for i in range(len(names))]
    heads = 12 * len(names)
    pos = heads
    for i, (name, nid) in enumerate(zip(names, nids)):
        root[i * 12:i * 12 + 8] = nid.to_bytes(8, "little")
        root[i * 12 + 8:i * 12 + 10] = pos.to_bytes(2, "little")
        root[i * 12 + 10] = 2  # directory
        root[pos:pos + len(name)] = name
        pos += len(name)
    img = bytearray(crafted_erofs([(stat.S_IFDIR | 0o755, 3000, 0, 1)] +
                                  [(stat.S_IFDIR | 0o755, 4096, 0, 2)] * len(names)))
    data = img + root + bytes(4096)  # block 2: an empty directory, 40 times
    path = tmp_path / "shared-dirs.erofs"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"has more directory data than the image holds: it is hostile"):
        erofs_metadata(str(path))
