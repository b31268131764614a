"""DNS labels made from names (wire/dnsname.py) and the DNS parts of the netmap."""

from __future__ import annotations

import pytest

from appliance.wire.dnsname import BadName, label_from, label_or, parse_domain, unique_label
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import ADDED_IN, CAPVER, netmap_json, parse_netmap
from tests.unit.meshes import netmap_json as mesh_json
from tests.unit.meshes import node


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("pi", "pi"),
        ("My Laptop!", "my-laptop"),
        ("alice's phone", "alice-s-phone"),
        ("  Desk.fritz.box ", "desk"),
        ("Müller PC", "xn--mller-pc-65a"),
        ("日本", "xn--wgv71a"),
        ("ＰＩ", "pi"),  # full-width letters, NFKC
        ("a_b__c", "a-b-c"),
        ("x" * 80, "x" * 57),
    ],
)
def test_dnsname_label_from_sanitises(name: str, label: str) -> None:
    assert label_from(name) == label


@pytest.mark.parametrize("name", ["", "---", "!!!", "😀😀", "ü" * 60])
def test_dnsname_label_from_refuses_with_the_name_quoted(name: str) -> None:
    with pytest.raises(BadName) as e:
        label_from(name, "device name")
    assert repr(name) in str(e.value) and "device name" in str(e.value)


def test_dnsname_label_or_falls_back_for_a_hostname() -> None:
    assert label_or("😀", "node") == "node" and label_or("Pi 4", "node") == "pi-4"


def test_dnsname_unique_label_takes_the_lowest_free_suffix() -> None:
    assert unique_label("pi", set()) == "pi"
    assert unique_label("pi", {"pi", "pi-2", "pi-4"}) == "pi-3"


@pytest.mark.parametrize("bad", ["", "a..b", "-a.b", "a.123", "a b", "x" * 250, 5])
def test_dnsname_parse_domain_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_domain(bad)


def test_dnsname_parse_domain_lowercases_and_drops_the_root_dot() -> None:
    assert parse_domain("Fritz.Box.") == "fritz.box"


def capver3_doc() -> dict[str, object]:
    peer = node("pi", ["192.168.178.0/24"]) | {
        "dns_name": "pi",
        "devices": [{"dns_name": "alice-phone", "addresses": ["100.64.0.9", "fd7a:6d70:6900::9"]}],
        "lan_dns": {"domains": ["fritz.box"], "resolver": "192.168.178.1"},
    }
    return mesh_json("laptop", [peer]) | {"capver": 3, "optional": [], "dns": {"domain": "mesh.internal"}}


def test_dnsname_netmap_round_trip_at_capver_3() -> None:
    netmap = parse_netmap(capver3_doc())
    assert netmap.dns is not None and netmap.dns.domain == "mesh.internal"
    pi = netmap.peers[0]
    assert pi.dns_name == "pi" and pi.devices[0].dns_name == "alice-phone"
    assert pi.lan_dns is not None and pi.lan_dns.domains == ("fritz.box",)
    assert parse_netmap(netmap_json(netmap)) == netmap
    old = netmap_json(netmap, 2)
    assert "dns" not in old and "dns_name" not in old["peers"][0]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("dns", "domain"), "not a domain"),
        (("peers", 0, "dns_name"), "Pi"),
        (("peers", 0, "devices"), [{"dns_name": "x", "addresses": []}]),
        (("peers", 0, "lan_dns"), {"domains": [], "resolver": "192.168.178.1"}),
        (("peers", 0, "lan_dns"), {"domains": ["lan"], "resolver": "fritz"}),
    ],
)
def test_dnsname_netmap_refuses_bad_dns_fields(path: tuple[object, ...], value: object) -> None:
    doc = capver3_doc()
    target: object = doc
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = value  # type: ignore[index]
    with pytest.raises(ConfigError):
        parse_netmap(doc)


def test_dnsname_capver_is_3() -> None:
    # names came with version 3; version 4 (compressed answers, wire/mapzip.py) added no field
    assert CAPVER >= 3 and ADDED_IN["dns"] == ADDED_IN["dns_name"] == 3
