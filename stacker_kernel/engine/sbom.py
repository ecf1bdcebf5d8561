"""What a rootfs has installed: its package databases, and the files no package owns.

Read from a snapshot as the container would see it (engine/grab.py's
resolve_at: symlinks followed inside the rootfs, never out of it), as root of
a user namespace (the files belong to subordinate ids). Databases read:
dpkg (`/var/lib/dpkg/status`, licences from the machine-readable
`/usr/share/doc/PKG/copyright`), apk (`/lib/apk/db/installed`) and rpm (with
the host's `rpm` tool, which is the only reader of its formats; without it the
inventory says so in `notes`). Formats (SPDX) are oci/sbom.py's job. A committed
snapshot's inventory is kept in the store's cache (it never changes), so an image
exported again is not read again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine.grab import GrabError, open_in_snapshot, resolve_at
from stacker_kernel.engine.inspect import resolve_in_root
from stacker_kernel.oci.sbom import DirSummary, Inventory, Package, Unowned, keep_recent
from stacker_kernel.storage.btrfs import copy_data

DPKG_STATUS = "/var/lib/dpkg/status"
DPKG_INFO = "/var/lib/dpkg/info"
APK_INSTALLED = "/lib/apk/db/installed"
RPM_DBS = ("/var/lib/rpm", "/usr/lib/sysimage/rpm")
RPM_FILES = ("rpmdb.sqlite", "Packages", "Packages.db")
# What rpm's backends open: sqlite (with its journal), bdb_ro, ndb. Nothing else is copied.
RPM_READ = ("rpmdb.sqlite", "rpmdb.sqlite-wal", "rpmdb.sqlite-shm", "Packages", "Packages.db", "Index.db")
_MAX_DB = 256 << 20  # no package database is bigger; a larger file is not one
_TOP_DIRS = 10
# dpkg states whose files are on disk (dpkg-query -W also lists config-files, whose are not)
_DPKG_PRESENT = {"installed", "half-configured", "unpacked", "half-installed",
                 "triggers-awaited", "triggers-pending"}


@dataclass(frozen=True)
class PackageChange:
    """A package a step added, removed, upgraded or downgraded (version `old` -> `new`)."""
    change: str  # "added" | "removed" | "changed"
    package: Package
    old: str = ""
    new: str = ""


def inventory(root: str | os.PathLike, files: bool = True, cache_dir: str | None = None) -> Inventory:
    """The packages installed in the rootfs `root` (a snapshot); with `files`, also
    the files no package owns, summarised. Runs in a user-namespace helper.

    With `cache_dir`, `root` is a committed snapshot of the store, which never changes:
    its inventory is kept there, so exporting it again (into another layout, as
    another layer type, by the `sbom` command) reads nothing of the rootfs."""
    root = os.fspath(root)
    kept = _kept_inventory(cache_dir, root, files) if cache_dir else None
    if kept is not None:
        try:
            with open(kept, "rb") as f:
                found = _inventory_of(json.load(f))
            os.utime(kept)  # recently used: kept longest
            return found
        except (OSError, ValueError, KeyError, TypeError):
            pass
    inv = run_in_userns(_inventory_in_ns, root, files)
    if kept is not None and not inv.notes:  # a note says what could not be read: try again next time
        keep_recent(kept, dataclasses.asdict(inv), _INVENTORIES_KEPT)
    return inv


_INVENTORIES_KEPT = 64
_INVENTORY_FORMAT = 1  # bump when what an inventory holds or how it is read changes


def _kept_inventory(cache_dir: str, root: str, files: bool) -> str | None:
    """Where the inventory of snapshot `root` is kept: named by its path and its root
    directory's inode times (a snapshot made again at the same path is another)."""
    try:
        st = os.stat(root)
    except OSError:
        return None
    key = json.dumps([_INVENTORY_FORMAT, os.path.abspath(root), files, st.st_ino, st.st_ctime_ns, st.st_mtime_ns])
    return os.path.join(cache_dir, "inventories", hashlib.sha256(key.encode()).hexdigest() + ".json")


def _inventory_of(data: dict) -> Inventory:
    """An Inventory back from its JSON (dataclasses.asdict) form."""
    unowned = data["unowned"]
    return Inventory(
        tuple(Package(**{**p, "licenses": tuple(p["licenses"])}) for p in data["packages"]),
        None if unowned is None else Unowned(unowned["files"], unowned["size"],
                                             tuple(DirSummary(**d) for d in unowned["top"])),
        data["distro"], data["distro_version"], tuple(data["notes"]))


def inventories(roots: list[str | os.PathLike]) -> list[Inventory]:
    """The packages (no file walk) of several rootfs, in one helper."""
    return run_in_userns(lambda rs: [_inventory_in_ns(r, False) for r in rs], [os.fspath(r) for r in roots])


def package_changes(before: Inventory | None, after: Inventory) -> list[PackageChange]:
    """What changed between two package lists, in name order."""
    old = before.by_name() if before is not None else {}
    new = after.by_name()
    out: list[PackageChange] = []
    for key in sorted(set(old) | set(new), key=lambda k: (k[1], k[0], k[2])):
        a, b = old.get(key), new.get(key)
        if a is None and b is not None:
            out.append(PackageChange("added", b, "", b.version))
        elif b is None and a is not None:
            out.append(PackageChange("removed", a, a.version, ""))
        elif a is not None and b is not None and a.version != b.version:
            out.append(PackageChange("changed", b, a.version, b.version))
    return out


# --- inside the user namespace ---------------------------------------------------------

@dataclass
class _Found:
    packages: list[Package] = field(default_factory=list)
    owned: list[str] = field(default_factory=list)  # container paths the databases list
    notes: list[str] = field(default_factory=list)


def _read(root: str, path: str, limit: int = _MAX_DB) -> bytes | None:
    """Container file `path` of `root` (symlinks followed inside it), None when it is not
    there or not a regular file."""
    try:
        fd, _, st = open_in_snapshot(root, path)
    except (GrabError, OSError):
        return None
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def _listdir(root: str, path: str) -> list[str]:
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent, name, st, _ = resolve_at(rootfd, path)
    except (GrabError, OSError):
        return []
    finally:
        os.close(rootfd)
    try:
        if not stat.S_ISDIR(st.st_mode):
            return []
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)
    except OSError:
        return []
    finally:
        os.close(parent)


def _stanzas(text: str) -> list[dict[str, str]]:
    """RFC 822-style paragraphs (dpkg status, copyright files): field -> first line
    (continuation lines are dropped: no field we read needs them)."""
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.isspace():  # as `not line.strip()`, without a copy of every line
            if current:
                out.append(current)
                current = {}
            continue
        if line[0] in " \t":
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip().lower(), value.strip())
    if current:
        out.append(current)
    return out


def _os_release(root: str) -> tuple[str, str]:
    data = _read(root, "/etc/os-release", 1 << 16) or _read(root, "/usr/lib/os-release", 1 << 16) or b""
    values = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("\"'")
    return values.get("ID", ""), values.get("VERSION_ID", "")


def debian_licenses(copyright_text: str) -> tuple[str, ...]:
    """The `License:` names of a machine-readable Debian copyright file (DEP-5), in
    order of first use; () for a free-form file, which names none reliably."""
    paragraphs = _stanzas(copyright_text)
    if not paragraphs or "format" not in paragraphs[0]:
        return ()
    names: list[str] = []
    for p in paragraphs:
        # Files paragraphs (and a header License) say what applies; stand-alone
        # License paragraphs only give the text of names used there.
        if ("files" in p or p is paragraphs[0]) and p.get("license"):
            if p["license"] not in names:
                names.append(p["license"])
    return tuple(names)


def _dpkg(root: str, distro: str, found: _Found, files: bool) -> None:
    data = _read(root, DPKG_STATUS)
    if data is None:
        return
    for st in _stanzas(data.decode("utf-8", "replace")):
        name, status = st.get("package"), st.get("status", "").split()
        if not name or len(status) < 3 or status[2] not in _DPKG_PRESENT:
            continue
        arch = st.get("architecture", "")
        copyright_text = _read(root, f"/usr/share/doc/{name}/copyright", 4 << 20)
        licenses = debian_licenses(copyright_text.decode("utf-8", "replace")) if copyright_text else ()
        found.packages.append(Package("deb", name, st.get("version", ""), arch, licenses, distro or "debian"))
        if files:
            for listname in (f"{name}:{arch}.list", f"{name}.list"):
                listed = _read(root, f"{DPKG_INFO}/{listname}")
                if listed is not None:
                    found.owned += [p for p in listed.decode("utf-8", "replace").splitlines() if p and p != "/."]
                    break


def _apk(root: str, distro: str, found: _Found, files: bool) -> None:
    data = _read(root, APK_INSTALLED)
    if data is None:
        return
    for block in data.decode("utf-8", "replace").split("\n\n"):
        fields: dict[str, str] = {}
        directory = ""
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if not sep or len(key) != 1:
                continue
            if key == "F":
                directory = value
            elif key == "R" and files:
                found.owned.append(f"/{directory}/{value}" if directory else f"/{value}")
            else:
                fields.setdefault(key, value)
        if fields.get("P"):
            licenses = (fields["L"],) if fields.get("L") else ()
            found.packages.append(Package("apk", fields["P"], fields.get("V", ""), fields.get("A", ""),
                                          licenses, distro or "alpine"))


def _rpm(root: str, distro: str, found: _Found, files: bool) -> None:
    for dbdir in RPM_DBS:
        names = _listdir(root, dbdir)
        if not any(n in RPM_FILES for n in names):
            continue
        tool = shutil.which("rpm")
        if tool is None:
            found.notes.append(f"the rpm database {dbdir} was not read: this host has no rpm tool "
                               "(apt-get install rpm), so its packages are missing here")
            return
        with tempfile.TemporaryDirectory(prefix=".tmp-sbom-", dir=_scratch_dir(root)) as tmp:
            # rpm writes beside its database (locks, sqlite journals): read a copy of
            # the files its backends open, each inode once, within a total cap.
            problem = _copy_rpm_db(root, dbdir, names, tmp)
            if problem:
                found.notes.append(f"the rpm database {dbdir} was not read: {problem}")
                return
            fmt = "%{NAME}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\t%{ARCH}\\t%{LICENSE}\\n"
            res = subprocess.run([tool, "--dbpath", tmp, "-qa", "--qf", fmt], capture_output=True, text=True)
            if res.returncode != 0:
                found.notes.append(f"the rpm database {dbdir} could not be read by rpm: "
                                   f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
                return
            for line in res.stdout.splitlines():
                parts = line.split("\t")
                if len(parts) == 4 and parts[0] != "gpg-pubkey":
                    lic = (parts[3],) if parts[3] and parts[3] != "(none)" else ()
                    found.packages.append(Package("rpm", parts[0], parts[1], parts[2], lic, distro or "redhat"))
            if files:
                listed = subprocess.run([tool, "--dbpath", tmp, "-qal"], capture_output=True, text=True)
                found.owned += [p for p in listed.stdout.splitlines() if p.startswith("/")]
        return


def _scratch_dir(root: str) -> str:
    """Where a copy for `root` goes: the store holding it (root/bases|snapshots/ID),
    the user's own bounded storage, never the host's /tmp."""
    return os.path.dirname(os.path.dirname(os.path.abspath(root)))


def _copy_rpm_db(root: str, dbdir: str, names: list[str], dest: str) -> str:
    """Copy the rpm database files `dbdir` of `root` holds into `dest` (reflinks or
    data extents only, hard links of one file copied once); '' or why not."""
    copied: dict[tuple[int, int], str] = {}
    total = 0
    for n in RPM_READ:
        if n not in names:
            continue
        try:
            fd, _, st = open_in_snapshot(root, f"{dbdir}/{n}")
        except (GrabError, OSError):
            continue
        if fd is None:
            continue
        try:
            target = os.path.join(dest, n)
            if (st.st_dev, st.st_ino) in copied:
                os.link(copied[st.st_dev, st.st_ino], target)
                continue
            total += st.st_size
            if total > _MAX_DB:
                return (f"its files total more than {_MAX_DB >> 20} MiB, "
                        "larger than any package database")
            out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                copy_data(fd, out, st.st_size)
            finally:
                os.close(out)
            copied[st.st_dev, st.st_ino] = target
        except OSError as e:
            return f"copying {n} failed: {e.strerror}"
        finally:
            os.close(fd)
    return ""


def _host_dir(root: str, directory: str, cache: dict[str, str]) -> str:
    """Container directory `directory` as a path relative to the rootfs, through its
    symlinks (/bin/ls of a merged-/usr system is the file usr/bin/ls). A directory
    that is no symlink, under a parent resolved before, is the parent's path and its
    name: one lstat, where resolve_in_root walks every component again (a Debian
    rootfs lists some 1,000 directories)."""
    if directory in cache:
        return cache[directory]
    parent, _, name = directory.rpartition("/")
    rel = None
    if parent.startswith("/") and name not in ("", ".", "..") and "//" not in directory:
        above = _host_dir(root, parent, cache)
        candidate = name if above == "." else f"{above}/{name}"
        try:
            if not stat.S_ISLNK(os.lstat(os.path.join(root, candidate)).st_mode):
                rel = candidate
        except OSError:
            pass  # missing: resolve_in_root says how it reads then
    if rel is None:
        try:
            rel = os.path.relpath(resolve_in_root(root, directory, missing_ok=True, clamp=True), root)
        except GrabError:
            rel = directory.strip("/")
    cache[directory] = rel
    return rel


def _unowned(root: str, owned: list[str]) -> Unowned:
    dirs: dict[str, str] = {}
    owned_rel: set[str] = set()
    for p in owned:
        d, _, base = p.rpartition("/")
        rel = _host_dir(root, d or "/", dirs)
        owned_rel.add(os.path.normpath(os.path.join(rel, base)))
    count = total = 0
    per_dir: dict[str, list[int]] = {}
    # As os.walk (no symlink followed into), with the paths joined once per directory:
    # a rootfs has some 10,000 files, and this walk is most of an SBOM's time.
    todo = [("", root)]
    while todo:
        rel_dir, path = todo.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            continue
        parts = rel_dir[:-1].split("/")[:2] if rel_dir else []
        top = "/" + "/".join(parts) if parts else None  # files at the top get their own
        n = size_sum = 0
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # through a symlink too: os.walk lists those as directories
            except OSError:
                is_dir = False
            if is_dir:
                if not entry.is_symlink():
                    todo.append((rel_dir + entry.name + "/", entry.path))
                continue
            rel = rel_dir + entry.name
            if rel in owned_rel:
                continue
            try:
                size = entry.stat(follow_symlinks=False).st_size if entry.is_file(follow_symlinks=False) else 0
            except OSError:
                continue
            if top is None:
                entry_sum = per_dir.setdefault("/" + rel, [0, 0])
                entry_sum[0] += 1
                entry_sum[1] += size
            n += 1
            size_sum += size
        count += n
        total += size_sum
        if top is not None and n:
            entry_sum = per_dir.setdefault(top, [0, 0])
            entry_sum[0] += n
            entry_sum[1] += size_sum
    ranked = sorted(per_dir.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))[:_TOP_DIRS]
    return Unowned(count, total, tuple(DirSummary(d, n, s) for d, (n, s) in ranked))


def _inventory_in_ns(root: str, files: bool) -> Inventory:
    distro, version = _os_release(root)
    found = _Found()
    for reader in (_dpkg, _apk, _rpm):
        reader(root, distro, found, files)
    packages = tuple(sorted(found.packages, key=lambda p: (p.manager, p.name, p.arch, p.version)))
    unowned = _unowned(root, found.owned) if files else None
    return Inventory(packages, unowned, distro, version, tuple(found.notes))


def step_changes(store, steps: list) -> tuple[Inventory, list[tuple[object, list[PackageChange]]]]:
    """For consecutive step snapshots `steps` (storage.store.Snapshot, oldest first):
    the packages after the last one, and what each step added, removed or changed
    against the snapshot before it (the first: against its parent). One helper."""
    parent = store.get(steps[0].parent) if steps and steps[0].parent else None
    roots = ([parent.path] if parent is not None else []) + [s.path for s in steps]
    invs = inventories(roots)
    before: Inventory | None = invs.pop(0) if parent is not None else None
    out = []
    for snap, inv in zip(steps, invs):
        out.append((snap, package_changes(before, inv)))
        before = inv
    return (invs[-1] if invs else Inventory((), None)), out
