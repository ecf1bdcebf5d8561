"""`grab LAYER:/file newdir/` (a trailing '/' is a directory to make) and wildcards
in the container's view (`grab LAYER:/build/*.deb out/`, `%grab /build/*.deb`) (issue 26)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernel_support import BASE, kernels, nbdir, start_kernel  # noqa: F401 (fixtures)

MAKE_FILES = "mkdir -p /build/sub && echo a > /build/a.deb && echo b > /build/b.deb && echo c > /build/c.txt " \
             "&& echo hidden > /build/.h.deb && echo s > /build/sub/s.deb"


def _grab(storage: Path, yaml: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stacker_kernel", "--storage", str(storage), "grab",
                           "-f", str(yaml), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def built(storage, busybox_oci, tmp_path) -> Path:
    from stacker_kernel.cli import main

    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(textwrap.dedent(f"""
        pkg:
          from:
            type: oci
            url: {busybox_oci}
          run: {MAKE_FILES}
        """))
    assert main(["--storage", str(storage), "build", "-f", str(yaml), "--no-oci"]) == 0
    return yaml


def test_a_trailing_slash_makes_the_directory_and_puts_the_file_in_it(storage, built, tmp_path):
    proc = _grab(storage, built, "pkg:/build/a.deb", "newdir/", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "newdir").is_dir()
    assert (tmp_path / "newdir" / "a.deb").read_text() == "a\n"
    # Without the slash, the name is the copy's (as cp).
    assert _grab(storage, built, "pkg:/build/b.deb", "renamed", cwd=tmp_path).returncode == 0
    assert (tmp_path / "renamed").read_text() == "b\n"


def test_a_wildcard_expands_in_the_container_view(storage, built, tmp_path):
    proc = _grab(storage, built, "pkg:/build/*.deb", "debs/", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "debs").iterdir()) == ["a.deb", "b.deb"]  # no dot file, no .txt
    assert proc.stdout.split() == [str(tmp_path / "debs" / n) for n in ("a.deb", "b.deb")]
    proc = _grab(storage, built, "pkg:/build/*/s.deb", "one", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "one").read_text() == "s\n"  # a single match is a plain grab


def test_a_wildcard_that_matches_nothing_is_one_line(storage, built, tmp_path):
    proc = _grab(storage, built, "pkg:/build/*.rpm", "out/", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "stacker-kernel: nothing in the rootfs matches /build/*.rpm"
    assert not (tmp_path / "out").exists()


def test_percent_grab_with_a_wildcard_copies_every_match_beside_the_notebook(nbdir, kernels):
    k = start_kernel(nbdir / "test.ipynb", kernels)
    try:
        assert k.execute(BASE, "base", timeout=120).status == "ok"
        assert k.execute(MAKE_FILES, "make", timeout=120).status == "ok"
        run = k.execute("%grab /build/*.deb", "grab", timeout=120)
        assert run.status == "ok", run.error
        assert (nbdir / "a.deb").read_text() == "a\n" and (nbdir / "b.deb").read_text() == "b\n"
        assert "2 matches" in run.text()
        run = k.execute("%grab /build/*.deb into/", "grab2", timeout=120)
        assert run.status == "ok", run.error
        assert sorted(p.name for p in (nbdir / "into").iterdir()) == ["a.deb", "b.deb"]
    finally:
        k.close()
