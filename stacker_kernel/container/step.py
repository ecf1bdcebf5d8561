"""The step protocol between the engine and the container's init, engine side.

A step is one build script. Non-shebang steps run as `/bin/sh -e WRAPPER`: the
wrapper (made here) restores the shell state of the previous step, traces each
command with a marker (so a failure names its command), sources the user's
script and, only if the script reaches its end, dumps the new state to a pipe.
Init answers each step with the output bytes followed by one sentinel
`ESC ] 5379 ; NONCE ; STATUS ; BASE64(STATE) BEL`; the nonce is known only to
the engine and init, so a step cannot fake its end.

Commands to init travel as one line `base64(json)\\n` each, so any script size
and any byte fits through the raw pty.
"""
from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import dataclass, field, replace

#: the OSC number that opens every sentinel init writes
SENTINEL_OSC = b"\x1b]5379;"
#: nonce;status;base64(state)[;flags] (flags: "pids" when the step ran into the process limit)
SENTINEL_RE = re.compile(rb"\x1b\]5379;([^;\x07]*);(-?\d+);([A-Za-z0-9+/=]*)(?:;([a-z,]*))?\x07")
#: first byte of every trace line (bash repeats PS4's first character per nesting level)
TRACE_LEAD = b"\x1e"
#: fds the step's shell inherits (dash redirects only single-digit fds, hence 9)
STATE_FD = 9
WRAPPER_FD = 10
SCRIPT_FD = 11
ROOT_HOME = "/root"  # every step's HOME (stacker's steps run as root); a USER step gets its own

# Variables the shell owns or recomputes: never saved, never restored.
SPECIAL_VARS = (
    "PWD OLDPWD OPTIND LINENO RANDOM SECONDS PS1 PS2 PS4 _ SHLVL "
    "FUNCNAME HISTCMD DIRSTACK PIPESTATUS IFS"
).split()
_SPECIAL_PATTERN = "|".join(SPECIAL_VARS + ["BASH*", "__sk_*"])
# Variables some shells own (bash: read-only UID, EUID, PPID...; dash: PPID) that are
# ordinary in others, and often a Dockerfile's ARG or ENV (ARG UID=1000): saved
# when exported (as a build argument is), restored where the shell lets them be set.
GUARDED_VARS = "UID EUID GROUPS PPID SHELLOPTS BASHOPTS".split()
_GUARDED_PATTERN = "|".join(GUARDED_VARS)
#: `set` options the wrapper applies (x is the wrapper's too: see XTRACE)
CARRIED_OPTIONS = "aCfuv"
#: the letter a ShellState's options carry when the user's own `set -x` is on
#: (the shell always traces for the wrapper, so only the output filter knows)
XTRACE = "x"
#: the option without a letter that carries too (bash, busybox; not dash)
PIPEFAIL = "-o pipefail"
DEFAULT_IFS = " \t\n"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class ShellState:
    """What carries from step to step within a layer.

    `options` lists the `set` letters to apply on top of a fresh `sh -e`
    (letters among "aCfuv", and "x" when the user's own trace is on), plus
    "+e" when the script turned errexit off, plus "-o pipefail" when the
    script turned pipefail on.

    `aliases` and `traps` (as `trap` prints them) carry in every shell.
    `functions` is what bash's `declare -f` prints. dash and busybox ash
    cannot print a function, so `sh_functions` holds, per function that
    exists after the step, the text of its definition in a step script:
    see `function_definitions` for which definitions qualify.
    """

    cwd: str = "/"
    exported: dict[str, str] = field(default_factory=dict)
    plain: dict[str, str] = field(default_factory=dict)
    options: str = ""
    umask: str = ""  # as `umask` prints it; "" = the step default (0022)
    aliases: dict[str, str] = field(default_factory=dict)
    traps: str = ""
    functions: str = ""
    sh_functions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        d = {"cwd": self.cwd, "exported": self.exported, "plain": self.plain, "options": self.options}
        # only when set: states (and cache keys) of ordinary steps stay as they were
        for key in ("umask", "aliases", "traps", "functions", "sh_functions"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def of_snapshot(cls, s: str) -> "ShellState | None":
        """The state a snapshot recorded; None ("null") before any step of its layer
        ran (a landing of dest imports, a failed first step), so the next step starts
        from the build environment, not from an empty one."""
        return None if s == "null" else cls.from_json(s)

    @classmethod
    def from_json(cls, s: str) -> "ShellState":
        d = json.loads(s)
        return cls(cwd=d.get("cwd", "/"), exported=dict(d.get("exported", {})),
                   plain=dict(d.get("plain", {})), options=d.get("options", ""),
                   umask=d.get("umask", ""), aliases=dict(d.get("aliases", {})),
                   traps=d.get("traps", ""), functions=d.get("functions", ""),
                   sh_functions=dict(d.get("sh_functions", {})))

    def with_user_trace(self, on: bool) -> "ShellState":
        """This state with the user's `set -x` on or off (the output filter knows which)."""
        options = self.options.replace(XTRACE, "")
        return replace(self, options=XTRACE + options if on else options)

    @property
    def user_trace(self) -> bool:
        return XTRACE in self.options.replace(PIPEFAIL, "")

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """The process environment of a shebang step run in this state: the
        exported variables of the state, plus the entries of `env` a shell
        cannot name (so the state cannot track them). Other names of `env`
        that the state lacks were unset by an earlier step and stay unset.
        """
        out = {k: v for k, v in env.items() if not _NAME_RE.match(k) or k in SPECIAL_VARS}
        out.update(self.exported)
        return out


@dataclass
class StepResult:
    """The outcome of one step, as the engine and the kernel report it."""

    status: int
    ok: bool
    state: ShellState | None
    failed_command: str | None
    interrupted: bool
    container_died: bool
    duration: float
    output_bytes: int
    message: str

    def error_line(self) -> str:
        """One line for the user: empty when the step succeeded."""
        return "" if self.ok else self.message


def failure_message(status: int, has_state: bool, failed_command: str | None,
                    interrupted: bool, container_died: bool) -> str:
    """The one-line explanation of a failed step ("" when it succeeded)."""
    if container_died:
        return "the container died during the step: the step failed and the container must be restarted"
    if interrupted:
        return f"step interrupted (status {status})"
    at = f" at `{failed_command}`" if failed_command else ""
    if status == 0 and not has_state:
        return "the step called exit before its end: remove the `exit` (a step must run to its last line)"
    if status == 0:
        return ""
    if 128 < status <= 128 + 64:  # the shell's 128+N for signal N; 255 is an exit status
        return f"step killed by signal {status - 128} (status {status}){at}"
    if status == 1 and failed_command and re.match(r"\s*read\b", failed_command):
        # stdin is /dev/null, as in stacker's `run`: `read` meets end of input at once.
        return f"step failed with status 1{at}: build steps have no stdin (it is /dev/null, as in stacker); " \
               "give the value in the script or with %build_env"
    return f"step failed with status {status}{at}"


#: first line of a step that runs as another user (a cell's `%user USER[:GROUP]`;
#: recipe/model.USER_MARKER writes it)
USER_MARKER = "#%user "


#: a first line of a step with a mount of its own (recipe/model.MOUNT_MARKER)
MOUNT_MARKER = "#%mount "


def step_directives(script: str) -> tuple[str | None, list[str], str]:
    """The user a step runs as (None: root), its mount specs, and its script
    without the marker lines."""
    user, mounts = None, []
    while script.startswith((USER_MARKER, MOUNT_MARKER)):
        first, _, script = script.partition("\n")
        if first.startswith(USER_MARKER):
            user = first[len(USER_MARKER):].strip() or None
        else:
            mounts.append(first[len(MOUNT_MARKER):].strip())
    return user, mounts, script


def step_user(script: str) -> tuple[str | None, str]:
    """The user a step runs as (None: root) and its script without the marker lines."""
    user, _, body = step_directives(script)
    return user, body


def is_shebang(script: str) -> bool:
    """True when the step chooses its own interpreter (`#!` first line), as in stacker."""
    return step_user(script)[1].startswith("#!")


def sh_quote(value: str) -> str:
    """Single-quote `value` for any POSIX shell."""
    return "'" + value.replace("'", "'\\''") + "'"


def _restore_lines(state: ShellState, env: dict[str, str]) -> list[str]:
    lines = [f"cd -- {sh_quote(state.cwd)}"]
    if re.fullmatch(r"[0-7]{1,4}", state.umask or ""):
        lines.append(f"umask {state.umask}")
    gone = [k for k in env if _NAME_RE.match(k) and k not in SPECIAL_VARS
            and k not in state.exported and k not in state.plain]
    if gone:
        lines.append("unset -v " + " ".join(sorted(gone)))
    for name, value in sorted(state.plain.items()):
        if _NAME_RE.match(name) and name not in SPECIAL_VARS + GUARDED_VARS:
            lines.append(f"{name}={sh_quote(value)}")
    for name, value in sorted(state.exported.items()):
        if name in GUARDED_VARS:  # a read-only one would end the shell: try in a subshell first
            lines.append(f"if ({name}=) 2>/dev/null; then {name}={sh_quote(value)}; export {name}; fi")
        elif _NAME_RE.match(name) and name not in SPECIAL_VARS:
            lines.append(f"{name}={sh_quote(value)}; export {name}")
    if "IFS" in state.plain:
        lines.append(f"IFS={sh_quote(state.plain['IFS'])}")
    for name, value in sorted(state.aliases.items()):
        lines.append("alias " + sh_quote(f"{name}={value}"))
    if state.functions:
        # bash printed them; a step whose /bin/sh is no longer bash skips them
        lines.append(f"if command -v declare >/dev/null; then eval {sh_quote(state.functions)}; fi")
    for name, text in sorted(state.sh_functions.items()):
        lines.append(f"eval {sh_quote(text)}")
    if state.traps:
        lines.append(f"eval {sh_quote(state.traps)}")
    return lines


def _option_commands(options: str) -> list[str]:
    """The `set` commands that apply `options` (a ShellState's) on top of `sh -e`."""
    cmds = []
    rest = options.replace(PIPEFAIL, "")
    letters = "".join(c for c in rest.replace("+e", "") if c in CARRIED_OPTIONS)
    if letters:
        cmds.append(f"set -{letters}")
    if "+e" in rest:
        cmds.append("set +e")
    if PIPEFAIL in options:
        cmds.append("set -o pipefail")
    return cmds


# Only builtins after the user's script: the rootfs may lack cat, env, test.
_POSTAMBLE = r"""printf 'u\0%s\0' "$(umask)" >&@STATE_FD@
{
printf 't\0'; trap; printf '\0a\0'; alias; printf '\0'
case $(command -v declare) in
  declare) printf 'f\0'; declare -f; printf '\0' ;;
  *) for __sk_f in @FUNCTIONS@; do
       case $(command -V "$__sk_f" 2>/dev/null) in *function*) printf 'F\0%s\0' "$__sk_f" ;; esac
     done ;;
esac
} >&@STATE_FD@
case $(command -v declare) in declare) ;; *)
  for __sk_f in @UNCLEAR@; do
    case $(command -V "$__sk_f" 2>/dev/null) in *function*)
      printf 'note: function %s will not exist in the next cell: /bin/sh cannot print functions, so only one top-level "%s() { ...; }" line carries; define it that way, or again in the cell that calls it\n' "$__sk_f" "$__sk_f" ;;
    esac
  done ;;
esac
case $(set +o) in *"set -o pipefail"*) __sk_o="$__sk_o pipefail" ;; esac
__sk_ifs_set=${IFS+x}
__sk_ifs=${IFS-}
__sk_set=$(set)
__sk_exp=$(export -p)
IFS='
'
set -f
__sk_x=' '
for __sk_l in $__sk_exp; do
  case $__sk_l in
    'declare -x '*) __sk_l=${__sk_l#declare -x } ;;
    'export '*) __sk_l=${__sk_l#export } ;;
    *) continue ;;
  esac
  __sk_x="$__sk_x${__sk_l%%=*} "
done
{
printf 'c\0%s\0o\0%s\0' "$PWD" "$__sk_o"
for __sk_l in $__sk_set; do
  case $__sk_l in [A-Za-z_]*=*) ;; *) continue ;; esac
  __sk_n=${__sk_l%%=*}
  case $__sk_n in *[!A-Za-z0-9_]*|@SPECIAL@) continue ;; esac
  case $__sk_n in @GUARDED@) case $__sk_x in *" $__sk_n "*) ;; *) continue ;; esac ;; esac
  eval "__sk_s=\${$__sk_n+x}"
  case $__sk_s in x) ;; *) continue ;; esac
  case $__sk_x in *" $__sk_n "*) __sk_t=x ;; *) __sk_t=v ;; esac
  eval "printf '%s\0%s\0%s\0' \"\$__sk_t\" \"\$__sk_n\" \"\${$__sk_n}\""
done
case $__sk_ifs_set in x)
  case $__sk_ifs in @DEFAULT_IFS@) ;; *) printf 'v\0IFS\0%s\0' "$__sk_ifs" ;; esac ;;
esac
printf 'e\0'
} >&@STATE_FD@
exit 0
""".replace("@SPECIAL@", _SPECIAL_PATTERN).replace("@GUARDED@", _GUARDED_PATTERN).replace("@DEFAULT_IFS@", sh_quote(DEFAULT_IFS)) \
   .replace("@STATE_FD@", str(STATE_FD))


def trace_marker(token: str, quoted: bool = True, nested: bool = False) -> bytes:
    """The PS4 of a step: a line that starts with it is a trace line, not output.

    `quoted` says the shell quotes the arguments it traces (bash, busybox);
    dash does not, so a quote in its trace lines is a literal byte. `nested`
    says the shell (bash) traces the sourced script one level deeper than
    the wrapper, so the user's own trace shows one level less.
    """
    return TRACE_LEAD + b"sk" + token.encode() + (b"n " if nested else b" " if quoted else b"u ")


def build_wrapper(state: ShellState | None, env: dict[str, str], trace_token: str,
                  functions: tuple[str, ...] = (), unclear: tuple[str, ...] = (),
                  user_home: bool = False) -> str:
    """The `/bin/sh -e` script that restores `state`, traces and sources the
    user's script from fd SCRIPT_FD, and dumps the state after it to fd STATE_FD.

    `env` is the environment the shell starts with; its names that `state`
    lacks are unset (an earlier step unset them). `trace_token` must differ
    from the sentinel nonce: the script can read PS4. `functions` are the
    names whose existence as functions the dump reports (for `sh_functions`);
    `unclear` those that get a note when they exist (they cannot carry).
    `user_home`: the step runs as another user whose home init gives in
    `__sk_home`: HOME is that home during the step (as Docker sets it for a
    RUN when the image's environment has no HOME), and what it was after it,
    unless the script set HOME itself.
    """
    lines = _restore_lines(state, env) if state is not None else []
    after = ""
    if user_home:
        lines.append('__sk_hs=${HOME+x}; __sk_h=${HOME-}; HOME=$__sk_home; export HOME')
        after = ('case $HOME in "$__sk_home") case $__sk_hs in x) HOME=$__sk_h ;; *) unset HOME ;; '
                 'esac ;; esac\n')
    quoted, plain = (sh_quote(trace_marker(trace_token, q).decode()) for q in (True, False))
    nested = sh_quote(trace_marker(trace_token, nested=True).decode())
    # dash traces arguments unquoted, bash the sourced script one level deeper: PS4 tells the filter
    lines.append(f"""case $(exec 2>&1; PS4=; set -x; : "'") in ": '") PS4={plain} ;; *) PS4={quoted} ;; esac""")
    lines.append(f"case ${{BASH_VERSION-}} in ?*) PS4={nested} ;; esac")
    # One line from the options to `set +vx`: a shell echoes the lines it
    # reads under `set -v`, and our lines are no output of the step.
    run = _option_commands(state.options) if state is not None else []
    run += ["set -x", f". /proc/self/fd/{SCRIPT_FD}", "__sk_o=$-", "set +vx"]
    lines.append("; ".join(run))
    def words(names: tuple[str, ...]) -> str:
        return " ".join(n for n in names if _NAME_RE.match(n))
    return ("\n".join(lines) + "\n" + after
            + _POSTAMBLE.replace("@FUNCTIONS@", words(functions)).replace("@UNCLEAR@", words(unclear)))


def parse_state_dump(data: bytes) -> ShellState | None:
    """Decode what the wrapper's postamble wrote; None if it is incomplete."""
    parts = data.split(b"\0")
    if not parts or parts[-1] != b"":
        return None
    parts = [p.decode("utf-8", "surrogateescape") for p in parts[:-1]]
    cwd, opts, umask, traps, alias_text, functions = "/", "", "", "", "", ""
    exported: dict[str, str] = {}
    plain: dict[str, str] = {}
    sh_functions: dict[str, str] = {}
    complete = False
    i = 0
    try:
        while i < len(parts):
            tag = parts[i]
            if tag == "c":
                cwd, opts, i = parts[i + 1], parts[i + 3], i + 4
            elif tag == "u":
                umask, i = parts[i + 1].strip(), i + 2
            elif tag == "t":
                traps, i = parts[i + 1].strip(), i + 2
            elif tag == "a":
                alias_text, i = parts[i + 1], i + 2
            elif tag == "f":
                functions, i = parts[i + 1].strip(), i + 2
            elif tag == "F":
                sh_functions[parts[i + 1]] = ""  # the text comes from the scripts: see carry_functions
                i += 2
            elif tag in ("v", "x"):
                (exported if tag == "x" else plain)[parts[i + 1]] = parts[i + 2]
                i += 3
            elif tag == "e":
                complete, i = True, i + 1
            else:
                return None
    except IndexError:
        return None
    if not complete:
        return None
    opts, _, extra = opts.partition(" ")  # `$-`, then the named options that are on
    options = "".join(c for c in CARRIED_OPTIONS if c in opts)
    if "e" not in opts:
        options += "+e"
    if "pipefail" in extra.split():
        options += PIPEFAIL
    if umask.lstrip("0") == "22":
        umask = ""  # the default: keep states (and cache keys) of ordinary steps unchanged
    return ShellState(cwd=cwd, exported=exported, plain=plain, options=options, umask=umask,
                      aliases=parse_aliases(alias_text), traps=traps, functions=functions,
                      sh_functions=sh_functions)


_DEF_RE = re.compile(r"(?<![A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]*)[ \t]*\([ \t]*\)")
_LINE_DEF_RE = re.compile(r"[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*\([ \t]*\)[ \t\n]*(?=\{)")
# the `}` that may close a brace group: a word of its own after `;`, `&` or a newline
_CLOSE_RE = re.compile(r"(?<=[;&\n \t])\}(?=[ \t\n;&|<>)]|\Z)")


def _parses(text: str) -> bool:
    """Whether `text` is complete shell syntax (the host's `sh -n`)."""
    import subprocess  # here: a cached build's start does without it

    r = subprocess.run(["/bin/sh", "-n"], input=text.encode("utf-8", "surrogateescape"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def function_definitions(script: str) -> tuple[dict[str, str], set[str]]:
    """The function definitions of a step script that can carry to the next
    step of a shell that cannot print functions (dash, busybox ash), and the
    names the script defines in other ways.

    A definition carries when it is the only definition of its name in the
    script, starts a line at the top level (the lines before it are complete
    syntax, so it is in no `if`, loop or here-document) and its body is a
    brace group: `name() { ...; }`. Its text ends at the first `}` that makes
    it complete syntax. Any other definition of a name (in an `if`, in a
    string for `eval`, twice) makes the name unclear: it does not carry.
    """
    if is_shebang(script):
        return {}, set()
    counts: dict[str, int] = {}
    for m in _DEF_RE.finditer(script):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    if not counts:
        return {}, set()
    clean: dict[str, str] = {}
    offset = 0
    for line in script.splitlines(keepends=True):
        m = _LINE_DEF_RE.match(script, offset)
        if m and counts.get(m.group(1)) == 1 and _parses(script[:offset]):
            text = _definition_text(script, offset, m.end())
            if text is not None:
                clean[m.group(1)] = text
        offset += len(line)
    return clean, set(counts) - set(clean)


def _definition_text(script: str, start: int, body: int) -> str | None:
    for close in _CLOSE_RE.finditer(script, body + 1):
        text = script[start:close.end()].strip()
        if _parses(text):
            return text
    return None


def functions_to_check(script: str, before: ShellState | None
                       ) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """The carrying definitions of `script`; the names whose existence the
    step's dump reports: those and the functions carried into the step,
    except the names the script defines in a way that cannot carry; and
    those names (unclear)."""
    defined, unclear = function_definitions(script)
    names = (set(before.sh_functions) if before else set()) | set(defined)
    return defined, tuple(sorted(names - unclear)), tuple(sorted(unclear))


def carry_functions(after: ShellState, before: ShellState | None, defined: dict[str, str]) -> ShellState:
    """`after` with the text of every function of `sh_functions` (names the dump found):
    from this step's `defined`, else from the state before."""
    if not after.sh_functions:
        return after
    earlier = before.sh_functions if before else {}
    texts = {n: defined.get(n) or earlier.get(n, "") for n in after.sh_functions}
    return replace(after, sh_functions={n: t for n, t in texts.items() if t})


def parse_aliases(text: str) -> dict[str, str]:
    """Aliases as `alias` prints them: `name='value'` words (bash: each after `alias`)."""
    try:
        words = shlex.split(text)
    except ValueError:
        return {}
    return dict(w.split("=", 1) for w in words if "=" in w)


def encode_command(cmd: dict) -> bytes:
    """One protocol line for init."""
    return base64.b64encode(json.dumps(cmd).encode()) + b"\n"


def decode_command(line: bytes) -> dict:
    return json.loads(base64.b64decode(line.strip()))


def format_sentinel(nonce: str, status: int, state: bytes, flags: str = "") -> bytes:
    tail = f";{flags}".encode() if flags else b""
    return SENTINEL_OSC + f"{nonce};{status};".encode() + base64.b64encode(state) + tail + b"\x07"


@dataclass
class Sentinel:
    nonce: str
    status: int
    state: bytes
    flags: tuple[str, ...] = ()


class OutputFilter:
    """Splits the pty byte stream of one step into output, trace lines and the
    end sentinel. Bytes that might begin a trace marker or the sentinel are
    held back until they can be decided, so split reads never leak markers.

    Shells write a trace line in several write() calls, so the lines of a
    pipeline's members (traced at once by forked shells) interleave: every
    marker opens one trace line, and bytes are swallowed until as many
    newlines have closed them.

    The user's own `set -x` trace is output: `user_trace` follows the `set`
    commands the trace shows, and while it is on, every trace line but the
    wrapper's own goes to the output as `+ command` (PS4's default).
    """

    def __init__(self, nonce: str, trace_token: str | None, user_trace: bool = False) -> None:
        self.nonce = nonce
        # after the lead byte(s): the marker of quoting shells, dash's, bash's
        self.markers = (tuple(trace_marker(trace_token, q)[1:] for q in (True, False))
                        + (trace_marker(trace_token, nested=True)[1:],)) if trace_token else ()
        self.user_trace = user_trace
        self._untraced = False  # the last trace line turned the shell's tracing off
        self._sourced = False  # the first trace line, the wrapper's `.` of the script, went by
        self._plain = False  # the open trace lines come from a shell that does not quote
        self._level = 0  # nesting level of the trace line, as the user's PS4 would show it
        self.last_trace: str | None = None
        self.sentinel: Sentinel | None = None
        self._held = b""
        self._open_lines = 0  # trace lines begun and not yet ended by a newline
        self._trace = bytearray()
        self._quote: str | None = None  # quote open in the current trace line
        self._escape = False

    def feed(self, data: bytes) -> bytes:
        """Output bytes of `data` that are decided; sets `sentinel` at the end."""
        buf = self._held + data
        self._held = b""
        out = bytearray()
        i = 0
        while i < len(buf) and self.sentinel is None:
            j = _next_special(buf, i)
            if self._open_lines:
                nl = self._trace_end(buf, i, len(buf) if j < 0 else j)
                if nl is not None:
                    self._trace += buf[i:nl]
                    self._open_lines -= 1
                    if not self._open_lines:
                        self.last_trace = self._trace.decode("utf-8", "replace")
                        out += self._user_trace_line(bytes(self._trace))
                        self._trace.clear()
                    i = nl + 1
                    continue
            end = len(buf) if j < 0 else j
            (self._trace if self._open_lines else out).extend(buf[i:end])
            if j < 0:
                break
            consumed = self._special(buf, j)
            if consumed is None:  # undecidable yet: hold the rest
                self._held = buf[j:]
                break
            if consumed == 0:  # not ours: an ordinary byte
                (self._trace if self._open_lines else out).extend(buf[j:j + 1])
                i = j + 1
            else:
                i = j + consumed
        return bytes(out)

    def _trace_end(self, buf: bytes, i: int, stop: int) -> int | None:
        """Index of the newline in buf[i:stop] that ends the open trace line.

        A newline inside the shell's quoting of an argument ('...', "...",
        bash's $'...') is part of the line: the scan keeps the quote state
        across calls, so every byte of a trace line is scanned once.
        """
        if self._plain:
            nl = buf.find(b"\n", i, stop)
            return None if nl < 0 else nl
        q, esc = self._quote, self._escape
        for k in range(i, stop):
            c = buf[k]
            if esc:
                esc = False
            elif c == 0x5C and q != "'":  # backslash escapes, except in '...'
                esc = True
            elif q is None:
                if c == 0x27:
                    q = "$'" if k > 0 and buf[k - 1] == 0x24 else "'"
                elif c == 0x22:
                    q = '"'
                elif c == 0x0A:
                    self._quote, self._escape = None, False
                    return k
            elif (c == 0x27 and q in ("'", "$'")) or (c == 0x22 and q == '"'):
                q = None
        self._quote, self._escape = q, esc
        return None

    def flush(self) -> bytes:
        """Whatever is still held (the stream ended without a sentinel)."""
        held, self._held = self._held, b""
        return held

    def _special(self, buf: bytes, j: int) -> int | None:
        """Bytes consumed at buf[j] (0: ordinary byte), or None to wait for more."""
        rest = buf[j:]
        if rest[:1] == b"\x1b":
            head = SENTINEL_OSC + self.nonce.encode() + b";"
            if not head.startswith(rest[:len(head)]):
                return 0  # not our sentinel (another nonce: a step cannot fake it)
            end = rest.find(b"\x07")
            if end < 0:
                return None  # ours: the state may be long, wait for its end
            m = SENTINEL_RE.match(rest[:end + 1])
            if not m:
                return 0
            self.sentinel = Sentinel(self.nonce, int(m.group(2)), base64.b64decode(m.group(3)),
                                     tuple((m.group(4) or b"").decode().split(",")) if m.group(4) else ())
            return end + 1
        if not self.markers:
            return 0
        k = 0
        while k < len(rest) and rest[k:k + 1] == TRACE_LEAD:
            k += 1  # bash repeats the lead per nesting level
        tail = rest[k:]
        for marker in self.markers:
            if len(tail) < len(marker) and marker.startswith(tail):
                return None
        marker = next((m for m in self.markers if tail.startswith(m)), None)
        if marker is None:
            return 0
        self._plain = marker is self.markers[1]
        if self._open_lines:
            self._trace += b" | "
        else:
            self._level = k - (marker is self.markers[2])
        self._open_lines += 1
        return k + len(marker)

    def _user_trace_line(self, text: bytes) -> bytes:
        """The output a finished trace line makes: itself while the user's trace is on."""
        wrapper = (self._level < 1 or text in _WRAPPER_TRACES or text.startswith(b"__sk_o=")
                   or (not self._sourced and text.startswith(b". ")))  # the `.` of the user's script
        self._sourced = True
        if wrapper:
            return b""
        if self._untraced:  # the shell traces again: the user's own `set -x` ran
            self.user_trace, self._untraced = True, False
        shown = self.user_trace
        self.user_trace = xtrace_after(text.decode("utf-8", "replace"), shown)
        # after a `set +x` the shell traces nothing, not even the `set -x` that turns it on again
        self._untraced = not xtrace_after(text.decode("utf-8", "replace"), True)
        return b"+" * self._level + b" " + text + b"\n" if shown else b""


#: trace lines of the wrapper's commands after the user's script
_WRAPPER_TRACES = (b"set +vx",)


def xtrace_after(command: str, on: bool) -> bool:
    """Whether tracing is on after the traced `command` (a `set` turns it on or off)."""
    words = command.split()
    if words[:1] != ["set"]:
        return on
    it = iter(words[1:])
    for w in it:
        if w in ("-o", "+o"):
            if next(it, "") == "xtrace":
                on = w == "-o"
        elif w[:1] in ("-", "+") and w not in ("-", "--"):
            if "x" in w[1:]:
                on = w[0] == "-"
        else:
            break
    return on


def _next_special(buf: bytes, start: int) -> int:
    a = buf.find(b"\x1b", start)
    b = buf.find(TRACE_LEAD, start)
    if a < 0:
        return b
    if b < 0:
        return a
    return min(a, b)
