"""Issue 18: every exported image carries an SPDX SBOM and SLSA provenance, attached
the OCI 1.1 way, pushed with the image by `publish`; `%sbom` and `stacker-kernel sbom`.

Real parts: a Debian minbase rootfs (scripts/debian-rootfs.sh, shared with
test_container) built on in a real container, real dpkg, spdx-tools validating
every document, Debian's docker-registry for the publish tests.
"""
import hashlib
import json
import os
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from stacker_kernel.cli import main
from stacker_kernel.engine.build import build, layer_snapshot
from stacker_kernel.engine.sbom import inventory
from stacker_kernel.engine.session import BuildSession
from stacker_kernel.errors import ImageError
from stacker_kernel.kernel.magics import MagicContext, run_magic
from stacker_kernel.oci import attach
from stacker_kernel.oci.layout import OCILayout
from stacker_kernel.oci.provenance import MEDIA_TYPE as PROVENANCE
from stacker_kernel.oci.publish import publish
from stacker_kernel.oci.sbom import MEDIA_TYPE as SPDX, validate_bytes
from stacker_kernel.recipe.cells import MAGICS
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Store

from net_support import serve_registry
from test_container import debian_tar, remove_storage_dir, storage_dir

EPOCH = "1700000000"


def deb_script(name: str, version: str, license: str = "GPL-2+") -> str:
    """A step that builds a tiny .deb with a machine-readable copyright and installs it."""
    return textwrap.dedent(f"""\
        p=/tmp/{name}
        mkdir -p $p/DEBIAN $p/usr/share/doc/{name} $p/usr/bin
        printf 'Package: {name}\\nVersion: {version}\\nArchitecture: all\\n' > $p/DEBIAN/control
        printf 'Maintainer: t <t@example.org>\\nDescription: test\\n' >> $p/DEBIAN/control
        printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\\n\\n' \\
            > $p/usr/share/doc/{name}/copyright
        printf 'Files: *\\nCopyright: 2024 t\\nLicense: {license}\\n' >> $p/usr/share/doc/{name}/copyright
        echo 'echo {version}' > $p/usr/bin/{name}
        dpkg-deb -b $p /tmp/{name}.deb >/dev/null
        dpkg -i /tmp/{name}.deb >/dev/null
        rm -rf $p /tmp/{name}.deb
        """)


LIST = "dpkg-query -W -f='${Package}\\t${Version}\\t${Architecture}\\n' > /root/dpkg-list"


@pytest.fixture(scope="module")
def debian(tmp_path_factory):
    """A session on the Debian rootfs: a cell installs hello-sk 1.0 and bye-sk, the next
    upgrades hello-sk to 2.0, the last purges bye-sk and lists dpkg-query -W; exported."""
    root = storage_dir()
    tmp = tmp_path_factory.mktemp("debian-sbom")
    store = Store.open(root)
    session = BuildSession.open(store, str(tmp / "deb.ipynb"), resume=False)
    try:
        session.begin_layer(Layer(name="deb", from_=ImageSource(type="tar", url=str(debian_tar()))))
        for cell, script in (("c-install", deb_script("hello-sk", "1.0") + deb_script("bye-sk", "1:0.5", "Expat")),
                             ("c-upgrade", deb_script("hello-sk", "2.0")),
                             ("c-purge", "dpkg --purge bye-sk >/dev/null\n" + LIST)):
            out = []
            outcome = session.run_step(script, cell, on_output=out.append)
            assert outcome.ok, "".join(out)
        oci = tmp / "oci"
        assert session.export_oci(str(oci)) == ["deb"]
        yield session, oci, tmp
    finally:
        session.close()
        store.close()
        remove_storage_dir(root)


def image_digest(layout: Path, tag: str) -> str:
    return OCILayout(layout).resolve(tag).manifest_digest


def attached(layout: Path, tag: str, artifact_type: str) -> tuple[dict, bytes]:
    """The one document of `artifact_type` attached to `tag`, found as oras finds it:
    a manifest in the layout whose subject is the image's manifest."""
    digest = image_digest(layout, tag)
    found = []
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        manifest = json.loads((layout / "blobs" / desc["digest"].replace(":", "/")).read_text())
        if (manifest.get("subject") or {}).get("digest") == digest and manifest.get("artifactType") == artifact_type:
            found.append(manifest)
    assert len(found) == 1, found
    manifest = found[0]
    layer = manifest["layers"][0]
    return manifest, (layout / "blobs" / layer["digest"].replace(":", "/")).read_bytes()


def spdx_packages(doc: dict) -> set[tuple[str, str, str]]:
    out = set()
    for p in doc["packages"]:
        purl = [r["referenceLocator"] for r in p.get("externalRefs", []) if r["referenceType"] == "purl"]
        if purl and purl[0].startswith("pkg:deb/"):
            arch = purl[0].rsplit("?arch=", 1)[1]
            out.add((p["name"], p["versionInfo"], arch))
    return out


def test_debian_sbom_lists_exactly_what_dpkg_query_lists(debian):
    session, oci, _ = debian
    listed = (Path(session.snapshot_at().path) / "root/dpkg-list").read_text().splitlines()
    expected = {tuple(line.split("\t")) for line in listed}
    assert len(expected) > 80 and ("hello-sk", "2.0", "all") in expected
    _, data = attached(oci, "deb", SPDX)
    doc = json.loads(data)
    assert spdx_packages(doc) == expected
    assert not any(p["name"] == "bye-sk" for p in doc["packages"])


def test_the_sbom_validates_and_carries_licences_and_purls(debian):
    _, oci, _ = debian
    manifest, data = attached(oci, "deb", SPDX)
    assert validate_bytes(data) == []
    doc = json.loads(data)
    assert doc["spdxVersion"] == "SPDX-2.3"
    hello = next(p for p in doc["packages"] if p["name"] == "hello-sk")
    assert hello["licenseDeclared"] == "GPL-2.0-or-later"
    assert [(r["referenceType"], r["referenceLocator"]) for r in hello["externalRefs"]] == [
        ("purl", "pkg:deb/debian/hello-sk@2.0?arch=all")]
    unowned = next(p for p in doc["packages"] if p["SPDXID"] == "SPDXRef-Unpackaged-Files")
    assert "no package database lists" in unowned["summary"] and "/root" in unowned["description"]


def test_an_epoch_is_percent_encoded_in_the_purl(debian):
    session, _, _ = debian
    inv = inventory(session.store.get(session.snapshot_at(1).id).path, files=False)
    bye = next(p for p in inv.packages if p.name == "bye-sk")
    assert bye.version == "1:0.5" and bye.purl() == "pkg:deb/debian/bye-sk@1%3A0.5?arch=all"
    assert bye.licenses == ("Expat",)


def test_the_unowned_files_exclude_what_dpkg_owns(debian):
    session, _, _ = debian
    inv = inventory(session.snapshot_at().path)
    tops = {d.path: d for d in inv.unowned.top}
    assert "/root" in tops  # /root/dpkg-list, written by a step
    # dpkg lists /bin/ls where merged /usr keeps usr/bin/ls: still owned
    assert "/usr/bin" not in tops or tops["/usr/bin"].files < 10
    assert 0 < inv.unowned.files < 1000


def test_sbom_magic_shows_the_packages_and_which_cell_changed_which(debian, tmp_path):
    session, _, _ = debian
    shown = run_magic(session, "sbom", None, MagicContext(tmp_path, MAGICS))
    lines = shown.text.splitlines()
    assert any(line.split()[:3] == ["hello-sk", "2.0", "all"] for line in lines)
    changes = shown.text.split("package changes by step:")[1]
    rows = [line.split() for line in changes.strip().splitlines()[1:]]
    assert ["c-install", "added", "hello-sk", "1.0"] in [r[1:] for r in rows]
    assert ["c-install", "added", "bye-sk", "1:0.5"] in [r[1:] for r in rows]
    assert ["c-upgrade", "changed", "hello-sk", "1.0", "->", "2.0"] in [r[1:] for r in rows]
    assert ["c-purge", "removed", "bye-sk", "1:0.5"] in [r[1:] for r in rows]
    assert "<table>" in shown.html


def test_sbom_magic_of_a_step_shows_that_step(debian, tmp_path):
    session, _, _ = debian
    shown = run_magic(session, "sbom", 1, MagicContext(tmp_path, MAGICS))
    assert any(line.split()[:2] == ["hello-sk", "1.0"] for line in shown.text.splitlines())
    assert "c-upgrade" not in shown.text


def test_provenance_names_the_builder_the_cells_and_the_base(debian):
    session, oci, tmp = debian
    manifest, data = attached(oci, "deb", PROVENANCE)
    statement = json.loads(data)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"] == [{"name": "deb", "digest": {"sha256": image_digest(oci, "deb").split(":")[1]}}]
    predicate = statement["predicate"]
    assert predicate["runDetails"]["builder"]["id"].endswith("stacker-kernel@0.1.0")
    steps = predicate["buildDefinition"]["externalParameters"]["layers"][0]["steps"]
    assert [s.get("cell") for s in steps] == ["c-install", "c-upgrade", "c-purge"]
    assert "dpkg --purge bye-sk" in steps[2]["script"]
    tar_sha = hashlib.sha256(debian_tar().read_bytes()).hexdigest()
    assert {"sha256": tar_sha} in [d.get("digest") for d in predicate["buildDefinition"]["resolvedDependencies"]]
    meta = predicate["runDetails"]["metadata"]
    assert meta["startedOn"] <= meta["finishedOn"]


def test_artifacts_are_oci_1_1_manifests_listed_in_the_index(debian):
    _, oci, _ = debian
    digest = image_digest(oci, "deb")
    found = attach.referrers(str(oci), digest)
    assert sorted(d["artifactType"] for d in found) == sorted([PROVENANCE, SPDX])
    for desc in found:
        manifest, _ = attach.read_document(str(oci), desc)
        assert manifest["config"] == {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                                      "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest()}
        assert (oci / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_bytes() == b"{}"
        assert len(manifest["layers"]) == 1 and manifest["layers"][0]["mediaType"] == desc["artifactType"]
    # the image itself still reads as before
    assert OCILayout(oci).tags() == ["deb"]


def test_export_magic_attaches_both_unless_turned_off(debian, tmp_path):
    from stacker_kernel.recipe.cells import ExportArgs

    session, _, _ = debian
    ctx = MagicContext(tmp_path, MAGICS)
    run_magic(session, "export", ExportArgs("oci", ["all"]), ctx)
    run_magic(session, "export", ExportArgs("oci", ["bare", "--no-sbom", "--no-provenance"]), ctx)
    run_magic(session, "export", ExportArgs("oci", ["prov", "--no-sbom"]), ctx)
    types = {name: sorted(d["artifactType"] for d in attach.referrers(str(tmp_path / name),
                                                                        image_digest(tmp_path / name, "deb")))
             for name in ("all", "bare", "prov")}
    assert types == {"all": sorted([PROVENANCE, SPDX]), "bare": [], "prov": [PROVENANCE]}


# --- apk, busybox-based builds ------------------------------------------------------------

APK_DB = """C:Q1abc=
P:musl
V:1.2.4-r2
A:x86_64
L:MIT
o:musl
F:lib
R:ld-musl-x86_64.so.1

C:Q1def=
P:busybox
V:1.36.1-r5
A:x86_64
L:GPL-2.0-only
F:bin
R:busybox-apk
F:etc
R:apk-owned.conf
"""


def apk_yaml(tmp_path: Path, busybox_oci: str, extra: str = "", imports: tuple = ()) -> Path:
    db = tmp_path / "installed"
    db.write_text(APK_DB)
    (tmp_path / "os-release").write_text("ID=alpine\nVERSION_ID=3.19.0\n")
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(textwrap.dedent(f"""\
        apk:
            from:
                type: oci
                url: {busybox_oci}
            imports:
                - {db}
                - {tmp_path / 'os-release'}{"".join(f"{chr(10)}                - {i}" for i in imports)}
            run: |
                mkdir -p /lib/apk/db /lib /etc
                cp /stacker/imports/installed /lib/apk/db/installed
                cp /stacker/imports/os-release /etc/os-release
                echo musl > /lib/ld-musl-x86_64.so.1
                echo owned > /etc/apk-owned.conf
                echo mine > /etc/not-owned.conf
                {extra}
        """))
    return yaml


def test_apk_sbom_lists_the_installed_database(storage, busybox_oci, tmp_path):
    yaml = apk_yaml(tmp_path, busybox_oci)
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
        inv = inventory(layer_snapshot(store, str(yaml), "apk").path)
    assert [(p.name, p.version, p.arch, p.licenses) for p in inv.packages] == [
        ("busybox", "1.36.1-r5", "x86_64", ("GPL-2.0-only",)), ("musl", "1.2.4-r2", "x86_64", ("MIT",))]
    assert inv.distro == "alpine"
    _, data = attached(oci, "apk", SPDX)
    assert validate_bytes(data) == []
    doc = json.loads(data)
    purls = {r["referenceLocator"] for p in doc["packages"] for r in p.get("externalRefs", [])}
    assert {"pkg:apk/alpine/musl@1.2.4-r2?arch=x86_64", "pkg:apk/alpine/busybox@1.36.1-r5?arch=x86_64"} <= purls
    assert {p["name"]: p.get("licenseDeclared") for p in doc["packages"]}["musl"] == "MIT"


def test_apk_owned_files_are_not_counted_as_unowned(storage, busybox_oci, tmp_path):
    yaml = apk_yaml(tmp_path, busybox_oci)
    with Store.open(storage) as store:
        build(store, str(yaml), out=lambda s: None, stream=lambda s: None)
        snap = layer_snapshot(store, str(yaml), "apk")
        with_db = inventory(snap.path)
    etc = {d.path: d for d in with_db.unowned.top}["/etc"]
    # /etc has passwd, group, os-release and not-owned.conf unowned; apk-owned.conf is owned
    assert etc.files == 4


def test_builds_under_source_date_epoch_attach_identical_documents(storage, busybox_oci, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    yaml = apk_yaml(tmp_path, busybox_oci)
    digests = []
    for run in ("a", "b"):
        oci = tmp_path / run
        with Store.open(storage) as store:
            build(store, str(yaml), oci_dir=str(oci), no_cache=True, out=lambda s: None, stream=lambda s: None)
        found = attach.referrers(str(oci), image_digest(oci, "apk"))
        digests.append(sorted((d["artifactType"], d["digest"]) for d in found))
    assert len(digests[0]) == 2 and digests[0] == digests[1]
    _, data = attached(tmp_path / "a", "apk", PROVENANCE)
    meta = json.loads(data)["predicate"]["runDetails"]["metadata"]
    assert meta == {"startedOn": "2023-11-14T22:13:20Z", "finishedOn": "2023-11-14T22:13:20Z"}


@pytest.mark.rootful
def test_as_root_the_export_attaches_a_valid_sbom_and_provenance(storage, busybox_oci, tmp_path):
    yaml = apk_yaml(tmp_path, busybox_oci)
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
    _, data = attached(oci, "apk", SPDX)
    assert validate_bytes(data) == []
    assert {p["name"] for p in json.loads(data)["packages"]} >= {"musl", "busybox"}
    _, data = attached(oci, "apk", PROVENANCE)
    assert json.loads(data)["subject"][0]["name"] == "apk"


def test_provenance_lists_the_base_digest_and_the_imports_with_their_sha256(storage, busybox_oci, tmp_path):
    yaml = apk_yaml(tmp_path, busybox_oci)
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
    _, data = attached(oci, "apk", PROVENANCE)
    definition = json.loads(data)["predicate"]["buildDefinition"]
    deps = {d["uri"]: d.get("digest") for d in definition["resolvedDependencies"]}
    layout, tag = busybox_oci.split(":")
    assert deps[busybox_oci] == {"sha256": image_digest(Path(layout), tag).split(":")[1]}
    db = tmp_path / "installed"
    assert deps[str(db)] == {"sha256": hashlib.sha256(db.read_bytes()).hexdigest()}
    assert definition["externalParameters"]["recipe"] == {
        "path": "stacker.yaml", "digest": {"sha256": hashlib.sha256(yaml.read_bytes()).hexdigest()}}


def test_no_sbom_and_no_provenance_turn_them_off(storage, busybox_oci, tmp_path, capsys):
    yaml = apk_yaml(tmp_path, busybox_oci)
    for flag, left in (("--no-sbom", [PROVENANCE]), ("--no-provenance", [SPDX])):
        oci = tmp_path / flag
        assert main(["--storage", str(storage), "build", "-f", str(yaml), "--oci-dir", str(oci), flag]) == 0
        assert [d["artifactType"] for d in attach.referrers(str(oci), image_digest(oci, "apk"))] == left


def test_a_re_export_replaces_the_documents_of_the_replaced_image(storage, busybox_oci, tmp_path):
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(apk_yaml(tmp_path, busybox_oci)), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
        build(store, str(apk_yaml(tmp_path, busybox_oci, "echo changed > /changed")), oci_dir=str(oci),
              out=lambda s: None, stream=lambda s: None)
    index = json.loads((oci / "index.json").read_text())
    assert sorted(d.get("artifactType", "image") for d in index["manifests"]) == sorted(["image", PROVENANCE, SPDX])


def test_cli_sbom_writes_the_document_of_a_layer(storage, busybox_oci, tmp_path, capsys):
    yaml = apk_yaml(tmp_path, busybox_oci)
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci"]) == 0
    out = tmp_path / "apk.spdx.json"
    assert main(["--storage", str(storage), "sbom", "-f", str(yaml), "apk", "-o", str(out)]) == 0
    assert validate_bytes(out.read_bytes()) == []
    assert {p["name"] for p in json.loads(out.read_text())["packages"]} >= {"musl", "busybox"}
    assert "2 packages of layer apk" in capsys.readouterr().out


RPM_SPEC = """Name: hello-rpm
Version: 1.2
Release: 3
Summary: test
License: MIT
BuildArch: noarch
%description
test
%install
mkdir -p %{buildroot}/usr/share/hello-rpm
echo hi > %{buildroot}/usr/share/hello-rpm/hi
%files
/usr/share/hello-rpm/hi
"""


def test_an_rpm_database_is_read_with_the_rpm_tool(storage, busybox_oci, tmp_path):
    import subprocess

    (tmp_path / "hello.spec").write_text(RPM_SPEC)
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("rpmbuild", "--define", f"_topdir {tmp_path / 'top'}", "-bb", str(tmp_path / "hello.spec"))
    db = tmp_path / "rpmdb"
    run("rpm", "--dbpath", str(db), "--initdb")
    run("rpm", "--dbpath", str(db), "-i", "--nodeps", "--justdb",
        str(tmp_path / "top/RPMS/noarch/hello-rpm-1.2-3.noarch.rpm"))
    run("tar", "-C", str(db), "-cf", str(tmp_path / "rpmdb.tar"), ".")
    yaml = apk_yaml(tmp_path, busybox_oci, """mkdir -p /var/lib/rpm /usr/share/hello-rpm
                tar -o -C /var/lib/rpm -xf /stacker/imports/rpmdb.tar
                echo hi > /usr/share/hello-rpm/hi""", imports=(tmp_path / "rpmdb.tar",))
    with Store.open(storage) as store:
        build(store, str(yaml), out=lambda s: None, stream=lambda s: None)
        inv = inventory(layer_snapshot(store, str(yaml), "apk").path)
    rpm = [p for p in inv.packages if p.manager == "rpm"]
    assert [(p.name, p.version, p.arch, p.licenses) for p in rpm] == [("hello-rpm", "1.2-3", "noarch", ("MIT",))]
    assert rpm[0].purl() == "pkg:rpm/alpine/hello-rpm@1.2-3?arch=noarch"  # the os-release ID names the distro
    assert "/usr/share" not in {d.path for d in inv.unowned.top}  # its file is owned


def test_an_rpm_database_without_the_rpm_tool_is_named_in_the_sbom(storage, busybox_oci, tmp_path, monkeypatch):
    from stacker_kernel.oci.sbom import spdx_document

    yaml = apk_yaml(tmp_path, busybox_oci, "mkdir -p /var/lib/rpm && echo db > /var/lib/rpm/rpmdb.sqlite")
    with Store.open(storage) as store:
        build(store, str(yaml), out=lambda s: None, stream=lambda s: None)
        snap = layer_snapshot(store, str(yaml), "apk")
        monkeypatch.setenv("PATH", str(tmp_path))  # no rpm tool here, whatever the host has
        inv = inventory(snap.path)
    assert inv.notes == ("the rpm database /var/lib/rpm was not read: this host has no rpm tool "
                         "(apt-get install rpm), so its packages are missing here",)
    assert "/var/lib/rpm was not read" in spdx_document(inv, "apk")["comment"]


def test_a_hard_linked_sparse_rpm_database_is_copied_once_into_the_users_storage(
        storage, busybox_oci, tmp_path, monkeypatch):
    # Issue 23 point 4: a 64 MiB sparse Packages under 24 names once made the export
    # write every name in full to the host's /tmp. A wrapper in front of the real rpm
    # records the folder it is given to read, as the export hands it over.
    record = tmp_path / "rpm-saw"
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "rpm").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = --dbpath ] && {{ echo "$2"; du -sk "$2" | cut -f1; du -sk --apparent-size "$2" | cut -f1
                                 stat -c %i "$2"/* | sort -u | wc -l; }} > {record}
        exec /usr/bin/rpm "$@"
        """))
    (wrapper / "rpm").chmod(0o755)
    links = " ".join(["Packages.db", "rpmdb.sqlite", "Index.db"] + [f"junk{i}" for i in range(20)])
    yaml = apk_yaml(tmp_path, busybox_oci, f"""mkdir -p /var/lib/rpm && cd /var/lib/rpm
                dd if=/dev/zero of=Packages bs=1 count=1 seek=67108863 2>/dev/null
                for n in {links}; do ln Packages $n; done; cd /""")
    monkeypatch.setenv("PATH", f"{wrapper}:{os.environ['PATH']}")
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
    dbpath, used_kib, apparent_kib, inodes = record.read_text().split()
    assert Path(dbpath).resolve().is_relative_to(Path(storage).resolve())  # the user's storage, not /tmp
    assert int(inodes) == 1 and int(apparent_kib) < (64 << 10) + 64  # one file, copied once
    assert int(used_kib) < 1024  # its holes stay holes
    assert not any(p.name.startswith(".tmp-sbom-") for p in Path(storage).iterdir())
    doc = json.loads(attached(oci, "apk", SPDX)[1])
    assert "/var/lib/rpm could not be read by rpm" in doc["comment"]  # garbage, said so; the export went on


def test_an_rpm_database_over_the_cap_is_named_not_copied(storage, busybox_oci, tmp_path):
    yaml = apk_yaml(tmp_path, busybox_oci, """mkdir -p /var/lib/rpm && cd /var/lib/rpm
                dd if=/dev/zero of=Packages bs=1 count=1 seek=200000000 2>/dev/null
                dd if=/dev/zero of=rpmdb.sqlite bs=1 count=1 seek=200000000 2>/dev/null; cd /""")
    with Store.open(storage) as store:
        build(store, str(yaml), out=lambda s: None, stream=lambda s: None)
        inv = inventory(layer_snapshot(store, str(yaml), "apk").path)
    assert inv.notes == ("the rpm database /var/lib/rpm was not read: its files total more than 256 MiB, "
                         "larger than any package database",)


def test_without_spdx_tools_the_sbom_says_how_to_install_it(monkeypatch):
    from stacker_kernel.engine.sbom import Inventory
    from stacker_kernel.oci.sbom import spdx_document

    for name in [m for m in sys.modules if m.startswith("spdx_tools")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "spdx_tools", None)
    with pytest.raises(ImageError, match=r"pip install spdx-tools.*--no-sbom"):
        spdx_document(Inventory((), None), "x")


# --- publish ---------------------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path, monkeypatch):
    # skopeo's own auth lookup starts in $XDG_RUNTIME_DIR (else /run/containers/UID,
    # which a root run may have made unreadable): a private empty one.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "registry").mkdir()
    yield from serve_registry(tmp_path / "registry")


def _get(url: str, accept: str) -> tuple[dict, str]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read()), resp.headers.get("Docker-Content-Digest", "")


def test_publish_pushes_the_documents_with_the_referrers_tag_fallback(storage, busybox_oci, tmp_path, registry):
    yaml = apk_yaml(tmp_path, busybox_oci)
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
    publish(str(oci), f"docker://{registry}/team")
    base = f"http://{registry}/v2/team/apk"
    _, pushed = _get(f"{base}/manifests/latest", "application/vnd.oci.image.manifest.v1+json")
    assert pushed == image_digest(oci, "apk")
    index, _ = _get(f"{base}/manifests/sha256-{pushed.split(':')[1]}", "application/vnd.oci.image.index.v1+json")
    assert sorted(d["artifactType"] for d in index["manifests"]) == sorted([PROVENANCE, SPDX])
    for desc in index["manifests"]:
        manifest, _ = _get(f"{base}/manifests/{desc['digest']}", desc["mediaType"])
        assert manifest["subject"]["digest"] == pushed
        layer = manifest["layers"][0]
        with urllib.request.urlopen(f"{base}/blobs/{layer['digest']}", timeout=10) as resp:
            data = resp.read()
        if desc["artifactType"] == SPDX:
            assert validate_bytes(data) == []


def test_publish_no_sbom_pushes_only_the_provenance(storage, busybox_oci, tmp_path, registry, capsys):
    yaml = apk_yaml(tmp_path, busybox_oci)
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
    assert main(["publish", "--oci-dir", str(oci), "--url", f"docker://{registry}/team", "--no-sbom"]) == 0
    hexdigest = image_digest(oci, "apk").split(":")[1]
    index, _ = _get(f"http://{registry}/v2/team/apk/manifests/sha256-{hexdigest}",
                    "application/vnd.oci.image.index.v1+json")
    assert [d["artifactType"] for d in index["manifests"]] == [PROVENANCE]


def test_publish_to_an_oci_layout_copies_the_documents(storage, busybox_oci, tmp_path):
    yaml = apk_yaml(tmp_path, busybox_oci)
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
    dest = tmp_path / "dest"
    publish(str(oci), f"oci:{dest}")
    found = attach.referrers(str(dest), image_digest(dest, "apk_latest"))
    assert sorted(d["artifactType"] for d in found) == sorted([PROVENANCE, SPDX])


def test_publish_with_a_password_pushes_the_documents_to_a_registry_that_wants_one(
        storage, busybox_oci, tmp_path, monkeypatch):
    import base64
    import secrets
    import subprocess

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    password = secrets.token_hex(16)
    (tmp_path / "registry").mkdir()
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(subprocess.run(["htpasswd", "-iBn", "alice"], input=password, check=True,
                                       capture_output=True, text=True).stdout)
    yaml = apk_yaml(tmp_path, busybox_oci)
    oci = tmp_path / "oci"
    with Store.open(storage) as store:
        build(store, str(yaml), oci_dir=str(oci), out=lambda s: None, stream=lambda s: None)
    for host in serve_registry(tmp_path / "registry", f"auth:\n  htpasswd: {{realm: test, path: {htpasswd}}}\n"):
        publish(str(oci), f"docker://{host}/team", username="alice", password=password)
        hexdigest = image_digest(oci, "apk").split(":")[1]
        req = urllib.request.Request(f"http://{host}/v2/team/apk/manifests/sha256-{hexdigest}", headers={
            "Accept": "application/vnd.oci.image.index.v1+json",
            "Authorization": "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()})
        with urllib.request.urlopen(req, timeout=10) as resp:
            index = json.loads(resp.read())
        assert sorted(d["artifactType"] for d in index["manifests"]) == sorted([PROVENANCE, SPDX])
