"""Signed shared-cache entries (oci/signing.py): builder A signs what it pushes to
a real registry (Debian's docker-registry); a consumer that trusts A's key takes
A's entries, and refuses, with one warning and a local run, an entry that
Mallory (push rights, her own key, not trusted) planted under the same tag."""
import gzip
import hashlib
import io
import json
import os
import tarfile
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from net_support import serve_registry
from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.build import build, layer_snapshot
from stacker_kernel.engine.remote_cache import CacheSettings
from stacker_kernel.errors import StorageError
from stacker_kernel.oci import layout_write as lw
from stacker_kernel.oci.registry import LAYER_MEDIA_TYPE, open_cache
from stacker_kernel.oci.signing import Trust
from stacker_kernel.storage import btrfs
from stacker_kernel.storage.store import Store

CELLS = ["mkdir -p /app && echo one > /app/one\necho made one", "echo two > /app/two",
         "cd /app\nexport GREETING=hello", "echo $GREETING > greeting"]


def _notebook(path: Path, base: str, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"%from oci {base}", id="from")]
    nb.cells += [nbformat.v4.new_code_cell(src, id=f"c{i}") for i, src in enumerate(cells)]
    nbformat.write(nb, path)
    return path


def _listing(rootfs: str) -> list[tuple]:
    out = []
    for dirpath, dirs, files in os.walk(rootfs):
        for name in sorted(dirs + files):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            data = hashlib.sha256(Path(full).read_bytes()).hexdigest() if os.path.isfile(full) \
                and not os.path.islink(full) else os.readlink(full) if os.path.islink(full) else None
            out.append((os.path.relpath(full, rootfs), st.st_mode, st.st_uid, st.st_gid, data))
    return sorted(out)


def _tree(rootfs: str) -> list[tuple]:
    return run_in_userns(_listing, rootfs)


def _key(path: Path) -> ed25519.Ed25519PrivateKey:
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def _home(tmp: Path, name: str, config: dict) -> Path:
    home = tmp / name
    (home / ".config/stacker-kernel").mkdir(parents=True)
    (home / ".config/stacker-kernel/config.json").write_text(json.dumps(config))
    return home


def _build(home: Path, nb: Path, monkeypatch, **cache):
    monkeypatch.setenv("HOME", str(home))
    root = Path(os.environ["STACKER_KERNEL_STORAGE"]) / f"t-{uuid.uuid4().hex}"
    root.mkdir()
    out: list[str] = []
    try:
        with Store.open(root) as store:
            result = build(store, str(nb), out=out.append, stream=out.append, cache=CacheSettings(**cache))
            tree = _tree(str(layer_snapshot(store, str(nb), None).path))
    finally:
        btrfs.remove_tree(root)
    return result, "".join(o if o.endswith("\n") else o + "\n" for o in out), tree


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    yield from serve_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    _key(d / "a.pem")
    _key(d / "mallory.pem")
    return d


@pytest.fixture(scope="module")
def signed_by_a(registry, keys, busybox_oci, tmp_path_factory):
    """A built the notebook with --cache-to, signing with a.pem: (notebook, cache URL, A's tree)."""
    tmp = tmp_path_factory.mktemp("a")
    nb = _notebook(tmp / "nb.ipynb", busybox_oci, CELLS)
    home = _home(tmp, "home", {"cache_signing_key": str(keys / "a.pem")})
    url = f"docker://{registry}/team/signed-{uuid.uuid4().hex[:8]}"
    mp = pytest.MonkeyPatch()
    try:
        result, out, tree = _build(home, nb, mp, cache_to=url)
    finally:
        mp.undo()
    assert result.steps_run == len(CELLS) and "warning" not in out, out
    return nb, url, tree


def test_a_consumer_trusting_the_builders_key_takes_its_signed_entries(signed_by_a, keys, tmp_path, monkeypatch):
    nb, url, tree_a = signed_by_a
    home = _home(tmp_path, "c", {"cache_trusted_keys": [str(keys / "a.pub")]})
    result, out, tree = _build(home, nb, monkeypatch, cache_from=[url])
    assert result.steps_run == 0 and result.steps_cached == len(CELLS), out
    assert "warning" not in out and tree == tree_a


def test_a_consumer_trusting_another_key_runs_every_step_with_one_warning(signed_by_a, keys, tmp_path, monkeypatch):
    nb, url, tree_a = signed_by_a
    home = _home(tmp_path, "c", {"cache_trusted_keys": [str(keys / "mallory.pub")]})
    result, out, tree = _build(home, nb, monkeypatch, cache_from=[url])
    assert result.steps_run == len(CELLS) and out.count("warning") == 1, out
    assert "is not signed by a trusted key" in out and "running the step" in out


def _plant(url: str, cell: str, mallory: ed25519.Ed25519PrivateKey, tmp: Path) -> None:
    """As Mallory, who may push: replace the entry of step `cell` with one whose layer
    adds /app/evil (the record copied, so key and parent match), signed with her key."""
    host_repo = url[len("docker://"):]
    host, repo = host_repo.split("/", 1)
    cache = open_cache(url)
    tags = json.load(urllib.request.urlopen(f"http://{host}/v2/{repo}/tags/list"))["tags"]
    for tag in tags:
        if not tag.startswith("sha256-"):
            fetched = cache.fetch(tag, str(tmp))
            if fetched.record["source"] == cell:
                break
    else:
        pytest.fail(f"no entry of {cell!r} in {url}")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (("app/", None), ("app/evil", b"planted\n")):
            info = tarfile.TarInfo(name.rstrip("/"))
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    layout = tmp / "mallory"
    lw.init_layout(str(layout))
    layer = lw.put_blob(str(layout), gzip.compress(raw.getvalue()), LAYER_MEDIA_TYPE)
    record = dict(fetched.record, diff_id="sha256:" + hashlib.sha256(raw.getvalue()).hexdigest())
    cache.put(tag, record, str(layout), layer.digest, layer.size)
    Trust(signing_key=mallory).sign(cache, record, layer.digest, layer.size)


def test_an_entry_planted_by_someone_with_push_rights_is_refused(signed_by_a, keys, tmp_path, monkeypatch):
    nb, url, tree_a = signed_by_a
    mallory = serialization.load_pem_private_key((keys / "mallory.pem").read_bytes(), None)
    _plant(url, CELLS[0], mallory, tmp_path)
    # Without trusted keys the planted layer is taken: what the signatures are for.
    home = _home(tmp_path, "naive", {})
    _, _, tree = _build(home, nb, monkeypatch, cache_from=[url])
    assert "app/evil" in {p for p, *_ in tree}
    home = _home(tmp_path, "careful", {"cache_trusted_keys": [str(keys / "a.pub")]})
    result, out, tree = _build(home, nb, monkeypatch, cache_from=[url])
    assert "app/evil" not in {p for p, *_ in tree} and tree == tree_a
    assert result.steps_run == len(CELLS) and out.count("warning") == 1, out
    assert f"warning: the entry of {url} for this step is not signed by a trusted key (cache_trusted_keys in " \
           f"{home}/.config/stacker-kernel/config.json); running the step" in out


def test_a_key_file_that_is_not_an_ed25519_key_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "bad.pem").write_text("not a key\n")
    home = _home(tmp_path, "h", {"cache_trusted_keys": [str(tmp_path / "bad.pem")]})
    with pytest.raises(StorageError, match=r"bad.pem named in .*config.json is not an unencrypted public key in PEM"):
        Trust.configured(home)
    home = _home(tmp_path, "h2", {"cache_signing_key": str(tmp_path / "missing.pem")})
    with pytest.raises(StorageError, match=r"cannot read the key .*missing.pem named in"):
        Trust.configured(home)


def test_an_oci_layout_cache_carries_signatures_too(busybox_oci, keys, tmp_path, monkeypatch):
    nb = _notebook(tmp_path / "nb.ipynb", busybox_oci, CELLS[:2])
    url = f"oci:{tmp_path / 'cache'}"
    _, out, tree_a = _build(_home(tmp_path, "a", {"cache_signing_key": str(keys / "a.pem")}), nb, monkeypatch,
                            cache_to=url)
    assert "warning" not in out, out
    trusting_a = _home(tmp_path, "c", {"cache_trusted_keys": [str(keys / "a.pub")]})
    result, out, tree = _build(trusting_a, nb, monkeypatch, cache_from=[url])
    assert result.steps_run == 0 and "warning" not in out and tree == tree_a, out
    trusting_mallory = _home(tmp_path, "m", {"cache_trusted_keys": [str(keys / "mallory.pub")]})
    result, out, _ = _build(trusting_mallory, nb, monkeypatch, cache_from=[url])
    assert result.steps_run == 2 and out.count("is not signed by a trusted key") == 1, out
