"""Hostile input through the user-facing paths (`stacker-kernel build`, `grab`, steps).

Every case ends in one clear line on stderr (never a traceback) and leaves the
host untouched: a canary directory outside the storage proves it. The unit
cases of the tar extractor live in test_tarlayer.py and test_bases.py; here
the same attacks go through the CLI, as a user (or a downloaded recipe) would
send them.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.cli import main
from stacker_kernel.engine.session import BuildSession
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Store
from conftest import in_tree

CANARY_TEXT = "the host is untouched\n"
# The console script (not `python -m stacker_kernel`, which takes `-f` for a kernel connection file).
STACKER_KERNEL = str(Path(sys.executable).parent / "stacker-kernel")


# --- helpers ------------------------------------------------------------------------------------

@pytest.fixture
def canary(tmp_path) -> Path:
    """A directory outside the storage holding one file; `assert_canary` checks both."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "canary").write_text(CANARY_TEXT)
    return d


def assert_canary(canary: Path) -> None:
    assert sorted(os.listdir(canary)) == ["canary"]
    assert (canary / "canary").read_text() == CANARY_TEXT


def entry(name: str, kind: str = "file", data: bytes = b"", link: str = "", mode: int = 0o644,
          devmajor: int = 0, devminor: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.mode, ti.mtime = mode, 1700000000
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
               "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE}[kind]
    ti.linkname, ti.devmajor, ti.devminor = link, devmajor, devminor
    ti.size = len(data) if kind == "file" else 0
    return ti, data


def tar_bytes(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    return buf.getvalue()


def oci_layout(path: Path, layers: list[bytes], tag: str = "t") -> str:
    """An OCI layout with `layers` (plain tars, stored gzipped) under `tag`; returns DIR:TAG."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    diff_ids, descs = [], []
    for layer in layers:
        diff_ids.append("sha256:" + hashlib.sha256(layer).hexdigest())
        descs.append(put(gzip.compress(layer), "application/vnd.oci.image.layer.v1.tar+gzip"))
    config = put(json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}, "config": {}}).encode(),
                 "application/vnd.oci.image.config.v1+json")
    manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": config, "layers": descs}).encode(),
                   "application/vnd.oci.image.manifest.v1+json")
    manifest["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    return f"{path}:{tag}"


def stacker_yaml(path: Path, base_type: str, url: str, run: str = "echo built > /built") -> Path:
    path.write_text(textwrap.dedent(f"""\
        hostile:
            from:
                type: {base_type}
                url: {url}
            run: |
                {run}
        """))
    return path


def cli(storage: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`stacker-kernel --storage STORAGE ARGS…` in a fresh process (so a traceback shows)."""
    return subprocess.run([STACKER_KERNEL, "--storage", str(storage), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 1 and exactly one line on stderr, `stacker-kernel: …`, holding `words`."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("stacker-kernel: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def build_base(storage: Path, tmp_path: Path, base_type: str, url: str,
               run: str = "echo built > /built") -> subprocess.CompletedProcess:
    yaml = stacker_yaml(tmp_path / "stacker.yaml", base_type, url, run)
    return cli(storage, "build", "-f", str(yaml), "--no-oci")


def assert_no_base_left(storage: Path) -> None:
    with Store.open(storage) as store:
        assert [s for s in store.snapshots() if s.kind == "base"] == []
    assert [p.name for p in (storage / "bases").iterdir() if not p.name.endswith(".lock")] == []


# --- hostile tar and OCI bases, through `stacker-kernel build` -------------------------------------

def escapes(canary: Path) -> dict[str, list]:
    """Archives whose entry (named second) tries to write outside the rootfs."""
    rel = "../" * 12 + str(canary).lstrip("/")
    return {
        "dotdot": ([entry(rel + "/pwned", data=b"pwned")], "pwned"),
        "symlink_escape": ([entry("evil", "symlink", link=rel), entry("evil/pwned", data=b"pwned")],
                           "evil/pwned"),
        "hardlink_escape": ([entry("pw", "hardlink", link=rel + "/canary")], "pw"),
    }


@pytest.mark.parametrize("attack", ["dotdot", "symlink_escape", "hardlink_escape"])
def test_tar_base_escape_is_one_line_error_naming_the_entry(storage, tmp_path, canary, attack):
    entries, offender = escapes(canary)[attack]
    (tmp_path / "evil.tar").write_bytes(tar_bytes(entries))
    proc = build_base(storage, tmp_path, "tar", str(tmp_path / "evil.tar"))
    assert_one_line_error(proc, offender)
    assert_canary(canary)
    assert_no_base_left(storage)


@pytest.mark.parametrize("attack", ["dotdot", "symlink_escape", "hardlink_escape"])
def test_oci_base_escape_is_one_line_error_naming_the_entry(storage, tmp_path, canary, attack):
    entries, offender = escapes(canary)[attack]
    ref = oci_layout(tmp_path / "oci", [tar_bytes([entry("ok", data=b"fine")]), tar_bytes(entries)])
    proc = build_base(storage, tmp_path, "oci", ref)
    assert_one_line_error(proc, offender)
    assert_canary(canary)
    assert_no_base_left(storage)


def test_symlink_from_a_lower_oci_layer_is_followed_inside_the_rootfs(storage, tmp_path, canary):
    # Across layers the symlink is the rootfs's own: it resolves as the container sees it
    # (`..` stops at its root), so the write lands inside the rootfs, never on the host.
    rel = "../" * 12 + str(canary).lstrip("/")
    ref = oci_layout(tmp_path / "oci", [tar_bytes([entry("evil", "symlink", link=rel)]),
                                        tar_bytes([entry("evil/pwned", data=b"pwned")])])
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(f"hostile:\n    from:\n        type: oci\n        url: {ref}\n")
    proc = cli(storage, "build", "-f", str(yaml), "--no-oci")
    assert proc.returncode == 0, proc.stderr
    assert_canary(canary)
    with Store.open(storage) as store:
        base = next(s for s in store.snapshots() if s.kind == "base")
        assert in_tree(base.path, str(canary).lstrip("/") + "/pwned").read_bytes() == b"pwned"


def busybox_plus(busybox_tar: Path, dest: Path, extra) -> Path:
    """The busybox rootfs tar with `extra` entries appended."""
    dest.write_bytes(busybox_tar.read_bytes())
    with tarfile.open(dest, "a", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in extra:
            tar.addfile(ti, io.BytesIO(data) if ti.isfile() else None)
    return dest


def test_device_node_in_tar_base_builds_as_an_empty_file_with_a_warning(storage, tmp_path, busybox_tar):
    # A device node is never made (rootless it cannot be, as root it must not be): an empty file and a warning.
    # (Outside /dev, which the container covers with its own tmpfs.)
    tar = busybox_plus(busybox_tar, tmp_path / "dev.tar",
                       [entry("devs", "dir", mode=0o755),
                        entry("devs/sda", "blk", devmajor=8, devminor=0, mode=0o666),
                        entry("devs/kmem", "chr", devmajor=1, devminor=2, mode=0o666)])
    proc = build_base(storage, tmp_path, "tar", str(tar),
                      run="test -f /devs/sda && test ! -s /devs/kmem && test ! -b /devs/sda && echo plain > /built")
    assert proc.returncode == 0, proc.stderr
    assert "devs/sda" in proc.stdout + proc.stderr and "warning" in (proc.stdout + proc.stderr).lower()


@pytest.mark.rootful
def test_root_build_of_a_base_with_a_host_disk_node_gets_an_empty_file(storage, tmp_path, busybox_tar):
    # As root, mknod would make `hostdisk` the host's loop device 7:0, readable and writable by any step.
    tar = busybox_plus(busybox_tar, tmp_path / "hostdisk.tar",
                       [entry("hostdisk", "blk", devmajor=7, devminor=0, mode=0o666)])
    proc = build_base(storage, tmp_path, "tar", str(tar),
                      run="test ! -b /hostdisk && test -f /hostdisk && test ! -s /hostdisk && echo plain > /built")
    assert proc.returncode == 0, proc.stderr
    assert "hostdisk" in proc.stdout + proc.stderr and "warning" in (proc.stdout + proc.stderr).lower()


def test_setuid_root_file_in_a_base_is_owned_by_the_subordinate_root_on_the_host(storage, tmp_path, busybox_tar):
    tar = busybox_plus(busybox_tar, tmp_path / "suid.tar",
                       [entry("bin/suid-shell", data=b"#!/bin/sh\n", mode=0o4755)])
    proc = build_base(storage, tmp_path, "tar", str(tar))
    assert proc.returncode == 0, proc.stderr
    with Store.open(storage) as store:
        base = next(s for s in store.snapshots() if s.kind == "base")
        st = os.lstat(in_tree(base.path, "bin/suid-shell"))
    # The bit is kept (the image asked for it), but the container's root is the
    # calling user on the host: the file is setuid to that user, never to real root.
    assert st.st_mode & 0o4000
    assert st.st_uid == os.geteuid() != 0


def test_member_of_absurd_size_is_one_line_error(storage, tmp_path, canary):
    ti = tarfile.TarInfo("huge")
    ti.size = 1 << 50
    (tmp_path / "huge.tar").write_bytes(ti.tobuf(tarfile.PAX_FORMAT) + bytes(4096))
    proc = build_base(storage, tmp_path, "tar", str(tmp_path / "huge.tar"))
    assert_one_line_error(proc, "huge")
    assert_canary(canary)
    assert_no_base_left(storage)


def test_corrupted_gzip_base_is_one_line_error_naming_the_file(storage, tmp_path):
    good = gzip.compress(tar_bytes([entry("f", data=os.urandom(300000))]))
    (tmp_path / "bad.tar.gz").write_bytes(good[: len(good) // 2])
    proc = build_base(storage, tmp_path, "tar", str(tmp_path / "bad.tar.gz"))
    assert_one_line_error(proc, "bad.tar.gz")
    assert_no_base_left(storage)


def test_garbage_that_is_not_a_tar_is_one_line_error(storage, tmp_path):
    (tmp_path / "junk.tar").write_bytes(random.Random(7).randbytes(50000))
    proc = build_base(storage, tmp_path, "tar", str(tmp_path / "junk.tar"))
    assert_one_line_error(proc, "junk.tar")


def test_oci_layer_with_wrong_digest_is_one_line_error(storage, tmp_path):
    ref = oci_layout(tmp_path / "oci", [tar_bytes([entry("f", data=b"x" * 1000)])])
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    manifest = json.loads((tmp_path / "oci" / "blobs" / "sha256" /
                           index["manifests"][0]["digest"].split(":")[1]).read_text())
    blob = tmp_path / "oci" / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    blob.write_bytes(gzip.compress(tar_bytes([entry("f", data=b"swapped")])))
    proc = build_base(storage, tmp_path, "oci", ref)
    assert_one_line_error(proc, "digest")
    assert_no_base_left(storage)


def test_oci_manifest_with_a_traversing_digest_is_one_line_error(storage, tmp_path, canary):
    ref = oci_layout(tmp_path / "oci", [tar_bytes([entry("f", data=b"x")])])
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:" + "../" * 10 + str(canary / "canary").lstrip("/")
    (tmp_path / "oci" / "index.json").write_text(json.dumps(index))
    proc = build_base(storage, tmp_path, "oci", ref)
    assert_one_line_error(proc, "digest")
    assert_canary(canary)


def test_oci_index_that_is_not_json_is_one_line_error(storage, tmp_path):
    ref = oci_layout(tmp_path / "oci", [tar_bytes([entry("f", data=b"x")])])
    (tmp_path / "oci" / "index.json").write_text("{not json")
    proc = build_base(storage, tmp_path, "oci", ref)
    assert_one_line_error(proc, "index.json")


# --- fuzzed stacker.yaml and notebooks through the CLI ---------------------------------------------

VALID_YAML = textwrap.dedent("""\
    first:
        from:
            type: scratch
        build_only: true
    second:
        from:
            type: built
            tag: first
        environment:
            A: b
        run: |
            true
    """)


def yaml_mutants(seed: int, count: int) -> list[str]:
    """Byte flips, truncations, junk insertions and type swaps of a valid stacker.yaml."""
    rng = random.Random(seed)
    swaps = [("type: scratch", "type: [1, 2]"), ("type: built", "type: {x: 1}"), ("tag: first", "tag: 5"),
             ("run: |", "run: 17"), ("A: b", "- A"), ("environment:", "environment: [1]"),
             ("first:", "- first:"), ("build_only: true", "build_only: {}"), ("from:", "from: null"),
             ("tag: first", "tag: second"), ("second:", "first:")]
    out = [VALID_YAML.replace(a, b, 1) for a, b in swaps]
    out += ["", "\x00\x01", "[]", "42", "a: [", "x:\n  from: 3\n", "{{{{", "!!python/object:os.system {}\n",
            "a: &x [*x]\n", "l:\n  from:\n    type: tar\n    url: ''\n"]
    while len(out) < count:
        b = bytearray(VALID_YAML.encode())
        for _ in range(rng.randint(1, 8)):
            op = rng.choice("flip cut insert")
            i = rng.randrange(len(b))
            if op == "flip":
                b[i] = rng.randrange(256)
            elif op == "cut":
                del b[i:i + rng.randint(1, 20)]
            else:
                b[i:i] = rng.choice([b":", b"-", b"\t", b"{", b"${{", b"\n  ", b"\xff", b"'"])
        out.append(b.decode("utf-8", errors="surrogateescape"))
    return out[:count]


def run_cli_inline(storage: Path, capsys, *args: str) -> tuple[int, str]:
    """main() in this process: anything but our error type escapes as an exception (a test failure)."""
    rc = main(["--storage", str(storage), *args])
    return rc, capsys.readouterr().err


def test_fuzzed_stacker_yaml_gives_one_line_errors_never_a_traceback(storage, tmp_path, capsys):
    failures = 0
    for i, text in enumerate(yaml_mutants(seed=9, count=60)):
        path = tmp_path / f"fuzz{i}.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
        rc, err = run_cli_inline(storage, capsys, "build", "-f", str(path), "--no-oci")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc in (0, 1), (text, err)
        if rc == 1:
            failures += 1
            assert len(lines) == 1 and lines[0].startswith("stacker-kernel: "), (text, err)
    assert failures >= 30  # most mutants are invalid, and said so


def notebook_mutants(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    valid = {"nbformat": 4, "nbformat_minor": 5, "metadata": {},
             "cells": [{"cell_type": "code", "id": "c1", "metadata": {}, "execution_count": None,
                        "outputs": [], "source": "%from scratch\n"},
                       {"cell_type": "code", "id": "c2", "metadata": {}, "execution_count": None,
                        "outputs": [], "source": "%layer two\n%from built nb\n%environment A=b\n"}]}
    text = json.dumps(valid, indent=1)
    out = [b"", b"{}", b"[]", b"null", b'{"nbformat": 4}', b'{"nbformat": 99, "cells": []}',
           json.dumps({**valid, "cells": "nope"}).encode(),
           json.dumps({**valid, "cells": [{"cell_type": "code"}]}).encode(),
           json.dumps({**valid, "cells": [{**valid["cells"][0], "source": 5}]}).encode(),
           json.dumps({**valid, "cells": [{**valid["cells"][0], "source": "%from tar\n"}]}).encode(),
           json.dumps({**valid, "cells": [{**valid["cells"][0], "source": "%from\x00oci ::\n"}]}).encode(),
           json.dumps({**valid, "cells": [{**valid["cells"][0], "source": "%layer a:b\n"}]}).encode(),
           json.dumps({**valid, "cells": [{**valid["cells"][0], "source": "%environment ===\n%cmd [\n"}]}).encode()]
    while len(out) < count:
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(b))
            if rng.random() < 0.5:
                b[i] = rng.choice(b'{}[]":,0a\\%\n')
            else:
                del b[i:i + rng.randint(1, 15)]
        out.append(bytes(b))
    return out[:count]


def test_fuzzed_notebooks_give_one_line_errors_never_a_traceback(storage, tmp_path, capsys):
    failures = 0
    for i, data in enumerate(notebook_mutants(seed=11, count=40)):
        path = tmp_path / "nb" / f"{i}" / "nb.ipynb"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        rc, err = run_cli_inline(storage, capsys, "build", "-f", str(path), "--no-oci")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc in (0, 1), (data, err)
        if rc == 1:
            failures += 1
            assert len(lines) == 1 and lines[0].startswith("stacker-kernel: "), (data, err)
    assert failures >= 20


# --- grab paths that escape --------------------------------------------------------------------------

@pytest.fixture
def built_links(storage, tmp_path, busybox_tar, canary):
    """A built layer `links` holding symlinks that point out of the rootfs, relative and absolute."""
    rel = "../" * 12 + str(canary).lstrip("/")
    run = " && ".join([f"ln -s {rel} /rel-escape", f"ln -s {canary} /abs-dir",
                       "mkdir -p /d", "ln -s ../../../../.. /d/up", f"ln -s {canary}/canary /abs-file",
                       f"mkdir -p {canary}", f"echo inside > {canary}/canary"])
    yaml = stacker_yaml(tmp_path / "stacker.yaml", "tar", str(busybox_tar), run).as_posix()
    proc = cli(storage, "build", "-f", yaml, "--no-oci")
    assert proc.returncode == 0, proc.stderr
    return yaml


@pytest.mark.parametrize("path", ["/../../../../etc/passwd", "/bin/../../../etc/passwd",
                                  "/rel-escape/canary", "/d/up/etc/passwd"])
def test_grab_that_escapes_is_one_line_error(storage, tmp_path, canary, built_links, path):
    dest = tmp_path / "grabbed"
    dest.mkdir()
    proc = cli(storage, "grab", "-f", built_links, f"hostile:{path}", str(dest))
    assert_one_line_error(proc, "escapes")
    assert os.listdir(dest) == []
    assert_canary(canary)


def test_grab_through_an_absolute_symlink_stays_in_the_rootfs(storage, tmp_path, canary, built_links):
    # /abs-file -> <canary>/canary is resolved inside the rootfs, as the container sees it.
    proc = cli(storage, "grab", "-f", built_links, "hostile:/abs-file", str(tmp_path / "got"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "got").read_text() == "inside\n"
    assert_canary(canary)


# --- hostile steps -----------------------------------------------------------------------------------

@pytest.fixture
def session(storage, busybox_tar, tmp_path):
    store = Store.open(storage)
    s = BuildSession.open(store, str(tmp_path / "hostile.ipynb"), resume=False)
    s.begin_layer(Layer(name="hostile", from_=ImageSource(type="tar", url=str(busybox_tar))))
    yield s
    s.close()
    store.close()


def test_step_printing_100_mb_is_capped_logged_whole_and_memory_bounded(storage, busybox_tar, tmp_path):
    # In a fresh process so its peak RSS measures this step alone.
    script = textwrap.dedent(f"""
        import resource, sys
        from stacker_kernel.engine.session import BuildSession
        from stacker_kernel.recipe.model import ImageSource, Layer
        from stacker_kernel.storage.store import Store
        store = Store.open({str(storage)!r})
        s = BuildSession.open(store, {str(tmp_path / 'big.ipynb')!r}, resume=False)
        s.begin_layer(Layer(name='big', from_=ImageSource(type='tar', url={str(busybox_tar)!r})))
        s.run_step('true')
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        shown = [0]
        o = s.run_step("head -c 100000000 /dev/zero | tr '\\\\0' x; echo; echo tail-marker",
                       on_output=lambda t: shown.__setitem__(0, shown[0] + len(t)))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(o.ok, shown[0], o.log_path, after - before)
        s.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    ok, shown, log_path, grown_kib = out.stdout.split()
    assert ok == "True"
    assert int(shown) < 5_000_000  # the cap (2 MB) plus a truncation line
    log = Path(log_path)
    assert log.stat().st_size >= 100_000_000
    with open(log, "rb") as f:
        f.seek(-200, os.SEEK_END)
        assert b"tail-marker" in f.read()
    assert int(grown_kib) < 50 * 1024  # never the whole 100 MB in memory


def test_step_printing_invalid_utf8_succeeds_with_replacement_characters(session):
    out = []
    o = session.run_step(r"printf 'ok \377\376 \300done\n'", on_output=out.append)
    assert o.ok, o.message
    text = "".join(out)
    assert "ok" in text and "done" in text and "\ufffd" in text


def test_step_forking_1000_processes_ends_and_leaves_none_behind(session):
    o = session.run_step("i=0; while [ $i -lt 1000 ]; do sleep 86399 & i=$((i+1)); done; echo forked")
    assert o.ok, o.message
    assert _count_procs(b"86399") == 0
    again = session.run_step("echo alive > /after")
    assert again.ok, again.message
    assert in_tree(session.store.get(again.snapshot_id).path, "after").read_text() == "alive\n"


def test_step_closing_its_stdout_is_committed_and_the_engine_goes_on(session):
    o = session.run_step("exec >&- 2>&-\ntouch /closed")
    assert o.ok, o.message
    assert in_tree(session.store.get(o.snapshot_id).path, "closed").exists()
    out = []
    nxt = session.run_step("echo still-talking", on_output=out.append)
    assert nxt.ok and "still-talking" in "".join(out)


def _count_procs(marker: bytes) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                    n += 1
            except OSError:
                pass
    return n
