"""update/snapshot.py on real directories: kept, put back, dropped; leftovers of a power cut."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.update.snapshot import Snapshot


def _state(root: Path, name: str) -> Path:
    live = root / name
    (live / "sub").mkdir(parents=True)
    live.chmod(0o700)
    (live / "prefs.json").write_text('{"v": 1}')
    (live / "sub" / "control.db").write_bytes(b"schema 4")
    os.symlink("prefs.json", live / "link")
    return live


def test_snapshot_restore_gives_back_the_state_as_it_was(tmp_path: Path) -> None:
    agent, control = _state(tmp_path, "meshpi"), _state(tmp_path, "meshpi-control")
    snap = Snapshot((agent, control, tmp_path / "meshpi-web"))  # not there: skipped
    assert snap.take() == [agent, control]
    # The new version migrates its state.
    (agent / "prefs.json").write_text('{"v": 2, "new": true}')
    (control / "sub" / "control.db").write_bytes(b"schema 5")
    (control / "new-file").write_text("x")
    assert snap.restore() == [agent, control]
    assert (agent / "prefs.json").read_text() == '{"v": 1}'
    assert (control / "sub" / "control.db").read_bytes() == b"schema 4"
    assert not (control / "new-file").exists()
    assert os.readlink(agent / "link") == "prefs.json"
    assert (agent.stat().st_mode & 0o777) == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meshpi", "meshpi-control"]


def test_snapshot_drop_and_a_leftover_replaced(tmp_path: Path) -> None:
    agent = _state(tmp_path, "meshpi")
    stale = tmp_path / "meshpi.before-update"
    stale.mkdir()
    (stale / "from-a-power-cut").write_text("old")
    snap = Snapshot((agent,))
    snap.take()
    assert not (stale / "from-a-power-cut").exists() and (stale / "prefs.json").exists()
    snap.drop()
    assert not stale.exists() and (agent / "prefs.json").exists()
    assert snap.restore() == []  # nothing kept: nothing touched
    assert (agent / "prefs.json").read_text() == '{"v": 1}'
