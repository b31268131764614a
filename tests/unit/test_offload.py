"""The forwarding fast paths in the plan (core/offload.py): the nft flowtable where
the kernel has one, UDP GRO forwarding on capable uplinks, both off by prefs; the
fake kernel's golden listing, and status's `dataplane`."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path

import pytest

from appliance.agent.localapi.dataplane import dataplane_status
from appliance.agent.reconcile import Reconciler
from appliance.core.model import Connected, HostFacts, Scope, State
from appliance.core.offload import feature_key, parse_feature_key
from appliance.core.planner import plan
from appliance.core.prefs import Prefs, parse_prefs
from appliance.kernel.fake import FakeKernel, fake_system
from tests.unit.meshes import KEYS, PI_FACTS, pi_netmap
from tests.unit.test_fake_golden import check_golden

LAN = ip_network("192.168.77.0/24")
EXIT = Prefs(advertise_exit_node=True, advertise_routes=(LAN,))
FAST = replace(PI_FACTS, uplinks=("wan0",), flowtable=True, udp_gro=("wan0",))
GRO_KEY = "ethtool.wan0.rx-udp-gro-forwarding"


def _nft(prefs: Prefs, facts: HostFacts) -> str:
    state = plan(pi_netmap(), prefs, KEYS["pi"], facts)
    assert state.nft is not None
    return state.nft.text


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("ethtool.eth0.rx-udp-gro-forwarding", ("eth0", "rx-udp-gro-forwarding")),
        ("ethtool.eth0.100.rx-udp-gro-forwarding", ("eth0.100", "rx-udp-gro-forwarding")),
        ("net.ipv4.ip_forward", None),
        ("ethtool.rx-gro", None),
        ("ethtool..x", None),
    ],
)
def test_offload_feature_key_parses_device_and_feature(key: str, parsed: tuple[str, str] | None) -> None:
    assert parse_feature_key(key) == parsed
    if parsed is not None:
        assert feature_key(*parsed) == key


def test_offload_flowtable_holds_mesh_uplink_and_lan_devices_and_offloads_from_to_mesh() -> None:
    facts = replace(FAST, connected=(*FAST.connected, Connected("lan1", ip_network("10.1.0.0/24"))))
    text = _nft(EXIT, facts)
    assert (
        'flowtable fastpath {\n\thook ingress priority filter\n\tdevices = { "meshpi0", "eth0", "lan1", "wan0" }\n}'
        in text
    )
    to_mesh = text.split("chain to_mesh {\n")[1].split("\n}")[0].splitlines()
    # Offloaded on the answer to a flow the mesh opened, before it is accepted.
    assert to_mesh[0] == "\tmeta l4proto { tcp, udp } ct state established flow add @fastpath"
    assert to_mesh[1] == "\tct state established,related accept"
    assert text.count("flow add") == 1


@pytest.mark.parametrize(
    ("prefs", "facts"),
    [
        (EXIT.with_changes(flowtable=False), FAST),  # the owner turned it off
        (EXIT, replace(FAST, flowtable=False)),  # this kernel has no nf_flow_table
    ],
)
def test_offload_no_flowtable_when_off_or_unsupported(prefs: Prefs, facts: HostFacts) -> None:
    text = _nft(prefs, facts)
    assert "flowtable" not in text and "flow add" not in text
    assert text == _nft(EXIT, PI_FACTS)  # exactly the table without fast paths


def test_offload_none_on_a_node_that_does_not_forward() -> None:
    state = plan(pi_netmap(), Prefs(dashboard_port=80), KEYS["pi"], FAST)
    assert state.nft is not None and "flowtable" not in state.nft.text
    assert GRO_KEY not in state.sysctls


def test_offload_udp_gro_on_capable_uplinks_only_and_off_by_pref() -> None:
    facts = replace(FAST, uplinks=("wan0", "wwan0"), udp_gro=("wan0",))
    assert plan(pi_netmap(), EXIT, KEYS["pi"], facts).sysctls[GRO_KEY] == "on"
    assert "ethtool.wwan0.rx-udp-gro-forwarding" not in plan(pi_netmap(), EXIT, KEYS["pi"], facts).sysctls
    off = plan(pi_netmap(), EXIT.with_changes(udp_gro_forwarding=False), KEYS["pi"], facts)
    assert not any(k.startswith("ethtool.") for k in off.sysctls)


def test_offload_prefs_parse_and_round_trip() -> None:
    prefs = parse_prefs({"flowtable": False, "udp_gro_forwarding": False})
    assert (prefs.flowtable, prefs.udp_gro_forwarding) == (False, False)
    assert parse_prefs(prefs.to_json()) == prefs
    assert (Prefs().flowtable, Prefs().udp_gro_forwarding) == (True, True)
    with pytest.raises(ValueError, match="flowtable"):
        parse_prefs({"flowtable": "yes"})


def test_offload_golden_fast_paths_set_then_restored(tmp_path: Path) -> None:
    kernel = FakeKernel(connected=PI_FACTS.connected, uplinks=("wan0",), flowtable=True, udp_gro=("wan0",))
    kernel.proc[GRO_KEY] = "off"
    system, kernel = fake_system(tmp_path, kernel)
    before = kernel.render()
    scope = Scope(EXIT.interface, EXIT.table, EXIT.fwmark)
    reconciler = Reconciler(system, scope)
    facts = system.facts(scope)
    assert (facts.uplinks, facts.flowtable, facts.udp_gro) == (("wan0",), True, ("wan0",))
    desired = plan(pi_netmap(), EXIT, KEYS["pi"], facts)
    reconciler.sync(desired)
    check_golden("pi_8_fast_paths", kernel.render())
    assert kernel.proc[GRO_KEY] == "on"
    assert dataplane_status(facts, desired) == {
        "uplinks": ["wan0"],
        "flowtable": True,
        "flowtable_supported": True,
        "udp_gro_forwarding": ["wan0"],
        "udp_gro_capable": ["wan0"],
    }
    # The owner turns both off: the feature goes back to what it was, the flowtable goes.
    off = plan(pi_netmap(), EXIT.with_changes(flowtable=False, udp_gro_forwarding=False), KEYS["pi"], facts)
    reconciler.sync(off)
    assert kernel.proc[GRO_KEY] == "off"
    assert kernel.nft is not None and "flowtable" not in kernel.nft.text
    assert dataplane_status(facts, off)["flowtable"] is False
    reconciler.sync(desired)
    reconciler.sync(State(), reread=True)
    assert kernel.render() == before, "down must leave the kernel as it was found"


def test_offload_dataplane_status_before_any_plan() -> None:
    assert dataplane_status(None, None) == {
        "uplinks": [],
        "flowtable": False,
        "flowtable_supported": None,
        "udp_gro_forwarding": [],
        "udp_gro_capable": [],
    }
