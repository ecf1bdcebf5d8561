"""Where an import with `dest` lands: stacker's copy rules (see engine/imports.land_in_rootfs).

Each case stages real files with `imports.stage` and lands them in a rootfs
directory as root of a real user namespace; what landed is read back from
inside the namespace (owners are container ids). One build test checks the
same rules end to end on busybox, with stacker's own "dir path behavior" cases.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import textwrap
from pathlib import Path

import pytest

from stacker_kernel.container.userns import run_in_userns
from stacker_kernel.engine import imports
from stacker_kernel.engine.build import build, layer_snapshot
from stacker_kernel.errors import RecipeError
from stacker_kernel.recipe.model import ImageSource, Import, Layer
from stacker_kernel.storage.store import Store
from conftest import in_tree


def _tree(root: str) -> dict[str, tuple]:
    """{container path: (type, mode, uid, gid, content or link)} of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = "/" + os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", None, st.st_uid, st.st_gid, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, Path(p).read_text())
    return out


def _setup_rootfs(rootfs: str) -> None:
    """A rootfs with an existing directory /d (holding /d/old) and an existing file /e."""
    os.makedirs(os.path.join(rootfs, "d"))
    Path(rootfs, "d", "old").write_text("old")
    Path(rootfs, "e").write_text("existing")


def _rm(path: str) -> None:
    shutil.rmtree(path)


@pytest.fixture
def src(tmp_path):
    """Host sources: a file F and a directory D (with a file, a subdir, a symlink)."""
    s = tmp_path / "src"
    (s / "D" / "sub").mkdir(parents=True)
    (s / "F").write_text("f")
    os.chmod(s / "F", 0o640)
    (s / "D" / "a").write_text("a")
    os.chmod(s / "D" / "a", 0o600)
    (s / "D" / "sub" / "b").write_text("b")
    os.symlink("a", s / "D" / "link")
    return s


@pytest.fixture
def land(tmp_path, src):
    """land(*imports) -> the rootfs tree after landing them on the prepared rootfs."""
    rootfs = str(tmp_path / "rootfs")
    os.mkdir(rootfs)
    run_in_userns(_setup_rootfs, rootfs)

    def go(*imps: Import) -> dict[str, tuple]:
        layer = Layer(name="l", from_=ImageSource(type="scratch"), imports=list(imps))
        imports.stage(layer, tmp_path / "staged", str(src))
        items = [(imports.staged_name(i), i.path.endswith("/"), i.dest, i.mode, i.uid, i.gid) for i in imps]
        run_in_userns(imports.land_in_rootfs, str(tmp_path / "staged"), rootfs, items)
        return run_in_userns(_tree, rootfs)

    yield go
    run_in_userns(_rm, rootfs)  # files belong to container ids


ROOTDIR = ("d", 0o755, 0, 0, None)


# --- a file -----------------------------------------------------------------------------

def test_file_to_absent_dest_is_that_file_with_its_parents_made(land):
    t = land(Import("F", dest="/new/g"))
    assert t["/new/g"] == ("f", 0o640, 0, 0, "f")
    assert t["/new"] == ROOTDIR


def test_file_to_absent_dest_with_slash_goes_inside_a_new_dir(land):
    t = land(Import("F", dest="/new/"))
    assert t["/new"] == ROOTDIR and t["/new/F"][4] == "f"


def test_file_to_existing_dir_without_slash_replaces_the_dir(land):
    # stacker lays the file as an overlay layer at /d: it hides the directory (not cp's "into it")
    t = land(Import("F", dest="/d"))
    assert t["/d"] == ("f", 0o640, 0, 0, "f")
    assert "/d/old" not in t


def test_file_to_existing_dir_with_slash_goes_inside_it(land):
    t = land(Import("F", dest="/d/"))
    assert t["/d/F"][4] == "f" and t["/d/old"][4] == "old"


def test_file_to_existing_file_replaces_it(land):
    t = land(Import("F", dest="/e"))
    assert t["/e"] == ("f", 0o640, 0, 0, "f")


def test_file_to_existing_file_with_slash_is_refused_naming_the_dest(land):
    with pytest.raises(RecipeError, match="/e/.*is a file"):
        land(Import("F", dest="/e/"))


def test_file_to_root_with_slash(land):
    assert land(Import("F", dest="/"))["/F"][4] == "f"


# --- a directory (path without '/') ----------------------------------------------------

def test_dir_to_absent_dest_becomes_that_dir(land):
    t = land(Import("D", dest="/new"))
    assert t["/new/a"][4] == "a" and t["/new/sub/b"][4] == "b" and t["/new/link"][4] == "a"
    assert "/new/D" not in t
    assert t["/new"] == ROOTDIR and t["/new/sub"] == ROOTDIR


def test_dir_to_absent_dest_with_slash_goes_inside_it(land):
    t = land(Import("D", dest="/new/"))
    assert t["/new/D/a"][4] == "a" and t["/new/D/sub/b"][4] == "b"
    assert "/new/a" not in t and "/new/new" not in t  # not stacker's stray empty dir


def test_dir_to_existing_dir_without_slash_merges(land):
    t = land(Import("D", dest="/d"))
    assert t["/d/a"][4] == "a" and t["/d/old"][4] == "old" and "/d/D" not in t


def test_dir_to_existing_dir_with_slash_goes_inside_it(land):
    t = land(Import("D", dest="/d/"))
    assert t["/d/D/a"][4] == "a" and t["/d/old"][4] == "old"


def test_dir_to_existing_file_replaces_the_file(land):
    t = land(Import("D", dest="/e"))
    assert t["/e"] == ROOTDIR and t["/e/a"][4] == "a"


def test_dir_to_existing_file_with_slash_is_refused(land):
    with pytest.raises(RecipeError, match="/e/"):
        land(Import("D", dest="/e/"))


def test_dir_to_root_with_slash_goes_inside_root(land):
    t = land(Import("D", dest="/"))
    assert t["/D/a"][4] == "a" and "/a" not in t


# --- a directory's contents (path ending with '/') --------------------------------------

@pytest.mark.parametrize("dest", ["/new", "/new/"])
def test_dir_contents_to_absent_dest_fill_it(land, dest):
    t = land(Import("D/", dest=dest))
    assert t["/new/a"][4] == "a" and "/new/D" not in t


@pytest.mark.parametrize("dest", ["/d", "/d/"])
def test_dir_contents_merge_into_an_existing_dir(land, dest):
    t = land(Import("D/", dest=dest))
    assert t["/d/a"][4] == "a" and t["/d/old"][4] == "old" and "/d/D" not in t


def test_dir_contents_replace_an_existing_file(land):
    t = land(Import("D/", dest="/e"))
    assert t["/e"] == ROOTDIR and t["/e/sub/b"][4] == "b"


def test_dir_contents_to_root(land):
    t = land(Import("D/", dest="/"))
    assert t["/a"][4] == "a" and t["/d/old"][4] == "old"


def test_a_file_in_the_import_replaces_a_dir_in_the_rootfs_and_vice_versa(land, src):
    t = land(Import("D", dest="/x"))  # first landing: /x/a file, /x/sub dir
    assert t["/x/a"][0] == "f" and t["/x/sub"][0] == "d"
    shutil.rmtree(src / "D")
    (src / "D" / "a").mkdir(parents=True)
    (src / "D" / "a" / "inner").write_text("i")
    (src / "D" / "sub").write_text("now a file")
    t = land(Import("D", dest="/x"))
    assert t["/x/a"][0] == "d" and t["/x/a/inner"][4] == "i"
    assert t["/x/sub"][:1] == ("f",) and t["/x/sub"][4] == "now a file" and "/x/sub/b" not in t


# --- mode, uid, gid, hash ---------------------------------------------------------------

def test_mode_uid_gid_on_a_file(land):
    t = land(Import("F", dest="/bin/tool", mode=0o755, uid=1000, gid=1001))
    assert t["/bin/tool"] == ("f", 0o755, 1000, 1001, "f")
    assert t["/bin"] == ROOTDIR


def test_mode_uid_gid_on_every_file_of_a_dir_import_not_its_dirs(land):
    t = land(Import("D", dest="/opt/app", mode=0o444, uid=7, gid=8))
    assert t["/opt/app/a"] == ("f", 0o444, 7, 8, "a")
    assert t["/opt/app/sub/b"] == ("f", 0o444, 7, 8, "b")
    assert t["/opt/app/link"] == ("l", None, 7, 8, "a")  # a link is copied as a link, owned too
    assert t["/opt/app/sub"] == ROOTDIR and t["/opt/app"] == ROOTDIR


def test_without_mode_files_keep_their_source_mode(land):
    t = land(Import("D", dest="/o"))
    assert t["/o/a"][1] == 0o600


def test_the_right_hash_lands_and_a_wrong_one_is_refused(land, src):
    good = hashlib.sha256(b"f").hexdigest()
    assert land(Import("F", dest="/h", hash=good.upper()))["/h"][4] == "f"
    with pytest.raises(RecipeError, match="sha256"):
        land(Import("F", dest="/h2", hash="0" * 64))


def test_a_hash_on_a_directory_is_refused(land):
    with pytest.raises(RecipeError, match="not a file"):
        land(Import("D", dest="/x", hash="0" * 64))


def test_symlinked_dest_parent_resolves_inside_the_rootfs(land, tmp_path):
    run_in_userns(os.symlink, "/d", str(tmp_path / "rootfs" / "ld"))
    t = land(Import("F", dest="/ld/F2"))
    assert t["/d/F2"][4] == "f" and t["/ld"][0] == "l"


# --- end to end: stacker's own cases, built ----------------------------------------------

def test_stacker_dir_path_behavior_cases_build(storage, busybox_oci, tmp_path):
    """test/import.bats "dir path behavior" and "import with dir contents" (fifth), plus
    a file replacing a directory."""
    (tmp_path / "folder1" / "subfolder2").mkdir(parents=True)
    (tmp_path / "folder1" / "file1").write_text("1")
    (tmp_path / "folder1" / "subfolder2" / "subfile1").write_text("s")
    (tmp_path / "tool").write_text("t")
    yaml = tmp_path / "stacker.yaml"
    yaml.write_text(textwrap.dedent("""
        l:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          imports:
          - path: folder1
            dest: /case1
          - path: folder1/
            dest: /case2
          - path: folder1
            dest: /case3/
          - path: folder1/
            dest: /case4/
          - path: folder1/subfolder2/
            dest: /folder3/
          - path: folder1/subfolder2
            dest: /folder4
          - path: tool
            dest: /usr/
            mode: 0750
          run: |
            [ -f /case1/file1 ]
            [ -f /case2/file1 ]
            [ -f /case3/folder1/file1 ]
            [ -f /case4/file1 ]
            [ -f /folder3/subfile1 ]
            [ ! -e /folder3/subfolder2 ]
            [ -f /folder4/subfile1 ]
            [ "$(stat -c %a /usr/tool)" = 750 ]
        """))
    with Store.open(storage) as store:
        build(store, str(yaml), substitutions={"BUSYBOX_OCI": busybox_oci}, out=lambda s: None,
              stream=lambda s: None)
        snap = layer_snapshot(store, str(yaml), "l")
        assert in_tree(snap.path, "case3/folder1/file1").read_text() == "1"


def test_a_changed_uid_lands_again_instead_of_reusing_the_cache(storage, busybox_oci, tmp_path):
    (tmp_path / "tool").write_text("t")
    yaml = tmp_path / "stacker.yaml"
    recipe = """
        l:
          from:
            type: oci
            url: ${{BUSYBOX_OCI}}
          imports:
          - path: tool
            dest: /usr/bin/tool
            uid: UID
          run: stat -c %u /usr/bin/tool > /uid
        """
    subs = {"BUSYBOX_OCI": busybox_oci}
    with Store.open(storage) as store:
        for uid in ("1000", "2000"):
            yaml.write_text(textwrap.dedent(recipe).replace("UID", uid))
            build(store, str(yaml), substitutions=subs, out=lambda s: None, stream=lambda s: None)
            assert in_tree(layer_snapshot(store, str(yaml), "l").path, "uid").read_text() == uid + "\n"


# --- '..' never leaves the rootfs or the layer (issue 23, point 6) ---------------------------

@pytest.mark.parametrize("entry, needle", [
    ("- path: tool\n    dest: /..", "'dest' /.. has a '..'"),
    ("- path: tool\n    dest: /usr/../../x", "'dest' /usr/../../x has a '..'"),
    ("- stacker://first/x/..", "import stacker://first/x/.. has a '..'"),
    ("- stacker://first/../../etc", "has a '..'"),
    ("- sub/..", "does not end in a name"),
])
def test_dotdot_in_an_import_is_refused_naming_the_line(entry, needle):
    from stacker_kernel.recipe.stacker_yaml import load

    text = f"first:\n  from:\n    type: scratch\nl:\n  from:\n    type: scratch\n  imports:\n  {entry}\n"
    with pytest.raises(RecipeError) as e:
        load(text)
    assert needle in str(e.value) and "(line 8)" in str(e.value) and "\n" not in str(e.value)


def test_dotdot_in_an_import_cell_is_refused():
    from stacker_kernel.recipe.notebook import recipe_from_notebook

    nb = {"nbformat": 4, "metadata": {}, "cells": [
        {"cell_type": "code", "id": "c1", "metadata": {}, "source": "%from scratch\n%import tool --dest /.."}]}
    with pytest.raises(RecipeError, match=r"^code cell 1 \(id c1\).*'dest' /\.\. has a '\.\.'"):
        recipe_from_notebook(nb, "n")


def test_dest_dotdot_leaves_a_concurrent_build_alive(storage, busybox_tar, tmp_path):
    """A build importing to /.. is refused in one line, while another build's rootfs
    (beside its own in the store) lives on and its step completes."""
    import subprocess
    import sys
    import time

    import nbformat

    tool = str(Path(sys.executable).parent / "stacker-kernel")
    nb = tmp_path / "a" / "long.ipynb"
    nb.parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"%from tar {busybox_tar}\necho x > /mark", id="c0"),
        nbformat.v4.new_code_cell("sleep 6; wc -l /mark", id="c1")]), nb)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tool").write_text("t")
    yaml = tmp_path / "b" / "stacker.yaml"
    yaml.write_text(f"l:\n  from:\n    type: tar\n    url: {busybox_tar}\n"
                    "  imports:\n  - path: tool\n    dest: /..\n  run: true\n")
    a = subprocess.Popen([tool, "--storage", str(storage), "build", "-f", str(nb), "--no-oci"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        live = Path(storage) / "live"
        deadline = time.monotonic() + 120
        while not list(live.glob("*/mark")) and a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        b = subprocess.run([tool, "--storage", str(storage), "build", "-f", str(yaml), "--no-oci"],
                           capture_output=True, text=True)
        out, err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    assert b.returncode != 0 and "Traceback" not in b.stderr
    assert "'dest' /.. has a '..'" in b.stderr and "(line 6)" in b.stderr
    assert a.returncode == 0, err
