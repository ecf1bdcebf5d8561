"""Dockerfile -> notebook cells: each stage a layer, each instruction group a cell.

Pure: it is handed the Dockerfile's text (parsed by the `dockerfile` package,
which wraps the official Go parser) and gives the cells of a notebook, which
`notebook.recipe_from_notebook` turns into the recipe built, exported as
stacker.yaml, or written as a notebook. The mapping, instruction by instruction:

- `FROM IMG [AS NAME]`: a layer (`%layer`, `%from`); an earlier stage is
  `%from built STAGE`, `scratch` is `%from scratch`, `bases` maps an image to
  another source (`oci:DIR:TAG`, `tar:PATH`, `docker://REF`), anything else is
  `%from docker docker://IMG`. Only the stages the target (the last stage, or
  `target`) needs are layers, as BuildKit builds only them; all but the target
  are `%build_only` (`all_stages`: every stage, each an image). A stage built
  on a stage inherits its environment, working directory, user, shell, CMD and
  ENTRYPOINT, and runs its ONBUILD instructions first. `--platform` must name
  the platform built (steps run on the host's kernel).
- `RUN CMD` (shell form): a cell running CMD in a subshell with errexit off,
  so, as Docker's `/bin/sh -c CMD`, it sees the environment and the working
  directory and changes neither; with `SHELL [...]`, that shell runs CMD.
  `RUN ["a", "b"]` (exec form): a cell running `a b`. Heredocs as BuildKit
  runs them. After a non-root USER, the cell has `%user USER`; each
  `--mount=...` is a `%mount` line (a bind's source relative to the cells).
- `ENV` / `ARG`: `%environment` (ENV only) and, in stages with RUN steps,
  `export` lines, so later steps see them. `${VAR}`, `${VAR:-default}`,
  `${VAR:+alt}` are expanded in the instructions Docker expands them in.
  `build_args` override ARG defaults, as `--build-arg`.
- `WORKDIR`: `%working_dir` and, in stages with RUN steps, `mkdir -p` + `cd`.
- `USER`: `%runtime_user`, and `%user` on the RUN cells after it.
- `COPY`/`ADD` of local files, of http(s) URLs (ADD) and `COPY --from=STAGE`
  (wildcards match in the stage): imports (`stacker://STAGE/path` for a stage).
  In a stage without RUN (e.g. `FROM scratch`) they land with `--dest`,
  `--mode` (--chmod) and `--uid`/`--gid` (--chown, names resolved in the image);
  in a stage with RUN they are staged at /stacker/imports and a cell copies them
  in place, in order. `COPY <<EOF FILE`: a cell writes FILE. With a
  .dockerignore (`dockerignore`), the stages that import from the context get
  `%dockerignore`.
- `LABEL`, `CMD`, `ENTRYPOINT`, `VOLUME`: `%labels`, `%cmd`, `%entrypoint`, `%volumes`;
  `MAINTAINER`: the `org.opencontainers.image.authors` annotation.
- `EXPOSE`, `STOPSIGNAL`, `ONBUILD`: stacker has no keys for them: the annotations
  `io.stacker-kernel.config.ExposedPorts` / `.StopSignal` / `.OnBuild`, which the
  OCI export also writes into the image config. `HEALTHCHECK`: an annotation only,
  with a warning (an OCI image config has no health check).
- Refused, naming the line: ADD of a git repository or a local archive,
  `RUN --network=none/--security`, `FROM --platform` of another platform, `COPY --from`
  an image, COPY heredocs in a stage without RUN, and any flag not listed here.
  Wildcard sources of local files are expanded by the caller's `match`.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Callable


from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.dockerfile_options import (  # noqa: F401 (part of this module's interface)
    DockerfileOptions, is_dockerfile, layer_name_for,
)
from stacker_kernel.recipe.model import Recipe, check_layer_name

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ["/bin/sh", "-c"]
# oci/export.CONFIG_ANNOTATION (recipe/ imports nothing of the lower layers)
CONFIG_ANNOTATION = "io.stacker-kernel.config."
HEALTHCHECK_ANNOTATION = "io.stacker-kernel.dockerfile.healthcheck"
# Where a stage with RUN steps copies a COPY's files first, to set owner and mode
# on them alone; removed in the same step, so it never reaches a layer.
COPY_TMP = "/.stacker-kernel-copy"
_ARCHIVE = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


@dataclass
class Translation:
    """The notebook cells of a Dockerfile: (cell_type, source) in order, and warnings."""
    cells: list[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Stage:
    name: str
    line: int
    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    shell: list[str] = field(default_factory=lambda: list(DEFAULT_SHELL))
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    has_run: bool = False
    head: list[str] = field(default_factory=list)   # the FROM cell's magic lines
    prelude: list[str] = field(default_factory=list)  # the FROM cell's script
    cells: list[str] = field(default_factory=list)
    staged: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (path, line)
    ports: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    stop_signal: str | None = None
    deps: set[str] = field(default_factory=set)  # the stages it is built on or copies from
    onbuild: list[str] = field(default_factory=list)
    onbuild_lines: list[int] = field(default_factory=list)
    base_onbuild: list[str] = field(default_factory=list)  # the base image's OnBuild
    parent: "_Stage | None" = None


# --- word expansion, as BuildKit's shell lexer (frontend/dockerfile/shell/lex.go) ---------

def expand(word: str, env: dict[str, str], line: int) -> str:
    """`word` with quotes removed and `$VAR`, `${VAR}`, `${VAR:-w}`, `${VAR-w}`,
    `${VAR:+w}`, `${VAR+w}`, `${VAR:?msg}` expanded from `env` (unset is empty)."""
    out: list[str] = []
    i, n = 0, len(word)
    quote = None
    while i < n:
        c = word[i]
        if quote == "'":
            if c == "'":
                quote = None
            else:
                out.append(c)
            i += 1
        elif c == "\\" and i + 1 < n and (quote is None or word[i + 1] in '"$\\`'):
            out.append(word[i + 1])
            i += 2
        elif c == "'" and quote is None:
            quote = "'"
            i += 1
        elif c == '"':
            quote = None if quote == '"' else '"'
            i += 1
        elif c == "$":
            value, i = _variable(word, i + 1, env, line)
            out.append(value)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _variable(word: str, i: int, env: dict[str, str], line: int) -> tuple[str, int]:
    n = len(word)
    if i < n and word[i] == "{":
        end, depth = i + 1, 1
        while end < n and depth:
            depth += {"{": 1, "}": -1}.get(word[end], 0)
            end += 1
        if depth:
            raise RecipeError(f"line {line}: unterminated ${{ in {word!r}: close it with }}")
        inner = word[i + 1:end - 1]
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])(.*))?", inner, re.S)
        if not m:
            raise RecipeError(f"line {line}: ${{{inner}}} is not a substitution this converter "
                              "knows (${VAR}, ${VAR:-default}, ${VAR:+alternative}): simplify it")
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if op is None:
            return value or "", end
        empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return (expand(arg, env, line) if empty else value or ""), end
        if op.endswith("+"):
            return ("" if empty else expand(arg, env, line)), end
        if empty:  # ?
            raise RecipeError(f"line {line}: {name} is not set: {arg or 'give it a value'}")
        return value or "", end
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", word[i:])
    if not m:
        return "$", i
    return env.get(m.group(0), ""), i + m.end()


# --- the translation ----------------------------------------------------------------------

def _q(value: str) -> str:
    return shlex.quote(value)


def _pair(key: str, value: str) -> str:
    return _q(f"{key}={value}")


# Names bash keeps read-only (an assignment would end the step's shell) and dash or
# busybox ash treat as ordinary variables (container/step.GUARDED_VARS).
_SHELL_OWNED = ("UID", "EUID", "GROUPS", "PPID", "SHELLOPTS", "BASHOPTS")


def _export(key: str, value: str) -> str:
    """The line that exports an ARG or ENV to later RUN steps, as Docker's environment
    does: where the shell owns the name (bash's UID), the shell's value stands."""
    line = f"export {key}={_q(value)}"
    return f"if ({key}=) 2>/dev/null; then {line}; fi" if key in _SHELL_OWNED else line


def _config_annotation(field_name: str, value: str) -> str:
    return f"%annotations {_pair(CONFIG_ANNOTATION + field_name, value)}"


def _flags(cmd, allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for flag in cmd.flags:
        key, eq, value = flag[2:].partition("=")
        if key not in allowed:
            what = "is not supported" if key in ("mount", "network", "security", "link", "parents",
                                                 "exclude", "platform", "keep-git-dir", "checksum") \
                else "is unknown"
            known = ", ".join("--" + a for a in allowed) or "no flags"
            raise RecipeError(f"line {cmd.start_line}: {cmd.cmd} {flag.split('=')[0]} {what}: "
                              f"remove it (stacker-kernel supports {known} on {cmd.cmd})")
        out[key] = value
    return out


def _key_values(cmd, env: dict[str, str]) -> list[tuple[str, str]]:
    vals = list(cmd.value)
    if len(vals) % 2:
        raise RecipeError(f"line {cmd.start_line}: {cmd.cmd} needs KEY=VALUE pairs")
    return [(expand(vals[k], env, cmd.start_line), expand(vals[k + 1], env, cmd.start_line))
            for k in range(0, len(vals), 2)]


def _command_list(cmd, shell: list[str]) -> list[str]:
    if cmd.json:
        return list(cmd.value)
    return shell + [" ".join(cmd.value)]


def _chown(spec: str, line: int) -> tuple[str, str]:
    user, _, group = spec.partition(":")
    if not user:
        raise RecipeError(f"line {line}: --chown={spec} has no user: write --chown=USER[:GROUP]")
    return user, group


def _source_path(src: str, context: str, line: int) -> str:
    rel = posixpath.normpath(src.lstrip("/") or ".")
    if rel == ".." or rel.startswith("../"):
        raise RecipeError(f"line {line}: {src!r} is outside the build context (the Dockerfile's "
                          "directory): move it in")
    path = posixpath.normpath(posixpath.join(context, rel)) if context else rel
    return path + "/"  # a directory's contents, a file itself: Docker's COPY rules


class _Translator:
    def __init__(self, text: str, name: str, build_args: dict[str, str],
                 bases: dict[str, str], context: str, platform: str, match,
                 target: str | None = None, all_stages: bool = False, dockerignore: bool = False,
                 base_onbuild: dict[str, list[str]] | None = None):
        self.text, self.name, self.context, self.match = text, name, context, match
        self.base_onbuild, self.used_base_onbuild = dict(base_onbuild or {}), []
        self.target, self.all_stages, self.dockerignore = target, all_stages, dockerignore
        self.build_args, self.bases = dict(build_args), dict(bases)
        self.used_args: set[str] = set()
        self.global_args: dict[str, str] = {}
        self.stages: list[_Stage] = []
        self.warnings: list[str] = []
        # BuildKit's automatic platform ARGs: the build runs on the host, for the host
        self.platform = platform
        self.platform_args = {}
        for prefix, value in (("TARGET", platform), ("BUILD", host_platform())):
            os_, _, arch = value.partition("/")
            arch, _, variant = arch.partition("/")
            self.platform_args.update({prefix + "PLATFORM": value, prefix + "OS": os_,
                                       prefix + "ARCH": arch, prefix + "VARIANT": variant})

    # -- driver
    def run(self, commands) -> Translation:
        groups: list[list] = []
        for cmd in commands:
            self._check_common(cmd)
            if cmd.cmd == "FROM":
                groups.append([cmd])
            elif not groups:
                if cmd.cmd != "ARG":
                    raise RecipeError(f"line {cmd.start_line}: {cmd.cmd} comes before the first "
                                      "FROM: only ARG may: start the Dockerfile with FROM")
                self._declare_args(cmd, None)
            else:
                groups[-1].append(cmd)
        if not groups:
            raise RecipeError("the Dockerfile has no FROM: start it with FROM IMAGE")
        image = self._target_index(groups)
        for index, group in enumerate(groups):
            self._stage(group, index, last=index == len(groups) - 1, image=index == image)
        # As BuildKit: only the stages the target needs are built (all with all_stages).
        needed = {self.stages[image].name}
        for stage in reversed(self.stages):
            if stage.name in needed:
                needed |= stage.deps
        if not self.all_stages:
            self.stages = [s for s in self.stages if s.name in needed]
        unused = sorted(set(self.build_args) - self.used_args)
        if unused:
            self.warnings.append("build argument(s) " + ", ".join(unused)
                                 + " are not declared by any ARG and were not used")
        cells: list[tuple[str, str]] = []
        for stage in self.stages:
            cells.append(("markdown", f"## Layer {stage.name}\n\nDockerfile stage from line {stage.line}."))
            head = "\n".join(stage.head)
            if stage.prelude:
                head += "\n" + "\n".join(stage.prelude)
            cells.append(("code", head))
            cells.extend(("code", c) for c in stage.cells)
        return Translation(cells, self.warnings)

    def _target_index(self, groups: list[list]) -> int:
        """The index of the stage that is the image: `target`, else the last."""
        if self.target is None:
            return len(groups) - 1
        names = []
        for index, group in enumerate(groups):
            words = group[0].value
            alias = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            if alias is not None and alias.lower() == self.target.lower():
                return index
            names.append(alias or str(index))
        raise RecipeError(f"--target {self.target} names no stage of the Dockerfile (its stages: "
                          f"{', '.join(names)}): give one of them")

    def _triggers(self, stage: _Stage) -> list:
        """The ONBUILD instructions of the stage (or local base image) a stage is built
        on, run first in it as Docker runs a base image's, each naming its ONBUILD
        line (a base image's: the FROM line)."""
        parent = stage.parent
        if parent is not None:
            texts, lines = parent.onbuild, parent.onbuild_lines
        else:
            texts = stage.base_onbuild
            lines = [stage.line] * len(texts)
        import dockerfile

        out = []
        for text, line in zip(texts, lines):
            for cmd in dockerfile.parse_string(text + "\n"):
                if cmd.cmd in ("ONBUILD", "FROM", "MAINTAINER"):
                    raise RecipeError(f"line {line}: ONBUILD {cmd.cmd} is not allowed (as Docker)")
                out.append(cmd._replace(start_line=line, end_line=line, original=f"ONBUILD {cmd.original}"))
        return out

    def _check_common(self, cmd) -> None:
        if cmd.heredocs and cmd.cmd not in ("RUN", "COPY", "ADD"):
            raise RecipeError(f"line {cmd.start_line}: {cmd.cmd} with a heredoc (<<) is not "
                              "a Dockerfile instruction that takes one: only RUN, COPY and ADD do")

    # -- ARG
    def _declare_args(self, cmd, stage: _Stage | None) -> list[str]:
        lines = []
        scope = self.global_args if stage is None else stage.args
        env = self.global_args if stage is None else {**stage.args, **stage.env}
        for item in cmd.value:
            key, eq, default = item.partition("=")
            if key in self.build_args:
                value: str | None = self.build_args[key]
                self.used_args.add(key)
            elif eq:
                value = expand(default, env, cmd.start_line)
            elif stage is not None and key in self.global_args:
                value = self.global_args[key]
            elif key in self.platform_args:
                value = self.platform_args[key]
            else:
                value = None
            if value is None:
                scope.pop(key, None)
                continue
            scope[key] = value
            if stage is not None and key not in stage.env:
                lines.append(_export(key, value))
        return lines

    # -- stages
    def _from(self, cmd, index: int, last: bool, is_image: bool) -> _Stage:
        flags = _flags(cmd, ("platform",))
        scope = {**self.platform_args, **self.global_args}
        if "platform" in flags:
            # steps run on this host's kernel: a stage can only be for the platform built
            wanted = expand(flags["platform"], scope, cmd.start_line)
            if _platform_key(wanted) != _platform_key(self.platform):
                raise RecipeError(f"line {cmd.start_line}: FROM --platform={wanted} is not the "
                                  f"platform built ({self.platform}): stacker-kernel runs steps on "
                                  "this host only, drop --platform or build on such a host")
        words = [expand(w, scope, cmd.start_line) for w in cmd.value]
        if len(words) == 3 and words[1].lower() == "as":
            image, alias = words[0], words[2]
        elif len(words) == 1:
            image, alias = words[0], None
        else:
            raise RecipeError(f"line {cmd.start_line}: write FROM IMAGE [AS NAME]")
        name = alias or (self.name if last else f"stage-{index}")
        try:
            check_layer_name(name, f" (line {cmd.start_line})")
        except RecipeError as e:
            raise RecipeError(f"stage {e}") from None
        if any(s.name == name for s in self.stages):
            raise RecipeError(f"line {cmd.start_line}: stage name {name} is used twice: rename one")
        stage = _Stage(name, cmd.start_line)
        parent = self._stage_named(image)
        stage.head.append(f"# line {cmd.start_line}: {cmd.original}")
        stage.head.append(f"%layer {name}")
        if parent is not None:
            stage.parent = parent
            stage.deps.add(parent.name)
            stage.head.append(f"%from built {parent.name}")
            stage.env, stage.workdir, stage.user = dict(parent.env), parent.workdir, parent.user
            stage.shell, stage.cmd, stage.entrypoint = list(parent.shell), parent.cmd, parent.entrypoint
        elif image == "scratch":
            stage.head.append("%from scratch")
        else:
            self.used_base_onbuild = []
            stage.head.append("%from " + self._base(image, cmd.start_line))
            stage.base_onbuild = list(self.used_base_onbuild)
            stage.env = {"PATH": DEFAULT_PATH}
        if not is_image and not self.all_stages:
            stage.head.append("%build_only")
        if parent is not None:
            # A stage's config is the one of the stage it is built on; that one is
            # build_only, whose config stacker never writes: declare it again.
            stage.labels, stage.volumes = dict(parent.labels), list(parent.volumes)
            stage.ports, stage.stop_signal = list(parent.ports), parent.stop_signal
            stage.head += [f"%environment {_pair(k, v)}" for k, v in stage.env.items()
                           if not (k == "PATH" and v == DEFAULT_PATH)]
            stage.head += [f"%labels {_pair(k, v)}" for k, v in stage.labels.items()]
            if stage.volumes:
                stage.head.append("%volumes " + " ".join(_q(v) for v in stage.volumes))
            if stage.ports:
                stage.head.append(_config_annotation("ExposedPorts", " ".join(stage.ports)))
            if stage.stop_signal:
                stage.head.append(_config_annotation("StopSignal", stage.stop_signal))
            if stage.workdir != "/":
                stage.head.append(f"%working_dir {_q(stage.workdir)}")
            if stage.user:
                stage.head.append(f"%runtime_user {_q(stage.user)}")
            if stage.cmd is not None:
                stage.head.append(f"%cmd {json.dumps(stage.cmd)}")
            if stage.entrypoint is not None:
                stage.head.append(f"%entrypoint {json.dumps(stage.entrypoint)}")
        return stage

    def _stage_named(self, ref: str) -> _Stage | None:
        for i, s in enumerate(self.stages):
            if s.name == ref or ref == str(i):
                return s
        return None

    def _base(self, image: str, line: int) -> str:
        source = self.bases.get(image)
        if source is None:
            norm = _normalize(image)
            source = next((v for k, v in self.bases.items() if _normalize(k) == norm), None)
        if source is None:  # buildah takes `FROM docker://busybox` too
            return "docker " + _q("docker://" + image.removeprefix("docker://"))
        self.used_base_onbuild = self.base_onbuild.get(source, [])
        if source.startswith("oci:"):
            return "oci " + _q(source[4:])
        if source.startswith("docker://"):
            return "docker " + _q(source)
        return "tar " + _q(source.removeprefix("tar:"))

    def _stage(self, group: list, index: int, last: bool, image: bool) -> None:
        stage = self._from(group[0], index, last, image)
        self.stages.append(stage)
        body = self._triggers(stage) + group[1:]
        stage.has_run = any(c.cmd == "RUN" for c in body)
        if stage.has_run:
            inherited = [_export(k, v) for k, v in stage.env.items()
                         if not (k == "PATH" and v == DEFAULT_PATH)]
            if "HOME" not in stage.env:  # as Docker gives a RUN whose image sets no HOME
                inherited.append("export HOME=/root")
            if stage.volumes:  # made here when the stage that set them had no RUN
                inherited.append("mkdir -p " + " ".join(_q(v) for v in stage.volumes))
            if stage.workdir != "/":
                inherited.append(f"mkdir -p {_q(stage.workdir)} && cd {_q(stage.workdir)}")
            stage.prelude = inherited
        pending: list[str] = []  # a group of config instructions, one cell

        def flush() -> None:  # magic lines first: a cell's script starts after them
            if pending:
                stage.cells.append(_magics_first("\n".join(pending)))
                pending.clear()

        for cmd in body:
            where = f"# line {cmd.start_line}: {cmd.original.split(chr(10))[0]}"  # a heredoc's first line
            if cmd.cmd in ("RUN", "COPY", "ADD"):
                flush()
                cell = getattr(self, "_" + cmd.cmd.lower())(cmd, stage)
                if cell is not None:
                    stage.cells.append(where + "\n" + cell)
                continue
            handler = getattr(self, "_" + cmd.cmd.lower(), None)
            if handler is None or cmd.cmd == "FROM":
                raise RecipeError(f"line {cmd.start_line}: {cmd.cmd} is not a Dockerfile "
                                  "instruction stacker-kernel knows: remove it")
            magics, script = handler(cmd, stage)
            pending.append(where)
            pending.extend(magics)
            if script and stage.has_run:
                pending.extend(script)
        flush()

    # -- instructions: each returns (magic lines, script lines)
    def _env(self, cmd, stage: _Stage):
        before = {**stage.args, **stage.env}
        pairs = _key_values(cmd, before)
        magics, script = [], []
        for key, value in pairs:
            stage.env[key] = value
            magics.append(f"%environment {_pair(key, value)}")
            script.append(_export(key, value))
        return magics, script

    def _arg(self, cmd, stage: _Stage):
        return [], self._declare_args(cmd, stage)

    def _workdir(self, cmd, stage: _Stage):
        path = expand(" ".join(cmd.value), {**stage.args, **stage.env}, cmd.start_line)
        stage.workdir = posixpath.normpath(posixpath.join(stage.workdir, path))
        return [f"%working_dir {_q(stage.workdir)}"], [f"mkdir -p {_q(stage.workdir)}",
                                                      f"cd {_q(stage.workdir)}"]

    def _user(self, cmd, stage: _Stage):
        stage.user = expand(" ".join(cmd.value), {**stage.args, **stage.env}, cmd.start_line)
        return [f"%runtime_user {_q(stage.user)}"], []

    def _label(self, cmd, stage: _Stage):
        pairs = _key_values(cmd, {**stage.args, **stage.env})
        stage.labels.update(pairs)
        return [f"%labels {_pair(k, v)}" for k, v in pairs], []

    def _maintainer(self, cmd, stage: _Stage):
        return [f"%annotations {_pair('org.opencontainers.image.authors', ' '.join(cmd.value))}"], []

    def _cmd(self, cmd, stage: _Stage):
        stage.cmd = _command_list(cmd, stage.shell)
        return [f"%cmd {json.dumps(stage.cmd)}"], []

    def _entrypoint(self, cmd, stage: _Stage):
        stage.entrypoint = _command_list(cmd, stage.shell)
        return [f"%entrypoint {json.dumps(stage.entrypoint)}"], []

    def _shell(self, cmd, stage: _Stage):
        if not cmd.json:
            raise RecipeError(f"line {cmd.start_line}: SHELL needs the JSON form, e.g. "
                              'SHELL ["/bin/bash", "-c"]')
        stage.shell = list(cmd.value)
        return [], []

    def _volume(self, cmd, stage: _Stage):
        env = {**stage.args, **stage.env}
        paths = list(cmd.value) if cmd.json else [expand(w, env, cmd.start_line) for w in cmd.value]
        stage.volumes += paths
        # as buildah, the image has the mount points (a stage without RUN: see WORKDIR)
        return ["%volumes " + " ".join(_q(p) for p in paths)], \
            ["mkdir -p " + " ".join(_q(p) for p in paths)]

    def _expose(self, cmd, stage: _Stage):
        env = {**stage.args, **stage.env}
        for w in cmd.value:
            port = expand(w, env, cmd.start_line)
            stage.ports.append(port if "/" in port else port + "/tcp")
        return [_config_annotation("ExposedPorts", " ".join(stage.ports))], []

    def _stopsignal(self, cmd, stage: _Stage):
        signal = stage.stop_signal = expand(" ".join(cmd.value), {**stage.args, **stage.env}, cmd.start_line)
        return [_config_annotation("StopSignal", signal)], []

    def _onbuild(self, cmd, stage: _Stage):
        trigger = cmd.original.split(None, 1)[1].strip()
        if not stage.onbuild:
            self.warnings.append(f"line {cmd.start_line}: ONBUILD is recorded in the image config "
                                 "(OnBuild, as Docker's format has it): the stages built on "
                                 "it run it first, here or FROM its image as a local OCI base")
        stage.onbuild.append(trigger)
        stage.onbuild_lines.append(cmd.start_line)
        return [_config_annotation("OnBuild", json.dumps(stage.onbuild))], []

    def _healthcheck(self, cmd, stage: _Stage):
        self.warnings.append(f"line {cmd.start_line}: HEALTHCHECK is kept as the annotation "
                             f"{HEALTHCHECK_ANNOTATION} only: an OCI image config has no health "
                             "check (buildah ignores it too)")
        return [f"%annotations {_pair(HEALTHCHECK_ANNOTATION, cmd.original.split(None, 1)[1])}"], []

    # -- RUN, COPY, ADD: one cell each (the text after the line comment)
    def _mounts(self, cmd, stage: _Stage) -> str:
        """`%mount` lines for a RUN's --mount flags: a bind's source in the context
        (relative to where the cells are used) or in a stage (`from=`, a layer)."""
        from stacker_kernel.recipe.model import parse_mount

        env = {**stage.args, **stage.env}
        lines = []
        for flag in cmd.flags:
            if not flag.startswith("--mount="):
                continue
            spec = expand(flag[len("--mount="):], env, cmd.start_line)
            parts = []
            for part in spec.split(","):  # a relative target is in the working directory
                key, eq, value = part.partition("=")
                if key.strip() in ("target", "dst", "destination") and eq and not value.startswith("/"):
                    value = posixpath.normpath(posixpath.join(stage.workdir, value))
                parts.append(f"{key}{eq}{value}")
            spec = ",".join(parts)
            try:
                m = parse_mount(spec)
            except RecipeError as e:
                raise RecipeError(f"line {cmd.start_line}: RUN --mount={spec}: {e}") from None
            if m["type"] == "bind" and "from" in m:
                parent = self._stage_named(m["from"])
                if parent is None or parent is stage:
                    raise RecipeError(f"line {cmd.start_line}: RUN --mount from={m['from']} names no "
                                      "earlier stage: mounting an image is not supported, add a "
                                      f"stage 'FROM {m['from']} AS NAME' and mount from=NAME")
                stage.deps.add(parent.name)
                m["from"] = parent.name
                m["source"] = posixpath.normpath(posixpath.join(parent.workdir, m.get("source", ".")))
            elif m["type"] == "bind":
                m["source"] = _source_path(m.get("source", "."), self.context, cmd.start_line).rstrip("/")
            lines.append("%mount " + ",".join(f"{k}={v}" for k, v in m.items()))
        return "".join(line + "\n" for line in lines)

    def _run(self, cmd, stage: _Stage) -> str:
        network = _flags(cmd, ("mount", "network")).get("network", "default")
        if network not in ("default", "host"):  # steps have the build's network, the host's
            raise RecipeError(f"line {cmd.start_line}: RUN --network={network} is not supported "
                              "(steps use the build's network): drop it, or use %network none in "
                              "the notebook for all its steps")
        user = self._mounts(cmd, stage)
        head = ""
        if stage.user not in ("", "root", "0", "root:root", "0:0"):
            # the step runs as the user, HOME the user's unless the image's environment sets it
            user += f"%user {_q(stage.user)}\n"
            if "HOME" in stage.env:
                head = f"HOME={_q(stage.env['HOME'])} "
        if cmd.json:
            return user + head + shlex.join(cmd.value)
        command = self._heredoc_run(cmd) if cmd.heredocs else self._raw_run(cmd)
        if stage.shell != DEFAULT_SHELL:
            return user + head + shlex.join(stage.shell + [command])
        # As `/bin/sh -c CMD`: no errexit, and no cd or variable leaves the subshell.
        head = f"export {head.strip()}\n" if head else ""
        return f"{user}(set +e\n{head}{command}\n)"

    def _matches(self, src: str, line: int) -> list[str]:
        """A local source with `*`, `?` or `[` as the context files it matches, sorted."""
        if not re.search(r"[*?\[]", src) or re.match(r"[a-z][a-z0-9+.-]*://", src):
            return [src]
        if self.match is None:
            raise RecipeError(f"line {line}: the wildcard source {src!r} needs the build context: "
                              "list the files")
        found = sorted(self.match(src.lstrip("/")))
        if not found:
            raise RecipeError(f"line {line}: no file of the build context matches {src!r}: "
                              "fix the pattern")
        return found

    def _heredoc_run(self, cmd) -> str:
        """A RUN with heredocs, as BuildKit runs it: a lone `<<EOF` is the script (a
        `#!` one runs as a file of its own); else the shell reads the heredocs."""
        m = re.fullmatch(r"<<(-?)(['\"]?)([^'\"\s]+)\2", cmd.value[0].strip())
        if m is None or len(cmd.heredocs) != 1:
            return re.sub(r"^\s*RUN\s+(?:--\S+\s+)*", "", cmd.original, flags=re.I).rstrip("\n")
        content = cmd.heredocs[0].content
        if m.group(1):
            content = re.sub(r"(?m)^\t+", "", content)
        if not content.startswith("#!"):
            return content.rstrip("\n")
        end = "STACKER_KERNEL_SCRIPT"
        return "\n".join([f"__sk_run=$(mktemp) && cat > \"$__sk_run\" <<'{end}'", content.rstrip("\n"),
                          end, 'chmod 0755 "$__sk_run"; "$__sk_run"; __sk_rc=$?; rm -f "$__sk_run"',
                          "(exit $__sk_rc)"])

    def _copy_heredocs(self, cmd, stage: _Stage, flags: dict[str, str], env: dict[str, str]) -> str:
        """COPY <<EOF FILE: the heredoc's text as FILE (variables expanded unless the
        delimiter is quoted, as BuildKit does), mode 0644 unless --chmod, root's unless --chown."""
        line = cmd.start_line
        if "from" in flags:
            raise RecipeError(f"line {line}: COPY --from with a heredoc names two sources: drop one")
        if not stage.has_run:
            raise RecipeError(f"line {line}: {cmd.cmd} <<... in a stage without RUN is not "
                              "supported (no shell writes the file there): put the text in a file "
                              "of the build context and COPY it")
        words = list(cmd.value)
        dest = expand(words[-1], env, line)
        into_dir = dest.endswith("/") or posixpath.basename(dest) in (".", "..") or len(words) > 2
        dest = posixpath.normpath(posixpath.join(stage.workdir, dest))
        docs = iter(cmd.heredocs)
        owner = _chown(expand(flags["chown"], env, line), line) if flags.get("chown") else None
        spec = "0:0" if owner is None else f"{owner[0]}:{owner[1] or owner[0]}"
        mode = flags.get("chmod") or "0644"
        if not re.fullmatch(r"[0-7]{3,4}", mode):
            raise RecipeError(f"line {line}: --chmod={mode} is not an octal mode: write e.g. --chmod=0755")
        lines = ["("]
        for word in words[:-1]:
            m = re.fullmatch(r"<<(-?)(['\"]?)([^'\"\s]+)\2", word)
            doc = next(docs, None)
            if m is None or doc is None:
                raise RecipeError(f"line {line}: {cmd.cmd} mixes heredocs and files: copy the "
                                  "files in a COPY of their own")
            text = doc.content if m.group(2) else _expand_variables(doc.content, env)
            if m.group(1):
                text = re.sub(r"(?m)^\t+", "", text)
            target = posixpath.join(dest, m.group(3)) if into_dir else dest
            lines += [f"mkdir -p {_q(posixpath.dirname(target))}",
                      f"printf %s {_q(text)} > {_q(target)}",
                      f"chown {spec} {_q(target)} && chmod {mode} {_q(target)}"]
        stage.head.append(f"# line {line} (its cell writes it): {cmd.original.splitlines()[0]}")
        return "\n".join(lines + [")"])

    def _raw_run(self, cmd) -> str:
        """A shell-form RUN's command as written, line breaks kept (the shell reads
        `\\`-newline as Docker's parser does), unless comment or blank lines
        inside it make the parser's joined text the only faithful one."""
        lines = self.text.split("\n")[cmd.start_line - 1:cmd.end_line]
        if len(lines) < 2 or "'" in "".join(lines) or re.search(r"(?m)^#\s*escape\s*=", self.text) \
                or any(not ln.strip() or ln.lstrip().startswith("#") for ln in lines[1:]):
            return cmd.value[0]
        # the instruction and its flags, which may go on over `\`-continued lines
        text = re.sub(r"^\s*RUN\s+(?:--\S+(?:\s|\\\n)+)*", "", "\n".join(lines), flags=re.I)
        return text.rstrip()

    def _add(self, cmd, stage: _Stage) -> str | None:
        return self._copy(cmd, stage, add=True)

    def _copy(self, cmd, stage: _Stage, add: bool = False) -> str | None:
        line = cmd.start_line
        # --link only changes how BuildKit caches the layer: the files are the same
        flags = _flags(cmd, ("chown", "chmod", "link") + (("checksum",) if add else ("from",)))
        env = {**stage.args, **stage.env}
        if cmd.heredocs:
            return self._copy_heredocs(cmd, stage, flags, env)
        words = list(cmd.value) if cmd.json else [expand(w, env, line) for w in cmd.value]
        if len(words) < 2:
            raise RecipeError(f"line {line}: {cmd.cmd} needs a source and a destination")
        sources, dest = words[:-1], words[-1]
        if "from" not in flags:
            sources = [m for src in sources for m in self._matches(src, line)]
        into_dir = dest.endswith("/") or posixpath.basename(dest) in (".", "..")
        if len(sources) > 1 and not into_dir:
            raise RecipeError(f"line {line}: {cmd.cmd} with several sources needs a destination "
                              f"ending in /: write {dest}/")
        dest = posixpath.normpath(posixpath.join(stage.workdir, dest))
        if into_dir and dest != "/":
            dest += "/"
        owner = _chown(expand(flags["chown"], env, line), line) if flags.get("chown") else None
        mode = None
        if flags.get("chmod"):
            if not re.fullmatch(r"[0-7]{3,4}", flags["chmod"]):
                raise RecipeError(f"line {line}: --chmod={flags['chmod']} is not an octal mode: "
                                  "write e.g. --chmod=0755")
            mode = int(flags["chmod"], 8)
        urls = [s for s in sources if add and re.match(r"https?://", s)]
        checksum = None
        if urls:
            if len(sources) > 1:
                raise RecipeError(f"line {line}: ADD of the URL {urls[0]} with other sources: give "
                                  "the URL an ADD of its own")
            # fetched when the layer's imports are staged, 0600 as Docker makes it
            mode = 0o600 if mode is None else mode
            if flags.get("checksum"):
                checksum = flags["checksum"].removeprefix("sha256:")
                if not re.fullmatch(r"[0-9a-fA-F]{64}", checksum):
                    raise RecipeError(f"line {line}: ADD --checksum={flags['checksum']} is not "
                                      "sha256:HEX (the only digest supported)")
        elif flags.get("checksum"):
            raise RecipeError(f"line {line}: ADD --checksum needs a URL source")
        paths = []
        for src in sources:
            if src in urls:
                paths.append(src)
                continue
            if add and (re.match(r"[a-z][a-z0-9+.-]*://", src) or src.startswith("git@")):
                raise RecipeError(f"line {line}: ADD of the URL {src} is not supported: ADD takes "
                                  "http(s) URLs; clone a git repository in a RUN step")
            if add and src.lower().endswith(_ARCHIVE):
                raise RecipeError(f"line {line}: ADD of the archive {src} (which Docker unpacks) is "
                                  "not supported: COPY it and unpack it with tar in a RUN step")
            if "from" in flags:
                source = expand(flags["from"], env, line)
                parent = self._stage_named(source)
                if parent is None or parent is stage:
                    raise RecipeError(f"line {line}: COPY --from={source} names no earlier stage: "
                                      "copying from an image is not supported, add a stage "
                                      f"'FROM {source} AS NAME' and copy --from=NAME")
                stage.deps.add(parent.name)  # wildcards match in the stage when it is copied from
                inner = posixpath.normpath(posixpath.join(parent.workdir, src))
                # a wildcard into a file dest is the one file it matches (see the engine's fetch)
                single = re.search(r"[*?\[]", src) and not into_dir
                paths.append(f"stacker://{parent.name}{inner}" + ("" if single else "/"))
            else:
                paths.append(_source_path(src, self.context, line))
                ignore = "%dockerignore " + _q(_source_path(".dockerignore", self.context, line).rstrip("/"))
                if self.dockerignore and ignore not in stage.head:
                    stage.head.append(ignore)
        new = []
        for p in paths:
            staged = _staged_name(p)
            before = stage.staged.get(staged)
            # Sources of one COPY with the same name are staged into one place in order,
            # so they merge (a later file replaces an earlier one) as they do at the dest.
            if before is not None and before[0] != p and before[1] != line:
                raise RecipeError(f"line {line}: {cmd.cmd} source {p.rstrip('/')} has the same name "
                                  f"as the one on line {before[1]} (both would be "
                                  f"/stacker/imports/{staged}): rename one")
            if before is None or before[0] != p:
                new.append(p)
            stage.staged[staged] = (p, line)
        stage.head.append(f"# line {line}{'' if not stage.has_run else ' (its cell copies it)'}: "
                          f"{cmd.original}")
        if not stage.has_run:
            ids = []  # names are the image's, looked up when the files land
            if owner is not None:
                ids = [f"--uid {_q(owner[0])}"]
                if owner[1] or owner[0].isdigit():
                    ids.append(f"--gid {_q(owner[1] or owner[0])}")
            for p in paths:
                opts = [f"--dest {_q(dest)}"] + ([f"--mode 0{mode:o}"] if mode is not None else []) + ids \
                    + ([f"--hash {checksum}"] if checksum else [])
                stage.head.append(f"%import {_q(p)} " + " ".join(opts))
            return None
        for p in new:  # staged once, however often it is copied
            stage.head.append(f"%import {_q(p)}" + (f" --hash {checksum}" if checksum else ""))
        once = list({_staged_name(p): p for p in paths}.values())
        return "\n".join(_copy_script(once, dest, owner, mode))


def _expand_variables(text: str, env: dict[str, str]) -> str:
    """$VAR and ${VAR} of `text` from `env`, quotes left alone (a heredoc's text)."""
    def one(m: re.Match) -> str:
        if m.group(0).startswith("\\"):
            return m.group(0)[1:]
        return env.get(m.group(1) or m.group(2), "")
    return re.sub(r"\\\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", one, text)


def _staged_name(path: str) -> str:
    """An import's name at /stacker/imports (engine/imports.staged_name)."""
    name = posixpath.basename(posixpath.normpath(path.rstrip("/") or "/"))
    return name if name not in ("", ".", "..", "/") else "import"


def _copy_script(paths: list[str], dest: str, owner: tuple[str, str] | None,
                 mode: int | None) -> list[str]:
    """Shell lines copying staged imports to `dest` with Docker's COPY rules: a
    directory's contents, a file into a directory dest or as the dest itself, owned
    by root unless --chown, modes kept unless --chmod, missing directories 0755 and
    owned as the files (as buildah and BuildKit make them). A subshell: no variable
    of it stays in the layer's shell."""
    spec = "0:0"
    if owner is not None:
        user, group = owner
        spec = f"{user}:{group}" if group else (f"{user}:{user}" if user.isdigit()
                                               else f"{user}:$(id -u {_q(user)})")
    lines = ["(", f"rm -rf {COPY_TMP} && mkdir {COPY_TMP}"]
    for p in paths:
        src = "/stacker/imports/" + _q(_staged_name(p))
        lines.append(f"if [ -d {src} ]; then cp -a {src}/. {COPY_TMP}/; "
                     f"else cp -a {src} {COPY_TMP}/; fi")
    lines.append(f"chown -R {spec} {COPY_TMP}")
    if mode is not None:
        lines.append(f"chmod -R 0{mode:o} {COPY_TMP}")
    d = _q(dest.rstrip("/") or "/")

    def mkdirs(path: str) -> list[str]:
        if owner is None:
            return [f"mkdir -p {path}"]
        return [f"p={path}; new=; while [ ! -e \"$p\" ]; do new=\"$p:$new\"; p=$(dirname \"$p\"); done",
                f"mkdir -p {path}",
                f"IFS=:; for x in $new; do chown {spec} \"$x\"; done; unset IFS"]

    each = (f"for e in {COPY_TMP}/* {COPY_TMP}/.[!.]* {COPY_TMP}/..?*; do "
            f"if [ -e \"$e\" ] || [ -L \"$e\" ]; then cp -a \"$e\" {d}/; fi; done")
    if len(paths) == 1 and not dest.endswith("/"):  # a file is dest itself, unless dest is a directory
        lines.append(f"if [ -d {src} ] || [ -d {d} ]; then")
        lines += mkdirs(d) + [each, "else"] + mkdirs(f'"$(dirname {d})"')
        lines += [f"cp -a {COPY_TMP}/* {d}", "fi"]
    else:
        lines += mkdirs(d) + [each]
    return lines + [f"rm -rf {COPY_TMP}", ")"]


def _magics_first(cell: str) -> str:
    lines = cell.split("\n")
    magics = [ln for ln in lines if ln.startswith("%")]
    if not magics:
        return cell
    comments = [ln for ln in lines if ln.startswith("# line ")]
    rest = [ln for ln in lines if not ln.startswith("%") and not ln.startswith("# line ")]
    return "\n".join(comments + magics + rest)


def _normalize(image: str) -> str:
    """docker.io/library/busybox:latest for busybox (a digest kept as is)."""
    ref = image.removeprefix("docker://")
    name, at, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not at:
        name += ":latest"
    first = name.split("/", 1)[0]
    if "/" not in name or not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + (name if "/" in name else "library/" + name)
    return name + at + digest


def translate(text: str, name: str, build_args: dict[str, str] | None = None,
              bases: dict[str, str] | None = None, context: str = "",
              platform: str | None = None,
              match: Callable[[str], list[str]] | None = None,
              target: str | None = None, all_stages: bool = False,
              dockerignore: bool = False,
              base_onbuild: dict[str, list[str]] | None = None) -> Translation:
    """The notebook cells of Dockerfile `text` (see the module doc for the mapping).

    `name` names the last stage when it has no `AS`; `build_args` are
    `--build-arg NAME=VALUE`; `bases` maps FROM images (as written, or normalized:
    `busybox` = `docker.io/library/busybox:latest`) to `oci:DIR:TAG`, `tar:PATH`
    or `docker://REF`; `context` is prefixed to COPY sources (the build context
    relative to where the cells are used); `platform` (default: the host's, e.g.
    linux/amd64) gives TARGETARCH and the other automatic platform ARGs; `match`
    gives the context paths (relative, `/` between parts) a wildcard source
    matches, as Go's filepath.Match: without it, wildcards are refused. `target`
    names the stage that is the image (`--target`; default the last): only the
    stages it needs (built on, copied from) are layers, as BuildKit builds only
    them, and they are build_only; `all_stages` keeps every stage, each an image.
    `dockerignore` says the context has a .dockerignore: the layers that import
    from the context filter their imports with it (`%dockerignore`); `match` must
    leave out what it excludes. `base_onbuild` maps a `bases` source to the
    ONBUILD instructions of its image config: a stage FROM it runs them first.
    Raises RecipeError naming the line for anything it cannot translate faithfully.
    """
    import dockerfile  # the official Go parser, wrapped

    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as e:
        raise RecipeError(f"the Dockerfile does not parse: {str(e).strip().splitlines()[0]}") from e
    return _Translator(text, name, build_args or {}, bases or {}, context,
                       platform or host_platform(), match, target, all_stages,
                       dockerignore, base_onbuild).run(commands)


def _platform_key(platform: str) -> tuple[str, str, str]:
    """os, arch, variant of an OCI platform (arm64's v8 and amd64's v1 are the defaults)."""
    os_, _, arch = platform.strip().lower().partition("/")
    arch, _, variant = arch.partition("/")
    if (arch, variant) in (("arm64", "v8"), ("amd64", "v1")):
        variant = ""
    return os_, arch, variant


_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm/v7", "armv6l": "arm/v6",
           "i686": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> str:
    """The host as an OCI platform, e.g. linux/amd64 (steps run on the host's kernel)."""
    import platform

    machine = platform.machine()
    return "linux/" + _GOARCH.get(machine, machine)


def dockerfile_notebook(text: str, name: str, **options) -> tuple[dict, list[str]]:
    """The notebook of Dockerfile `text` and the translation's warnings (options as
    `translate`). Cell ids are deterministic: the same Dockerfile gives the same notebook."""
    from stacker_kernel.recipe.notebook import KERNELSPEC, LANGUAGE_INFO

    t = translate(text, name, **options)
    # Plain nbformat 4.5 JSON, as nbformat.v4.new_notebook makes it: importing
    # nbformat (jsonschema, lark grammars) would be most of a cached build's time.
    cells = []
    for i, (kind, source) in enumerate(t.cells):
        cell: dict = {"id": hashlib.sha1(f"{name}\0{i}\0{source}".encode()).hexdigest()[:12],
                      "cell_type": kind, "metadata": {}, "source": source}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    nb = {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
          "metadata": {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}}
    return nb, t.warnings


def dockerfile_recipe(text: str, name: str, **options) -> tuple[Recipe, list[str]]:
    """The recipe of Dockerfile `text` (through its notebook, so a Dockerfile builds,
    exports and imports exactly as the notebook `dockerfile_notebook` gives)."""
    from stacker_kernel.recipe.notebook import recipe_from_notebook

    nb, warnings = dockerfile_notebook(text, name, **options)
    return recipe_from_notebook(nb, name), warnings
