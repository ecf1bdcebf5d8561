"""Signed shared-cache entries: whoever can push to the cache registry no longer
decides what trusting builds take from it.

A builder with a signing key (`"cache_signing_key"` in the config file: an
ed25519 private key in PEM, `openssl genpkey -algorithm ed25519`) signs each
entry it pushes. The signature follows cosign's layout for OCI 1.1 referrers:
a "simple signing" payload naming the entry's manifest digest
(`critical.image.docker-manifest-digest`), stored as the one layer of an
artifact manifest (artifactType application/vnd.dev.cosign.artifact.sig.v1+json)
whose subject is the entry, the base64 signature in the layer's
`dev.cosignproject.cosign/signature` annotation. It is found through the
registry's referrers API, else the referrers tag `sha256-<hex>`
(distribution-spec 1.1), which oci/referrers.py keeps up to date; in an
`oci:DIR` cache, among the index's manifests (as oci/attach.py keeps them).

A build with trusted keys (`"cache_trusted_keys"`: ed25519 public keys in
PEM) takes an entry only when one of them signed that entry's manifest
digest; the digest is recomputed from the record and the verified layer the
build is about to use, so neither a swapped tag nor a signature copied from
another entry passes. Anything else is one warning and a local run.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stacker_kernel.errors import ImageError, StorageError
from stacker_kernel.oci import layout_write as lw
from stacker_kernel.oci import registry as reg

SIG_ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIG_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
SIGN_KEY = "cache_signing_key"
TRUSTED_KEYS = "cache_trusted_keys"
_MAX_SIGNATURES = 16  # referrers looked at per entry: a flood of bogus ones costs no more
_MAX_PAYLOAD = 64 << 10
EMPTY = b"{}"  # the config of an artifact manifest (OCI 1.1)
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY).hexdigest()


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise StorageError("signed cache entries need the cryptography package: "
                           "pip install cryptography") from None
    return serialization, ed25519


def entry_digest(record: dict[str, Any], layer_digest: str, layer_size: int) -> str:
    """The manifest digest of the cache entry holding `record` and that layer, as
    oci/registry.py stores it (canonical JSON): what a signature names."""
    config = lw.Descriptor(reg.CONFIG_MEDIA_TYPE, "sha256:" + hashlib.sha256(lw.canonical_json(record)).hexdigest(),
                           len(lw.canonical_json(record)))
    manifest = reg._manifest(config, lw.Descriptor(reg.LAYER_MEDIA_TYPE, layer_digest, layer_size))
    return "sha256:" + hashlib.sha256(lw.canonical_json(manifest)).hexdigest()


def payload(reference: str, digest: str) -> bytes:
    """cosign's simple signing payload for manifest `digest` of `reference` (HOST/REPO)."""
    return lw.canonical_json({"critical": {"identity": {"docker-reference": reference},
                                           "image": {"docker-manifest-digest": digest},
                                           "type": PAYLOAD_TYPE},
                              "optional": None})


@dataclass
class Trust:
    """The signing key and the trusted keys of one user (both may be absent)."""
    signing_key: Any = None  # ed25519.Ed25519PrivateKey
    trusted: list[Any] = field(default_factory=list)  # ed25519.Ed25519PublicKey
    config: str = ""

    @classmethod
    def configured(cls, home: str | os.PathLike | None = None) -> "Trust":
        """From ~/.config/stacker-kernel/config.json; a one-line StorageError for a
        key file that is missing or not an ed25519 key in PEM."""
        from stacker_kernel.storage.location import config_file

        path = config_file(home or Path.home())
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()  # a missing or broken file is remote_cache.configured's to report
        if not isinstance(data, dict):
            return cls()
        sign, trusted = data.get(SIGN_KEY), data.get(TRUSTED_KEYS) or []
        trusted = [trusted] if isinstance(trusted, str) else trusted
        if not isinstance(sign, (str, type(None))) or not isinstance(trusted, list) \
                or not all(isinstance(t, str) for t in trusted):
            raise StorageError(f"{path}: {SIGN_KEY} must be a key file and {TRUSTED_KEYS} a list of key files")
        trust = cls(config=str(path))
        if sign or trusted:
            _, ed25519 = _crypto()
        if sign:
            key = _load(sign, path, private=True)
            if not isinstance(key, ed25519.Ed25519PrivateKey):
                raise StorageError(f"{SIGN_KEY} {sign} in {path} is not an ed25519 private key: "
                                   f"make one with 'openssl genpkey -algorithm ed25519 -out {sign}'")
            trust.signing_key = key
        for name in trusted:
            key = _load(name, path, private=False)
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise StorageError(f"{TRUSTED_KEYS} entry {name} in {path} is not an ed25519 public key: "
                                   "export one with 'openssl pkey -in KEY -pubout'")
            trust.trusted.append(key)
        return trust

    # --- the builder ---------------------------------------------------------------------

    def sign(self, target: Any, record: dict[str, Any], layer_digest: str, layer_size: int) -> None:
        """Attach our signature of the entry just pushed to `target` (a registry or an
        OCI layout; nothing without a key). CacheUnavailable on failure."""
        if self.signing_key is None:
            return
        digest = entry_digest(record, layer_digest, layer_size)
        if isinstance(target, reg.LayoutCache):
            try:
                _sign_in_layout(self.signing_key, target.dir, digest)
            except (OSError, ImageError) as e:
                raise reg.CacheUnavailable(f"cannot sign the entry in {target.url} ({e})") from None
            return
        if not isinstance(target, reg.RegistryCache):
            return
        from stacker_kernel.oci.referrers import _update_fallback_tag

        subject = _manifest_descriptor(target, digest)
        data, raw, entry = _signature_artifact(self.signing_key, f"{target.host}/{target.repo}", subject)
        _put_blob(target, data, json.loads(raw)["layers"][0]["digest"])
        _put_blob(target, EMPTY, EMPTY_DIGEST)
        resp = target._open("PUT", target._path("manifests", entry["digest"]), data=raw,
                            headers={"Content-Type": lw.MEDIA_TYPE_MANIFEST}, ok=(201, 200))
        if resp is None:
            raise reg.CacheUnavailable(f"{target.url} refused the signature of the entry")
        has_api = bool(resp.headers.get("OCI-Subject"))
        resp.close()
        if not has_api:
            try:
                _update_fallback_tag(target, digest, [entry])
            except ImageError as e:
                raise reg.CacheUnavailable(str(e)) from None

    # --- the consumer --------------------------------------------------------------------

    def refusal(self, source: Any, fetched: Any) -> str | None:
        """None when no keys are trusted or a trusted key signed the entry `fetched`
        from `source`; else why the entry is not taken (one line)."""
        if not self.trusted:
            return None
        if not isinstance(source, (reg.RegistryCache, reg.LayoutCache)):
            return f"{source.url} holds no signatures and {TRUSTED_KEYS} is set"
        try:
            digest = entry_digest(fetched.record, fetched.layer_digest, fetched.layer_size)
        except (TypeError, ValueError):
            return f"the entry of {source.url} for this step is not signed by a trusted key"
        try:
            found = (_layout_signatures(source.dir, digest) if isinstance(source, reg.LayoutCache)
                     else _signatures(source, digest))
            for sig_payload, signature in found:
                if _names(sig_payload, digest) and any(_verifies(k, signature, sig_payload) for k in self.trusted):
                    return None
        except reg.CacheUnavailable as e:
            return f"the signatures of the entry of {source.url} could not be read ({e})"
        return (f"the entry of {source.url} for this step is not signed by a trusted key "
                f"({TRUSTED_KEYS} in {self.config})")


def _signature_artifact(key: Any, reference: str, subject: dict[str, Any]) -> tuple[bytes, bytes, dict[str, Any]]:
    """(payload, artifact manifest bytes, its index descriptor) of our signature of `subject`."""
    data = payload(reference, subject["digest"])
    signature = base64.b64encode(key.sign(data)).decode()
    layer = lw.Descriptor(PAYLOAD_MEDIA_TYPE, "sha256:" + hashlib.sha256(data).hexdigest(), len(data),
                          {SIG_ANNOTATION: signature})
    manifest = {"schemaVersion": 2, "mediaType": lw.MEDIA_TYPE_MANIFEST, "artifactType": SIG_ARTIFACT_TYPE,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": EMPTY_DIGEST,
                           "size": len(EMPTY)},
                "layers": [layer.to_json()], "subject": subject}
    raw = lw.canonical_json(manifest)
    entry = {"mediaType": lw.MEDIA_TYPE_MANIFEST, "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
             "size": len(raw), "artifactType": SIG_ARTIFACT_TYPE}
    return data, raw, entry


def _sign_in_layout(key: Any, layout: str, digest: str) -> None:
    subject = {"mediaType": lw.MEDIA_TYPE_MANIFEST, "digest": digest,
               "size": os.path.getsize(lw.blob_path(layout, digest))}
    data, raw, entry = _signature_artifact(key, f"oci:{layout}", subject)
    lw.put_blob(layout, data, PAYLOAD_MEDIA_TYPE)
    lw.put_blob(layout, EMPTY, "application/vnd.oci.empty.v1+json")
    lw.put_blob(layout, raw, lw.MEDIA_TYPE_MANIFEST)

    def add(index: dict[str, Any]) -> None:
        index["manifests"] = [d for d in index.get("manifests") or [] if d.get("digest") != entry["digest"]] + [entry]

    lw.update_index(layout, add)


def _layout_signatures(layout: str, digest: str) -> list[tuple[bytes, str]]:
    """(payload, base64 signature) of each signature artifact about `digest` in `layout`."""
    from stacker_kernel.oci import attach, cas

    out = []
    try:
        found = attach.referrers(layout, digest, SIG_ARTIFACT_TYPE)[:_MAX_SIGNATURES]
    except ImageError as e:
        raise reg.CacheUnavailable(str(e)) from None
    blobs = cas.Blobs(layout)
    for desc in found:
        try:
            manifest = json.loads(blobs.read(desc.get("digest"), desc.get("size")))
            layer = _signature_layer(manifest, digest)
            if layer is not None:
                out.append((blobs.read(layer["digest"], layer["size"], limit=_MAX_PAYLOAD),
                            layer["annotations"][SIG_ANNOTATION]))
        except (ImageError, ValueError, KeyError, TypeError):
            continue
    return out


def _signature_layer(manifest: Any, digest: str) -> dict[str, Any] | None:
    """The payload layer of signature manifest `manifest` when it is about `digest`."""
    try:
        layer = manifest["layers"][0]
        if manifest["subject"]["digest"] != digest or layer["mediaType"] != PAYLOAD_MEDIA_TYPE \
                or not reg._DIGEST.fullmatch(layer["digest"]) or not 0 < layer["size"] <= _MAX_PAYLOAD \
                or not isinstance(layer["annotations"][SIG_ANNOTATION], str):
            return None
    except (KeyError, TypeError, IndexError):
        return None
    return layer


def _load(name: str, config: Path, private: bool) -> Any:
    serialization, _ = _crypto()
    try:
        data = Path(name).expanduser().read_bytes()
    except OSError as e:
        raise StorageError(f"cannot read the key {name} named in {config} ({e.strerror})") from None
    try:
        return (serialization.load_pem_private_key(data, password=None) if private
                else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        what = "private" if private else "public"
        raise StorageError(f"{name} named in {config} is not an unencrypted {what} key in PEM ({e})") from None


def _manifest_descriptor(target: Any, digest: str) -> dict[str, Any]:
    resp = target._open("HEAD", target._path("manifests", digest), headers={"Accept": lw.MEDIA_TYPE_MANIFEST})
    if resp is None:
        raise reg.CacheUnavailable(f"the entry {digest[:19]} just pushed to {target.url} is not there")
    size = int(resp.headers.get("Content-Length") or 0)
    resp.close()
    return {"mediaType": lw.MEDIA_TYPE_MANIFEST, "digest": digest, "size": size}


def _put_blob(target: Any, data: bytes, digest: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "blob")
        with open(path, "wb") as f:
            f.write(data)
        target._upload(digest, len(data), path)


def _get_json(source: Any, kind: str, ref: str, digest: str | None, size: int | None, accept: str | None = None):
    resp = source._open("GET", source._path(kind, ref), headers={"Accept": accept} if accept else None)
    if resp is None:
        return None
    data = source._read_small(resp, digest, size, "a signature")
    return data


def _signatures(source: Any, digest: str) -> list[tuple[bytes, str]]:
    """(payload, base64 signature) of each signature artifact about `digest`."""
    from stacker_kernel.oci.referrers import FALLBACK_ACCEPT, fallback_tag

    listing = None
    try:
        listing = _get_json(source, "referrers", digest, None, None, lw.MEDIA_TYPE_INDEX)
    except reg.CacheUnavailable:
        listing = None  # a registry without the referrers API may answer anything but 404
    if listing is None:
        listing = _get_json(source, "manifests", fallback_tag(digest), None, None, FALLBACK_ACCEPT)
    if listing is None:
        return []
    try:
        manifests = json.loads(listing).get("manifests") or []
    except (ValueError, AttributeError):
        return []
    out = []
    candidates = [d for d in manifests if isinstance(d, dict) and d.get("artifactType") == SIG_ARTIFACT_TYPE
                  and isinstance(d.get("digest"), str) and reg._DIGEST.fullmatch(d["digest"])]
    for desc in candidates[:_MAX_SIGNATURES]:
        raw = _get_json(source, "manifests", desc["digest"], desc["digest"], None, lw.MEDIA_TYPE_MANIFEST)
        try:
            layer = _signature_layer(json.loads(raw), digest) if raw is not None else None
        except ValueError:
            layer = None
        if layer is None:
            continue
        data = _get_json(source, "blobs", layer["digest"], layer["digest"], layer["size"])
        if data is not None:
            out.append((data, layer["annotations"][SIG_ANNOTATION]))
    return out


def _names(sig_payload: bytes, digest: str) -> bool:
    try:
        critical = json.loads(sig_payload)["critical"]
        return critical["image"]["docker-manifest-digest"] == digest and critical["type"] == PAYLOAD_TYPE
    except (ValueError, KeyError, TypeError):
        return False


def _verifies(key: Any, signature: str, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(signature, validate=True), data)
        return True
    except (InvalidSignature, ValueError):
        return False
