"""The resolver's plan (core/dns.py), as golden listings: the zone of nodes and
hosted devices, and where other names go with no exit node, through an exit node,
with the exit node gone, and for split DNS."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest

from appliance.base.net import Endpoint
from appliance.core.dns import plan_dns
from appliance.core.prefs import Prefs
from appliance.wire.netmap import parse_netmap
from tests.unit.meshes import netmap_json, node
from tests.unit.test_fake_golden import check_golden

HOST = (Endpoint(ip_address("192.0.2.53"), 53), Endpoint(ip_address("2001:db8::53"), 53))
PHONE = {"dns_name": "alice-phone", "addresses": ["100.64.0.9", "fd7a:6d70:6900::9"]}
FRITZ = {"domains": ["fritz.box", "home.arpa"], "resolver": "192.168.77.1"}


def laptop_view(pi_routes: list[str], **pi_extra: Any) -> dict[str, Any]:
    pi = node("pi", pi_routes) | {"dns_name": "pi", "devices": [PHONE]} | pi_extra
    office = node("office") | {"dns_name": "office"}
    doc = netmap_json("laptop", [pi, office]) | {"capver": 3, "dns": {"domain": "mesh.internal"}}
    doc["self"]["dns_name"] = "laptop"
    return doc


CASES = {
    "no_exit_node": (laptop_view(["0.0.0.0/0", "::/0"]), Prefs()),
    "exit_node_in_use": (laptop_view(["0.0.0.0/0", "::/0"]), Prefs(exit_node="pi")),
    "exit_node_gone": (laptop_view([]), Prefs(exit_node="pi")),
    "split_dns": (laptop_view(["192.168.77.0/24"], lan_dns=FRITZ), Prefs()),
    "split_dns_not_accepted": (laptop_view(["192.168.77.0/24"], lan_dns=FRITZ), Prefs(accept_routes=False)),
    "split_dns_without_its_route": (laptop_view(["10.1.0.0/16"], lan_dns=FRITZ), Prefs()),
}


def test_dns_plan_golden() -> None:
    text = ""
    for name, (doc, prefs) in CASES.items():
        planned = plan_dns(parse_netmap(doc), prefs, HOST)
        assert planned is not None
        text += f"# {name}\n{planned.render()}\n"
    check_golden("dns_plan", text)


def test_dns_plan_exit_node_never_sends_to_the_host_resolvers() -> None:
    planned = plan_dns(parse_netmap(CASES["exit_node_in_use"][0]), Prefs(exit_node="pi"), HOST)
    assert planned is not None and not set(planned.default) & set(HOST)
    assert {e.host for e in planned.default} == {ip_address("100.64.0.1"), ip_address("fd7a:6d70:6900::1")}
    gone = plan_dns(parse_netmap(CASES["exit_node_gone"][0]), Prefs(exit_node="pi"), HOST)
    assert gone is not None and gone.default == () and gone.via.startswith("nowhere")


def test_dns_plan_none_without_names_from_control() -> None:
    doc = laptop_view([])
    del doc["dns"]
    assert plan_dns(parse_netmap(doc), Prefs(), HOST) is None


def test_dns_plan_own_address_is_never_an_upstream() -> None:
    looped = (Endpoint(ip_address("100.64.0.2"), 53), *HOST)  # resolv.conf already pointing at us
    planned = plan_dns(parse_netmap(laptop_view([])), Prefs(), looped)
    assert planned is not None and planned.default == HOST


@pytest.mark.parametrize("domain", ["mesh.internal", "x.mesh.internal"])
def test_dns_plan_split_dns_never_takes_the_mesh_domain(domain: str) -> None:
    doc = laptop_view(["192.168.77.0/24"], lan_dns={"domains": [domain], "resolver": "192.168.77.1"})
    planned = plan_dns(parse_netmap(doc), Prefs(), HOST)
    assert planned is not None and planned.split == {}
