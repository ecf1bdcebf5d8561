"""The step protocol: status, output streaming, shell state carry, interrupts.

Real containers on real btrfs subvolumes (busybox, and Debian minbase for dash
and bash); the pure parts (output filter, state dump) also get unit tests.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from stacker_kernel.container.runtime import Container, ContainerConfig
from stacker_kernel.container.step import (
    OutputFilter, ShellState, build_wrapper, format_sentinel, parse_state_dump, trace_marker,
)
from test_container import ENV, debian_tar, make_rootfs, remove_storage_dir, run, storage_dir


@pytest.fixture(scope="module")
def workdir():
    root = storage_dir()
    yield root
    remove_storage_dir(root)


@pytest.fixture(scope="module")
def container(busybox_tar, workdir):
    with Container.start(ContainerConfig(str(make_rootfs(busybox_tar, workdir, "busybox")),
                                         interrupt_grace=1.0)) as c:
        yield c


@pytest.fixture(scope="module")
def debian(workdir):
    with Container.start(ContainerConfig(str(make_rootfs(debian_tar(), workdir, "debian")))) as c:
        yield c


def carry(container: Container, *scripts: str):
    """Run scripts as consecutive steps of one layer; the last (result, output)."""
    state = None
    for script in scripts[:-1]:
        result, out = run(container, script, state)
        assert result.ok, out
        state = result.state
    return run(container, scripts[-1], state)


# --- unit: the output filter and the state dump ------------------------------

def test_filter_removes_trace_lines_split_across_reads():
    f = OutputFilter("n", "tok")
    data = b"out1\n" + trace_marker("tok") + b"false\nout2" + format_sentinel("n", 1, b"")
    out = b"".join(f.feed(data[i:i + 3]) for i in range(0, len(data), 3))
    assert out == b"out1\nout2"
    assert f.last_trace == "false"
    assert f.sentinel.status == 1


def test_filter_removes_interleaved_trace_lines_of_a_pipeline():
    m = trace_marker("tok")
    f = OutputFilter("n", "tok")
    out = f.feed(b"a\n" + m + b"cut" + m + b" -d:\n" + b"tr\nb\n")
    assert out == b"a\nb\n"


def test_filter_ignores_a_sentinel_with_another_nonce():
    f = OutputFilter("real", None)
    out = f.feed(format_sentinel("fake", 0, b"") + b"x")
    assert f.sentinel is None
    assert out.endswith(b"x")


def test_incomplete_state_dump_is_no_state():
    assert parse_state_dump(b"c\0/\0o\0e\0v\0X\0") is None
    assert parse_state_dump(b"c\0/tmp\0o\0e\0e\0") == ShellState(cwd="/tmp")


def test_wrapper_quotes_values_for_the_shell():
    w = build_wrapper(ShellState(plain={"A": "it's"}), {}, "tok")
    assert "A='it'\\''s'" in w


# --- status and output ------------------------------------------------------

def test_output_streams_before_the_step_ends(container):
    seen: list[tuple[str, bool]] = []
    done = threading.Event()

    def on_output(text: str) -> None:
        seen.append((text, done.is_set()))

    def watch():
        while not seen:
            time.sleep(0.01)
        container.interrupt()  # proves the output came while the step was still running

    threading.Thread(target=watch, daemon=True).start()
    result = container.run_step("echo -n dots...; sleep 1000", ENV, None, on_output=on_output)
    done.set()
    assert seen[0] == ("dots...", False)
    assert result.interrupted


def test_failed_step_names_status_and_command(container):
    result, out = run(container, "echo before\nfalse\necho after")
    assert (result.ok, result.status, result.failed_command) == (False, 1, "false")
    assert out == "before\n"
    assert result.message == "step failed with status 1 at `false`"


def test_read_in_a_step_says_build_steps_have_no_stdin(container):
    result, _ = run(container, "echo ask\nread answer\necho never")
    assert (result.ok, result.status, result.failed_command) == (False, 1, "read answer")
    assert result.message.startswith("step failed with status 1 at `read answer`: build steps have no stdin")


def test_trace_lines_stay_out_of_output_and_log(container, tmp_path):
    log = tmp_path / "log"
    chunks: list[str] = []
    result = container.run_step("echo a | cat | tr a b\necho c", ENV, None, on_output=chunks.append,
                                log_path=str(log))
    assert result.ok
    assert "".join(chunks) == "b\nc\n"
    assert log.read_bytes() == b"b\nc\n"


def test_output_beyond_the_cap_goes_only_to_the_log(container, tmp_path):
    log = tmp_path / "log"
    chunks: list[str] = []
    result = container.run_step("i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done", ENV, None,
                                on_output=chunks.append, log_path=str(log), stream_cap=1000)
    text = "".join(chunks)
    assert result.ok
    assert text.endswith(f"[output truncated: full log in {log}]\n")
    assert log.read_text().count("\n") == 2000


def test_multibyte_characters_survive_split_reads(container):
    result, out = run(container, "i=0; while [ $i -lt 3000 ]; do printf 'é€'; i=$((i+1)); done")
    assert out == "é€" * 3000


def test_a_fake_sentinel_does_not_end_the_step(container):
    result, out = run(container, "printf '\\033]5379;0123456789abcdef;0;\\007'; echo still-running")
    assert result.ok
    assert "still-running" in out


def test_exit_3_fails_the_step_and_the_container_lives_on(container):
    failed, _ = run(container, "exit 3")
    after, out = run(container, "echo alive")
    assert (failed.ok, failed.status, failed.container_died) == (False, 3, False)
    assert (after.ok, out) == (True, "alive\n")


def test_exit_0_fails_the_step(container):
    result, _ = run(container, "exit 0")
    assert not result.ok
    assert "called exit" in result.message


def test_killing_the_shell_fails_the_step_and_the_container_lives_on(container):
    failed, _ = run(container, "kill -9 $$")
    after, _ = run(container, "true")
    assert (failed.ok, failed.status) == (False, 137)
    assert after.ok


def test_interrupt_ends_a_sleeping_step(container):
    timer = threading.Timer(0.5, container.interrupt)
    timer.start()
    box: list = []
    t = threading.Thread(target=lambda: box.append(container.run_step("sleep 1000", ENV, None)))
    t.start()
    t.join(60)
    assert not t.is_alive()
    assert box[0].interrupted and not box[0].ok
    assert box[0].status == 130


def test_interrupt_kills_a_step_that_ignores_sigint(container):
    timer = threading.Timer(0.5, container.interrupt)
    timer.start()
    result = container.run_step("trap '' INT; sleep 1000", ENV, None)
    assert result.interrupted and not result.ok


def test_background_process_does_not_outlive_its_step(container):
    started, _ = run(container, "sleep 1000 &\necho $! > /tmp/bgpid")
    result, out = run(container, "kill -0 $(cat /tmp/bgpid) 2>/dev/null && echo alive || echo gone")
    assert started.ok
    assert out == "gone\n"


def test_large_script_runs(container):
    script = "".join(f"V{i}=x\n" for i in range(5000)) + "echo $V4999"
    result, out = run(container, script)
    assert (result.ok, out) == (True, "x\n")


def test_large_state_carries(container):
    result, out = carry(container, "BIG=$(head -c 200000 /dev/zero | tr '\\0' a)", "echo ${#BIG}")
    assert out == "200000\n"


# --- state carry (busybox sh) -----------------------------------------------

def test_cwd_and_variables_carry(container):
    result, out = carry(container, "cd /tmp; X=1; export Y=2",
                        "pwd; echo $X; sh -c 'echo exported:$Y'; sh -c 'echo plain:$X'")
    assert out.splitlines() == ["/tmp", "1", "exported:2", "plain:"]


def test_awkward_values_survive(container):
    value = "a'b\"c\n$HOME \\back `tick` *"
    result, out = carry(container, "V=" + "'" + value.replace("'", "'\\''") + "'",
                        "printf '%s' \"$V\"")
    assert out == value


def test_unset_carries(container):
    result, out = carry(container, "export GONE=1; ALSO=1", "unset GONE ALSO HOME",
                        "echo ${GONE-unset} ${ALSO-unset} ${HOME-unset}")
    assert out == "unset unset unset\n"


def test_set_options_carry(container):
    result, out = carry(container, "set +e; set -u", "false; echo survived-false; echo $NOPE")
    assert "survived-false" in out
    assert not result.ok


def test_fresh_layer_starts_in_root_with_only_env(container):
    result, out = run(container, "pwd; echo ${X-none}; export -p | grep -c ' X=' || true")
    assert out.splitlines()[:2] == ["/", "none"]


def test_failed_step_returns_no_state(container):
    result, _ = carry(container, "cd /tmp", "cd /; false")
    assert result.state is None


def test_shebang_step_runs_its_interpreter(container):
    result, out = run(container, "#!/bin/sh\necho $0 | grep -q fd && echo shebang")
    assert (result.ok, out) == (True, "shebang\n")


def test_shebang_step_keeps_the_state_before(container):
    first, _ = run(container, "cd /tmp; export Z=9")
    second, out = run(container, "#!/bin/sh\npwd; echo $Z; cd /; export Z=0", first.state)
    assert out == "/tmp\n9\n"
    assert second.state == first.state


# --- Debian: dash and bash --------------------------------------------------

def test_state_carries_with_dash(debian):
    result, out = carry(debian, "readlink -f /bin/sh; cd /usr; A='x y'; export B=\"q'z\"",
                        "readlink -f /bin/sh; pwd; echo \"$A\"; bash -c 'echo \"$B\"'")
    assert result.ok, out
    assert out.splitlines() == ["/usr/bin/dash", "/usr", "x y", "q'z"]


def test_state_carries_with_bash_as_sh(debian):
    relink, _ = run(debian, "ln -sf bash /bin/sh.new && mv -f /bin/sh.new /bin/sh")
    try:
        result, out = carry(debian, "cd /etc; A=$'tab\\there'; export B=2; unset HOME",
                            "readlink -f /bin/sh; pwd; printf '%s\\n' \"$A\"; sh -c 'echo $B'; echo ${HOME-nohome}")
    finally:
        run(debian, "ln -sf dash /bin/sh.new && mv -f /bin/sh.new /bin/sh")
    assert relink.ok
    assert out.splitlines() == ["/usr/bin/bash", "/etc", "tab\there", "2", "nohome"]


def test_bash_shebang_with_errexit_fails_at_false(debian):
    result, out = run(debian, "#!/bin/bash -e\necho $BASH_VERSION | cut -c1\nfalse\necho after")
    assert (result.ok, result.status) == (False, 1)
    assert out == "5\n"


def test_failing_command_is_named_with_dash(debian):
    result, _ = run(debian, "true\nls /nonexistent-dir\necho after")
    assert result.failed_command == "ls /nonexistent-dir"


@pytest.mark.rootful
def test_rootful_state_carries(container):
    result, out = carry(container, "cd /tmp; X=1", "pwd; echo $X; id -u")
    assert out.splitlines() == ["/tmp", "1", "0"]


def test_filter_keeps_quoted_newlines_inside_the_trace_line():
    f = OutputFilter("n", "tok")
    out = f.feed(trace_marker("tok") + b"printf %s 'a\nb' $'c\\'\nd'\nreal\n")
    assert out == b"real\n"
    assert f.last_trace == "printf %s 'a\nb' $'c\\'\nd'"


def test_death_of_the_init_fails_the_step_and_marks_the_container_dead(busybox_tar, workdir):
    c = Container.start(ContainerConfig(str(make_rootfs(busybox_tar, workdir, "doomed"))))
    try:
        threading.Timer(0.5, os.kill, (c.init_pid, 9)).start()
        result = c.run_step("sleep 1000", ENV, None)
        assert result.container_died and not result.ok
        assert "container died" in result.message
        assert not c.alive
    finally:
        c.stop()


def test_an_output_callback_error_surfaces_after_the_step(container):
    def broken(text: str) -> None:
        raise ValueError("callback broke")

    with pytest.raises(ValueError, match="callback broke"):
        container.run_step("echo x; sleep 0.2; echo y", ENV, None, on_output=broken)
    after, out = run(container, "echo in-sync")
    assert out == "in-sync\n"


def test_sigint_in_the_waiting_thread_interrupts_the_step(container):
    # Python's own SIGINT handler (a kernel's interrupt), also where the suite was
    # started in the background of a script, which leaves SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), 2)).start()
        result = container.run_step("sleep 1000", ENV, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    after, out = run(container, "echo in-sync")
    assert result.interrupted and not result.ok
    assert out == "in-sync\n"


def test_output_with_apostrophes_survives_dash_traces(debian):
    result, out = run(debian, "echo \"don't\"\necho hello\necho \"it's ok\"")
    assert result.ok
    assert out == "don't\nhello\nit's ok\n"


def test_set_v_does_not_echo_the_wrapper(container):
    result, out = carry(container, "set -v", "echo hi")
    assert result.ok, out
    assert "__sk_" not in out and "PS4" not in out
    assert out.endswith("hi\n")


def test_pipefail_carries_to_the_next_step(container):
    result, out = carry(container, "set -o pipefail", "false | true\necho not-reached")
    assert (result.ok, result.status) == (False, 1)
    assert out == ""


def test_pipefail_turned_off_stays_off(container):
    result, out = carry(container, "set -o pipefail", "set +o pipefail", "false | true\necho reached")
    assert result.ok
    assert out == "reached\n"


def test_umask_carries_and_steps_start_at_0022(container):
    fresh, out = run(container, "umask")
    assert fresh.ok and out.strip().lstrip("0") == "22"
    result, out = carry(container, "umask 077", "touch /tmp/u-file; stat -c %a /tmp/u-file; umask")
    assert result.ok, out
    assert out.split()[0] == "600" and out.split()[1].lstrip("0") == "77"


def test_umask_carries_with_dash(debian):
    result, out = carry(debian, "umask 027", "umask")
    assert result.ok, out
    assert out.strip() == "0027"


def test_status_255_is_an_exit_status_not_a_signal():
    """A failing `mount` (or `exit -1`) ends with status 255: no signal 127 exists."""
    from stacker_kernel.container.step import failure_message

    assert failure_message(255, True, "mount -t tmpfs x /mnt", False, False) == \
        "step failed with status 255 at `mount -t tmpfs x /mnt`"
    assert failure_message(137, True, "sleep 100", False, False).startswith("step killed by signal 9 ")
