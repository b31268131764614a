"""Netmap capability versions: an agent from before versioning (capver 1, recorded
in tests/unit/recorded/map_v1.json) against today's control, and today's agent
against what a version-1 control answered and refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.agent.bus import Bus
from appliance.agent.control.client import ControlRefused
from appliance.agent.control.link import ControlLink
from appliance.agent.statedir import StateDir
from appliance.control.service import ControlService
from appliance.wire.fields import ConfigError
from appliance.wire.mapdelta import parse_delta, patched
from appliance.wire.netmap import CAPVER, parse_netmap
from tests.control.test_service import auth_key, join, machine, run

RECORDED = json.loads((Path(__file__).parents[1] / "unit" / "recorded" / "map_v1.json").read_text())


def keys_of(answer: dict[str, Any]) -> dict[str, set[str]]:
    """The field names at each level of a map answer: what a strict v1 parser checks."""
    body = answer.get("full") or answer.get("delta") or {}
    nodes = [body.get("self")] if body.get("self") else []
    nodes += body.get("peers", []) + body.get("changed", [])
    return {
        "answer": set(answer),
        "body": set(body),
        "node": set().union(*(set(n) for n in nodes)) if nodes else set(),
    }


def v1_allows(answer: dict[str, Any], recorded: dict[str, Any]) -> None:
    got, allowed = keys_of(answer), keys_of(recorded)
    for level in got:
        assert got[level] <= allowed[level], f"{level}: a v1 agent refuses {got[level] - allowed[level]}"


def test_capver_a_v1_agent_gets_answers_it_can_read(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        await join(s, 1, "pi", key)
        await join(s, 2, "laptop", key)
        full = await s.map(machine(2), dict(RECORDED["request_first"]))
        v1_allows(full, RECORDED["answer_full"])
        assert "capver" not in full["full"] and "endpoints" not in full["full"]["peers"][0]
        await s.update(machine(1), {"endpoints": ["198.51.100.1:51820"]})
        delta = await s.map(machine(2), {"version": full["version"]})
        v1_allows(delta, RECORDED["answer_delta"])
        # and today's agent asking with its capver gets the new fields
        new = await s.map(machine(2), {"version": None, "capver": CAPVER})
        assert new["full"]["capver"] == CAPVER and "endpoints" in new["full"]["optional"]
        assert new["full"]["peers"][0]["endpoints"] == ["198.51.100.1:51820"]

    run(tmp_path, scenario)


def test_capver_todays_agent_reads_recorded_v1_answers() -> None:
    netmap = parse_netmap(RECORDED["answer_full"]["full"], "recorded v1 full map")
    assert [p.name for p in netmap.peers] == ["pi"] and netmap.peers[0].endpoints == ()
    after = patched(netmap, RECORDED["answer_delta"]["delta"], "recorded v1 delta")
    assert str(after.peers[0].endpoint) == "198.51.100.9:51820"


def test_capver_optional_fields_are_ignored_and_others_refused_with_a_hint() -> None:
    doc = json.loads(json.dumps(RECORDED["answer_full"]["full"]))
    doc |= {"capver": CAPVER + 1, "optional": ["colour"]}
    doc["peers"][0]["colour"] = "blue"
    assert parse_netmap(doc).peers[0].name == "pi"  # told it may ignore it
    doc["optional"] = []
    with pytest.raises(ConfigError) as e:
        parse_netmap(doc, "control (full map)")
    assert e.value.field == "peers[0].colour" and f"capability version {CAPVER}: upgrade meshpi" in str(
        e.value
    )


def test_capver_a_delta_is_parsed_per_node_only() -> None:
    netmap = parse_netmap(RECORDED["answer_full"]["full"])
    delta = parse_delta(RECORDED["answer_delta"]["delta"], netmap.mesh)
    assert [n.name for n in delta.changed] == ["pi"] and len(delta.removed) == 1


class _V1Control:
    """What a version-1 control does with `map`: refuses the unknown field (its
    recorded words), and answers a request without it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def call(self, op: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self.bodies.append(dict(body))
        if "capver" in body:
            raise ControlRefused(400, RECORDED["refusal_of_unknown_field"])
        return dict(RECORDED["answer_full"])


def test_capver_todays_agent_speaks_v1_to_a_v1_control(tmp_path: Path) -> None:
    bus = Bus()
    link = ControlLink(StateDir(tmp_path), lambda: None, lambda p: {}, bus)  # type: ignore[arg-type, return-value]
    v1 = _V1Control()
    answer = link._map(v1, None)  # type: ignore[arg-type]
    assert answer == RECORDED["answer_full"]
    assert v1.bodies == [{"version": None, "capver": CAPVER}, {"version": None}]
    link._map(v1, 7)  # type: ignore[arg-type]
    assert v1.bodies[-1] == {"version": 7}  # no second try with capver in this session


def test_capver_a_v2_agent_gets_no_names_and_todays_gets_them(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        await join(s, 1, "pi", key)
        await join(s, 2, "laptop", key)
        v2 = await s.map(machine(2), {"version": None, "capver": 2})
        assert "dns" not in v2["full"] and not {"dns_name", "devices", "lan_dns"} & set(
            v2["full"]["peers"][0]
        )
        assert parse_netmap(v2["full"]).dns is None  # and reads as a map without names
        pi_id = (await s.db(s.store.get_node_by_machine_key, machine(1))).id  # type: ignore[union-attr]
        await s.changed(s.store.rename_node, pi_id, "home")
        delta = await s.map(machine(2), {"version": v2["version"], "capver": 2})
        assert "dns" not in delta["delta"] and delta["delta"]["changed"][0]["name"] == "home"
        assert "dns_name" not in delta["delta"]["changed"][0]
        new = await s.map(machine(2), {"version": None, "capver": CAPVER})
        assert (
            new["full"]["dns"] == {"domain": "mesh.internal"}
            and new["full"]["peers"][0]["dns_name"] == "home"
        )
        assert {"dns", "dns_name", "devices", "lan_dns"} <= set(new["full"]["optional"])

    run(tmp_path, scenario)
