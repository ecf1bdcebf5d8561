"""engine/run_mounts.py's copies of a layer's path for a step's bind (`from=`): made as
root of the user namespace, once per session for a read-only bind of an unchanging
snapshot, afresh (into the same inode, which the container keeps staged) for `rw`."""
from __future__ import annotations

import os
from pathlib import Path

from stacker_kernel.engine.run_mounts import plan
from stacker_kernel.storage.store import Store


def _populate(path: Path) -> None:
    (path / "opt" / "tools").mkdir(parents=True)
    (path / "opt" / "tools" / "version").write_text("v1\n")
    (path / "etc").mkdir()
    (path / "etc" / "hostname").write_text("stage\n")


def _plan(store: Store, spec: str, layer_path: str):
    return plan([spec], storage=store.root, scratch=store.root / "tmp" / "mounts-test", base_dir="/",
                secrets={}, built_path=lambda name: layer_path)


def test_a_read_only_copy_is_made_once_a_writable_one_at_every_step(storage):
    with Store.open(storage) as store:
        (store.root / "tmp" / "mounts-test").mkdir(parents=True)
        base = store.add_base("sha256-" + "cd" * 32, _populate, "a stage")
        ro, rw = "type=bind,from=stage,source=/opt/tools,target=/t", "type=bind,from=stage,source=/opt/tools,target=/t,rw"
        copies_ro = store.driver.name == "overlay"  # btrfs binds the snapshot's own folder
        first = _plan(store, ro, str(base.path)).mounts[0].source
        assert Path(first, "version").read_text() == "v1\n"
        assert (first.startswith(str(store.root / "tmp")) if copies_ro else first == str(base.path / "opt" / "tools"))
        if copies_ro:
            Path(first, "mark").write_text("")  # a copy made again would not have it
            again = _plan(store, ro, str(base.path)).mounts[0].source
            assert again == first and Path(first, "mark").exists()
            # another path of the layer is a copy of that path
            other = _plan(store, ro.replace("/opt/tools", "/etc"), str(base.path)).mounts[0].source
            assert sorted(os.listdir(other)) == ["hostname"]
        w = _plan(store, rw, str(base.path)).mounts[0].source
        Path(w, "written").write_text("")
        inode = os.stat(w).st_ino
        w2 = _plan(store, rw, str(base.path)).mounts[0].source
        assert w2 == w and os.stat(w2).st_ino == inode and sorted(os.listdir(w2)) == ["version"]
