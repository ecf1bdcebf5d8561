"""Publish tags of an OCI layout with `skopeo copy` (stacker's `publish`).

Destinations follow stacker's `publish` (cmd/stacker/publish.go): for `docker://HOST/PATH`
each image goes to `HOST/PATH/<layer>:<tag>`, for `oci:DIR` to
`DIR:<layer>_<tag>`. A URL that already names a tag
(`docker://HOST/REPO:TAG`) receives exactly one image under that name.
TLS verification is off for registries on localhost, as for a test registry.

Credentials never go on a command line (every local user sees argv in `ps`):
skopeo reads them from the containers auth file (oci/registry_auth.py), and a
password given to us reaches it through a private temporary auth file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from stacker_kernel.errors import ImageError, RecipeError
from stacker_kernel.oci.layout import OCILayout
from stacker_kernel.oci.layout_write import REF_NAME
from stacker_kernel.oci.referrers import attachment_types, push_attachments
from stacker_kernel.oci.registry_auth import auth_file_paths, find_credentials, private_auth_file

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
_UNREACHABLE = re.compile(r"connection refused|no such host|dial tcp|i/o timeout|network is unreachable|"
                          r"server gave HTTP response to HTTPS client|no route to host", re.I)
_UNAUTHORIZED = re.compile(r"unauthorized|authentication required|denied", re.I)


@dataclass(frozen=True)
class Published:
    """One copy made: layout tag -> destination reference."""
    image: str
    destination: str


def layout_tags(layout_dir: str) -> list[str]:
    """The tags of `layout_dir` in index order."""
    try:
        with open(os.path.join(layout_dir, "index.json"), "rb") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ImageError(f"{layout_dir} is not a readable OCI layout ({e}): build first or pass the right --oci-dir") from None
    tags = [(d.get("annotations") or {}).get(REF_NAME) for d in index.get("manifests") or []]
    return [t for t in tags if t]


def layer_type_name(name: str, layer_type: str) -> str:
    """stacker's LayerType.LayerName: NAME for tar, NAME-squashfs / NAME-erofs otherwise."""
    from stacker_kernel.oci.layer_types import LayerType

    return LayerType(layer_type).tag(name)


def typed_destinations(url: str, images: list[str], tags: list[str] | None,
                       layer_types: list[str]) -> list[Published]:
    """stacker's `publish --layer-type`: per image, tag and type, the layout's
    `NAME-TYPE` goes to `NAME:TAG-TYPE` (`NAME:TAG` for tar); pure, no I/O."""
    done = []
    for image in images:
        for tag in tags or ["latest"]:
            for layer_type in layer_types:
                source = layer_type_name(image, layer_type)
                for p in destinations(url, [image], [layer_type_name(tag, layer_type)]):
                    done.append(Published(source, p.destination))
    return done


def destinations(url: str, images: list[str], tags: list[str] | None) -> list[Published]:
    """Where each image goes (see the module docstring); pure, no I/O."""
    if url.startswith("docker://"):
        rest = url[len("docker://"):].rstrip("/")
        last = rest.rsplit("/", 1)[-1]
        if "/" in rest and ":" in last:  # docker://HOST/REPO:TAG names the destination
            if tags:
                raise RecipeError(f"{url} already names a tag: drop --tag or the ':TAG' of --url")
            if len(images) != 1:
                raise RecipeError(f"{url} names one image but {len(images)} would go there: pick one with --image")
            return [Published(images[0], url)]
        return [Published(i, f"docker://{rest}/{i}:{t}") for i in images for t in (tags or ["latest"])]
    if url.startswith("oci:"):
        return [Published(i, f"{url}:{i}_{t}") for i in images for t in (tags or ["latest"])]
    raise RecipeError(f"cannot publish to {url!r}: use --url docker://HOST/PATH or oci:DIR")


def _repository(reference: str) -> str:
    """`docker://HOST/PATH/NAME:TAG` -> `HOST/PATH/NAME` (what auth entries are keyed by)."""
    rest = reference[len("docker://"):]
    host, _, path = rest.partition("/")
    return f"{host}/{path.rsplit(':', 1)[0]}" if path else host


def _is_local(reference: str) -> bool:
    host = reference[len("docker://"):].split("/", 1)[0]
    if host.startswith("["):
        host = host[: host.index("]") + 1]
    else:
        host = host.split(":", 1)[0]
    return host in _LOCAL_HOSTS


def _authfile_for(destination: str, authfile: str | None) -> str | None:
    """The auth file skopeo should read for `destination`: the one holding its
    credentials, else the one given; None leaves skopeo to its own lookup."""
    found = find_credentials(_repository(destination), authfile)
    return str(found.source) if found else authfile


def publish(layout_dir: str, url: str, tags: list[str] | None = None, *, images: list[str] | None = None,
            username: str | None = None, password: str | None = None,
            authfile: str | None = None, sbom: bool = True, provenance: bool = True,
            layer_types: list[str] | None = None, show_only: bool = False) -> list[Published]:
    """Copy `images` (default: every tag of the layout) to `url` with skopeo,
    each under every tag in `tags` (default `latest`); the copies made, in order.
    The SBOM and provenance attached to each image go along (oci/referrers.py)
    unless `sbom`/`provenance` is False.

    Credentials: `username` with `password` (read from stdin by the CLI) go to
    skopeo in a private temporary auth file; otherwise the containers auth
    files are used (`authfile`, else the default lookup of registry_auth).
    Neither ever appears on a command line.

    With `layer_types` (stacker's --layer-type), `images` are layer names and
    each type's image of them (`NAME-squashfs`) is pushed under `TAG-squashfs`.
    With `show_only` (stacker's --show-only), nothing is copied: the copies that
    would be made are returned, once the images are checked.

    Raises ImageError naming the registry when it cannot be reached or refuses
    the push, and when an image is not in the layout.
    """
    if (username is None) != (password is None):
        raise RecipeError("give the registry user and password together (--username with "
                          "--password-stdin), or neither to use the auth file")
    if username is not None and authfile is not None:
        raise RecipeError("give either --authfile or --username with --password-stdin, not both")
    available = layout_tags(layout_dir)
    if layer_types:
        names = list(images or [])
        if not names:  # every layer whose image of each requested type is in the layout
            suffixes = tuple(f"-{t}" for t in ("squashfs", "erofs"))
            layers = dict.fromkeys(t.rsplit("-", 1)[0] if t.endswith(suffixes) else t for t in available)
            names = [n for n in layers if all(layer_type_name(n, t) in available for t in layer_types)]
            if not names:
                raise ImageError(f"{layout_dir} has no image of type {', '.join(layer_types)}: build with "
                                 f"--layer-type {' --layer-type '.join(layer_types)} (tags there: "
                                 f"{', '.join(available) or 'none'})")
        plan = typed_destinations(url, names, tags, layer_types)
    else:
        plan = destinations(url, list(images) if images else available, tags)
    chosen = list(dict.fromkeys(p.image for p in plan))
    missing = [i for i in chosen if i not in available]
    if missing:
        hint = f" (build with --layer-type {' --layer-type '.join(layer_types)})" if layer_types else ""
        raise ImageError(f"{', '.join(missing)} not in {layout_dir}: build it first{hint} "
                         f"(tags there: {', '.join(available) or 'none'})")
    layout = OCILayout(layout_dir)
    digests = {}
    for image in chosen:  # skopeo would follow a blob symlinked to /dev/zero forever
        digests[image] = layout.check_image(image).manifest_digest
    if show_only:
        return plan
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise ImageError("skopeo is missing: install Debian's skopeo package (apt-get install skopeo)")
    done = []
    with contextlib.ExitStack() as stack:
        given_auth = None  # one private file for the one registry of `url`
        if username is not None and url.startswith("docker://"):
            registry = url[len("docker://"):].split("/", 1)[0]
            given_auth = stack.enter_context(private_auth_file(registry, username, password or ""))
        for p in plan:
            cmd = [skopeo, "copy", "--quiet"]
            to_registry = p.destination.startswith("docker://")
            if to_registry and _is_local(p.destination):
                cmd.append("--dest-tls-verify=false")
            dest_auth = given_auth or (_authfile_for(p.destination, authfile) if to_registry else None)
            if dest_auth:
                cmd.append(f"--dest-authfile={dest_auth}")
            digestfile = stack.enter_context(tempfile.TemporaryDirectory()) + "/digest"
            cmd += [f"--digestfile={digestfile}", f"oci:{layout_dir}:{p.image}", p.destination]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                detail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"status {res.returncode}"
                if _UNREACHABLE.search(res.stderr):
                    raise ImageError(f"cannot reach the registry for {p.destination} ({detail}): start it or check --url")
                if to_registry and _UNAUTHORIZED.search(res.stderr) and username is None \
                        and find_credentials(_repository(p.destination), authfile) is None:
                    looked = ", ".join(str(f) for f in auth_file_paths(authfile))
                    raise ImageError(f"the registry refused {p.destination} without credentials ({detail}) "
                                     f"and none are in {looked}: run 'skopeo login' for it, or pass "
                                     "--username USER --password-stdin with the password on stdin")
                raise ImageError(f"publishing {p.image} to {p.destination} failed ({detail}): check --url and the credentials")
            with open(digestfile) as f:
                pushed = f.read().strip()
            push_attachments(layout_dir, digests[p.image], p.destination, pushed,
                             attachment_types(sbom, provenance), dest_auth)
            done.append(p)
    return done
