"""`stacker-kernel …`: one function per subcommand, registered in COMMANDS.

To add a command: write `add_NAME(parser)` (its options) and `cmd_NAME(args) -> int`,
then append a `Command` to COMMANDS. Every command gets `--storage DIR`.
User errors (StackerKernelError) print `stacker-kernel: <message>` and exit 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from stacker_kernel.errors import StackerKernelError
from stacker_kernel.recipe.model import first_line, human_size


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, option adder and runner."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def write_bytes(path: Path, data: bytes) -> None:
    """Write an output file, never through a link planted in a shared folder (engine/beside.py)."""
    from stacker_kernel.engine.beside import write_bytes as write

    write(path, data)


def _write_output(path: str, write: Callable[[str], object]) -> None:
    """Call `write(path)`; an unwritable output path is a user error, not a traceback."""
    try:
        write(path)
    except OSError as e:
        raise StackerKernelError(f"cannot write {path}: {e.strerror or e}: "
                                 "give an output path in an existing, writable directory") from None


@contextmanager
def _open_store(args: argparse.Namespace) -> Iterator:
    """The store, for a `with` block in which a full disk (anywhere) is one clear line, not a traceback."""
    import errno
    import sqlite3

    from stacker_kernel.storage.location import resolve_driver, resolve_storage
    from stacker_kernel.storage.store import Store, storage_error

    with Store.open(resolve_storage(args.storage), resolve_driver(getattr(args, "storage_driver", None))) as store:
        try:
            yield store
        except (OSError, sqlite3.Error) as e:
            if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise storage_error(store.root, e) from e


# --- setup-storage ----------------------------------------------------------

def add_setup_storage(p: argparse.ArgumentParser) -> None:
    from stacker_kernel.storage.location import DEFAULT_MOUNT, STATE_DIR

    p.add_argument("--user", required=True, help="the user who gets a storage dir")
    p.add_argument("--size", default=None,
                   help="size of the user's image, their space bound (default 20G; a larger size grows it)")
    p.add_argument("--image", type=Path, default=None,
                   help=f"the user's btrfs image file (default {STATE_DIR}/images/USER.img)")
    p.add_argument("--mount", type=Path, default=DEFAULT_MOUNT,
                   help=f"directory of the users' mount points (default {DEFAULT_MOUNT})")
    p.add_argument("--state-dir", type=Path, default=STATE_DIR,
                   help=f"where root keeps images and records (default {STATE_DIR})")
    p.add_argument("--teardown", action="store_true",
                   help="unmount and delete the user's storage (only what setup-storage created)")
    p.add_argument("--max-user-processes", type=int, default=None, metavar="N",
                   help="cap each user's builds together at N processes (kept for later runs; default: "
                        "3/4 of kernel.pid_max shared by the users with storage, at most 16384)")


def cmd_setup_storage(args: argparse.Namespace) -> int:
    from stacker_kernel.storage import setup

    storage = Path(args.storage) if args.storage else None
    if args.teardown:
        if storage is not None:
            raise StackerKernelError("--teardown removes only what setup-storage recorded: omit --storage")
        for line in setup.teardown_storage(args.user, args.mount, args.state_dir):
            print(line)
        return 0
    if args.max_user_processes is not None and args.max_user_processes < 1:
        raise StackerKernelError(f"--max-user-processes {args.max_user_processes}: give a whole number above 0")
    print(setup.setup_storage(args.user, args.size, args.image, args.mount, storage, args.state_dir,
                              args.max_user_processes))
    return 0


# --- storage-path -----------------------------------------------------------

def add_storage_path(p: argparse.ArgumentParser) -> None:
    from stacker_kernel.storage.location import DEFAULT_MOUNT, STATE_DIR

    p.add_argument("--user", help="print this user's storage root (from root's record or their config, else MOUNT/USER)")
    p.add_argument("--mount", type=Path, default=DEFAULT_MOUNT, help=argparse.SUPPRESS)
    p.add_argument("--state-dir", type=Path, default=STATE_DIR, help=argparse.SUPPRESS)


def cmd_storage_path(args: argparse.Namespace) -> int:
    from stacker_kernel.storage import location, setup

    if args.user:
        print(setup.storage_path(args.user, args.mount, args.state_dir))
        return 0
    try:
        print(location.resolve_storage(args.storage))
    except StackerKernelError:
        print(setup.storage_path(location.current_user(), args.mount, args.state_dir))
    return 0


# --- layers -----------------------------------------------------------------

def add_layers(p: argparse.ArgumentParser) -> None:
    pass


def _snapshot_line(snap, cached: bool) -> str:
    if snap.kind == "base":
        return f"base {snap.id[:19]}  {first_line(snap.source, width=48)}"
    cols = [snap.id[:8], f"cell {snap.cell_id[:8]}" if snap.cell_id else "", first_line(snap.source, width=48),
            f"{snap.duration:.2f}s", "cached" if cached else human_size(snap.size_delta, signed=True)]
    return "  ".join(c for c in cols if c)


def render_layers(store) -> list[str]:
    """The `layers` tree: per session, per layer, one line per snapshot; then unreferenced ones."""
    lines: list[str] = []
    shown: set[str] = set()
    for sess in store.find_sessions():
        state = "alive" if store.session_alive(sess) else "ended"
        lines.append(f"session {sess.id[:8]} {sess.kind} {sess.name} ({state})")
        ids = list(sess.history)
        if not ids and sess.head:
            ids = [s.id for s in store.chain(sess.head)]
        snaps = store.chain(ids[0])[:-1] if ids else []
        snaps += [s for s in (store.get(i) for i in ids) if s is not None]
        layer = None
        for snap in snaps:
            if snap.kind != "base" and snap.layer != layer:
                layer = snap.layer
                lines.append(f"  layer {layer}")
            head = "*" if snap.id == sess.head else " "
            cached = snap.kind == "step" and snap.session != sess.id
            lines.append(f"   {head} {_snapshot_line(snap, cached)}")
            shown.add(snap.id)
    rest = [s for s in store.snapshots() if s.id not in shown]
    if rest:
        lines.append("not in any session history")
        lines.extend(f"     {_snapshot_line(s, False)}" for s in rest)
    return lines


def storage_total(root, driver=None) -> str:
    """One line: the storage's driver, what it uses and what its filesystem has free, and
    how many snapshots gc deleted that are not destroyed yet (they still hold their space)."""
    from stacker_kernel.storage import driver as drivers

    driver = driver or drivers.of_root(Path(root))
    st = os.statvfs(root)
    pending = sum(p.parent.name != "layers" for p in drivers.trash_entries(Path(root)))
    return (f"storage {root} ({driver.name} driver): {human_size(driver.usage(Path(root)))} used, "
            f"{human_size(st.f_bavail * st.f_frsize)} free"
            + (f", {pending} deleted snapshot(s) being freed in the background" if pending else ""))


def cmd_layers(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        lines = render_layers(store)
        steps = [s for s in store.snapshots() if s.kind == "step"]
        measured = [s.size_delta for s in steps if s.size_delta is not None]
        total = storage_total(store.root, store.driver)
    print("\n".join(lines) if lines else "no snapshots")
    if steps:  # kernels measure their steps' sizes; builds do not (it would slow them)
        print(f"{len(measured)} of {len(steps)} step(s) measured, adding "
              f"{human_size(sum(max(n, 0) for n in measured))}")
    print(total)
    return 0


# --- gc ---------------------------------------------------------------------

def add_gc(p: argparse.ArgumentParser) -> None:
    add_gc_choices(p)
    p.add_argument("--wait", action="store_true",
                   help="wait until the space of the deleted snapshots is free again and say how much "
                        "was freed (by default it is freed in the background; a full storage always waits)")


def removed_line(removed, freed: int | None) -> str:
    """What gc removed: the bytes freed when it waited for them, else what the removed
    snapshots hold by their recorded sizes (being freed in the background)."""
    if freed is not None:
        return f"removed {len(removed)} snapshot(s), freed {human_size(max(freed, 0))}"
    if not removed:
        return "removed 0 snapshot(s)"
    sizes = [s.size_delta for s in removed if s.kind == "step" and s.size_delta is not None]
    unknown = len(removed) - len(sizes)
    held = human_size(sum(max(n, 0) for n in sizes))
    return (f"removed {len(removed)} snapshot(s) holding {held}"
            + (f" ({unknown} of them not measured)" if unknown else "")
            + "; their space is freed in the background ('gc --wait' waits for it)")


def cmd_gc(args: argparse.Namespace) -> int:
    from stacker_kernel.engine.export import prune_layer_cache
    from stacker_kernel.engine.history import held_bytes
    from stacker_kernel.storage.location import resolve_storage
    from stacker_kernel.storage.store import collect_garbage

    root = resolve_storage(args.storage)
    forget_chosen_sessions(args)
    removed, freed = collect_garbage(root, progress=print, held=held_bytes, wait=args.wait)
    report_cache_pruned(args, everything=args.cache)
    kept = prune_layer_cache(root)
    if kept:
        print(f"deleted {human_size(kept)} of exported layers kept for the removed snapshots")
    for snap in removed:
        what = f"base  {first_line(snap.source, width=48)}" if snap.kind == "base" else (
            f"layer {snap.layer}  {first_line(snap.source, width=48)}  "
            f"{human_size(snap.size_delta, signed=True) if snap.size_delta is not None else ''}".rstrip())
        print(f"removed {snap.id[:12]}  {what}")  # the id status lines and %layers show
    print(f"{removed_line(removed, freed)}; {storage_total(root)}")
    return 0


def add_gc_choices(p: argparse.ArgumentParser) -> None:
    """What `gc` drops besides unreferenced snapshots (engine/clean.py)."""
    p.add_argument("--recipe-gone", action="store_true",
                   help="also drop the ended builds and kernels of notebooks and stacker.yaml files "
                        "that were deleted or renamed")
    p.add_argument("--older-than", metavar="AGE",
                   help="also drop ended builds and kernels not used for AGE (e.g. 12h, 7d, 2w)")
    p.add_argument("--cache", action="store_true",
                   help="also empty the download caches (registry images, downloaded tars) and the "
                        "export layer cache and SBOM parts; builds fill them again")


def _say_spared(running) -> None:
    for sess in running:
        print(f"kept {sess.kind} of {sess.name}: it is running (pid {sess.owner_pid})")


def forget_chosen_sessions(args: argparse.Namespace, recipe: str | None = None,
                           folder: str | None = None) -> int:
    """Forget the ended sessions `args` (gc's choices) or `recipe`/`folder` choose; how many."""
    from stacker_kernel.engine.clean import parse_age, select_sessions

    older = parse_age(args.older_than) if getattr(args, "older_than", None) else None
    gone = getattr(args, "recipe_gone", False)
    if recipe is None and folder is None and not gone and older is None:
        return 0
    with _open_store(args) as store:
        chosen = select_sessions(store, recipe=recipe, folder=folder, recipe_gone=gone, older_than=older)
        for sess in chosen.drop:
            store.forget_session(sess.id)
            print(f"forgot {sess.kind} {sess.id[:8]} of {sess.name}")
    _say_spared(chosen.running)
    return len(chosen.drop)


def report_cache_pruned(args: argparse.Namespace, everything: bool) -> None:
    """Prune <root>/cache (engine/clean.prune_cache) and say what it freed."""
    from stacker_kernel.engine.clean import prune_cache

    with _open_store(args) as store:
        entries, size = prune_cache(store, everything=everything)
    if entries:
        print(f"cache: removed {entries} entr{'y' if entries == 1 else 'ies'}, {human_size(size)}")


# --- clean ------------------------------------------------------------------

def add_clean(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="a notebook, stacker.yaml or Dockerfile, or a folder of them (default: .)")
    p.add_argument("--oci-dir", default="oci",
                   help="the OCI layout to delete, relative to a folder (default oci, as stacker clean)")
    p.add_argument("--keep-oci", action="store_true", help="keep the OCI layout")
    p.add_argument("--all", action="store_true", help=argparse.SUPPRESS)  # stacker's no-op flag


def cmd_clean(args: argparse.Namespace) -> int:
    """`stacker clean` for this store: every ended build and kernel of the recipe (or of the
    recipes under the folder), their snapshots, what they left beside them, the OCI layout."""
    from stacker_kernel.engine.clean import remove_beside, remove_oci_layout
    from stacker_kernel.engine.history import held_bytes
    from stacker_kernel.storage.location import resolve_storage
    from stacker_kernel.storage.store import collect_garbage

    for given in args.paths or ["."]:
        path = Path(os.path.abspath(given))
        if path.is_dir():
            forget_chosen_sessions(args, folder=str(path))
            removed = remove_beside(path)
            oci = path / args.oci_dir
        else:  # a recipe, perhaps deleted already: its state is still worth cleaning
            forget_chosen_sessions(args, recipe=str(path))
            removed, oci = remove_beside(path.parent, path), None
        if oci is not None and not args.keep_oci and remove_oci_layout(oci):
            removed.append(str(oci))
        for item in removed:
            print(f"removed {item}")
    dropped, freed = collect_garbage(resolve_storage(args.storage), held=held_bytes)
    report_cache_pruned(args, everything=False)
    print(removed_line(dropped, freed))
    return 0


def add_install(p: argparse.ArgumentParser) -> None:
    from stacker_kernel.kernel.install import add_arguments

    add_arguments(p)


def cmd_install(args: argparse.Namespace) -> int:
    from stacker_kernel.kernel.install import run

    return run(args)


# --- build ------------------------------------------------------------------

def _substitutions(pairs: list[str]) -> dict[str, str]:
    subs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StackerKernelError(f"--substitute {pair!r} is not KEY=VALUE")
        subs[key] = value
    return subs


def add_dockerfile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--build-arg", action="append", metavar="NAME=VALUE",
                   help="a Dockerfile's ARG value, as docker build --build-arg (repeatable)")
    p.add_argument("--base", action="append", metavar="IMAGE=SOURCE",
                   help="build a Dockerfile's FROM IMAGE from SOURCE instead: oci:DIR:TAG, tar:PATH "
                        "or docker://REF (repeatable; for offline builds)")
    p.add_argument("--target", metavar="STAGE",
                   help="the Dockerfile stage that is the image (default the last), as docker "
                        "build --target: only the stages it needs are built")
    p.add_argument("--secret", action="append", metavar="id=ID,src=FILE|env=VAR",
                   help="what a secret mount (RUN --mount=type=secret,id=ID) shows: a file or an "
                        "environment variable; never in a layer, the cache or the provenance "
                        "(repeatable)")
    p.add_argument("--all-stages", action="store_true",
                   help="build every stage of a Dockerfile and make each an image (tagged by "
                        "its name), not only the target")


def _dockerfile_options(args: argparse.Namespace, relative_to: str = "."):
    """The Dockerfile options of `args`, local --base paths made absolute."""
    from stacker_kernel.recipe.dockerfile_options import DockerfileOptions

    bases = {}
    for pair in args.base or []:
        image, sep, source = pair.partition("=")
        if not sep or not image or not source:
            raise StackerKernelError(f"--base {pair!r} is not IMAGE=SOURCE, e.g. debian:12=oci:./oci:debian")
        kind, colon, rest = source.partition(":")
        if source.startswith("docker://"):
            bases[image] = source
        elif colon and kind in ("oci", "tar"):
            bases[image] = f"{kind}:{os.path.abspath(rest)}"
        else:
            bases[image] = f"tar:{os.path.abspath(source)}"
    build_args = {}
    for pair in args.build_arg or []:
        key, sep, value = pair.partition("=")
        if not key:
            raise StackerKernelError(f"--build-arg {pair!r} is not NAME=VALUE")
        build_args[key] = value if sep else os.environ.get(key, "")  # as docker: NAME alone takes $NAME
    return DockerfileOptions(build_args, bases, args.target, args.all_stages)


def add_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--stacker-file", dest="file", action="append", metavar="FILE",
                   help="stacker.yaml, notebook (.ipynb) or Dockerfile to build (default stacker.yaml; "
                        "repeat to build several, in order)")
    add_build_options(p)


def add_build_options(p: argparse.ArgumentParser) -> None:
    """The options `build` and `recursive-build` share."""
    add_dockerfile_options(p)
    p.add_argument("--substitute", action="append", metavar="K=V", help="set ${{K}} in the stacker.yaml")
    p.add_argument("--oci-dir", default=None, help="write the images to this OCI layout (default: oci)")
    p.add_argument("--no-oci", action="store_true", help="keep results in the store only")
    p.add_argument("--no-cache", action="store_true", help="run every step even when a cached result exists")
    p.add_argument("--squash", action="store_true", help="one OCI layer per stacker layer (as stacker emits)")
    p.add_argument("--annotations-namespace", default="io.stackeroci",
                   help="namespace of the manifest annotations (default io.stackeroci)")
    add_layer_type_flags(p)
    # The shared cache (engine/remote_cache.py); defaults from the config file.
    p.add_argument("--cache-from", action="append", metavar="URL",
                   help="take step results from this cache (docker://HOST[:PORT]/REPO or oci:DIR; repeatable)")
    p.add_argument("--cache-to", metavar="URL", help="push each step's result to this cache")
    p.add_argument("--insecure", action="store_true",
                   help="let the caches be plain http or unverified TLS (localhost needs no flag)")
    p.add_argument("--authfile", metavar="PATH",
                   help="registry credentials file (default: the containers auth file)")
    fail = p.add_mutually_exclusive_group()
    fail.add_argument("--on-run-failure", metavar="CMD",
                      help="when a run fails, first run CMD (a shell command line, e.g. /bin/sh) on this "
                           "terminal in the failed step's container, as stacker does")
    fail.add_argument("--shell-fail", action="store_true",
                      help="when a run fails, open a shell in its failed state (--on-run-failure=/bin/sh)")
    _add_attestation_flags(p)
    p.add_argument("--max-processes", type=int, metavar="N",
                   help="most processes and threads a step may run at once (default 4096, "
                        "or $STACKER_KERNEL_MAX_PROCESSES, or max_processes in your config file)")
    add_stacker_build_flags(p)


def add_stacker_build_flags(p: argparse.ArgumentParser) -> None:
    """stacker's build flags that Makefiles use (cmd/stacker/build.go), and --replay-cached."""
    p.add_argument("--substitute-file", metavar="FILE",
                   help="a YAML file of substitutions ('FOO: bar' lines); --substitute wins over it")
    p.add_argument("--require-hash", action="store_true",
                   help="refuse an http(s) import without a hash (as stacker --require-hash)")
    p.add_argument("--order-only", action="store_true",
                   help="print the order the files would build in (with their prerequisites); build nothing")
    p.add_argument("--replay-cached", action="store_true",
                   help="show a cached step's stored output again (default: one 'found cached layer' line)")


def build_substitutions(args: argparse.Namespace) -> dict[str, str]:
    """--substitute-file's values, then --substitute's (stacker gives those precedence)."""
    subs: dict[str, str] = {}
    if getattr(args, "substitute_file", None):
        import yaml

        try:
            with open(args.substitute_file, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise StackerKernelError(f"cannot read --substitute-file {args.substitute_file}: "
                                     f"{e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise StackerKernelError(f"--substitute-file {args.substitute_file} is not YAML: "
                                     f"{str(e).splitlines()[0]}") from None
        if data is not None and not isinstance(data, dict):
            raise StackerKernelError(f"--substitute-file {args.substitute_file} must be a mapping "
                                     "of names to values, e.g. 'FOO: bar'")
        for key, value in (data or {}).items():
            if isinstance(value, (dict, list)):
                raise StackerKernelError(f"--substitute-file {args.substitute_file}: {key} must be "
                                         "a plain value, not a list or mapping")
            subs[str(key)] = "" if value is None else (str(value).lower() if isinstance(value, bool)
                                                        else str(value))
    subs.update(_substitutions(args.substitute))
    return subs


def print_build_order(args: argparse.Namespace, files: list[str]) -> int:
    """--order-only: stacker's `N build PATH: requires: [PATHS]` lines."""
    from stacker_kernel.engine.build import build_order

    for i, (path, requires) in enumerate(build_order(files, build_substitutions(args),
                                                     _dockerfile_options(args))):
        print(f"{i} build {path}: requires: [{' '.join(requires)}]")
    return 0


def add_layer_type_flags(p: argparse.ArgumentParser) -> None:
    """stacker's --layer-type (repeatable) and --no-verity (alias --no-squashfs-verity)."""
    p.add_argument("--layer-type", action="append", choices=("tar", "squashfs", "erofs"), metavar="TYPE",
                   help="output layer type: tar, squashfs or erofs; repeat for several (default tar); "
                        "non-tar images are tagged NAME-squashfs / NAME-erofs")
    p.add_argument("--no-verity", "--no-squashfs-verity", action="store_true", dest="no_verity",
                   help="do not append dm-verity data to squashfs/erofs layers")
    p.add_argument("--compression", choices=("gzip", "zstd"), default="gzip",
                   help="compression of new tar layers (default gzip; zstd: media type tar+zstd, "
                        "on every core); a base's layers are kept as they are")


def _layer_types(args: argparse.Namespace):
    if not args.layer_type and args.compression == "gzip":
        return None  # the default, tar (--no-verity is for squashfs/erofs): the layer writers load if needed
    from stacker_kernel.oci.layer_types import parse_layer_types

    return parse_layer_types(args.layer_type, args.no_verity, args.compression)


def _add_attestation_flags(p: argparse.ArgumentParser, what: str = "the images") -> None:
    p.add_argument("--no-sbom", action="store_true", help=f"attach no SPDX SBOM to {what}")
    p.add_argument("--no-provenance", action="store_true", help=f"attach no SLSA provenance to {what}")


def _attestations(args: argparse.Namespace):
    from stacker_kernel.engine.attest import Attestations

    return Attestations(sbom=not args.no_sbom, provenance=not args.no_provenance)


def _cache_settings(args: argparse.Namespace):
    from stacker_kernel.engine.cache_settings import CacheSettings, configured

    defaults = configured()
    return CacheSettings(args.cache_from if args.cache_from is not None else defaults.cache_from,
                         args.cache_to or defaults.cache_to, args.insecure or defaults.insecure,
                         args.authfile)


def _failure_command(args: argparse.Namespace) -> list[str] | None:
    """The argv to run in a failed step's state: `--shell-fail` is `--on-run-failure=/bin/sh`."""
    if args.shell_fail:
        return ["/bin/sh"]
    if args.on_run_failure:
        return ["/bin/sh", "-c", args.on_run_failure]  # a command line, found on the container's PATH
    return None


def _secrets(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """`--secret id=ID,src=FILE` / `--secret id=ID,env=VARIABLE`, as docker build's."""
    out = {}
    for text in getattr(args, "secret", None) or []:
        opts = dict(p.partition("=")[::2] for p in text.split(",") if p)
        sid = opts.pop("id", "")
        src = opts.pop("src", opts.pop("source", ""))
        env = opts.pop("env", "")
        opts.pop("type", None)
        if not sid or bool(src) == bool(env) or opts:
            raise StackerKernelError(f"--secret {text!r}: write --secret id=ID,src=FILE or "
                                     "--secret id=ID,env=VARIABLE")
        out[sid] = ("src", os.path.abspath(src)) if src else ("env", env)
    return out


def cmd_build(args: argparse.Namespace, files: list[str] | None = None) -> int:
    import time

    from stacker_kernel.engine.build import build

    files = files or args.file or ["stacker.yaml"]
    if args.order_only:
        return print_build_order(args, files)
    if args.max_processes is not None:  # the containers read it where they start (container/limits.py)
        os.environ["STACKER_KERNEL_MAX_PROCESSES"] = str(args.max_processes)
    oci_dir = None if args.no_oci else (args.oci_dir or "oci")
    _say_single_id_mode()
    for file in files:
        t0 = time.monotonic()
        with _open_store(args) as store, offline_base_hint(file):
            result = build(store, file, substitutions=build_substitutions(args),
                           no_cache=args.no_cache, oci_dir=oci_dir, squash=args.squash,
                           annotations_namespace=args.annotations_namespace, cache=_cache_settings(args),
                           on_failure=_failure_command(args), dockerfile=_dockerfile_options(args),
                           layer_types=_layer_types(args), attestations=_attestations(args),
                           replay_cached=args.replay_cached, require_hash=args.require_hash,
                           secrets=_secrets(args))
        print(f"built {len(result.tags)} layer(s): {result.steps_run} step(s) ran, "
              f"{result.steps_cached} cached, in {time.monotonic() - t0:.2f}s"
              + (f" ({file})" if len(files) > 1 else ""))
    return 0


@contextmanager
def offline_base_hint(file: str) -> Iterator[None]:
    """A Dockerfile's FROM that cannot be pulled (offline, no DNS): say how to build
    from a local copy of the image instead (--base IMAGE=SOURCE)."""
    from stacker_kernel.errors import ImageError
    from stacker_kernel.recipe.dockerfile_options import is_dockerfile

    try:
        yield
    except ImageError as e:
        import re

        text = str(e)
        pulled = re.match(r"cannot pull docker://(.+?)(?:: | \()", text)
        if not (is_dockerfile(file) and pulled):
            raise
        ref = pulled.group(1)
        raise ImageError(f"{text}; or build from a local copy of the image: --base {ref}=oci:DIR:TAG "
                         f"(or --base {ref}=tar:ROOTFS.tar)") from e


# --- recursive-build -----------------------------------------------------------

def add_recursive_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--search-dir", default=".",
                   help="directory under which to search for stacker files to build (default .)")
    p.add_argument("-p", "--stacker-file-pattern", default=r"\/stacker.yaml$",
                   help=r"regex a file's path must match (default \/stacker.yaml$, as stacker)")
    add_build_options(p)


def cmd_recursive_build(args: argparse.Namespace) -> int:
    """stacker's recursive-build: every matching file under --search-dir, each after the
    files it has as prerequisites."""
    from stacker_kernel.engine.build import build_order, find_stacker_files

    found = find_stacker_files(args.search_dir, args.stacker_file_pattern)
    if args.order_only:
        return print_build_order(args, found)
    # A file another found file has as prerequisite is built as part of that one.
    order = build_order(found, build_substitutions(args), _dockerfile_options(args))
    needed = {os.path.realpath(p) for _, requires in order for p in requires}
    return cmd_build(args, [path for path, _ in order if os.path.realpath(path) not in needed])


# --- grab -------------------------------------------------------------------

def add_grab(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--stacker-file", dest="file", default="stacker.yaml",
                   help="the stacker.yaml or notebook that was built (default stacker.yaml)")
    p.add_argument("source", metavar="LAYER:/PATH", help="what to copy out of the layer's last snapshot")
    p.add_argument("dest", nargs="?", default=".", help="where to put it (default: the current directory)")


def cmd_grab(args: argparse.Namespace) -> int:
    from stacker_kernel.engine.build import layer_snapshot
    from stacker_kernel.engine.grab import grab

    layer, sep, path = args.source.partition(":")
    if not sep or not path:
        raise StackerKernelError(f"grab {args.source!r}: give LAYER:/path, e.g. build:/usr/bin/hello")
    with _open_store(args) as store:
        snap = layer_snapshot(store, args.file, layer)
        grabbed = grab(snap.path, path, args.dest, into=_grab_into(args.dest))
    print("\n".join(grabbed.copied) or grabbed.path)
    for note in grabbed.notes:
        print(note, file=sys.stderr)
    return 0


def _grab_into(dest: str) -> bool | None:
    """A DEST ending in '/' is a directory to put the copy in (made when missing), as
    `%grab` and cp take it; otherwise cp's rule (an existing directory receives it)."""
    return True if dest.endswith("/") else None


# --- sbom -------------------------------------------------------------------

def add_sbom(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--stacker-file", dest="file", default="stacker.yaml",
                   help="the stacker.yaml or notebook that was built (default stacker.yaml)")
    p.add_argument("layer", nargs="?", help="the layer (default: the last one built)")
    p.add_argument("-o", "--output", help="SPDX JSON file to write (default: print it)")


def cmd_sbom(args: argparse.Namespace) -> int:
    from stacker_kernel.engine.build import layer_snapshot
    from stacker_kernel.engine.export import sbom_cache
    from stacker_kernel.engine.sbom import inventory
    from stacker_kernel.oci.export import source_date_epoch_from_env
    from stacker_kernel.oci.sbom import document_bytes, spdx_document

    with _open_store(args) as store:
        snap = layer_snapshot(store, args.file, args.layer)
        cache = sbom_cache(store)
        inv = inventory(snap.path, cache_dir=cache)
    data = document_bytes(spdx_document(inv, snap.layer, source_date_epoch=source_date_epoch_from_env(),
                                        cache_dir=cache))
    for note in inv.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.output:
        _write_output(args.output, lambda p: write_bytes(Path(p), data))
        print(f"wrote {args.output}: {len(inv.packages)} packages of layer {snap.layer}")
    else:
        sys.stdout.write(data.decode())
    return 0


# --- chroot -----------------------------------------------------------------

def add_chroot(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--stacker-file", dest="file", default="stacker.yaml",
                   help="the stacker.yaml or notebook that was built (default stacker.yaml)")
    p.add_argument("--substitute", action="append", metavar="K=V", help="set ${{K}} in the stacker.yaml")
    p.add_argument("layer", nargs="?",
                   help="layer to enter (default: the one a failed build stopped in, else the last one built)")
    p.add_argument("cmd", nargs="?", help="the command to run instead of /bin/sh (as stacker chroot LAYER CMD)")


def _say_single_id_mode() -> None:
    """Before a build or chroot: the one line on single-id mode, if the user is in it."""
    from stacker_kernel.container.userns import single_id_notice

    notice = single_id_notice()
    if notice:
        print(notice, file=sys.stderr)


def cmd_chroot(args: argparse.Namespace) -> int:
    from stacker_kernel.engine.build import chroot

    _say_single_id_mode()
    with _open_store(args) as store:
        return chroot(store, args.file, args.layer, _substitutions(args.substitute), command=args.cmd)


# --- export / import ----------------------------------------------------------

def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("notebook", help="the notebook (.ipynb) to export")
    p.add_argument("-o", "--output", default=None, help="stacker.yaml to write (default: print it)")
    p.add_argument("--per-cell", action="store_true", help="one build_only layer per cell")
    p.add_argument("--to", choices=("stacker.yaml", "dockerfile"), default="stacker.yaml",
                   help="dockerfile: a Dockerfile that buildah bud builds into the same image")
    p.add_argument("--oci", action="store_true", help="also write the images of the notebook's last session")
    p.add_argument("--oci-dir", default="oci", help="OCI layout for --oci (default oci)")
    add_layer_type_flags(p)
    _add_attestation_flags(p)


def cmd_export(args: argparse.Namespace) -> int:
    from stacker_kernel.engine.build import export_notebook

    if args.to == "dockerfile":
        return _export_dockerfile(args)
    text = export_notebook(args.notebook, per_cell=args.per_cell,
                           oci_dir=args.oci_dir if args.oci else None,
                           open_store=lambda: _open_store(args), layer_types=_layer_types(args),
                           attestations=_attestations(args),
                           progress=lambda line: print(line, file=sys.stderr))  # stdout may be the yaml
    return _print_or_write(args.output, text)


def _print_or_write(output: str | None, text: str) -> int:
    """An export's text to file `output` (written as files beside a notebook are), else to stdout."""
    if output:
        _write_output(output, lambda p: write_bytes(Path(p), text.encode()))
        print(f"wrote {output}")
    else:
        sys.stdout.write(text)
    return 0


def _export_dockerfile(args: argparse.Namespace) -> int:
    """`export NOTEBOOK --to dockerfile [-o FILE]`: its build context is the notebook's folder."""
    import nbformat

    from stacker_kernel.recipe.dockerfile_out import notebook_to_dockerfile

    if args.per_cell or args.oci:
        raise StackerKernelError("--to dockerfile takes neither --per-cell nor --oci")
    try:
        nb = nbformat.read(args.notebook, as_version=4)
    except (OSError, ValueError) as e:
        raise StackerKernelError(f"cannot read notebook {args.notebook}: {e}") from None
    text = notebook_to_dockerfile(nb, Path(args.notebook).stem)
    return _print_or_write(args.output, text)


def add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("stacker_yaml", metavar="FILE", help="the stacker.yaml or Dockerfile to turn into a notebook")
    p.add_argument("-o", "--output", required=True,
                   help="notebook (.ipynb) to write (or, from a Dockerfile, a stacker.yaml)")
    p.add_argument("--substitute", action="append", metavar="K=V", help="set ${{K}} in the stacker.yaml")
    add_dockerfile_options(p)


def _import_dockerfile(args: argparse.Namespace) -> int:
    import nbformat

    from stacker_kernel.engine.build import convert_dockerfile

    out = convert_dockerfile(args.stacker_yaml, args.output, _dockerfile_options(args))
    if isinstance(out, str):
        _write_output(args.output, lambda p: write_bytes(Path(p), out.encode()))
    else:
        _write_output(args.output, lambda p: write_bytes(Path(p), (nbformat.writes(nbformat.from_dict(out)) + "\n").encode()))
    print(f"wrote {args.output}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import nbformat

    from stacker_kernel.recipe.dockerfile_options import is_dockerfile
    from stacker_kernel.recipe.notebook import notebook_from_recipe
    from stacker_kernel.recipe.stacker_yaml import load_file

    if is_dockerfile(args.stacker_yaml):
        return _import_dockerfile(args)
    subs = _substitutions(args.substitute)
    try:  # placeholders stay in the cells: the notebook builds with other values too
        recipe = load_file(args.stacker_yaml, subs, keep_placeholders=True)
    except StackerKernelError:
        recipe = load_file(args.stacker_yaml, subs, keep_missing=True)  # a real error is raised here
        print(f"note: a ${{{{...}}}} placeholder of {args.stacker_yaml} is where a number, a yes/no or "
              "a layer name must be: the notebook has the resolved values of those with a default",
              file=sys.stderr)
    notebook = notebook_from_recipe(recipe)
    _write_output(args.output, lambda p: write_bytes(Path(p), (nbformat.writes(notebook) + "\n").encode()))
    print(f"wrote {args.output}")
    return 0


# --- publish ------------------------------------------------------------------

def add_publish(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="docker://HOST/PATH[:TAG] or oci:DIR")
    p.add_argument("--tag", action="append", help="tag to publish under (repeatable; default latest)")
    p.add_argument("--image", action="append", help="only this layer (repeatable; default every tag)")
    p.add_argument("--oci-dir", default="oci", help="the OCI layout built before (default oci)")
    p.add_argument("--authfile", help="registry auth file (default: as skopeo: $REGISTRY_AUTH_FILE, "
                   "$XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json, "
                   "~/.docker/config.json)")
    p.add_argument("--username", help="registry user; the password comes from --password-stdin")
    p.add_argument("--password-stdin", action="store_true", help="read the registry password from stdin")
    _add_attestation_flags(p, "the published images (those in the layout are not pushed)")
    add_publish_layer_type(p)
    # Kept only to refuse it: argv is visible to every local user (ps).
    p.add_argument("--password", help=argparse.SUPPRESS)


def cmd_publish(args: argparse.Namespace) -> int:
    from stacker_kernel.oci.publish import publish

    if args.password is not None:
        raise StackerKernelError("--password puts the password where every user on this machine "
                                 "sees it (ps): pipe it to --password-stdin with --username, or "
                                 "log in once with 'skopeo login' (or pass --authfile)")
    if args.password_stdin and not args.username:
        raise StackerKernelError("--password-stdin needs --username: give the registry user")
    if args.username and not args.password_stdin:
        raise StackerKernelError("--username needs --password-stdin: pipe the password to "
                                 "stdin, e.g. stacker-kernel publish ... --username U "
                                 "--password-stdin < password-file")
    password = None
    if args.password_stdin:
        # As `podman login --password-stdin`: the whole input, less its final newline.
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
        if not password:
            raise StackerKernelError("--password-stdin read an empty password: pipe the password to stdin")
    for done in publish(args.oci_dir, args.url, args.tag, images=args.image,
                        username=args.username, password=password, authfile=args.authfile,
                        sbom=not args.no_sbom, provenance=not args.no_provenance,
                        layer_types=args.layer_type, show_only=args.show_only):
        print(f"{'would publish' if args.show_only else 'published'} {done.image} to {done.destination}")
    return 0


def add_publish_layer_type(p: argparse.ArgumentParser) -> None:
    """stacker's `publish --layer-type`: which built type of each layer goes out."""
    p.add_argument("--layer-type", action="append", choices=("tar", "squashfs", "erofs"), metavar="TYPE",
                   help="publish each layer's image of this type (repeatable): NAME-squashfs goes to "
                        "NAME:TAG-squashfs, as stacker; default every tag of the layout as it is")
    p.add_argument("--show-only", action="store_true",
                   help="print what would be published where, and publish nothing (as stacker)")


COMMANDS: list[Command] = [
    Command("setup-storage", "as root: btrfs storage for a user (loop-mounted image if needed)",
            add_setup_storage, cmd_setup_storage),
    Command("storage-path", "print the storage root", add_storage_path, cmd_storage_path),
    Command("layers", "show the snapshots of every session, per layer", add_layers, cmd_layers),
    Command("gc", "delete snapshots that no session references", add_gc, cmd_gc),
    Command("clean", "forget the builds of a recipe or folder and delete their snapshots, logs and "
            "OCI layout (as stacker clean)", add_clean, cmd_clean),
    Command("install", "install the 'stacker' Jupyter kernel spec", add_install, cmd_install),
    Command("build", "build a stacker.yaml or a notebook, layer by layer", add_build, cmd_build),
    Command("recursive-build", "build every stacker.yaml under a directory, prerequisites first",
            add_recursive_build, cmd_recursive_build),
    Command("grab", "copy a file out of a built layer", add_grab, cmd_grab),
    Command("sbom", "the SPDX SBOM (packages, unpackaged files) of a built layer", add_sbom, cmd_sbom),
    Command("chroot", "an interactive shell in a throwaway copy of a built layer "
            "(or of the failed state a failed build stopped in)", add_chroot, cmd_chroot),
    Command("export", "a notebook as stacker.yaml (and OCI images)", add_export, cmd_export),
    Command("import", "a stacker.yaml or a Dockerfile as a notebook", add_import, cmd_import),
    Command("publish", "copy built images to a registry or another OCI layout (skopeo)", add_publish,
            cmd_publish),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand; with `command`, only that
    one, with its options (each command's are many, some import what they name, and
    each parser's words go through gettext)."""
    def storage_option(default: object) -> argparse.ArgumentParser:
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--storage", metavar="DIR", default=default,
                            help="storage root (default: $STACKER_KERNEL_STORAGE, else your config file, "
                                 "else $XDG_DATA_HOME/stacker-kernel)")
        common.add_argument("--storage-driver", choices=("btrfs", "overlay"), default=default,
                            help="for a new storage root: btrfs subvolumes or overlayfs layers (default: "
                                 "btrfs where the storage is on btrfs, else overlay); an existing root keeps its own")
        return common

    parser = argparse.ArgumentParser(prog="stacker-kernel", parents=[storage_option(None)],
                                     description="Build container images cell by cell on btrfs snapshots.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # SUPPRESS: a subcommand without --storage keeps the value given before it.
    sub_common = storage_option(argparse.SUPPRESS)
    for c in COMMANDS:
        if command not in (None, c.name):
            continue
        p = sub.add_parser(c.name, help=c.help, description=c.help, parents=[sub_common])
        c.add_arguments(p)
        p.set_defaults(run=c.run)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names (its first word that is not a global option or an
    option's value), None when it names none that exists."""
    words = iter(argv)
    for word in words:
        if len(word) > 2 and any(o.startswith(word) for o in ("--storage", "--storage-driver")):
            next(words, None)  # its value (argparse takes a long option's unambiguous prefix too)
        elif not word.startswith("-"):
            return word if word in {c.name for c in COMMANDS} else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    try:
        # Line by line also into a file or pipe (CI logs): a buffered line would be
        # written again by every forked helper that flushes it (run_in_userns).
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass  # not a text stream of our own (e.g. replaced by a caller)
    try:
        return args.run(args)
    except StackerKernelError as e:
        print(f"stacker-kernel: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
