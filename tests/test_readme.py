"""Every command in the README works as written for a new user account (issue 26):
the programs its shell blocks start are on a fresh login's PATH (`jupyter lab`
included), its scripts exist, and each `stacker-kernel` line names a real
subcommand with real flags."""
import os
import re
import shlex
import subprocess
from pathlib import Path

from stacker_kernel.cli import COMMANDS, build_parser

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
# A new account's PATH (Debian's /etc/profile for a user; what the test runner gives too).
NEW_USER_PATH = "/usr/local/bin:/usr/bin:/bin"


def _shell_lines() -> list[str]:
    """The lines of the README's ```sh blocks, continuation lines joined, comments cut."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.replace("\n    ", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _program(line: str) -> str:
    words = shlex.split(line.replace("|", " | ").replace("<", " < "))
    return words[1] if words[0] == "sudo" else words[0]


def test_the_readme_has_shell_blocks():
    assert len(_shell_lines()) >= 15


def test_every_program_the_readme_runs_is_on_a_new_users_path_or_in_the_repo():
    for line in _shell_lines():
        program = _program(line)
        if "/" in program:
            assert os.access(ROOT / program, os.X_OK), line
        elif program == "make":
            target = line.split()[1]
            assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), re.M), line
        else:
            found = subprocess.run(["sh", "-c", f"command -v {shlex.quote(program)}"], capture_output=True,
                                   text=True, env={"PATH": NEW_USER_PATH})
            assert found.returncode == 0, f"{program} (README: {line}) is not on {NEW_USER_PATH}"


def test_jupyter_lab_runs_from_a_new_users_path():
    proc = subprocess.run(["jupyter", "lab", "--version"], capture_output=True, text=True, timeout=60,
                          env={"PATH": NEW_USER_PATH, "HOME": os.environ.get("HOME", "/tmp")})
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\s*", proc.stdout)


def test_every_stacker_kernel_line_names_a_real_subcommand_and_flags():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    names = {c.name for c in COMMANDS}
    for line in _shell_lines():
        if _program(line) != "stacker-kernel":
            continue
        words = line.split()
        words = words[words.index("stacker-kernel") + 1:]
        sub = words[0]
        assert sub in names, line
        known = {s for action in subparsers[sub]._actions for s in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", " ".join(words[1:])):
            assert flag in known, f"{flag} is no option of stacker-kernel {sub} (README: {line})"
