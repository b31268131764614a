"""What a hosted phone's config dials (reach/phones.py), and the owner's
`public_endpoint` pref (core/hostport.py): hostile text refused, naming the value."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from appliance.agent.reach.phones import phones
from appliance.agent.reach.portmap import PortMapState
from appliance.agent.reach.stun import Discovery
from appliance.base.net import Endpoint
from appliance.core.hostport import parse_host_port
from appliance.core.prefs import Prefs, parse_prefs
from appliance.wire.fields import ConfigError


def ep(host: str, port: int = 51820) -> Endpoint:
    return Endpoint(IPv4Address(host), port)


def stun(v4: str | None, varies: bool | None = False) -> Discovery:
    return Discovery(ep(v4, 40001) if v4 else None, None, 0.0, None, None, varies)


def mapping(external: str | None, port: int = 51820, error: str | None = None) -> PortMapState:
    return PortMapState("udp", 51820, "nat-pmp" if external else None,
                        external=ep(external, port) if external else None, last_error=error)  # fmt: skip


def test_phones_dial_the_mapped_port_first() -> None:
    p = phones(Prefs(), mapping("5.5.5.1", 51999), stun("5.5.5.1"))
    assert (p.endpoint, p.source, p.reachable, p.fix) == ("5.5.5.1:51999", "port-mapping", True, None)
    assert "NAT-PMP" in p.why


def test_phones_dial_the_owners_name_with_the_mapped_port() -> None:
    prefs = parse_prefs({"public_endpoint": "Home.Example.org"})
    p = phones(prefs, mapping("5.5.5.1", 51999), stun("5.5.5.1"))
    assert (p.endpoint, p.source, p.reachable) == ("home.example.org:51999", "public_endpoint", True)
    assert phones(prefs, None, None).endpoint == "home.example.org:51820"
    given = parse_prefs({"public_endpoint": "[2001:db8::7]:443"})
    assert phones(given, mapping("5.5.5.1"), None).endpoint == "[2001:db8::7]:443"


def test_phones_a_forward_is_dialled_at_the_address_stun_sees_now() -> None:
    prefs = Prefs(advertise_endpoints=(ep("198.51.100.1", 40000),))
    p = phones(prefs, mapping(None, error="no gateway answered"), stun("203.0.113.9"))
    assert (p.endpoint, p.source, p.reachable) == ("203.0.113.9:40000", "stun", True)
    # Without STUN (or a NAT that maps per destination) the typed address, said unchecked.
    for seen in (None, stun("203.0.113.9", varies=True)):
        p = phones(prefs, None, seen)
        assert (p.endpoint, p.source) == ("198.51.100.1:40000", "advertise_endpoints")
        assert "not checked" in p.why


def test_phones_without_mapping_or_forward_are_told_why_and_the_fix() -> None:
    p = phones(Prefs(), mapping(None, error="PCP: refused; UPnP: no IGD"), stun("203.0.113.9"))
    assert p.endpoint is None and not p.reachable and not p.cgnat
    assert p.why.startswith("phones cannot reach this Pi from outside") and "no IGD" in p.why
    assert p.fix is not None and "UPnP" in p.fix and "UDP 51820" in p.fix and "public_endpoint" in p.fix
    off = phones(Prefs(port_mapping=False), None, stun("203.0.113.9"))
    assert "port mapping is off" in off.why and off.fix is not None and "port_mapping" in off.fix


@pytest.mark.parametrize(
    ("mapped", "seen", "words"),
    [
        ("100.72.1.9", "203.0.113.50", "100.64.0.0/10"),
        ("192.0.2.77", "203.0.113.50", "internet sees 203.0.113.50"),
    ],
)
def test_phones_behind_a_carriers_nat_cannot_be_reached_even_with_a_mapping(
    mapped: str, seen: str, words: str
) -> None:
    p = phones(Prefs(), mapping(mapped), stun(seen))
    assert p.endpoint is None and not p.reachable and p.cgnat and words in p.why and "CGNAT" in p.why
    assert p.fix is not None and "public IPv4" in p.fix
    # The owner's name is still used, with the doubt said.
    named = phones(parse_prefs({"public_endpoint": "home.example.org"}), mapping(mapped), stun(seen))
    assert named.endpoint == "home.example.org:51820" and named.cgnat and "CGNAT" in named.why


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("home.example.org", "home.example.org", None), ("203.0.113.7:51820", "203.0.113.7", 51820),
     ("[2001:db8::1]:1", "2001:db8::1", 1), ("2001:db8::1".join("[]"), "2001:db8::1", None),
     ("a-b.c9.example.", "a-b.c9.example", None)],
)  # fmt: skip
def test_hostport_accepts_addresses_and_names(text: str, host: str, port: int | None) -> None:
    parsed = parse_host_port(text)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize(
    "text",
    ["", "home example.org", " home.example.org", "home.example.org:0", "home.example.org:65536",
     "home.example.org:51820x", "home.example.org:", "2001:db8::1", "[2001:db8::1", "[2001:db8::1]x",
     "-bad.example.org", "bad-.example.org", "a..b", "x" * 64 + ".org", "a." * 130 + "org",
     "x" * 100_000, "home.example.org\n", "home.example.org#x", "hôme.example.org", "0.0.0.0",
     "127.0.0.1", "224.0.0.1:5", "999.1.1.1", "1.2.3", "ex_ample.org", "[::]:51820"],
)  # fmt: skip
def test_hostport_refuses_hostile_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_prefs_public_endpoint_refusal_names_the_field_and_the_value() -> None:
    with pytest.raises(ConfigError) as e:
        parse_prefs({"public_endpoint": "my home.example.org"})
    assert e.value.status == 400
    assert "public_endpoint: 'my home.example.org'" in e.value.message and "no spaces" in e.value.message
    with pytest.raises(ConfigError) as e:
        parse_prefs({"public_endpoint": "x" * 5000})
    assert "longer than 260" in e.value.message
    with pytest.raises(ConfigError):
        parse_prefs({"public_endpoint": ["home.example.org"]})
    kept = parse_prefs({"public_endpoint": "home.example.org:443"})
    assert kept.to_json()["public_endpoint"] == "home.example.org:443"
    assert parse_prefs(kept.to_json()) == kept
    assert parse_prefs({"public_endpoint": ""}).public_endpoint is None
    assert parse_prefs({"public_endpoint": None}).public_endpoint is None


def test_phones_a_stun_server_on_this_host_says_nothing_about_a_carriers_nat() -> None:
    # Control on the Pi itself: its STUN answers 127.0.0.1 (or a LAN address).
    for local in ("127.0.0.1", "192.168.77.2"):
        p = phones(Prefs(), mapping("5.5.5.1"), stun(local))
        assert (p.endpoint, p.reachable, p.cgnat) == ("5.5.5.1:51820", True, False)
        forward = phones(Prefs(advertise_endpoints=(ep("198.51.100.1"),)), None, stun(local))
        assert forward.endpoint == "198.51.100.1:51820"
