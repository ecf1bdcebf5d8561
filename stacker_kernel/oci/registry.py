"""The shared build cache as OCI content: in a registry (Docker Registry HTTP API
v2, spoken with urllib) or in an OCI layout directory.

One cache entry is one OCI image manifest tagged `sk-cache-<hex>` (the hex is
the sha256 of the step's versioned cache key). Its config blob is the entry's
record (media type CONFIG_MEDIA_TYPE, JSON written by engine/remote_cache.py);
its one layer is the step's diff as a gzip tar, as the export writes it.

Guarantees of `CacheStore.fetch`: every blob handed back was checked against
its digest and size; every request has a timeout and a whole fetch a deadline,
so a slow or dead registry ends in CacheUnavailable, never in a hang.
Credentials come from the containers auth file (`auth_for`), never argv.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from stacker_kernel.errors import ImageError
from stacker_kernel.oci import cas, layout_write as lw
from stacker_kernel.oci.layout import OCILayout
from stacker_kernel.oci.registry_auth import find_credentials

CONFIG_MEDIA_TYPE = "application/vnd.stacker-kernel.cache.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_MEDIA_TYPE = lw.MEDIA_TYPE_MANIFEST
TAG_PREFIX = "sk-cache-"
DEFAULT_TIMEOUT = 10.0  # seconds, each connect and each read
MIN_RATE = 256 * 1024  # bytes/s a blob transfer may not fall below (after the grace of one timeout)
_MAX_JSON = 16 << 20  # a record holds up to 2 MB of output, escaped
_CHUNK = 1 << 20
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follows a registry's redirect (e.g. a blob served by object storage) without
    handing our credentials to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


class CacheUnavailable(ImageError):
    """The remote cache cannot be used now: down, slow, refused, or its content is wrong."""


def cache_tag(key: str) -> str:
    """The tag of the entry for cache key `key` (tags allow [A-Za-z0-9_.-]{1,128})."""
    return TAG_PREFIX + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Fetched:
    """An entry read from a cache: its record and its verified layer blob."""
    record: dict[str, Any]
    layer_path: str  # a file checked against layer_digest (the caller deletes it when temporary)
    layer_digest: str
    layer_size: int
    temporary: bool


# --- the containers auth file -----------------------------------------------------

def auth_for(host: str, repo: str = "", authfile: str | None = None) -> tuple[str, str] | None:
    """(user, password) for `host/repo` from the containers auth file, looked up
    as publish and skopeo do (oci/registry_auth.py); None when no file has one."""
    creds = find_credentials(f"{host}/{repo}" if repo else host, authfile)
    return (creds.username, creds.password) if creds else None


# --- URLs -------------------------------------------------------------------------------

def open_cache(url: str, *, insecure: bool = False, authfile: str | None = None,
               timeout: float | None = None) -> "CacheStore":
    """The cache at `url`: docker://HOST[:PORT]/REPO or oci:DIR. RecipeError-like
    ImageError for any other form."""
    if url.startswith("oci:") and len(url) > 4:
        return LayoutCache(url)
    if url.startswith("docker://"):
        rest = url[len("docker://"):].strip("/")
        host, _, repo = rest.partition("/")
        if host and repo and re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", repo):
            return RegistryCache(url, host, repo, insecure=insecure, authfile=authfile,
                                 timeout=timeout or float(os.environ.get("STACKER_KERNEL_CACHE_TIMEOUT",
                                                                         DEFAULT_TIMEOUT)))
    raise ImageError(f"cache {url!r} is not a cache URL: write docker://HOST[:PORT]/REPO "
                     "(lowercase repository) or oci:DIR")


class CacheStore(Protocol):
    """Where cache entries are kept (a registry or a layout)."""
    url: str

    def has(self, tag: str) -> bool:
        """True when an entry is stored under `tag`."""

    def fetch(self, tag: str, tmp_dir: str) -> Fetched | None:
        """The entry under `tag`, its layer verified (downloaded into `tmp_dir` when
        remote); None when there is none. CacheUnavailable on any failure."""

    def put(self, tag: str, record: dict[str, Any], layer_dir: str, layer_digest: str, layer_size: int) -> None:
        """Store an entry: `record` as config, the blob `layer_digest` of the
        layout-like directory `layer_dir` as its layer (skipped when present)."""


def _manifest(config: lw.Descriptor, layer: lw.Descriptor) -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config.to_json(),
            "layers": [layer.to_json()]}


def _check_manifest(manifest: Any, where: str) -> tuple[dict, dict]:
    """The config and layer descriptors of a cache manifest, checked for shape."""
    try:
        config, layers = manifest["config"], manifest["layers"]
        ok = (config["mediaType"] == CONFIG_MEDIA_TYPE and len(layers) == 1
              and all(_DIGEST.fullmatch(d["digest"]) and isinstance(d["size"], int) and d["size"] >= 0
                      for d in (config, layers[0])) and config["size"] <= _MAX_JSON)
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise CacheUnavailable(f"{where} is not a stacker-kernel cache entry")
    return config, layers[0]


def _record(data: bytes, where: str) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise CacheUnavailable(f"the record of {where} is not a JSON object")
    return record


# --- OCI layout ------------------------------------------------------------------------------

class LayoutCache(CacheStore):
    """Entries in the OCI layout `oci:DIR` (tags in index.json)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dir = url[len("oci:"):]

    def _descriptor(self, tag: str) -> dict | None:
        if not os.path.exists(os.path.join(self.dir, "index.json")):
            return None
        try:
            layout = OCILayout(self.dir)
        except ImageError as e:
            raise CacheUnavailable(str(e)) from e
        for d in layout.index.get("manifests") or []:
            if isinstance(d, dict) and (d.get("annotations") or {}).get(lw.REF_NAME) == tag:
                return d
        return None

    def has(self, tag: str) -> bool:
        return self._descriptor(tag) is not None

    def fetch(self, tag: str, tmp_dir: str) -> Fetched | None:
        d = self._descriptor(tag)
        if d is None:
            return None
        where = f"{self.url}:{tag}"
        try:
            layout = OCILayout(self.dir)
            config, layer = _check_manifest(layout.read_json(d.get("digest", ""), d.get("size")), where)
            record = _record(layout.blobs.read(config["digest"], config["size"], f"the record of {where}"), where)
            # Copied out verified: the layout may change under us, the copy cannot.
            path = os.path.join(tmp_dir, layer["digest"].split(":", 1)[1])
            with layout.blobs.open(layer["digest"], layer["size"], f"the layer of {where}") as src, \
                    open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
                src.read()  # at the end: raises unless it was exactly the blob
        except (ImageError, OSError) as e:
            raise CacheUnavailable(f"{where}: {e}") from e
        return Fetched(record, path, layer["digest"], layer["size"], temporary=True)

    def put(self, tag: str, record: dict[str, Any], layer_dir: str, layer_digest: str, layer_size: int) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
            lw.init_layout(self.dir)
            layer = lw.Descriptor(LAYER_MEDIA_TYPE, layer_digest, layer_size)
            lw.copy_blob(cas.Blobs(layer_dir), self.dir, layer)
            config = lw.put_json(self.dir, record, CONFIG_MEDIA_TYPE)
            manifest = lw.put_json(self.dir, _manifest(config, layer), MANIFEST_MEDIA_TYPE)
            lw.set_tags(self.dir, [(tag, manifest)])
        except ImageError as e:  # the step's own layer failed its digest check
            raise CacheUnavailable(f"cannot write {self.url} ({e})") from e
        except OSError as e:
            raise CacheUnavailable(f"cannot write {self.url} ({e.strerror or e})") from e


# --- registry ----------------------------------------------------------------------------------

class RegistryCache(CacheStore):
    """Entries in repository `repo` of a registry, over the HTTP API v2."""

    def __init__(self, url: str, host: str, repo: str, *, insecure: bool, authfile: str | None,
                 timeout: float) -> None:
        self.url, self.host, self.repo, self.timeout = url, host, repo, timeout
        hostname = host[: host.index("]") + 1] if host.startswith("[") else host.split(":", 1)[0]
        # As publish: a registry on localhost may speak plain http; others need --insecure.
        self.plain_ok = insecure or hostname in _LOCAL_HOSTS
        self.scheme = "https"
        self.creds = auth_for(host, repo, authfile)
        self.authorization: str | None = None
        self._ssl = ssl.create_default_context()
        if self.plain_ok:
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self._ssl), _Redirect)

    # one request, with auth and the http fallback
    def _open(self, method: str, url: str, *, headers: dict[str, str] | None = None,
              data: bytes | BinaryIO | None = None, ok: tuple[int, ...] = (200,), retry: bool = True):
        """The response to one request (status in `ok`, or 404 -> None). Any other
        outcome is CacheUnavailable naming the registry."""
        if url.startswith("/"):
            url = f"{self.scheme}://{self.host}{url}"
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.authorization:
            req.add_header("Authorization", self.authorization)
        try:
            resp = self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            challenge = e.headers.get("WWW-Authenticate", "")
            e.close()
            if e.code == 404:
                return None
            if e.code == 401 and retry and challenge and self._authenticate(challenge):
                if hasattr(data, "seek"):
                    data.seek(0)
                return self._open(method, url, headers=headers, data=data, ok=ok, retry=False)
            if e.code in (401, 403):
                raise CacheUnavailable(f"{self.url} refused access (HTTP {e.code}): log in with "
                                       "'skopeo login' (the containers auth file) or check the URL") from None
            raise CacheUnavailable(f"{self.url} answered HTTP {e.code} to {method}") from None
        except urllib.error.URLError as e:
            if (self.plain_ok and self.scheme == "https" and isinstance(e.reason, ssl.SSLError)
                    and url.startswith("https://")):
                self.scheme = "http"  # a plain-http registry (localhost or --insecure)
                return self._open(method, "http://" + url[len("https://"):], headers=headers, data=data,
                                  ok=ok, retry=retry)
            raise CacheUnavailable(f"cannot reach {self.url} ({e.reason})") from None
        except (socket.timeout, TimeoutError):
            raise CacheUnavailable(f"{self.url} did not answer within {self.timeout:g}s") from None
        except (OSError, ValueError) as e:  # connection reset, bad status line, ...
            raise CacheUnavailable(f"cannot talk to {self.url} ({e})") from None
        if resp.status not in ok:
            resp.close()
            raise CacheUnavailable(f"{self.url} answered HTTP {resp.status} to {method}")
        return resp

    def _authenticate(self, challenge: str) -> bool:
        """Set self.authorization for a Bearer or Basic challenge; False if we cannot."""
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        basic = None
        if self.creds is not None:
            basic = "Basic " + base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
        if scheme.lower() == "basic":
            self.authorization = basic
            return basic is not None
        if scheme.lower() != "bearer" or "realm" not in fields:
            return False
        query = {"scope": fields.get("scope") or f"repository:{self.repo}:pull,push"}
        if fields.get("service"):
            query["service"] = fields["service"]
        req = urllib.request.Request(fields["realm"] + "?" + urllib.parse.urlencode(query))
        if basic:
            req.add_header("Authorization", basic)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                answer = json.loads(resp.read(_MAX_JSON))
        except (OSError, ValueError) as e:
            raise CacheUnavailable(f"no token for {self.url} from {fields['realm']} ({e})") from None
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not token:
            return False
        self.authorization = f"Bearer {token}"
        return True

    def _path(self, kind: str, ref: str) -> str:
        return f"/v2/{self.repo}/{kind}/{ref}"

    def _read_small(self, resp, digest: str | None, size: int | None, where: str) -> bytes:
        with resp:
            try:
                data = resp.read(_MAX_JSON + 1)
            except (OSError, socket.timeout) as e:
                raise CacheUnavailable(f"reading {where} from {self.url} failed ({e})") from None
        if len(data) > _MAX_JSON or (size is not None and len(data) != size):
            raise CacheUnavailable(f"{where} from {self.url} has the wrong size")
        if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise CacheUnavailable(f"{where} from {self.url} does not match its digest {digest}")
        return data

    def has(self, tag: str) -> bool:
        resp = self._open("HEAD", self._path("manifests", tag),
                          headers={"Accept": MANIFEST_MEDIA_TYPE})
        if resp is None:
            return False
        resp.close()
        return True

    def fetch(self, tag: str, tmp_dir: str) -> Fetched | None:
        where = f"{self.url}:{tag}"
        resp = self._open("GET", self._path("manifests", tag), headers={"Accept": MANIFEST_MEDIA_TYPE})
        if resp is None:
            return None
        try:
            manifest = json.loads(self._read_small(resp, None, None, "the manifest"))
        except ValueError:
            raise CacheUnavailable(f"{where} is not a JSON manifest") from None
        config, layer = _check_manifest(manifest, where)
        resp = self._open("GET", self._path("blobs", config["digest"]))
        if resp is None:
            raise CacheUnavailable(f"the record of {where} is missing from the registry")
        record = _record(self._read_small(resp, config["digest"], config["size"], "the record"), where)
        path = os.path.join(tmp_dir, layer["digest"].split(":", 1)[1])
        self._download(layer["digest"], layer["size"], path)
        return Fetched(record, path, layer["digest"], layer["size"], temporary=True)

    def _deadline(self, size: int) -> float:
        return time.monotonic() + self.timeout + size / MIN_RATE

    def _download(self, digest: str, size: int, dest: str) -> None:
        """Blob `digest` into `dest`, hashed while it streams; CacheUnavailable when
        it is short, long, wrong or slower than MIN_RATE overall."""
        resp = self._open("GET", self._path("blobs", digest))
        if resp is None:
            raise CacheUnavailable(f"layer {digest} is missing from {self.url}")
        deadline = self._deadline(size)
        h = hashlib.sha256()
        total = 0
        try:
            with resp, open(dest, "wb") as f:
                while True:
                    chunk = resp.read(min(_CHUNK, size - total + 1))
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > size:
                        break
                    h.update(chunk)
                    f.write(chunk)
                    if time.monotonic() > deadline:
                        raise CacheUnavailable(f"{self.url} sends layer {digest[:19]} too slowly "
                                               f"(under {MIN_RATE // 1024} KiB/s)")
        except (socket.timeout, TimeoutError):
            raise CacheUnavailable(f"{self.url} stopped sending layer {digest[:19]} "
                                   f"for {self.timeout:g}s") from None
        except OSError as e:  # includes http.client.IncompleteRead
            raise CacheUnavailable(f"downloading layer {digest[:19]} from {self.url} failed ({e})") from None
        if total < size:
            raise CacheUnavailable(f"layer {digest[:19]} from {self.url} was cut short ({total} of {size} "
                                   "bytes): the entry is ignored")
        if total != size or "sha256:" + h.hexdigest() != digest:
            raise CacheUnavailable(f"layer {digest[:19]} from {self.url} does not match its digest "
                                   f"({total} of {size} bytes): the entry is ignored")

    def _upload(self, digest: str, size: int, path: str) -> None:
        """Blob `digest` (the file `path`) into the repository, unless it is there."""
        head = self._open("HEAD", self._path("blobs", digest))
        if head is not None:
            head.close()
            return  # already pushed (by us or by anyone): not uploaded again
        resp = self._open("POST", f"/v2/{self.repo}/blobs/uploads/", data=b"", ok=(202,))
        if resp is None:
            raise CacheUnavailable(f"{self.url} does not accept uploads")
        location = resp.headers.get("Location")
        resp.close()
        if not location:
            raise CacheUnavailable(f"{self.url} gave no upload location")
        location = urllib.parse.urljoin(f"{self.scheme}://{self.host}/", location)
        sep = "&" if "?" in location else "?"
        with open(path, "rb") as f:
            done = self._open("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}", data=f,
                              headers={"Content-Type": "application/octet-stream",
                                       "Content-Length": str(size)}, ok=(201, 204))
        if done is None:
            raise CacheUnavailable(f"{self.url} lost the upload of {digest[:19]}")
        done.close()

    def put(self, tag: str, record: dict[str, Any], layer_dir: str, layer_digest: str, layer_size: int) -> None:
        self._upload(layer_digest, layer_size, lw.blob_path(layer_dir, layer_digest))
        with tempfile.TemporaryDirectory() as tmp:
            lw.init_layout(tmp)
            config = lw.put_json(tmp, record, CONFIG_MEDIA_TYPE)
            self._upload(config.digest, config.size, lw.blob_path(tmp, config.digest))
        body = lw.canonical_json(_manifest(config, lw.Descriptor(LAYER_MEDIA_TYPE, layer_digest, layer_size)))
        resp = self._open("PUT", self._path("manifests", tag), data=body,
                          headers={"Content-Type": MANIFEST_MEDIA_TYPE}, ok=(201, 200))
        if resp is None:
            raise CacheUnavailable(f"{self.url} refused the manifest of {tag}")
        resp.close()


def remove_quietly(path: str) -> None:
    """Delete a temporary file or directory, ignoring that it is gone."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
