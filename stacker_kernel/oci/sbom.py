"""An inventory (what engine/sbom.py reads from a rootfs) as an SPDX 2.3 JSON document, built and validated
with the `spdx-tools` library.

spdx-tools (a dependency) is imported only here, when a
document is made, so the kernel starts fast; a broken install without it gets one
ImageError that says how to install it. The document is deterministic: same
inventory, name, subject and time give the same bytes (sorted JSON, a
namespace derived from the content, the creation time from SOURCE_DATE_EPOCH).
What a package list gives (most of the work) is kept and reused for the next
image with the same packages (spdx_document's `cache_dir`).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Any

from stacker_kernel.errors import ImageError

MEDIA_TYPE = "application/spdx+json"
TOOL = "stacker-kernel-0.1.0"
INSTALL_HINT = (f"the SBOM needs the spdx-tools library: install it with '{sys.executable} -m pip install "
                "spdx-tools' (a dependency of stacker-kernel missing from this install), or pass --no-sbom")
_GNU = re.compile(r"(A?L?GPL|GFDL)-(\d+(?:\.\d+)?)(\+?)", re.I)
_TOKEN = re.compile(r"\(|\)|[^\s()]+")


@dataclass(frozen=True)
class Package:
    """One installed package as its database records it. `licenses` are the
    database's own words (Debian short names, apk's licence field), possibly empty."""
    manager: str  # "deb" | "apk" | "rpm"
    name: str
    version: str
    arch: str
    licenses: tuple[str, ...] = ()
    distro: str = ""

    def purl(self) -> str:
        """The package URL: pkg:deb/debian/NAME@VERSION?arch=ARCH (purl-spec: version
        percent-encoded, so a Debian epoch `1:2.3` reads 1%3A2.3)."""
        namespace = self.distro or {"deb": "debian", "apk": "alpine", "rpm": "redhat"}[self.manager]
        name = urllib.parse.quote(self.name, safe=".-_~")
        version = urllib.parse.quote(self.version, safe=".-_~")
        arch = urllib.parse.quote(self.arch, safe=".-_~")
        return f"pkg:{self.manager}/{namespace}/{name}@{version}" + (f"?arch={arch}" if arch else "")


@dataclass(frozen=True)
class DirSummary:
    path: str
    files: int
    size: int


@dataclass(frozen=True)
class Unowned:
    """The files (not directories) no package database lists: how many, their bytes,
    and the directories (two levels deep) holding the most bytes."""
    files: int
    size: int
    top: tuple[DirSummary, ...] = ()


@dataclass(frozen=True)
class Inventory:
    packages: tuple[Package, ...]
    unowned: Unowned | None  # None when not asked for (files=False)
    distro: str = ""  # os-release ID
    distro_version: str = ""  # os-release VERSION_ID
    notes: tuple[str, ...] = ()

    def by_name(self) -> dict[tuple[str, str, str], Package]:
        return {(p.manager, p.name, p.arch): p for p in self.packages}


def _spdx():
    try:
        import spdx_tools.spdx.model as model
        from spdx_tools.common.spdx_licensing import spdx_licensing
        from spdx_tools.spdx.jsonschema.document_converter import DocumentConverter
        from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    except ImportError as e:
        raise ImageError(INSTALL_HINT) from e
    return model, spdx_licensing, DocumentConverter, validate_full_spdx_document


_KNOWN: dict[str, str] = {}


def _license_id(word: str, licensing) -> str | None:
    """An SPDX licence id for one Debian/apk licence name, None when there is none."""
    if not _KNOWN:
        _KNOWN.update({k.lower(): k for k in licensing.known_symbols if not k.startswith("LicenseRef-")})
    special = {"expat": "MIT", "public-domain": None, "artistic": "Artistic-1.0-Perl", "zlib": "Zlib"}
    if word.lower() in special:
        return special[word.lower()]
    m = _GNU.fullmatch(word)
    if m:
        version = m.group(2) if "." in m.group(2) else m.group(2) + ".0"
        candidate = f"{m.group(1).upper()}-{version}-{'or-later' if m.group(3) else 'only'}"
        return _KNOWN.get(candidate.lower())
    return _KNOWN.get(word.lower()) or (_KNOWN.get(word.lower() + ".0") if word[-1:].isdigit() else None)


def license_ref(text: str) -> str:
    """The LicenseRef- id we give a licence name SPDX has no id for."""
    return "LicenseRef-" + (re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-") or "unknown")


def license_expression(names: tuple[str, ...], licensing) -> tuple[str | None, dict[str, str]]:
    """The SPDX expression for a package's licence names (each name its own term,
    all of them ANDed) and the LicenseRef ids it uses -> the name they stand for.
    Words between names are operators (`or`, `and`); a name SPDX lacks, or one
    that does not parse (`GPL-3+ with Bison exception`), is a LicenseRef."""
    terms: list[str] = []
    refs: dict[str, str] = {}
    for name in names:
        out: list[str] = []
        mine: dict[str, str] = {}
        # "GPL-3+ with Bison exception": Debian's exceptions have no SPDX names to map to
        tokens = [] if re.search(r"\bwith\b", name, re.I) else _TOKEN.findall(name.replace(",", " "))
        for tok in tokens:
            if tok.lower() in ("or", "and"):
                out.append(tok.upper())
            elif tok == ")":
                out.append(tok)
            else:
                if out and out[-1] not in ("OR", "AND", "("):
                    out.append("AND")  # apk: "MIT BSD-2-Clause"
                if tok == "(":
                    out.append(tok)
                    continue
                spdx_id = _license_id(tok, licensing)
                if spdx_id is None:
                    spdx_id = license_ref(tok)
                    mine[spdx_id] = tok
                out.append(spdx_id)
        expr = " ".join(out).replace("( ", "(").replace(" )", ")")
        try:
            if not expr:
                raise ValueError(name)
            licensing.parse(expr, strict=True)  # the structure; our LicenseRefs are unknown to it
            valid = not [s for s in licensing.validate(expr).invalid_symbols if s not in mine]
        except Exception:  # license_expression raises several kinds
            valid = False
        if not valid:
            expr = license_ref(name)
            mine = {expr: name}
        refs.update(mine)
        if expr and expr not in terms:
            terms.append(expr)
    if not terms:
        return None, {}
    joined = " AND ".join(f"({t})" if " " in t else t for t in terms)
    return joined, {r: t for r, t in refs.items() if r in joined}


def _created(epoch: int | None) -> datetime.datetime:
    if epoch is not None:
        return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).replace(tzinfo=None)
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)


def _spdx_id(prefix: str, text: str, used: set[str]) -> str:
    base = f"SPDXRef-{prefix}-" + re.sub(r"[^A-Za-z0-9.-]+", "-", text)
    candidate, n = base, 1
    while candidate in used:
        n += 1
        candidate = f"{base}-{n}"
    used.add(candidate)
    return candidate


def _unowned_text(u: Unowned) -> tuple[str, str]:
    summary = f"{u.files} files ({u.size} bytes) that no package database lists"
    lines = [f"{d.path}: {d.files} files, {d.size} bytes" for d in u.top]
    return summary, "Directories holding the most of them:\n" + "\n".join(lines) if lines else summary


def spdx_document(inv: Inventory, name: str, *, subject_digest: str | None = None,
                  source_date_epoch: int | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """The SPDX 2.3 document (as JSON data) of the rootfs inventory `inv` of image or
    layer `name` (manifest `subject_digest`, when it is an exported image).
    Validated with spdx-tools; ImageError when the library is missing.

    What the packages give (their entries, licence expressions, relationships: what
    spdx-tools makes and validates, most of the time) is made once per package list
    and, with `cache_dir`, kept there; this document's digest, time and unowned files
    are then set in it. So a rebuild that changed no package loads no spdx-tools, and
    its document is byte for byte the one made anew."""
    with_subject = subject_digest is not None
    try:
        return _filled(_skeleton(inv, name, with_subject, cache_dir), inv, name, subject_digest, source_date_epoch)
    except (KeyError, IndexError, TypeError, AttributeError):  # a kept part damaged (by hand): made again
        return _filled(_skeleton(inv, name, with_subject, cache_dir, reuse=False), inv, name, subject_digest,
                       source_date_epoch)


# A document made with these stand-ins has every field the real values go into.
_STAND_IN_DIGEST = "sha256:" + "0" * 64
_STAND_IN_UNOWNED = Unowned(0, 0)
_SKELETON_FORMAT = 1  # bump when _made or _filled change what they write
_SKELETONS_KEPT = 32


def _skeleton(inv: Inventory, name: str, with_subject: bool, cache_dir: str | None,
              reuse: bool = True) -> dict[str, Any]:
    """The document of `inv` with stand-ins for what _filled sets: from `cache_dir` when
    it was made there before (by the same spdx-tools) and `reuse`, else made now and
    kept there."""
    path = None
    versions = _library_versions() if cache_dir else None
    if versions:
        key = hashlib.sha256(json.dumps(
            [_SKELETON_FORMAT, TOOL, versions, name, with_subject, [p.__dict__ for p in inv.packages],
             inv.unowned is not None, inv.distro, inv.distro_version, list(inv.notes)],
            sort_keys=True).encode()).hexdigest()
        path = os.path.join(cache_dir, f"{key}.json")
        if reuse:
            try:
                with open(path, "rb") as f:
                    doc = json.load(f)
                os.utime(path)  # recently used: kept longest
                return doc
            except (OSError, ValueError):
                pass
    doc = _made(inv, name, _STAND_IN_DIGEST if with_subject else None, 0,
                _STAND_IN_UNOWNED if inv.unowned is not None else None)
    if path is not None:
        keep_recent(path, doc, _SKELETONS_KEPT)
    return doc


def _library_versions() -> list[str] | None:
    """The installed spdx-tools and license-expression (their dist-info names, found
    without importing them), None when either is missing."""
    import importlib.util

    found: list[str] = []
    for package in ("spdx_tools", "license_expression"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return None
        where = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
        if not where:
            return None
        site = os.path.dirname(os.path.dirname(where) if spec.origin else where)
        try:
            found += sorted(n for n in os.listdir(site) if n.startswith(f"{package}-") and n.endswith(".dist-info"))
        except OSError:
            return None
    return found


def keep_recent(path: str, data: Any, most: int) -> None:
    """Write JSON `data` to the cache file `path` (atomically; a cache that cannot be
    written is no error) and drop the least recently used .json files of its directory
    beyond `most` (a reader touches what it uses)."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, path)
        kept = [os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".json")]
        if len(kept) > most:
            kept.sort(key=lambda p: os.stat(p).st_mtime_ns)
            for old in kept[:-most]:
                os.unlink(old)
    except OSError:
        pass


def _namespace(inv: Inventory, name: str, subject_digest: str | None) -> str:
    identity = hashlib.sha256(json.dumps([name, subject_digest, [p.__dict__ for p in inv.packages],
                                          inv.unowned and inv.unowned.__dict__ and
                                          [inv.unowned.files, inv.unowned.size]], default=str,
                                         sort_keys=True).encode()).hexdigest()
    return f"https://stacker-kernel.invalid/spdx/{re.sub(r'[^A-Za-z0-9._-]', '-', name)}-{identity}"


def _image_purl(name: str, subject_digest: str) -> str:
    return f"pkg:oci/{re.sub(r'[^A-Za-z0-9._-]', '-', name).lower()}@{subject_digest.replace(':', '%3A')}"


def _filled(doc: dict[str, Any], inv: Inventory, name: str, subject_digest: str | None,
            source_date_epoch: int | None) -> dict[str, Any]:
    """`doc` (a skeleton) with the fields that differ between documents of the same
    packages set as _made sets them (spdx-tools writes a time as ISO 8601 with a Z)."""
    doc["creationInfo"]["created"] = _created(source_date_epoch).replace(microsecond=0).isoformat() + "Z"
    doc["documentNamespace"] = _namespace(inv, name, subject_digest)
    for package in doc["packages"]:
        if package["SPDXID"] == "SPDXRef-Image" and subject_digest:
            package["versionInfo"] = subject_digest
            package["externalRefs"][0]["referenceLocator"] = _image_purl(name, subject_digest)
        elif package["SPDXID"] == "SPDXRef-Unpackaged-Files" and inv.unowned is not None:
            package["summary"], package["description"] = _unowned_text(inv.unowned)
    return doc


def _made(inv: Inventory, name: str, subject_digest: str | None, source_date_epoch: int | None,
          unowned: Unowned | None) -> dict[str, Any]:
    """The document made and validated by spdx-tools (with `unowned` for the inventory's)."""
    model, licensing, DocumentConverter, validate = _spdx()
    noassert = model.SpdxNoAssertion()
    comment = "; ".join(inv.notes) or None
    info = model.CreationInfo(
        spdx_version="SPDX-2.3", spdx_id="SPDXRef-DOCUMENT", name=f"{name} (stacker-kernel SBOM)",
        document_namespace=_namespace(inv, name, subject_digest),
        creators=[model.Actor(model.ActorType.TOOL, TOOL)], created=_created(source_date_epoch),
        document_comment=comment)
    used: set[str] = {"SPDXRef-DOCUMENT", "SPDXRef-Image"}
    image = model.Package(spdx_id="SPDXRef-Image", name=name, download_location=noassert,
                          version=subject_digest, files_analyzed=False,
                          primary_package_purpose=model.PackagePurpose.CONTAINER,
                          summary=(f"the rootfs of {name}" + (f" (OS {inv.distro} {inv.distro_version})"
                                                              if inv.distro else "")))
    if subject_digest:
        image.external_references = [model.ExternalPackageRef(
            model.ExternalPackageRefCategory.PACKAGE_MANAGER, "purl",
            _image_purl(name, subject_digest))]
    packages = [image]
    relationships = [model.Relationship("SPDXRef-DOCUMENT", model.RelationshipType.DESCRIBES, "SPDXRef-Image")]
    extracted: dict[str, str] = {}
    for p in inv.packages:
        expr, refs = license_expression(p.licenses, licensing)
        extracted.update(refs)
        pkg = model.Package(
            spdx_id=_spdx_id(f"Package-{p.manager}", f"{p.name}-{p.arch}", used), name=p.name,
            download_location=noassert, version=p.version or None, files_analyzed=False,
            license_declared=licensing.parse(expr) if expr else noassert,
            license_concluded=noassert, copyright_text=noassert,
            source_info=f"{p.manager} package, architecture {p.arch or 'unknown'}",
            external_references=[model.ExternalPackageRef(model.ExternalPackageRefCategory.PACKAGE_MANAGER,
                                                          "purl", _purl(p))])
        packages.append(pkg)
        relationships.append(model.Relationship("SPDXRef-Image", model.RelationshipType.CONTAINS, pkg.spdx_id))
    if unowned is not None:
        summary, description = _unowned_text(unowned)
        rest = model.Package(spdx_id="SPDXRef-Unpackaged-Files", name="files no package owns",
                             download_location=noassert, files_analyzed=False, summary=summary,
                             description=description)
        packages.append(rest)
        relationships.append(model.Relationship("SPDXRef-Image", model.RelationshipType.CONTAINS, rest.spdx_id))
    licenses = [model.ExtractedLicensingInfo(
        license_id=ref, extracted_text=f"The licence the package database calls {text!r}; its text is in the "
                                       "package's copyright file (/usr/share/doc/PACKAGE/copyright).",
        license_name=text) for ref, text in sorted(extracted.items())]
    doc = model.Document(info, packages=packages, relationships=relationships, extracted_licensing_info=licenses)
    problems = validate(doc)
    if problems:
        raise ImageError(f"the SBOM of {name} is not valid SPDX ({problems[0].validation_message}): "
                         "this is a bug in stacker-kernel; pass --no-sbom meanwhile")
    return DocumentConverter().convert(doc)


def _purl(p: Package) -> str:
    return p.purl()


def document_bytes(document: dict[str, Any]) -> bytes:
    """The bytes stored and written for a document: sorted keys, indented, one final newline."""
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def validate_bytes(data: bytes) -> list[str]:
    """The validation messages of SPDX JSON `data` (parsed and checked by spdx-tools); [] when valid."""
    _spdx()
    from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    doc = JsonLikeDictParser().parse(json.loads(data))  # in memory: nothing written to /tmp
    return [m.validation_message for m in validate_full_spdx_document(doc)]
