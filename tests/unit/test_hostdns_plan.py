"""The pure part of the host's DNS (core/hostdns.py, agent/dns/host.py's plan)."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest

from appliance.agent.bus import Applied
from appliance.agent.dns import host as host_module
from appliance.agent.dns.host import HostDnsLink, mesh_domains, planned
from appliance.core.hostdns import (
    HostDnsConfig,
    host_dns_config,
    is_ours,
    parse_nameservers,
    render_resolv_conf,
    resolvectl_domains,
)
from appliance.core.prefs import Prefs
from appliance.wire.netmap import parse_netmap

V4, V6 = ip_address("100.64.0.2"), ip_address("fd7a:6d70:6900::2")
KEY = "CzzdLnSKWkyuuKDQc4jTtyMfo2X3FKzlrKgQVdXSjQY="  # any 32 bytes


def netmap(names: bool = True) -> object:
    return parse_netmap({
        **({"capver": 3, "dns": {"domain": "mesh.internal"}} if names else {}),
        "mesh": {"ipv4": "100.64.0.0/10", "ipv6": "fd7a:6d70:6900::/48"},
        "self": {"name": "laptop", "public_key": KEY, "addresses": [str(V6), str(V4)]},
        "peers": [],
    })  # fmt: skip


def test_hostdns_config_lists_ipv4_first_and_dedups_domains() -> None:
    cfg = host_dns_config("meshpi0", (V6, V4), "Mesh.Internal.", ("fritz.box", "mesh.internal"), True)
    assert cfg == HostDnsConfig("meshpi0", (V4, V6), ("mesh.internal", "fritz.box"), True)


def test_hostdns_config_without_addresses_leaves_the_host_alone() -> None:
    assert host_dns_config("meshpi0", (), "mesh.internal", (), False) is None


def test_hostdns_config_refuses_no_servers_and_bad_domains() -> None:
    with pytest.raises(ValueError, match="no servers"):
        HostDnsConfig("meshpi0", (), (), False)
    with pytest.raises(ValueError, match="'Bad.'"):
        HostDnsConfig("meshpi0", (V4,), ("Bad.",), False)


def test_hostdns_resolv_conf_is_ours_and_names_only_our_resolver() -> None:
    text = render_resolv_conf(HostDnsConfig("meshpi0", (V4, V6), ("mesh.internal", "fritz.box"), True))
    assert is_ours(text) and is_ours(text.encode())
    assert parse_nameservers(text) == (V4, V6)
    assert "search mesh.internal\n" in text and "fritz.box" not in text  # split domains are never searched


def test_hostdns_parse_nameservers_skips_what_glibc_would_not_use() -> None:
    text = "# hi\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\nnameserver bogus\nnameserver\n" \
           "  nameserver 10.0.0.2\nnameserver 10.0.0.1\nsearch lan\n"  # fmt: skip
    assert parse_nameservers(text) == (ip_address("10.0.0.1"),)  # glibc: the keyword starts the line
    assert not is_ours(text)


@pytest.mark.parametrize(
    ("default_route", "expected"),
    [(False, ["mesh.internal", "~fritz.box"]), (True, ["mesh.internal", "~fritz.box", "~."])],
)
def test_hostdns_resolved_domains_route_everything_only_with_an_exit_node(
    default_route: bool, expected: list[str]
) -> None:
    cfg = HostDnsConfig("meshpi0", (V4,), ("mesh.internal", "fritz.box"), default_route)
    assert resolvectl_domains(cfg) == expected


def test_hostdns_plan_follows_exit_node_and_accept_dns() -> None:
    nm = netmap()
    with_exit = planned(Applied(nm, Prefs(exit_node="pi"), 0))  # type: ignore[arg-type]
    assert with_exit is not None and with_exit.default_route and with_exit.servers == (V4, V6)
    without = planned(Applied(nm, Prefs(), 0))  # type: ignore[arg-type]
    assert without is not None and not without.default_route
    assert planned(Applied(nm, Prefs(accept_dns=False), 0)) is None  # type: ignore[arg-type]
    assert planned(Applied(None, Prefs(), 0)) is None
    assert planned(Applied(netmap(names=False), Prefs(), 0)) is None  # type: ignore[arg-type]  # no resolver runs


def test_hostdns_domains_are_the_mesh_and_the_accepted_lan_domains() -> None:
    pi = {"name": "pi", "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "addresses": ["100.64.0.1"],
          "routes": ["0.0.0.0/0", "192.168.77.0/24"],
          "lan_dns": {"domains": ["fritz.box", "home.arpa"], "resolver": "192.168.77.1"}}  # fmt: skip
    nm = parse_netmap({
        "capver": 3, "dns": {"domain": "mesh.internal"},
        "mesh": {"ipv4": "100.64.0.0/10", "ipv6": "fd7a:6d70:6900::/48"},
        "self": {"name": "laptop", "public_key": KEY, "addresses": [str(V4)]},
        "peers": [pi],
    })  # fmt: skip
    assert mesh_domains(nm, Prefs()) == ("mesh.internal", ("fritz.box", "home.arpa"))
    assert mesh_domains(nm, Prefs(accept_routes=False)) == ("mesh.internal", ())
    cfg = planned(Applied(nm, Prefs(exit_node="pi"), 0))
    assert cfg is not None and cfg.domains == ("mesh.internal", "fritz.box", "home.arpa")


def test_hostdns_link_looks_at_the_host_again_only_on_a_change_or_after_recheck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.77.0.1\n")
    link = HostDnsLink(tmp_path / "hostdns.json", resolv)
    clock = [1000.0]
    monkeypatch.setattr(host_module.time, "monotonic", lambda: clock[0])
    event = Applied(netmap(), Prefs(exit_node="pi"), 0)  # type: ignore[arg-type]
    link.on_applied(event)
    assert is_ours(resolv.read_text())
    resolv.write_text("nameserver 10.77.0.254\n")  # a DHCP client, between two deltas
    link.on_applied(event)  # the same plan, 1 s later: not even a file read
    assert resolv.read_text() == "nameserver 10.77.0.254\n"
    clock[0] += host_module.RECHECK
    link.on_applied(event)
    assert is_ours(resolv.read_text()) and link.original_servers() == (ip_address("10.77.0.254"),)
    link.on_applied(Applied(netmap(), Prefs(exit_node="pi", accept_dns=False), 0))  # type: ignore[arg-type]
    assert resolv.read_text() == "nameserver 10.77.0.254\n"  # a changed plan acts at once
