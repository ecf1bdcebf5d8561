"""A failed build, by hand: `chroot` into the failed step's state, `build --shell-fail`
and `--on-run-failure`, failure lines that name the layer, and build logs without
repeated lines (issue 15)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pexpect

from stacker_kernel.cli import main
from stacker_kernel.storage.store import Store
from conftest import in_tree

FAILING = """
    broken:
        from:
            type: oci
            url: ${{BUSYBOX_OCI}}
        imports:
            - blob.txt
        binds:
            - bound -> /bound
        run: |
            cd /tmp
            echo half-done > /made
            git clone nothing
            echo never > /after
    """


def _project(tmp_path: Path, text: str = FAILING) -> Path:
    (tmp_path / "blob.txt").write_text("imported-blob\n")
    (tmp_path / "bound").mkdir(exist_ok=True)
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(textwrap.dedent(text))
    return yaml


def _cli_args(storage, *args) -> list[str]:
    return ["-m", "stacker_kernel", "--storage", str(storage), *args]


def _failed_snapshots(storage) -> list:
    with Store.open(storage) as store:
        return [s for s in store.snapshots() if s.status == "failed"]


def test_chroot_after_a_failed_build_opens_the_failed_step_with_imports_and_binds(storage, busybox_oci, tmp_path):
    yaml = _project(tmp_path)
    (tmp_path / "bound" / "host-file").write_text("from-the-host\n")
    rc = main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci",
               "--substitute", f"BUSYBOX_OCI={busybox_oci}"])
    assert rc == 1
    child = pexpect.spawn(sys.executable, _cli_args(storage, "chroot", "-f", str(yaml),
                                                    "--substitute", f"BUSYBOX_OCI={busybox_oci}"),
                          timeout=30, encoding="utf-8")
    child.expect("layer broken: the failed state of step 1")
    child.sendline("cat /made /stacker/imports/blob.txt /bound/host-file; "
                   "test -e /after || echo no-after-$((6*7))")
    child.expect("half-done")
    child.expect("imported-blob")
    child.expect("from-the-host")
    child.expect("no-after-42")
    child.sendline("touch /scribble; exit 4")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 4
    failed = _failed_snapshots(storage)
    assert len(failed) == 1 and in_tree(failed[0].path, "made").is_file()
    assert not in_tree(failed[0].path, "scribble").exists()  # a throwaway copy, as for a built layer
    assert list((storage / "live").iterdir()) == []


def test_chroot_names_the_layer_that_failed(storage, busybox_oci, tmp_path):
    yaml = _project(tmp_path)
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci",
                 "--substitute", f"BUSYBOX_OCI={busybox_oci}"]) == 1
    child = pexpect.spawn(sys.executable, _cli_args(storage, "chroot", "-f", str(yaml), "broken",
                                                    "--substitute", f"BUSYBOX_OCI={busybox_oci}"),
                          timeout=30, encoding="utf-8")
    child.expect("failed state of step 1")
    child.sendline("cat /made")
    child.expect("half-done")
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_next_build_of_the_file_replaces_the_failed_state(storage, busybox_oci, tmp_path):
    yaml = _project(tmp_path)
    subs = ["--substitute", f"BUSYBOX_OCI={busybox_oci}"]
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci", *subs]) == 1
    assert len(_failed_snapshots(storage)) == 1
    yaml.write_text(yaml.read_text().replace("git clone nothing", "true"))
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci", *subs]) == 0
    assert _failed_snapshots(storage) == []
    child = pexpect.spawn(sys.executable, _cli_args(storage, "chroot", "-f", str(yaml), *subs),
                          timeout=30, encoding="utf-8")
    child.sendline("cat /after; exit")
    child.expect("never")
    child.expect(pexpect.EOF)
    assert "failed state" not in child.before


def test_gc_collects_the_failed_state(storage, busybox_oci, tmp_path):
    yaml = _project(tmp_path)
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci",
                 "--substitute", f"BUSYBOX_OCI={busybox_oci}"]) == 1
    assert len(_failed_snapshots(storage)) == 1
    assert main(["--storage", str(storage), "gc"]) == 0
    assert _failed_snapshots(storage) == []


def test_build_shell_fail_opens_a_shell_in_the_failed_step(storage, busybox_oci, tmp_path):
    yaml = _project(tmp_path)
    child = pexpect.spawn(sys.executable, _cli_args(storage, "build", "-f", str(yaml), "--no-oci",
                                                    "--shell-fail", "--substitute",
                                                    f"BUSYBOX_OCI={busybox_oci}"),
                          timeout=60, encoding="utf-8")
    child.expect("in the failed state of layer broken step 1")
    child.sendline("cat /made /stacker/imports/blob.txt; echo $((6*7)) > /bound/from-shell; exit")
    child.expect("half-done")
    child.expect("imported-blob")
    child.expect("open its failed state with 'stacker-kernel chroot")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1  # the build failed all the same
    assert (tmp_path / "bound" / "from-shell").read_text() == "42\n"  # the build's binds


def test_on_run_failure_runs_the_command_in_the_failed_state(storage, busybox_oci, tmp_path):
    yaml = _project(tmp_path)
    # Not a terminal (as in CI): the command runs and the build ends, nothing waits for input.
    proc = subprocess.run([sys.executable, *_cli_args(storage, "build", "-f", str(yaml), "--no-oci",
                                                      "--on-run-failure", "cp /made /bound/copied",
                                                      "--substitute", f"BUSYBOX_OCI={busybox_oci}")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "bound" / "copied").read_text() == "half-done\n"


def test_a_failing_line_names_the_layer_not_proc_fds(storage, busybox_oci, tmp_path):
    yaml = _project(tmp_path)
    proc = subprocess.run([sys.executable, *_cli_args(storage, "build", "-f", str(yaml), "--no-oci",
                                                      "--substitute", f"BUSYBOX_OCI={busybox_oci}")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    text = proc.stdout + proc.stderr
    assert "/proc/self/fd" not in text
    # busybox sh: "layer broken run: line 3: git: not found"
    assert "layer broken run: line 3: git: not found" in text


def test_build_log_has_every_line_once_when_stdout_is_a_pipe(storage, busybox_oci, tmp_path):
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(textwrap.dedent("""
        one:
            from:
                type: oci
                url: ${{BUSYBOX_OCI}}
            run: echo out-of-one
        two:
            from:
                type: built
                tag: one
            run: echo out-of-two
        """))
    log = tmp_path / "log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, *_cli_args(storage, "build", "-f", str(yaml),
                                                   "--oci-dir", str(tmp_path / "oci"),
                                                   "--substitute", f"BUSYBOX_OCI={busybox_oci}")],
                       stdin=subprocess.DEVNULL, stdout=f, check=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ))
    lines = log.read_text().splitlines()
    assert len(lines) == len(set(lines)), lines
    assert sum("two step 1/1 ran" in line for line in lines) == 1
    assert any(line.startswith("wrote ") for line in lines)


def test_a_second_chroot_while_one_is_open_opens_the_layer_too(storage, busybox_oci, tmp_path):
    yaml = _project(tmp_path, FAILING.replace("git clone nothing", "true"))
    args = ["chroot", "-f", str(yaml), "--substitute", f"BUSYBOX_OCI={busybox_oci}"]
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci", *args[3:]]) == 0
    first = pexpect.spawn(sys.executable, _cli_args(storage, *args), timeout=30, encoding="utf-8")
    first.sendline("echo first-$((6*7))")
    first.expect("first-42")  # its throwaway session is open now
    second = pexpect.spawn(sys.executable, _cli_args(storage, *args), timeout=30, encoding="utf-8")
    second.sendline("cat /after; exit")
    second.expect("never")
    second.expect(pexpect.EOF)
    first.sendline("exit")
    first.expect(pexpect.EOF)


def test_a_failing_line_of_a_cell_names_the_layer_and_cell_in_output_and_log(storage, busybox_tar, tmp_path):
    from stacker_kernel.engine.session import BuildSession
    from stacker_kernel.recipe.model import ImageSource, Layer

    with Store.open(storage) as store:
        session = BuildSession.open(store, str(tmp_path / "nb.ipynb"), resume=False)
        try:
            session.begin_layer(Layer(name="nb", from_=ImageSource(type="tar", url=str(busybox_tar))))
            out = []
            outcome = session.run_step("echo one\nno-such-tool --x\n", "c0ffee00-cell", on_output=out.append)
            assert not outcome.ok
            assert "layer nb cell c0ffee00: line 2: no-such-tool: not found" in "".join(out)
            log = Path(outcome.log_path).read_text()  # the kernel replays and shows the log too
            assert "/proc/self/fd" not in log and "layer nb cell c0ffee00: line 2" in log
        finally:
            session.close()
