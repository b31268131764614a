"""Power loss: the agent and control are SIGKILLed while they write their state
(tests/netns/powerloss.py says what is written and what is checked); every file
loads afterwards and the node comes back as itself. 20 cycles here, ~30 s;
scripts/bench/powerloss runs 1,000."""

from __future__ import annotations

from pathlib import Path

from tests.netns import powerloss


def test_powerloss_kill9_while_writing_state_loses_nothing(tmp_path: Path) -> None:
    figures = powerloss.run(tmp_path, cycles=20, seed=20)
    assert figures["problems"] == [], figures
    assert figures["comeback"] == {
        "same_machine_key": True,
        "same_addresses": True,
        "node_key_is_used": True,
        "one_node_at_control": True,
        "no_rotation_pending": True,
    }, figures
    assert figures["agent_kills"] == 20 and figures["control_kills"] > 0, figures
    # The cuts landed while everything was being written.
    assert set(figures["writes"]) >= {"prefs", "device_add", "rotate", "approve", "authkey"}, figures
