"""What an overlay storage uses (issue 24): each layer is measured once, the first time
it is counted, and its size recorded (a layer never changes); a figure costs what
changed since the last one, and stays what `du` says of the storage."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path


from conftest import reaped

from stacker_kernel.engine.session import BuildSession
from stacker_kernel.recipe.model import ImageSource, Layer
from stacker_kernel.storage import driver
from stacker_kernel.storage.store import Store


def _du(root: Path) -> int:
    """`du` of the storage, its top directory left out (usage counts what is in it)."""
    out = subprocess.run(["du", "-s", "-B1", str(root)], capture_output=True, text=True).stdout
    return int(out.split()[0]) - os.lstat(root).st_blocks * 512


def _ok(session: BuildSession, script: str) -> None:
    outcome = session.run_step(script)
    assert outcome.ok, outcome.message


def test_usage_sums_recorded_layer_sizes_and_matches_du_after_steps_rollback_and_gc(
        storage, busybox_tar, tmp_path, monkeypatch):
    measured: list[str] = []
    measure = driver._du_entry
    monkeypatch.setattr(driver, "_du_entry", lambda path: measured.append(os.path.basename(path)) or measure(path))
    with Store.open(storage) as store:
        s = BuildSession.open(store, str(tmp_path / "nb.ipynb"), resume=False)
        try:
            s.begin_layer(Layer(name="nb", from_=ImageSource(type="tar", url=str(busybox_tar))))
            for i in range(3):
                _ok(s, f"head -c {(i + 1) * 300000} /dev/urandom > /blob{i}")
            s._stop_container()  # nothing changes under du
            first = store.driver.usage(storage)
            assert first == _du(storage)
            layers = {n for n in os.listdir(storage / "layers") if n != ".empty"}
            assert set(measured) >= layers and len(layers) == 4  # the base and three steps
            measured.clear()
            assert store.driver.usage(storage) == first
            assert measured == [".empty"]  # every layer counted by its record

            _ok(s, "head -c 200000 /dev/urandom > /blob3")
            s._stop_container()
            measured.clear()
            assert store.driver.usage(storage) == _du(storage)
            assert sorted(measured) == sorted([".empty", s.head.id])  # the new step's layer alone

            s.rollback(2)  # back to the second step: the last two are left to gc
        finally:
            s.close()
        usage = store.driver.usage(storage)
        assert usage == _du(storage)
        dropped = store.gc()
        assert len(dropped) >= 2
        assert store.driver.usage(storage) < usage - 500_000  # their layers in the trash are not counted
        reaped(storage)
        after = store.driver.usage(storage)
        assert after == _du(storage) and after < usage - 500_000
        records = set(os.listdir(storage / driver.SIZES))
        assert records == {n for n in os.listdir(storage / "layers") if n != ".empty"}
