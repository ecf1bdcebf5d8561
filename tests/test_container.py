"""The persistent unprivileged container: namespaces, mounts, lifetime.

Real user namespaces, real btrfs subvolumes under $STACKER_KERNEL_STORAGE.
The rootfs helpers here are shared with test_step.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from stacker_kernel.container.runtime import Container, ContainerConfig, Mount
from stacker_kernel.container.userns import IdMap, run_in_userns
from stacker_kernel.errors import ContainerError
from stacker_kernel.storage import btrfs

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
IS_ROOT = os.geteuid() == 0


def _extract(tar_path: str, dest: str) -> None:
    """Inside the userns: unpack a rootfs tar keeping owners (device nodes are
    skipped: the container's /dev is a tmpfs anyway)."""
    with tarfile.open(tar_path) as tf:
        members = [m for m in tf.getmembers() if not (m.ischr() or m.isblk() or m.isfifo())]
        tf.extractall(dest, members=members, numeric_owner=True)


def make_rootfs(tar: Path, parent: Path, name: str = "rootfs") -> Path:
    """A writable subvolume `parent/name` holding the rootfs in `tar`."""
    path = parent / name
    btrfs.create_subvolume(path)
    run_in_userns(_extract, str(tar), str(path))
    return path


def storage_dir() -> Path:
    root = Path(os.environ["STACKER_KERNEL_STORAGE"]) / f"tc-{uuid.uuid4().hex[:12]}"
    root.mkdir()
    return root


def remove_storage_dir(root: Path) -> None:
    btrfs.remove_tree(root)


def debian_tar() -> Path:
    out = subprocess.run([str(Path(__file__).parent.parent / "scripts/debian-rootfs.sh")],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def run(container: Container, script: str, state=None):
    """Run a step, returning (result, output text)."""
    chunks: list[str] = []
    result = container.run_step(script, ENV, state, on_output=chunks.append)
    return result, "".join(chunks)


@pytest.fixture(scope="module")
def workdir():
    root = storage_dir()
    yield root
    remove_storage_dir(root)


@pytest.fixture(scope="module")
def bb_rootfs(busybox_tar, workdir) -> Path:
    return make_rootfs(busybox_tar, workdir, "busybox")


@pytest.fixture(scope="module")
def imports_dir(workdir) -> Path:
    d = workdir / "imports"
    d.mkdir()
    (d / "hello.txt").write_text("hello from the host\n")
    return d


@pytest.fixture(scope="module")
def container(bb_rootfs, imports_dir):
    c = Container.start(ContainerConfig(str(bb_rootfs), mounts=[Mount(str(imports_dir), "/stacker/imports")]))
    yield c
    c.stop()


def test_uid_map_inside_holds_65536_ids(container, bb_rootfs):
    # The step's namespace is nested in one mapping the caller's ids (which locks
    # the mounts), so its map reads one to one; where root's files land shows the real map.
    result, out = run(container, "cat /proc/self/uid_map; touch /owned-by-0")
    rows = [line.split() for line in out.splitlines()]
    assert result.ok
    assert sum(int(r[2]) for r in rows) == 65536 and rows[0][:2] == ["0", "0"]
    assert os.lstat(bb_rootfs / "owned-by-0").st_uid == os.getuid()


def test_chown_inside_is_a_subordinate_id_outside(container, bb_rootfs):
    result, _ = run(container, "touch /owned && chown 1000:1000 /owned")
    st = os.lstat(bb_rootfs / "owned")
    idmap = IdMap.for_current_user()
    assert result.ok
    assert (st.st_uid, st.st_gid) == (idmap.to_outside_uid(1000), idmap.to_outside_gid(1000))


def test_hostname_is_stacker(container):
    _, out = run(container, "hostname")
    assert out.strip() == "stacker"


def test_proc_shows_only_the_containers_processes(container):
    # builtins only, so the step's shell is the one process besides init
    _, out = run(container, "echo $$; for p in /proc/[0-9]*; do echo ${p#/proc/}; done")
    shell, *listed = [int(p) for p in out.split()]
    assert sorted(listed) == sorted({1, shell})


def test_sys_is_read_only(container):
    result, out = run(container, "if touch /sys/kernel/x 2>/dev/null || mkdir /sys/x 2>/dev/null; "
                                 "then echo writable; else echo readonly; fi; grep ' /sys ' /proc/mounts")
    assert out.splitlines()[0] == "readonly"
    assert " ro," in out or " ro " in out


def test_resolv_conf_is_the_hosts(container):
    _, out = run(container, "cat /etc/resolv.conf")
    assert out == Path("/etc/resolv.conf").read_text()


def test_resolv_conf_cannot_be_written(container):
    result, out = run(container, "echo 'nameserver 1.2.3.4' > /etc/resolv.conf")
    assert not result.ok
    assert "1.2.3.4" not in Path("/etc/resolv.conf").read_text()


def test_imports_are_mounted_read_only(container):
    result, out = run(container, "cat /stacker/imports/hello.txt; touch /stacker/imports/new 2>/dev/null && echo wrote || echo refused")
    assert result.ok
    assert out.splitlines() == ["hello from the host", "refused"]


def test_no_placeholder_remains_in_the_rootfs_after_a_step(container, bb_rootfs):
    # The busybox rootfs has neither /stacker nor /etc/resolv.conf: both are
    # placeholders that exist only while a step runs.
    result, out = run(container, "test -d /stacker/imports && test -f /etc/resolv.conf && echo present")
    assert out.strip() == "present"
    assert not os.path.lexists(bb_rootfs / "stacker")
    assert not os.path.lexists(bb_rootfs / "etc/resolv.conf")


def test_dev_has_the_host_devices_and_a_private_devpts(container):
    _, out = run(container, "head -c 4 /dev/zero | od -An -tx1; ls /dev/pts; echo x > /dev/null && echo null-ok")
    assert "00 00 00 00" in out
    assert "ptmx" in out
    assert "null-ok" in out


def test_rootfs_is_mounted_nodev(container):
    # A device node that reaches the rootfs (a layer, a bind, a root-run extraction) opens nothing.
    result, out = run(container, "awk '$5 == \"/\" {print $6}' /proc/self/mountinfo")
    assert result.ok
    assert "nodev" in out.split(","), out


def test_proc_sys_and_the_other_host_knobs_are_read_only(container):
    result, out = run(container, "cat /proc/mounts")
    assert result.ok
    mounts = {line.split()[1]: line.split()[3].split(",") for line in out.splitlines()}
    knobs = [f"/proc/{n}" for n in ("sys", "sysrq-trigger", "irq", "bus", "fs") if os.path.exists(f"/proc/{n}")]
    assert "/proc/sys" in knobs
    for knob in knobs:
        assert "ro" in mounts.get(knob, []), (knob, out)


# Each tries to make a read-only mount writable the way root in the container could before.
REMOUNTS = {
    "imports": "mount -o remount,rw,bind /stacker/imports",
    "resolv.conf": "mount -o remount,rw,bind /etc/resolv.conf",
    "sys": "mount -o remount,rw,bind /sys",
    "proc-sys": "mount -o remount,rw,bind /proc/sys",
    "staged-source": "mkdir -p /mnt/x && mount -o bind /dev/.stacker-kernel/0 /mnt/x && "
                     "mount -o remount,rw,bind /mnt/x",
    "nodev-root": "mount -o remount,dev,bind /",
}


@pytest.mark.parametrize("what", sorted(REMOUNTS))
def test_read_only_mounts_cannot_be_remounted_writable(container, imports_dir, what):
    result, out = run(container, f"if {REMOUNTS[what]} 2>/dev/null; then echo remounted; else echo refused; fi; "
                                 "if touch /stacker/imports/new 2>/dev/null; then echo wrote; else echo not-written; fi")
    assert result.ok, result.message
    assert out.split() == ["refused", "not-written"], out
    assert not (imports_dir / "new").exists()


def test_network_none_has_only_loopback(bb_rootfs):
    with Container.start(ContainerConfig(str(bb_rootfs), network="none")) as c:
        _, out = run(c, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert out.split() == ["lo"]


def test_host_network_is_the_hosts(container):
    _, out = run(container, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert len(out.split()) > 1


def test_rootfs_without_sh_is_refused(workdir):
    empty = workdir / "empty"
    btrfs.create_subvolume(empty)
    with pytest.raises(ContainerError, match="no /bin/sh"):
        Container.start(ContainerConfig(str(empty)))


def test_missing_bind_source_is_refused(bb_rootfs, workdir):
    with pytest.raises(ContainerError, match="does not exist"):
        Container.start(ContainerConfig(str(bb_rootfs), mounts=[Mount(str(workdir / "nope"), "/x")]))


def test_stop_is_idempotent_and_kills_the_init(bb_rootfs):
    c = Container.start(ContainerConfig(str(bb_rootfs)))
    init_pid = c.init_pid
    c.stop()
    c.stop()
    assert not c.alive
    assert not os.path.exists(f"/proc/{init_pid}")


def _container_pids(ns_link: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == ns_link:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_killing_the_engine_leaves_no_container_process(bb_rootfs, tmp_path):
    engine = tmp_path / "engine.py"
    engine.write_text(textwrap.dedent(f"""
        import sys
        from stacker_kernel.container.runtime import Container, ContainerConfig
        c = Container.start(ContainerConfig({str(bb_rootfs)!r}))
        print(c.host_pid, c.init_pid, flush=True)
        c.run_step("sleep 1000 & sleep 1000", {ENV!r}, None)
    """))
    proc = subprocess.Popen([sys.executable, str(engine)], stdout=subprocess.PIPE, text=True)
    host_pid, init_pid = map(int, proc.stdout.readline().split())
    ns_link = os.readlink(f"/proc/{init_pid}/ns/pid")
    deadline = time.monotonic() + 30
    while len(_container_pids(ns_link)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # until both sleeps run
    assert len(_container_pids(ns_link)) >= 3
    proc.kill()
    proc.wait()
    while (_container_pids(ns_link) or os.path.exists(f"/proc/{host_pid}")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _container_pids(ns_link) == []
    assert not os.path.exists(f"/proc/{host_pid}/ns")


@pytest.mark.slow
def test_apt_get_install_works_in_a_debian_container(workdir):
    rootfs = make_rootfs(debian_tar(), workdir, "debian-apt")
    with Container.start(ContainerConfig(str(rootfs))) as c:
        result, out = run(c, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hello >/dev/null && hello")
    assert result.ok, out
    assert "Hello, world!" in out


@pytest.mark.rootful
def test_rootful_device_node_in_the_rootfs_opens_nothing(container, bb_rootfs):
    # Real root can put a real device into a rootfs; nodev keeps it from opening the host's device.
    os.mknod(bb_rootfs / "zerodev", 0o20666, os.makedev(1, 5))
    try:
        _, out = run(container, "head -c 4 /zerodev 2>/dev/null | wc -c; head -c 4 /dev/zero | wc -c")
    finally:
        os.unlink(bb_rootfs / "zerodev")
    assert out.split() == ["0", "4"], out  # the container's own /dev still works


@pytest.mark.rootful
def test_rootful_step_cannot_write_proc_sys(container):
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    # Writes back the value it read, so a broken build changes nothing on the host.
    result, out = run(container, "v=$(cat /proc/sys/kernel/core_pattern); "
                                 "if { printf '%s\\n' \"$v\" > /proc/sys/kernel/core_pattern; } 2>/dev/null; "
                                 "then echo wrote; else echo refused; fi")
    assert result.ok, result.message
    assert out.split() == ["refused"], out
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before


@pytest.mark.rootful
def test_rootful_step_cannot_make_host_files_writable(container):
    before = Path("/etc/resolv.conf").read_bytes()
    result, out = run(container, "if mount -o remount,rw,bind /etc/resolv.conf 2>/dev/null; then echo remounted; fi; "
                                 "if { printf '' >> /etc/resolv.conf; } 2>/dev/null; then echo wrote; else echo refused; fi")
    assert result.ok, result.message
    assert out.split() == ["refused"], out
    assert Path("/etc/resolv.conf").read_bytes() == before


@pytest.mark.rootful
def test_rootful_step_cannot_read_host_firmware_tables(container):
    # Issue 23 point 12b: /sys/firmware (ACPI tables, memory map) is root-only on the host.
    assert os.listdir("/sys/firmware"), "this host shows no firmware tables to hide"
    result, out = run(container, "ls -A /sys/firmware | wc -l; umount /sys/firmware 2>/dev/null && echo unmounted; "
                                 "cat /sys/firmware/acpi/tables/DSDT /sys/firmware/memmap/0/type 2>/dev/null "
                                 "| wc -c")
    assert result.ok, result.message
    assert out.split() == ["0", "0"], out


@pytest.mark.rootful
def test_rootful_container_maps_ids_one_to_one(container):
    _, out = run(container, "cat /proc/self/uid_map")
    assert out.split() == ["0", "0", "4294967295"]


@pytest.mark.rootful
def test_rootful_chown_keeps_the_id(container, bb_rootfs):
    result, _ = run(container, "touch /owned-root && chown 1000:1000 /owned-root")
    st = os.lstat(bb_rootfs / "owned-root")
    assert result.ok
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_interact_runs_a_shell_on_the_terminal(bb_rootfs, tmp_path):
    import pexpect

    script = tmp_path / "chroot.py"
    script.write_text(textwrap.dedent(f"""
        from stacker_kernel.container.runtime import Container, ContainerConfig
        from stacker_kernel.container.step import ShellState
        with Container.start(ContainerConfig({str(bb_rootfs)!r})) as c:
            status = c.interact({ENV!r}, ShellState(cwd="/tmp", exported={{"PATH": "/bin", "GREETING": "hi"}}))
        print("status", status)
    """))
    child = pexpect.spawn(sys.executable, [str(script)], timeout=30, encoding="utf-8")
    child.expect("# ")
    child.sendline("echo $GREETING-$(pwd)-$((40+2))")
    child.expect("hi-/tmp-42")
    child.sendline("exit 3")
    child.expect("status 3")
    child.expect(pexpect.EOF)


def test_kill_orphans_ends_containers_whose_engine_is_gone(tmp_path):
    import json
    import subprocess
    import sys

    from stacker_kernel.container.runtime import INIT_MODULE

    live = tmp_path / "live"
    dead = subprocess.Popen(["true"])
    dead.wait()

    def fake_init(rootfs, engine_pid):
        # A process that looks like a container init (its argv is what ps shows).
        config = json.dumps({"rootfs": str(rootfs), "engine_pid": engine_pid})
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", INIT_MODULE, config])

    orphan = fake_init(live / "s1", dead.pid)
    owned = fake_init(live / "s2", os.getpid())
    elsewhere = fake_init(tmp_path / "other" / "s3", dead.pid)
    try:
        time.sleep(0.2)
        assert Container.kill_orphans(str(live)) == [orphan.pid]
        assert orphan.wait(5) == -9
        assert owned.poll() is None and elsewhere.poll() is None
    finally:
        for p in (orphan, owned, elsewhere):
            p.kill()
            p.wait()


def test_a_step_whose_mounts_fail_halfway_leaves_no_placeholder(bb_rootfs, tmp_path):
    src = tmp_path / "bind-src"
    src.mkdir()
    # /etc/passwd is a file: the second mount point cannot be made, after the first was.
    mounts = [Mount(str(src), "/stacker/imports"), Mount(str(src), "/etc/passwd/below")]
    with Container.start(ContainerConfig(str(bb_rootfs), mounts=mounts)) as c:
        result, _ = run(c, "true")
        assert not result.ok
        assert not os.path.lexists(bb_rootfs / "stacker")
        again, _ = run(c, "true")
        assert not again.ok and not os.path.lexists(bb_rootfs / "stacker")
