"""PATCH /v1/prefs then GET: the owner reads back what was chosen, even before the
reconcile loop has taken the change off the bus (the dashboard's page after Save)."""

from __future__ import annotations

from pathlib import Path

from appliance.agent.loop import Agent
from appliance.agent.statedir import StateDir
from appliance.core.prefs import Prefs


def _agent(tmp_path: Path) -> Agent:
    state = StateDir(tmp_path / "state")
    state.ensure()
    return Agent.for_control(state, lambda backend: None, resolv_conf=tmp_path / "resolv.conf")  # type: ignore[arg-type,return-value]


def test_agent_prefs_read_back_before_the_loop_takes_them(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    assert agent.stored_prefs().mtu == Prefs().mtu
    chosen = agent.set_prefs({"mtu": 1400})
    assert agent.stored_prefs().mtu == 1400 and agent.wanted.prefs.mtu == Prefs().mtu  # the loop is behind
    agent.receive(agent.bus.take(timeout=1))
    assert agent.chosen_prefs is None and agent.stored_prefs() == chosen == agent.wanted.prefs


def test_agent_prefs_a_later_choice_is_not_hidden_by_an_earlier_one(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.set_prefs({"mtu": 1400})
    first = agent.bus.take(timeout=1)
    agent.set_prefs({"mtu": 1420})  # chosen while the loop still works on the first
    agent.receive(first)
    assert agent.stored_prefs().mtu == 1420
    agent.receive(agent.bus.take(timeout=1))
    assert agent.stored_prefs().mtu == 1420 == agent.wanted.prefs.mtu
