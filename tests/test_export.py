"""oci/tarwriter.py, oci/layout_write.py, oci/export.py: snapshot chains to an
OCI layout that umoci and skopeo accept, on real btrfs in a real user namespace."""
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.errors import ImageError
from stacker_kernel.oci.diff import diff_snapshots
from stacker_kernel.oci.export import ImageSpec, OciBase, StepSnapshot, export_image
from stacker_kernel.oci.tarwriter import write_layer
from stacker_kernel.storage import btrfs
from stacker_kernel.storage import driver as drivers

EPOCH = 1700000000


@dataclass
class Cfg:
    """The image-config directives of a layer (what recipe.model.Layer has)."""
    environment: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    cmd: list | None = None
    entrypoint: list | None = None
    full_command: list | None = None
    working_dir: str | None = None
    volumes: list = field(default_factory=list)
    runtime_user: str | None = None
    annotations: dict = field(default_factory=dict)
    os: str | None = None
    arch: str | None = None
    build_only: bool = False


class Chain:
    """A writable tree and its read-only snapshots, changed in a userns, made by the
    storage root's driver (a btrfs subvolume and its snapshots, or overlay layers)."""

    def __init__(self, root: Path, name: str = "live"):
        self.root = root
        self.driver = drivers.of_root(root)
        trees = root / "trees"
        trees.mkdir(exist_ok=True)
        self.live = trees / name
        if self.driver.name == "btrfs":
            btrfs.create_subvolume(self.live)
        else:  # an overlay tree stacks on a layer: an empty one
            tmp, base = trees / f".tmp-{name}", trees / f"{name}-empty"
            self.driver.create(tmp)
            self.driver.adopt(tmp, base, f"{name}-empty")
            self.driver.writable_copy(base, self.live)
        self.count = 0
        self.name = name

    def change(self, fn, *args):
        return run_in_userns(fn, str(self.live), *args)

    def sh(self, script: str) -> None:
        def run(live):
            subprocess.run(["/bin/sh", "-ec", script], cwd=live, check=True)
        self.change(run)

    def snap(self) -> str:
        dest = self.live.parent / f"{self.name}-s{self.count}"
        self.count += 1
        self.driver.commit(self.live, dest, dest.name)
        return str(dest)


def _extract(live, tar_path):
    with tarfile.open(tar_path) as t:
        t.extractall(live, numeric_owner=True)


@pytest.fixture
def busybox_base(storage, busybox_tar) -> tuple[Chain, str]:
    """A chain whose first snapshot is the busybox rootfs."""
    c = Chain(storage)
    c.change(_extract, str(busybox_tar))
    return c, c.snap()


def step(chain: Chain, script: str) -> StepSnapshot:
    chain.sh(script)
    return StepSnapshot(chain.snap(), script)


# --- reading what we wrote ----------------------------------------------------------

def read_json(layout, digest):
    return json.loads((Path(layout) / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())


def index(layout):
    return json.loads((Path(layout) / "index.json").read_text())


def manifest(layout, tag):
    for d in index(layout)["manifests"]:
        if d["annotations"]["org.opencontainers.image.ref.name"] == tag:
            return read_json(layout, d["digest"])
    raise KeyError(tag)


def config(layout, tag):
    return read_json(layout, manifest(layout, tag)["config"]["digest"])


def layer_tar(layout, desc) -> tarfile.TarFile:
    data = gzip.decompress((Path(layout) / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes())
    return tarfile.open(fileobj=io.BytesIO(data))


def check_digests(layout, tag):
    """Validate `tag`: `oci-image-tool validate` (image-spec JSON schemas, blob
    digests and sizes), then our own checks: every layer's DiffID matches its
    tar, one non-empty history entry per layer."""
    res = subprocess.run(["oci-image-tool", "validate", "--type", "image", "--ref", f"name={tag}", str(layout)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    m = manifest(layout, tag)
    c = config(layout, tag)
    for desc in [m["config"]] + m["layers"]:
        blob = (Path(layout) / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
        assert len(blob) == desc["size"]
    diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(
        (Path(layout) / "blobs" / "sha256" / d["digest"].split(":")[1]).read_bytes())).hexdigest() for d in m["layers"]]
    assert diff_ids == c["rootfs"]["diff_ids"]
    assert len([h for h in c["history"] if not h.get("empty_layer")]) == len(m["layers"])


def umoci_unpack(storage: Path, layout, tag) -> Path:
    """`umoci unpack --rootless` of `tag`; the bundle's rootfs."""
    bundle = storage / f"bundle-{tag}-{os.urandom(4).hex()}"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle)],
                   check=True, capture_output=True, text=True)
    return bundle / "rootfs"


def tree_in_userns(root: str) -> dict:
    """path -> (type, mode, uid, gid, link target or sha256, xattrs) of a tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            else:
                what = None
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)
                      if k.startswith("user.")}
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what, xattrs)
    return out


def unpack_with_owners(storage: Path, layout, tag) -> Path:
    """`umoci unpack` as root of a user namespace, so owners are restored."""
    holder = storage / f"owned-{tag}-{os.urandom(4).hex()}"
    if btrfs.is_btrfs(storage):
        btrfs.create_subvolume(holder)  # deleted with one ioctl whatever the owners inside
    else:
        holder.mkdir()  # overlay storage: the fixture deletes the root as the container's root

    def unpack(layout, tag, bundle):
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", bundle], check=True, capture_output=True)
    run_in_userns(unpack, str(layout), tag, str(holder / "bundle"))
    return holder / "bundle" / "rootfs"


# --- layer tars -------------------------------------------------------------------------

def test_layer_tar_has_whiteouts_before_siblings_and_an_opaque_only_for_replaced_dirs(storage):
    c = Chain(storage)
    c.sh("mkdir -p a/old b/keep; echo 1 > a/f; echo 2 > a/z; echo 3 > b/keep/x")
    s0 = c.snap()
    c.sh("rm a/z; rm -r b/keep; mkdir b/keep; echo 4 > b/keep/y; echo 5 > a/new")
    s1 = c.snap()
    blob = run_in_userns(lambda: write_layer(s1, diff_snapshots(s0, s1), str(storage / "out")))
    names = [m.name for m in layer_tar(storage / "out", {"digest": blob.digest}).getmembers()]
    assert names.index("a/.wh.z") < names.index("a/new")
    assert "b/keep/.wh..wh..opq" in names and names.index("b/keep") < names.index("b/keep/.wh..wh..opq") < names.index("b/keep/y")
    assert "a/.wh..wh..opq" not in names and "b/keep/.wh.x" not in names


def test_layer_tar_hard_links_point_inside_the_layer(storage):
    c = Chain(storage)
    s0 = c.snap()
    c.sh("mkdir d; echo data > d/one; ln d/one d/two; ln d/one three")
    s1 = c.snap()
    blob = run_in_userns(lambda: write_layer(s1, diff_snapshots(s0, s1), str(storage / "out")))
    members = {m.name: m for m in layer_tar(storage / "out", {"digest": blob.digest}).getmembers()}
    assert members["d/one"].isreg() and members["d/one"].size == 5
    assert members["d/two"].islnk() and members["d/two"].linkname == "d/one"
    assert members["three"].islnk() and members["three"].linkname == "d/one"


def test_layer_tar_has_numeric_owners_xattrs_and_clamped_mtimes(storage):
    c = Chain(storage)
    s0 = c.snap()

    def make(live):
        Path(f"{live}/f").write_text("x")
        os.chown(f"{live}/f", 1000, 2000)
        os.setxattr(f"{live}/f", "user.bin", b"\xff\x00x")
    c.change(make)
    s1 = c.snap()
    blob = run_in_userns(lambda: write_layer(s1, diff_snapshots(s0, s1), str(storage / "out"), source_date_epoch=EPOCH))
    m = layer_tar(storage / "out", {"digest": blob.digest}).getmember("f")
    assert (m.uid, m.gid, m.uname, m.gname) == (1000, 2000, "", "")
    assert m.mtime == EPOCH
    assert m.pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == b"\xff\x00x"


def test_layer_blob_is_named_by_its_digest_and_diff_id_is_of_the_tar(storage):
    c = Chain(storage)
    s0 = c.snap()
    c.sh("echo hi > f")
    s1 = c.snap()
    blob = run_in_userns(lambda: write_layer(s1, diff_snapshots(s0, s1), str(storage / "out")))
    data = (storage / "out" / "blobs" / "sha256" / blob.digest.split(":")[1]).read_bytes()
    assert blob.digest == "sha256:" + hashlib.sha256(data).hexdigest() and blob.size == len(data)
    assert blob.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    assert blob.media_type == "application/vnd.oci.image.layer.v1.tar+gzip" and not blob.empty
    assert [p.name for p in (storage / "out" / "blobs" / "sha256").iterdir()] == [blob.digest.split(":")[1]]


# --- images ----------------------------------------------------------------------------------

def test_exported_image_unpacks_with_umoci_and_has_the_steps_files(storage, busybox_base):
    c, base = busybox_base
    steps = [step(c, "touch foo"), step(c, "mkdir -p srv/www && echo hello > srv/www/index.html")]
    layout = storage / "oci"
    tags = export_image(str(layout), [ImageSpec("busybox", Cfg(), steps, base_rootfs=base)])
    assert tags == ["busybox"]
    check_digests(layout, "busybox")
    rootfs = umoci_unpack(storage, layout, "busybox")
    assert (rootfs / "foo").is_file()
    assert (rootfs / "srv/www/index.html").read_text() == "hello\n"
    assert (rootfs / "bin/busybox").is_file()


def test_unpacked_rootfs_equals_the_snapshot(storage, busybox_base):
    c, base = busybox_base

    def work(live):
        Path(f"{live}/etc/owned").write_text("o")
        os.chown(f"{live}/etc/owned", 1000, 100)
        os.setxattr(f"{live}/etc/owned", "user.k", b"v")
        os.symlink("../etc/owned", f"{live}/usr/link")
        os.link(f"{live}/etc/passwd", f"{live}/etc/passwd-hard")
        os.chmod(f"{live}/etc/group", 0o600)
        os.unlink(f"{live}/bin/ls")
    c.change(work)
    tip = c.snap()
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("t", Cfg(), [StepSnapshot(tip, "work")], base_rootfs=base)])
    rootfs = unpack_with_owners(storage, layout, "t")
    assert run_in_userns(tree_in_userns, str(rootfs)) == run_in_userns(tree_in_userns, tip)


def test_whiteouts_across_a_chain_of_built_layers(storage, busybox_base):
    # SC-06
    c, base = busybox_base
    l1 = [step(c, "mkdir -p aaa/111/ab ddd/111/ab")]
    l2 = [step(c, "rm -rf aaa; mkdir -p bbb/111/ab ccc/111/ab; rm -rf ddd; mkdir -p ddd/222/ab")]
    l3 = [step(c, "rm -rf bbb ccc; mkdir -p aaa/222/ab ccc/222/ab ddd/333/ab")]
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("l1", Cfg(), l1, base_rootfs=base),
                               ImageSpec("l2", Cfg(), l2, parent="l1"),
                               ImageSpec("l3", Cfg(), l3, parent="l2")])
    r = umoci_unpack(storage, layout, "l3")
    assert not (r / "aaa/111").exists() and (r / "aaa/222/ab").is_dir()
    assert not (r / "bbb").exists()
    assert (r / "ccc/222").is_dir() and not (r / "ccc/111").exists()
    assert (r / "ddd/333").is_dir() and (r / "ddd/222").is_dir() and not (r / "ddd/111").exists()


def test_index_lists_tags_in_build_order(storage, busybox_base):
    c, base = busybox_base
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("parent", Cfg(), [step(c, "touch root/parent")], base_rootfs=base),
                               ImageSpec("child", Cfg(), [step(c, "touch root/child")], parent="parent")])
    assert [d["annotations"]["org.opencontainers.image.ref.name"] for d in index(layout)["manifests"]] == ["parent", "child"]
    assert (umoci_unpack(storage, layout, "child") / "root/parent").exists()


def test_skopeo_inspects_and_copies_the_layout(storage, busybox_base):
    c, base = busybox_base
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("img", Cfg(), [step(c, "touch x")], base_rootfs=base)])
    info = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout}:img"], check=True,
                                     capture_output=True, text=True).stdout)
    assert len(info["Layers"]) == 2
    subprocess.run(["skopeo", "copy", f"oci:{layout}:img", f"oci:{storage / 'copy'}:img"], check=True, capture_output=True)
    assert manifest(storage / "copy", "img")["layers"] == manifest(layout, "img")["layers"]


def test_same_epoch_gives_identical_manifest_digests(storage, busybox_base):
    c, base = busybox_base
    steps = [step(c, "echo a > a"), step(c, "true"), step(c, "rm a; mkdir b")]
    specs = [ImageSpec("r", Cfg(environment={"B": "2", "A": "1"}), steps, base_rootfs=base)]
    export_image(str(storage / "one"), specs, source_date_epoch=EPOCH)
    export_image(str(storage / "two"), specs, source_date_epoch=EPOCH)
    assert index(storage / "one") == index(storage / "two")
    cfg = config(storage / "one", "r")
    assert cfg["created"] == "2023-11-14T22:13:20Z" and cfg["author"] == "stacker"
    assert "stacker build" in cfg["history"][-1]["created_by"]


def test_step_that_changed_nothing_is_an_empty_history_entry(storage, busybox_base):
    c, base = busybox_base
    steps = [step(c, "touch one"), step(c, "true"), step(c, "touch two")]
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("pkg", Cfg(), steps, base_rootfs=base)])
    hist = config(layout, "pkg")["history"]
    assert len(manifest(layout, "pkg")["layers"]) == 3  # base + two changing steps
    assert [h.get("empty_layer", False) for h in hist] == [False, False, True, False, True]
    assert hist[2]["created_by"] == "stacker-kernel step 2 of layer pkg: true"
    check_digests(layout, "pkg")


def test_squash_makes_one_layer_per_stacker_layer(storage, busybox_base):
    c, base = busybox_base
    steps = [step(c, "touch one"), step(c, "touch two"), step(c, "rm one")]
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("sq", Cfg(), steps, base_rootfs=base)], squash=True)
    m = manifest(layout, "sq")
    assert len(m["layers"]) == 2
    r = umoci_unpack(storage, layout, "sq")
    assert (r / "two").exists() and not (r / "one").exists()


def test_config_directives_follow_stacker(storage, busybox_base):
    # SC-03 plus env/labels/volumes/working_dir/user
    c, base = busybox_base
    tip = step(c, "touch x")
    layout = storage / "oci"
    export_image(str(layout), [
        ImageSpec("base", Cfg(cmd=["foo"], environment={"A": "1"}, labels={"l": "1"}, volumes=["/data"],
                              working_dir="/srv", runtime_user="1000"), [tip], base_rootfs=base),
        ImageSpec("layer1", Cfg(entrypoint=["bar"], environment={"A": "2", "B": "3"}, labels={"m": "2"}), [], parent="base"),
        ImageSpec("layer2", Cfg(full_command=["baz"]), [], parent="layer1"),
    ])
    b, l1, l2 = (config(layout, t)["config"] for t in ("base", "layer1", "layer2"))
    assert b["Cmd"] == ["foo"] and "Entrypoint" not in b
    assert b["Env"][0] == "A=1" and any(e.startswith("PATH=") for e in b["Env"])
    assert b["Volumes"] == {"/data": {}} and b["WorkingDir"] == "/srv" and b["User"] == "1000"
    assert l1["Entrypoint"] == ["bar"] and "Cmd" not in l1  # cmd not inherited
    assert [e for e in l1["Env"] if e[0] in "AB"] == ["A=2", "B=3"]
    assert l1["Labels"] == {"l": "1", "m": "2"} and l1["WorkingDir"] == "/srv"
    assert l2["Entrypoint"] == ["baz"] and "Cmd" not in l2


def test_manifest_annotations_carry_the_yaml_version_and_user_annotations(storage, busybox_base):
    c, base = busybox_base
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("a", Cfg(annotations={"org.example.k": "v"}), [step(c, "touch x")], base_rootfs=base)],
                 stacker_yaml="a:\n  run: touch x\n", annotations_namespace="org.test")
    ann = manifest(layout, "a")["annotations"]
    assert ann["org.test.stacker.stacker_yaml"] == "a:\n  run: touch x\n"
    assert ann["org.test.stacker.stacker_version"] == "stacker-kernel 0.1.0"
    assert ann["org.example.k"] == "v"


def test_build_only_layers_are_untagged_and_carried_into_children(storage, busybox_base):
    c, base = busybox_base
    layout = storage / "oci"
    tags = export_image(str(layout), [
        ImageSpec("one", Cfg(), [step(c, "touch one")], base_rootfs=base),
        ImageSpec("two", Cfg(build_only=True), [step(c, "touch two")], parent="one"),
        ImageSpec("three", Cfg(build_only=True), [step(c, "touch three")], parent="two"),
        ImageSpec("four", Cfg(), [step(c, "touch four")], parent="three"),
    ])
    assert tags == ["one", "four"]
    assert [d["annotations"]["org.opencontainers.image.ref.name"] for d in index(layout)["manifests"]] == ["one", "four"]
    assert len(manifest(layout, "four")["layers"]) == 5
    r = umoci_unpack(storage, layout, "four")
    assert all((r / n).exists() for n in ("one", "two", "three", "four"))


def test_oci_base_layers_are_taken_as_is(storage, busybox_base):
    c, base = busybox_base
    first = storage / "first"
    export_image(str(first), [ImageSpec("base", Cfg(cmd=["sh"]), [], base_rootfs=base)], source_date_epoch=EPOCH)
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("app", Cfg(), [step(c, "touch app")], base_rootfs=base,
                                         base_oci=OciBase.from_layout(str(first), "base"))])
    base_layers = manifest(first, "base")["layers"]
    assert manifest(layout, "app")["layers"][:1] == base_layers
    assert len(manifest(layout, "app")["layers"]) == 2
    assert config(layout, "app")["history"][0] == config(first, "base")["history"][0]
    check_digests(layout, "app")
    assert (umoci_unpack(storage, layout, "app") / "app").exists()


def test_re_export_replaces_a_tag(storage, busybox_base):
    c, base = busybox_base
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("t", Cfg(), [step(c, "touch a")], base_rootfs=base)])
    export_image(str(layout), [ImageSpec("t", Cfg(), [step(c, "touch b")], base_rootfs=base)])
    refs = [d["annotations"]["org.opencontainers.image.ref.name"] for d in index(layout)["manifests"]]
    assert refs == ["t"]
    assert (umoci_unpack(storage, layout, "t") / "b").exists()


def test_non_layout_directory_is_refused(storage, busybox_base):
    c, base = busybox_base
    (storage / "notoci").mkdir()
    (storage / "notoci" / "file").write_text("x")
    with pytest.raises(ImageError, match="not an OCI layout"):
        export_image(str(storage / "notoci"), [ImageSpec("t", Cfg(), [], base_rootfs=base)])


def test_scratch_image_with_no_changes_still_has_one_layer(storage):
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("empty", Cfg(), [])])
    assert len(manifest(layout, "empty")["layers"]) == 1
    check_digests(layout, "empty")
    umoci_unpack(storage, layout, "empty")


@pytest.mark.rootful
def test_root_export_keeps_owners_and_unpacks(storage, busybox_base):
    c, base = busybox_base

    def work(live):
        Path(f"{live}/owned").write_text("o")
        os.chown(f"{live}/owned", 1234, 5678)
    c.change(work)
    tip = c.snap()
    layout = storage / "oci"
    export_image(str(layout), [ImageSpec("r", Cfg(), [StepSnapshot(tip, "chown")], base_rootfs=base)])
    bundle = storage / "b"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:r", str(bundle)], check=True, capture_output=True)
    st = os.lstat(bundle / "rootfs" / "owned")
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_reexport_reuses_layers_made_from_the_same_snapshots(storage, busybox_oci, tmp_path):
    """A second export of the same build into the same layout makes no layer again."""
    from stacker_kernel.cli import main as cli_main

    yaml = tmp_path / "stacker.yaml"
    yaml.write_text("l:\n  from:\n    type: oci\n    url: ${{B}}\n  run: echo x > /x\n")
    oci = tmp_path / "oci"
    args = ["--storage", str(storage), "build", "-f", str(yaml), "--oci-dir", str(oci),
            "--substitute", f"B={busybox_oci}"]

    def layer_mtimes():
        index = json.loads((oci / "index.json").read_text())
        blob = lambda d: oci / "blobs" / "sha256" / d.split(":")[1]  # noqa: E731
        manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
        return {d["digest"]: blob(d["digest"]).stat().st_mtime_ns for d in manifest["layers"]}

    assert cli_main(args) == 0
    first = layer_mtimes()
    assert cli_main(args) == 0
    assert layer_mtimes() == first
