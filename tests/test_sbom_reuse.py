"""An SBOM made again costs what changed (issue 25): the document part its packages
give is kept and reused (oci/sbom.py), the unowned-files walk (engine/sbom.py) reads
each directory once. Every reused document must be byte for byte the one made anew."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from stacker_kernel.engine.build import build
from stacker_kernel.engine.sbom import _unowned
from stacker_kernel.oci import sbom
from stacker_kernel.oci.sbom import DirSummary, Inventory, Package, Unowned, document_bytes, spdx_document
from stacker_kernel.storage.store import Store

from test_sbom import EPOCH, SPDX, apk_yaml, attached

PACKAGES = (
    Package("deb", "adduser", "3.134", "all", ("GPL-2+",), "debian"),
    Package("deb", "bison-sk", "1:3.8", "amd64", ("GPL-3+ with Bison exception", "Expat"), "debian"),
    Package("deb", "nolicence", "1.0", "amd64", (), "debian"),
    Package("apk", "musl", "1.2.4-r2", "x86_64", ("MIT BSD-2-Clause",), "alpine"),
)
FIRST = Inventory(PACKAGES, Unowned(3, 30, (DirSummary("/etc", 2, 20), DirSummary("/late", 1, 10))), "debian", "12")
# A later RUN changed files no package owns: the same packages, other unowned files.
LATER = Inventory(PACKAGES, Unowned(4, 1234, (DirSummary("/opt", 2, 1204), DirSummary("/etc", 2, 30))),
                  "debian", "12")
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def made_anew(inv: Inventory, name: str, digest: str | None, epoch: int | None) -> bytes:
    """The document as spdx-tools makes it from these very values (no skeleton)."""
    return document_bytes(sbom._made(inv, name, digest, epoch, inv.unowned))


def test_a_document_from_the_kept_part_equals_the_one_made_anew(tmp_path):
    cache = str(tmp_path / "sbom")
    first = document_bytes(spdx_document(FIRST, "app", subject_digest=DIGEST_A, source_date_epoch=1,
                                         cache_dir=cache))
    assert first == made_anew(FIRST, "app", DIGEST_A, 1)
    assert len(os.listdir(cache)) == 1
    for inv, digest, epoch in ((LATER, DIGEST_B, 1700000000), (FIRST, DIGEST_B, 5), (LATER, DIGEST_A, 0)):
        again = document_bytes(spdx_document(inv, "app", subject_digest=digest, source_date_epoch=epoch,
                                             cache_dir=cache))
        assert again == made_anew(inv, "app", digest, epoch)
        assert sbom.validate_bytes(again) == []
    assert len(os.listdir(cache)) == 1  # the same packages: one kept part
    # Another name, no subject, no file walk: parts of their own, each equal to the made one.
    for inv, name, digest in ((LATER, "other", DIGEST_A), (LATER, "app", None),
                              (Inventory(PACKAGES, None, "debian", "12"), "app", DIGEST_A)):
        kept = document_bytes(spdx_document(inv, name, subject_digest=digest, source_date_epoch=7, cache_dir=cache))
        assert kept == made_anew(inv, name, digest, 7)
    assert len(os.listdir(cache)) == 4


def test_other_packages_are_not_taken_from_a_kept_part(tmp_path):
    cache = str(tmp_path / "sbom")
    spdx_document(FIRST, "app", subject_digest=DIGEST_A, source_date_epoch=1, cache_dir=cache)
    upgraded = Inventory((Package("deb", "adduser", "3.135", "all", ("GPL-2+",), "debian"),) + PACKAGES[1:],
                         FIRST.unowned, "debian", "12")
    doc = spdx_document(upgraded, "app", subject_digest=DIGEST_A, source_date_epoch=1, cache_dir=cache)
    assert document_bytes(doc) == made_anew(upgraded, "app", DIGEST_A, 1)
    assert {p["name"]: p.get("versionInfo") for p in doc["packages"]}["adduser"] == "3.135"


def test_a_kept_part_is_reused_without_loading_spdx_tools(tmp_path):
    cache = str(tmp_path / "sbom")
    spdx_document(FIRST, "app", subject_digest=DIGEST_A, source_date_epoch=1, cache_dir=cache)
    code = ("import sys\n"
            "from stacker_kernel.oci.sbom import DirSummary, Inventory, Package, Unowned, document_bytes, "
            "spdx_document\n"
            f"data = document_bytes(spdx_document({LATER!r}, 'app', subject_digest={DIGEST_B!r}, "
            f"source_date_epoch=9, cache_dir={cache!r}))\n"
            "sys.stdout.buffer.write(data)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('spdx_tools', 'license_expression', 'beartype'))),"
            " file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert proc.stderr.decode().strip() == "[]"
    assert proc.stdout == made_anew(LATER, "app", DIGEST_B, 9)


def test_the_kept_parts_are_bounded(tmp_path, monkeypatch):
    cache = tmp_path / "sbom"
    monkeypatch.setattr(sbom, "_SKELETONS_KEPT", 2)
    for n in range(4):
        inv = Inventory((Package("apk", f"p{n}", "1", "x86_64", ("MIT",), "alpine"),), None)
        spdx_document(inv, "app", cache_dir=str(cache))
    assert len(list(cache.glob("*.json"))) == 2


def test_an_unwritable_cache_still_gives_the_document(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    doc = spdx_document(FIRST, "app", subject_digest=DIGEST_A, source_date_epoch=1, cache_dir=str(blocked / "sbom"))
    assert document_bytes(doc) == made_anew(FIRST, "app", DIGEST_A, 1)


def test_the_unowned_walk_counts_as_os_walk_lists(tmp_path):
    """Files (and symlinks to files) no package owns, per top two directory levels;
    a symlink to a directory is no file and is not followed."""
    root = tmp_path / "rootfs"
    (root / "etc" / "apt" / "deep").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root\n")  # 5 bytes
    (root / "etc" / "owned.conf").write_text("owned\n")
    (root / "etc" / "apt" / "sources").write_text("deb x\n")  # 6
    (root / "etc" / "apt" / "deep" / "a").write_text("abc")  # 3, counted under /etc/apt
    (root / "usr" / "lib" / "libx.so").write_text("x" * 100)
    (root / "late").write_text("late\n")  # 5, a top-level file is its own entry
    os.symlink("usr/lib", root / "lib")  # a directory through a symlink: neither file nor walked
    os.symlink("passwd", root / "etc" / "link")  # a symlink to a file: a file of size 0
    os.symlink("/nonexistent", root / "etc" / "dangling")  # also a file
    os.mkfifo(root / "etc" / "fifo")
    got = _unowned(str(root), ["/etc/owned.conf", "/lib/libx.so", "/etc/apt"])  # /lib/libx.so is usr/lib/libx.so
    assert got == Unowned(7, 19, (DirSummary("/etc/apt", 2, 9), DirSummary("/etc", 4, 5), DirSummary("/late", 1, 5)))


def test_a_rebuild_attaches_the_sbom_a_fresh_build_attaches(storage, busybox_oci, tmp_path, monkeypatch):
    """The rebuild reuses the kept part of the first build's SBOM; a build in a store
    without any kept part makes the same document."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    cache = storage / "cache" / "sbom"
    first = apk_yaml(tmp_path, busybox_oci, "echo one > /late")
    with Store.open(storage) as store:
        build(store, str(first), oci_dir=str(tmp_path / "oci"), out=lambda s: None, stream=lambda s: None)
        assert len(list(cache.glob("*.json"))) == 1
        later = apk_yaml(tmp_path, busybox_oci, "echo a longer line > /late")
        build(store, str(later), oci_dir=str(tmp_path / "oci"), out=lambda s: None, stream=lambda s: None)
        assert len(list(cache.glob("*.json"))) == 1  # reused
        _, reused = attached(tmp_path / "oci", "apk", SPDX)
        for kept in cache.glob("*.json"):
            kept.unlink()
        build(store, str(later), oci_dir=str(tmp_path / "fresh"), no_cache=True, out=lambda s: None,
              stream=lambda s: None)
    _, fresh = attached(tmp_path / "fresh", "apk", SPDX)
    assert json.loads(reused)["documentNamespace"] == json.loads(fresh)["documentNamespace"]
    assert reused == fresh
    unowned = next(p for p in json.loads(fresh)["packages"] if p["SPDXID"] == "SPDXRef-Unpackaged-Files")
    assert "/late: 1 files, 14 bytes" in unowned["description"]


def test_a_snapshots_inventory_is_kept_and_read_back_without_the_rootfs(storage, busybox_oci, tmp_path,
                                                                         monkeypatch):
    from stacker_kernel.engine import sbom as reader
    from stacker_kernel.engine.build import layer_snapshot
    from stacker_kernel.engine.export import sbom_cache

    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    yaml = apk_yaml(tmp_path, busybox_oci)

    def build_into(layout: str) -> bytes:
        with Store.open(storage) as store:
            build(store, str(yaml), oci_dir=str(tmp_path / layout), out=lambda s: None, stream=lambda s: None)
        return attached(tmp_path / layout, "apk", SPDX)[1]

    build_into("oci")
    with Store.open(storage) as store:
        snap = layer_snapshot(store, str(yaml), "apk")
        cache = sbom_cache(store)
    made = reader.inventory(snap.path)
    assert [p.name for p in made.packages] == ["busybox", "musl"] and made.unowned.files > 0
    assert len(list((storage / "cache" / "sbom" / "inventories").glob("*.json"))) == 1  # the export kept it

    def no_rootfs(*args, **kwargs):
        raise AssertionError("the rootfs was read again")

    with monkeypatch.context() as m:
        m.setattr(reader, "run_in_userns", no_rootfs)
        assert reader.inventory(snap.path, cache_dir=cache) == made
        again = build_into("again")  # another layout of the same image: its SBOM from what was kept
    for kept in (storage / "cache" / "sbom").rglob("*.json"):
        kept.unlink()
    assert build_into("anew") == again


def test_an_inventory_with_a_note_is_not_kept(tmp_path, monkeypatch):
    from stacker_kernel.engine import sbom as reader

    noted = Inventory((), None, notes=("the rpm database /var/lib/rpm was not read: no rpm tool",))
    monkeypatch.setattr(reader, "run_in_userns", lambda fn, *args: noted)
    root = tmp_path / "rootfs"
    root.mkdir()
    assert reader.inventory(root, cache_dir=str(tmp_path / "sbom")) == noted
    assert not (tmp_path / "sbom").exists()


def test_a_damaged_kept_part_is_made_again(tmp_path):
    cache = tmp_path / "sbom"
    spdx_document(FIRST, "app", subject_digest=DIGEST_A, source_date_epoch=1, cache_dir=str(cache))
    (kept,) = cache.glob("*.json")
    kept.write_text(json.dumps({"packages": "not a list of packages"}))
    doc = spdx_document(LATER, "app", subject_digest=DIGEST_B, source_date_epoch=2, cache_dir=str(cache))
    assert document_bytes(doc) == made_anew(LATER, "app", DIGEST_B, 2)
    assert json.loads(kept.read_text())["spdxVersion"] == "SPDX-2.3"  # kept whole again
