"""Files written beside a notebook never follow a planted link (engine/beside.py; the
two-user case is tests/test_shared_folder.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from stacker_kernel.engine import beside
from stacker_kernel.errors import StorageError
from stacker_kernel.kernel.magics import save_log


def test_a_file_replaces_nothing_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out.yaml").symlink_to(victim)
    with pytest.raises(StorageError, match=r"out.yaml is a symbolic link: not written"):
        beside.write_bytes(tmp_path / "out.yaml", b"new")
    assert victim.read_text() == "precious" and (tmp_path / "out.yaml").is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_file_of_ours_is_replaced_and_a_new_one_is_created(tmp_path):
    beside.write_bytes(tmp_path / "a", b"one")
    beside.write_bytes(tmp_path / "a", b"two")
    assert (tmp_path / "a").read_bytes() == b"two"


def test_a_folder_of_ours_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "stacker-logs").symlink_to(elsewhere)
    with pytest.raises(StorageError, match="stacker-logs is a symbolic link"):
        beside.own_dir(tmp_path / "stacker-logs")
    log = tmp_path / "step.log"
    log.write_text("out")
    assert save_log(tmp_path, "nb", str(log), 1, "l", True) is None
    assert list(elsewhere.iterdir()) == []


def test_save_log_writes_beside_the_notebook(tmp_path):
    log = tmp_path / "step.log"
    log.write_text("out")
    saved = save_log(tmp_path, "nb", str(log), 3, "my layer", True)
    assert saved == tmp_path / "stacker-logs" / "nb-step3-my_layer-failed.log" and saved.read_text() == "out"
    assert not os.path.islink(saved)


def test_the_cli_writes_no_output_through_a_link(tmp_path, capsys):
    from stacker_kernel.cli import main

    (tmp_path / "stacker.yaml").write_text("l:\n  from:\n    type: scratch\n")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out.ipynb").symlink_to(victim)
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "out.ipynb")]) == 1
    assert "out.ipynb is a symbolic link: not written" in capsys.readouterr().err
    assert victim.read_text() == "precious"
    assert main(["import", str(tmp_path / "stacker.yaml"), "-o", str(tmp_path / "new.ipynb")]) == 0
    assert (tmp_path / "new.ipynb").read_text().endswith("}\n")
