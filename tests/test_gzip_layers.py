"""gzip layers are made by the fastest program there is (oci/tarwriter.py _GzipSink):
ISA-L's igzip, else pigz, else zlib; each gives the same blob wherever it runs. The tar
headers' checksums are tarfile's, computed faster."""
from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess

from stacker_kernel.cli import main
from stacker_kernel.oci import tarwriter

GZIP_MT = "application/vnd.oci.image.layer.v1.tar+gzip"


def _sink_bytes(data: bytes) -> tuple[bytes, str]:
    out = io.BytesIO()
    sink = tarwriter._GzipSink(out)
    for i in range(0, len(data), 1 << 16):
        sink.write(data[i:i + (1 << 16)])
    digest, size = sink.finish()
    assert size == len(out.getvalue())
    return out.getvalue(), digest


def _payload() -> bytes:
    # compressible and not: text and bytes of a rootfs-like mix
    return b"".join(f"line {i} of a file in the image\n".encode() for i in range(40000)) + bytes(range(256)) * 2000


def test_a_gzip_layer_is_igzip_output_the_same_for_any_thread_count(storage, tmp_path, busybox_tar):
    assert shutil.which("igzip"), "ISA-L's igzip (Debian's isal package) is installed by scripts/setup-host.sh"
    recipe = tmp_path / "app.yaml"
    recipe.write_text(f"app:\n  from:\n    type: tar\n    url: {busybox_tar}\n  run: echo hello > /hello\n")
    out = tmp_path / "oci"
    assert main(["--storage", str(storage), "build", "-f", str(recipe), "--oci-dir", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    layers = [d for d in manifest["layers"] if d["mediaType"] == GZIP_MT]
    assert layers
    for desc in layers:
        blob = (out / "blobs/sha256" / desc["digest"][7:]).read_bytes()
        tar = gzip.decompress(blob)
        for threads in ("1", "2"):
            again = subprocess.run(["igzip", "-n", f"-{tarwriter.IGZIP_LEVEL}", "-T", threads, "-c"],
                                   input=tar, capture_output=True, check=True).stdout
            assert again == blob


def test_without_igzip_pigz_then_zlib_make_the_gzip(monkeypatch):
    data = _payload()
    real_which = shutil.which
    monkeypatch.setattr(tarwriter.shutil, "which", lambda name, *a: None if name == "igzip" else real_which(name))
    blob, digest = _sink_bytes(data)
    assert blob == subprocess.run(["pigz", "-n", f"-{tarwriter.GZIP_LEVEL}", "-c"], input=data,
                                  capture_output=True, check=True).stdout
    assert gzip.decompress(blob) == data
    monkeypatch.setattr(tarwriter.shutil, "which", lambda name, *a: None)
    blob, _ = _sink_bytes(data)
    assert gzip.decompress(blob) == data
    assert blob[4:8] == b"\0\0\0\0"  # no mtime: the same blob at any time


def test_the_sinks_digest_is_of_the_bytes_it_wrote():
    import hashlib

    blob, digest = _sink_bytes(_payload())
    assert digest == "sha256:" + hashlib.sha256(blob).hexdigest()


def test_the_header_checksums_are_tarfiles():
    import os
    import random
    import tarfile

    import stacker_kernel.oci.tarwriter  # noqa: F401 (installs its checksum)
    from stacker_kernel.oci.tarwriter import _calc_chksums

    assert tarfile.calc_chksums is _calc_chksums
    import struct

    def stdlib(buf):
        return (256 + sum(struct.unpack_from("148B8x356B", buf)), 256 + sum(struct.unpack_from("148b8x356b", buf)))

    rnd = random.Random(25)
    for buf in [bytes(512), b"\xff" * 512, os.urandom(512)] + [rnd.randbytes(512) for _ in range(200)]:
        assert _calc_chksums(buf) == stdlib(buf)
    info = tarfile.TarInfo("dir/ünïcode-name")
    info.size, info.mtime, info.uid = 3, 1700000000, 100000
    header = info.tobuf(tarfile.PAX_FORMAT)
    back = tarfile.TarFile(fileobj=__import__("io").BytesIO(header + b"abc" + bytes(509) + bytes(1024)))
    assert back.getmembers()[0].name == "dir/ünïcode-name"
