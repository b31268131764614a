"""The input policy's prefs, plan and ruleset (the netns port scan is tests/netns/test_input_policy.py)."""

from __future__ import annotations

import pytest

from appliance.cli.flags import build_parser
from appliance.core.planner import plan
from appliance.core.prefs import Prefs, parse_prefs
from appliance.wire.fields import ConfigError
from tests.unit.meshes import KEYS, LAPTOP_FACTS, PI_FACTS, laptop_netmap, pi_netmap


def test_input_policy_prefs_default_off_and_round_trip() -> None:
    d = Prefs()
    assert (d.dashboard_port, d.dashboard_from_mesh, d.ssh_port) == (0, False, 0)
    assert not d.guards_ports
    p = parse_prefs({"dashboard_port": 80, "ssh_port": 22, "dashboard_from_mesh": True})
    assert p.guards_ports and parse_prefs(p.to_json()) == p


@pytest.mark.parametrize(
    ("doc", "field"),
    [({"dashboard_port": 70000}, "dashboard_port"), ({"ssh_port": -1}, "ssh_port"),
     ({"dashboard_from_mesh": "yes"}, "dashboard_from_mesh"), ({"dashboard_port": 80, "ssh_port": 80}, "ssh_port")],
)  # fmt: skip
def test_input_policy_prefs_refuse_bad_values_naming_the_field(doc: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_prefs(doc)


def test_input_policy_plain_node_without_guarded_ports_has_no_table() -> None:
    assert plan(laptop_netmap(), Prefs(interface="meshpi1"), KEYS["laptop"], LAPTOP_FACTS).nft is None


def test_input_policy_only_a_dashboard_gives_a_table_without_forwarding() -> None:
    state = plan(pi_netmap(), Prefs(dashboard_port=80), KEYS["pi"], PI_FACTS)
    assert state.nft is not None
    assert "net.ipv4.ip_forward" not in state.sysctls  # the host does not become a router
    text = state.nft.text
    assert "hook input" in text and "hook forward" not in text and "masquerade" not in text
    assert "tcp dport 22" not in text  # SSH left alone unless its port is set


def test_input_policy_drops_only_the_guarded_ports_from_the_wrong_sources() -> None:
    prefs = Prefs(advertise_exit_node=True, dashboard_port=80, ssh_port=22)
    state = plan(pi_netmap(), prefs, KEYS["pi"], PI_FACTS)
    assert state.nft is not None
    text = state.nft.text
    assert "policy accept;" in text.split("chain input {")[1].split("}")[0]
    dashboard = text.split("chain dashboard {")[1].split("}")[0]
    assert 'iifname "meshpi0" counter drop' in dashboard
    ssh = text.split("chain ssh {")[1].split("}")[0]
    assert 'iifname "meshpi0" counter accept' in ssh
    local_v4 = text.split("set local_v4 {")[1].split("}")[0]
    assert "192.168.77.0/24" in local_v4 and "100.64.0.0/10" not in local_v4  # not the mesh, not CGNAT
    opened = plan(pi_netmap(), prefs.with_changes(dashboard_from_mesh=True), KEYS["pi"], PI_FACTS)
    assert opened.nft is not None and opened.nft.digest != state.nft.digest
    assert 'iifname "meshpi0" counter accept' in opened.nft.text.split("chain dashboard {")[1]


def test_input_policy_cli_flags_reach_the_prefs() -> None:
    from appliance.cli.flags import pref_changes

    args = build_parser().parse_args(
        ["set", "--dashboard-from-mesh", "--dashboard-port", "80", "--ssh-port", "22"]
    )
    assert pref_changes(args) == {"dashboard_from_mesh": True, "dashboard_port": 80, "ssh_port": 22}
    args = build_parser().parse_args(["set", "--no-dashboard-from-mesh"])
    assert pref_changes(args) == {"dashboard_from_mesh": False}
