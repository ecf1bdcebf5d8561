"""Shell state between the steps of a layer is the state between the lines of
one `run` script: aliases, traps, `set` options (and the user's `set -x`
trace, shown in the output), and functions where the shell can print them.

Real containers on real btrfs: busybox ash, Debian's dash, and bash as /bin/sh.
"""
from __future__ import annotations

import textwrap

import pytest

from stacker_kernel.container.runtime import Container, ContainerConfig
from stacker_kernel.container.step import (
    OutputFilter, ShellState, function_definitions, parse_aliases, trace_marker, xtrace_after,
)
from stacker_kernel.engine.build import build
from stacker_kernel.engine.session import BuildSession
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage.store import Store
from test_container import debian_tar, make_rootfs, run
from test_step import carry, workdir  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def busybox(busybox_tar, workdir):
    with Container.start(ContainerConfig(str(make_rootfs(busybox_tar, workdir, "busybox")))) as c:
        yield c


@pytest.fixture(scope="module")
def dash(workdir):
    with Container.start(ContainerConfig(str(make_rootfs(debian_tar(), workdir, "debian")))) as c:
        yield c


@pytest.fixture(scope="module")
def bash(workdir):
    """Debian with /bin/sh -> bash."""
    with Container.start(ContainerConfig(str(make_rootfs(debian_tar(), workdir, "debian-bash")))) as c:
        relink, out = run(c, "ln -sf bash /bin/sh.new && mv -f /bin/sh.new /bin/sh")
        assert relink.ok, out
        yield c


SHELLS = ["busybox", "dash", "bash"]


@pytest.fixture(params=SHELLS)
def shell(request):
    return request.getfixturevalue(request.param)


# --- unit ---------------------------------------------------------------------

def test_aliases_parse_as_each_shell_prints_them():
    dash_ash = "a='echo x'\nb='it'\"'\"'s\ntwo'\n"
    bash = "alias a='echo x'\nalias b='it'\\''s\ntwo'\n"
    assert parse_aliases(dash_ash) == parse_aliases(bash) == {"a": "echo x", "b": "it's\ntwo"}


def test_set_commands_turn_the_trace_on_and_off():
    assert xtrace_after("set -x", False)
    assert xtrace_after("set -eux", False)
    assert xtrace_after("set -o xtrace", False)
    assert not xtrace_after("set +x", True)
    assert not xtrace_after("set +o xtrace", True)
    assert xtrace_after("set -e", True)
    assert not xtrace_after("set -- -x", False)
    assert not xtrace_after("echo set -x", False)


def test_the_user_trace_is_output_and_the_wrapper_lines_are_not():
    m = trace_marker("tok")
    f = OutputFilter("n", "tok")
    out = f.feed(m + b". /proc/self/fd/11\n" + m + b"set -x\n" + m + b"echo hi\nhi\n"
                 + m + b"__sk_o=ehx\n" + m + b"set +vx\n")
    assert out == b"+ echo hi\nhi\n"
    assert f.user_trace


def test_a_state_without_new_parts_serializes_as_before():
    # ordinary steps keep their states, so their cache keys do not change
    assert ShellState(cwd="/tmp").to_json() == '{"cwd": "/tmp", "exported": {}, "options": "", "plain": {}}'


# --- every shell ----------------------------------------------------------------

def test_an_alias_carries(shell):
    result, out = carry(shell, "alias greet='echo hello'", "greet world")
    assert (result.ok, out) == (True, "hello world\n")


def test_an_alias_with_quotes_and_newlines_carries(shell):
    result, out = carry(shell, "alias two='echo \"it'\\''s\"\necho second'", "two")
    assert (result.ok, out) == (True, "it's\nsecond\n")


def test_a_trap_carries(shell):
    result, out = carry(shell, "trap 'echo caught USR1' USR1", "kill -USR1 $$\necho after")
    assert result.ok, out
    assert out == "caught USR1\nafter\n"


def test_an_exit_trap_runs_at_the_end_of_every_step_it_is_set_in(shell):
    first, out1 = run(shell, "trap 'echo cleanup' EXIT\necho one")
    second, out2 = run(shell, "echo two", first.state)
    third, out3 = run(shell, "trap - EXIT\necho three", second.state)
    assert (out1, out2, out3) == ("one\ncleanup\n", "two\ncleanup\n", "three\n")


def test_set_u_carries(shell):
    result, out = carry(shell, "set -u", "echo before\necho $NOT_SET_ANYWHERE\necho after")
    assert not result.ok
    assert "before" in out and "after" not in out


def test_the_users_set_x_trace_is_shown(shell):
    result, out = run(shell, "echo quiet\nset -x\necho loud\nset +x\necho quiet again")
    assert result.ok, out
    assert out == "quiet\n+ echo loud\nloud\n+ set +x\nquiet again\n"


def test_set_x_carries_and_the_wrapper_is_never_traced(shell):
    result, out = carry(shell, "X=1\nset -x", "echo traced", "echo $X")
    assert result.ok, out
    assert out == "+ echo 1\n1\n"


def test_a_failed_command_is_named_under_the_users_trace(shell):
    result, out = carry(shell, "set -x", "echo a\nfalse\necho b")
    assert result.failed_command == "false"
    assert out == "+ echo a\na\n+ false\n"


def test_set_x_turned_off_stays_off(shell):
    result, out = carry(shell, "set -x", "set +x", "echo plain")
    assert out == "plain\n"
    assert not result.state.user_trace


# --- pipefail: busybox and bash (dash has no pipefail) --------------------------

@pytest.mark.parametrize("name", ["busybox", "bash"])
def test_pipefail_carries(request, name):
    result, out = carry(request.getfixturevalue(name), "set -o pipefail", "false | true\necho not-reached")
    assert (result.ok, out) == (False, "")


def test_bash_traces_nested_levels_as_in_a_script(bash):
    result, out = carry(bash, "set -x", "x=$(echo a)")
    assert result.ok, out
    assert out == "++ echo a\n+ x=a\n"


# --- functions in dash and busybox ash: from the definitions in the scripts ----

def test_top_level_definitions_are_found_and_others_are_unclear():
    script = ("f() { echo hi; }\ng()\n{\n  echo \"}\"\n  x=${y}\n}; echo after\n"
              "if true; then\n  h() { :; }\nfi\nk() { :; }\nk() { echo; }\neval 'e() { :; }'\n")
    defined, unclear = function_definitions(script)
    assert defined == {"f": "f() { echo hi; }", "g": "g()\n{\n  echo \"}\"\n  x=${y}\n}"}
    assert unclear == {"h", "k", "e"}


def test_a_function_carries(shell):
    result, out = carry(shell, "greet() {\n  printf '%s\\n' \"hi $1\" 'it'\\''s }'\n}\necho defined",
                        "greet you")
    assert (result.ok, out) == (True, "hi you\nit's }\n")


def test_a_function_carries_through_later_steps_and_a_redefinition_wins(shell):
    result, out = carry(shell, "f() { echo one; }", "true", "f", "f() { echo two; }", "f")
    assert (result.ok, out) == (True, "two\n")


def test_an_unset_function_stays_unset(shell):
    result, out = carry(shell, "f() { echo f; }", "unset -f f", "f 2>/dev/null || echo gone")
    assert (result.ok, out) == (True, "gone\n")


def test_a_function_defined_in_an_if_does_not_carry_in_dash(dash):
    # dash cannot print it and the script alone does not say which body is in effect
    first, note = run(dash, "if true; then f() { echo a; }; else f() { echo b; }; fi\ng() { :; }\nif false; then h() { :; }; fi")
    result, out = run(dash, "f 2>&1 || true", first.state)
    assert note == ("note: function f will not exist in the next cell: /bin/sh cannot print functions, so only one"
                    ' top-level "f() { ...; }" line carries; define it that way, or again in the cell that calls it\n')
    assert "not found" in out


# --- a layer's cells and their concatenation as one `run:` ---------------------

CELLS = [
    "alias say='echo said'\ntrap 'echo got-usr1' USR1\ngreet() { echo \"hello $1\"; }\n"
    "set -o pipefail\nset -u\nX=1\nset -x\n",
    # (members of a traced pipeline trace in no fixed order: the pipeline runs untraced)
    "say one\nset +x\nkill -USR1 $$\nif false | true; then echo no-pipefail; else echo pipefail; fi\n"
    "set -x\ngreet \"$X\"\n",
    "echo ${UNSET_VAR-default}\n",
]


def test_cells_of_a_layer_behave_as_their_concatenation_as_one_run(storage, busybox_tar, busybox_oci, tmp_path):
    with Store.open(storage) as store:
        session = BuildSession.open(store, str(tmp_path / "nb.ipynb"), resume=False)
        try:
            session.begin_layer(Layer(name="nb", from_=ImageSource(type="tar", url=str(busybox_tar))))
            cells = []
            for i, cell in enumerate(CELLS):
                out: list[str] = []
                outcome = session.run_step(cell, f"c{i}", on_output=out.append)
                assert outcome.ok, outcome.message
                cells.append("".join(out))
            unset = session.run_step("echo $UNSET_VAR", "c9", on_output=lambda s: None)
        finally:
            session.close()
        yaml = tmp_path / "stacker.yaml"
        script = "".join(CELLS)
        yaml.write_text("l:\n  from:\n    type: oci\n    url: ${{BUSYBOX_OCI}}\n  run: |\n"
                        + textwrap.indent(script, "    "))
        streamed: list[str] = []
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, out=lambda s: None,
              stream=streamed.append)
    assert "".join(cells) == "".join(streamed)
    assert cells[1] == "+ echo said one\nsaid one\n+ set +x\ngot-usr1\npipefail\n+ greet 1\n+ echo 'hello 1'\nhello 1\n"
    assert not unset.ok  # set -u carried


def test_set_x_after_set_x_was_turned_off_is_shown(shell):
    result, out = run(shell, "set -x\necho a\nset +x\necho b\nset -x\necho c\nfalse\necho d")
    assert out == "+ echo a\na\n+ set +x\nb\n+ echo c\nc\n+ false\n"
    assert result.failed_command == "false"


def test_a_state_with_every_part_survives_its_json():
    # the store keeps states as JSON: a cache hit or a reopened notebook goes on from it
    state = ShellState(cwd="/x", options="xu-o pipefail", aliases={"a": "echo 'q'"}, traps="trap -- 'x' USR1",
                       functions="f () \n{ \n    :\n}", sh_functions={"g": "g() { :; }"})
    assert ShellState.from_json(state.to_json()) == state
    assert state.user_trace and not ShellState(options="u-o pipefail").user_trace


@pytest.mark.rootful
def test_rootful_functions_aliases_and_the_trace_carry(busybox):
    result, out = carry(busybox, "f() { id -u; }\nalias g='echo g'\nset -x", "f\ng")
    assert result.ok, out
    assert out == "+ f\n+ id -u\n0\n+ echo g\ng\n"
