"""Pure parts of the kernel: output batching, shell completeness, rootfs path completion.

The same features are tested end to end over the protocol in
test_kernel_protocol.py and test_kernel_conformance.py; these pin the edge cases.
"""
from __future__ import annotations

import os
import textwrap

import pytest

from stacker_kernel.kernel.completion import complete_path, complete_shell
from stacker_kernel.kernel.output import OutputSink
from stacker_kernel.kernel.syntax import shell_completeness


def test_output_sink_folds_crlf_split_across_chunks():
    sink = OutputSink()
    sink.write(b"one\r")
    sink.write(b"\ntwo\r\n")
    assert sink.take(final=True) == "one\ntwo\n"


def test_output_sink_keeps_a_lone_carriage_return_for_progress_bars():
    sink = OutputSink()
    sink.write("10%\r20%\r")
    assert sink.take(final=True) == "10%\r20%\r"


def test_output_sink_decodes_a_utf8_character_split_across_chunks():
    sink = OutputSink()
    data = "héllo\n".encode()
    sink.write(data[:2])
    sink.write(data[2:])
    assert sink.take() == "héllo\n"


def test_output_sink_caps_a_cell_and_says_so():
    sink = OutputSink(cap=10)
    sink.write("x" * 100)
    sink.write("more")
    text = sink.take()
    assert text.startswith("x" * 10) and "capped" in text and "more" not in text
    assert sink.capped


def test_unterminated_heredoc_is_incomplete():
    assert shell_completeness("cat <<EOF\nbody").status == "incomplete"


def test_trailing_backslash_is_incomplete_but_an_escaped_one_is_complete():
    assert shell_completeness("echo a \\").status == "incomplete"
    assert shell_completeness("echo a \\\\").status == "complete"


def test_stray_keyword_is_invalid():
    assert shell_completeness("done").status == "invalid"


def test_path_completion_follows_absolute_symlinks_inside_the_rootfs(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "real" / "inner").mkdir(parents=True)
    # /link -> /real inside the container; on the host /real does not exist.
    os.symlink("/real", rootfs / "link")
    assert complete_path(str(rootfs), "/link/in") == ["/link/inner/"]


def test_path_completion_never_lists_the_host_through_a_symlink(tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    os.symlink("/etc", rootfs / "hostetc")  # /etc of the container, which is empty here
    assert complete_path(str(rootfs), "/hostetc/pass") == []


def test_commands_complete_in_command_position_and_paths_elsewhere(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "busybox").write_text("")
    assert complete_shell(str(rootfs), "cd /; busy", 10).matches == ["busybox"]
    assert complete_shell(str(rootfs), "ls /b", 5).matches == ["/bin/"]


def test_variables_complete_after_a_dollar_with_or_without_braces():
    from stacker_kernel.kernel.completion import complete_variable

    names = {"FOO", "FOLDER", "BAR"}
    assert complete_variable("$FO", names) == ["$FOLDER", "$FOO"]
    assert complete_variable("${FO", names) == ["${FOLDER}", "${FOO}"]
    assert complete_variable("x$BA", names) == ["x$BAR"]
    assert complete_variable("FO", names) is None


def test_names_a_cell_assigns_are_found_in_its_text():
    from stacker_kernel.kernel.completion import assigned_names

    script = "A=1; export B=2\nread -r C\nfor D in x y; do :; done\n(E=3)"
    assert assigned_names(script) == {"A", "B", "C", "D", "E"}


def test_whatis_reads_the_name_section_of_a_man_page(tmp_path):
    import gzip

    from stacker_kernel.engine.command_help import whatis

    man = tmp_path / "usr/share/man/man8"
    man.mkdir(parents=True)
    with gzip.open(man / "greetd.8.gz", "wt") as f:
        f.write('.TH GREETD 8\n.SH "NAME"\ngreetd \\- \\fBgreeting\\fR daemon\n.SH SYNOPSIS\n')
    assert whatis(str(tmp_path), "greetd") == "greetd (8) - greeting daemon"
    assert whatis(str(tmp_path), "absent") is None


def test_whatis_never_reads_a_man_page_through_a_symlink_out_of_the_rootfs(tmp_path):
    """An image whose /usr/share/man points at the host must not show host files."""
    from stacker_kernel.engine.command_help import whatis

    host = tmp_path / "host/man8"
    host.mkdir(parents=True)
    (host / "secret.8").write_text('.TH S 8\n.SH NAME\nsecret \\- host file\n')
    root = tmp_path / "rootfs"
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/man").symlink_to(tmp_path / "host")
    assert whatis(str(root), "secret") is None


def test_command_help_runs_as_nobody_and_cannot_leave_its_chroot(tmp_path, busybox_tar):
    """Shift-Tab runs the image's own binary: it gets no root that could climb out of
    the chroot, and no setuid file gives root back."""
    import tarfile

    from stacker_kernel.engine.command_help import help_text

    root = tmp_path / "rootfs"
    root.mkdir()
    with tarfile.open(busybox_tar) as tar:
        tar.extractall(root)
    probe = root / "bin/probe"
    probe.write_text('#!/bin/sh\necho "uid=$(id -u)"\n'
                     'mkdir /tmp/x 2>/dev/null; chroot /tmp/x /bin/true 2>/dev/null'
                     ' && echo chroot-allowed || echo chroot-refused\n')
    probe.chmod(0o755)
    text = help_text(str(root), "/bin/probe")
    assert "uid=65534" in text and "chroot-refused" in text, text


def _rootfs_with(tmp_path, busybox_tar, name: str, script: str):
    import tarfile

    root = tmp_path / "rootfs"
    root.mkdir()
    with tarfile.open(busybox_tar) as tar:
        tar.extractall(root)
    probe = root / "bin" / name
    probe.write_text("#!/bin/sh\n" + script)
    probe.chmod(0o755)
    return root


def test_command_help_has_a_writable_dev_null_and_tmp_and_its_own_pid_namespace(tmp_path, busybox_tar):
    """Issue 26 point 10: `git --help` opens /dev/null for writing. Issue 23 point 5:
    the image's binary is pid 1 of a pid namespace of its own."""
    from stacker_kernel.engine.command_help import help_text

    root = _rootfs_with(tmp_path, busybox_tar, "gitlike", textwrap.dedent("""\
        echo x > /dev/null && echo devnull-ok
        echo kept > /tmp/f && echo "tmp=$(cat /tmp/f)"
        echo "pid=$$"
        """))
    text = help_text(str(root), "/bin/gitlike")
    assert text.splitlines() == ["devnull-ok", "tmp=kept", "pid=1"], text
    assert not (root / "tmp/f").exists()  # its /tmp was its own


@pytest.mark.rootful
def test_as_root_command_help_cannot_signal_a_host_process_running_as_nobody(tmp_path, busybox_tar):
    import subprocess

    from stacker_kernel.engine.command_help import help_text

    victim = subprocess.Popen(["sleep", "300"], user=65534, group=65534)
    try:
        root = _rootfs_with(tmp_path, busybox_tar, "killer",
                            f"kill -9 {victim.pid} 2>/dev/null && echo killed || echo missed\n")
        text = help_text(str(root), "/bin/killer")
        assert victim.poll() is None, "the image's binary killed a host process"
        assert text == "missed", text
    finally:
        victim.kill()
        victim.wait()
