"""`meshpi netcheck`'s verdict: reachable from outside or not, and why, from the
port mapping's state and a STUN round."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from appliance.agent.reach.netcheck import format_report, report, verdict
from appliance.agent.reach.portmap import PortMapState
from appliance.agent.reach.stun import Discovery
from appliance.base.net import Endpoint
from appliance.core.prefs import Prefs


def ep(host: str, port: int = 51820) -> Endpoint:
    return Endpoint(IPv6Address(host) if ":" in host else IPv4Address(host), port)


def stun(v4: str | None, v6: str | None = None, varies: bool | None = False) -> Discovery:
    return Discovery(ep(v4) if v4 else None, ep(v6) if v6 else None, 0.0, None, None, varies)


def mapping(external: str | None, protocol: str = "pcp") -> PortMapState:
    return PortMapState(
        "udp", 51820, protocol if external else None, external=ep(external) if external else None
    )


def test_netcheck_a_mapping_the_internet_agrees_with_is_reachable() -> None:
    v = verdict(Prefs(), mapping("5.5.5.1"), stun("5.5.5.1"))
    assert v.reachable and "5.5.5.1:51820" in v.why and "pcp" in v.why


def test_netcheck_a_wan_address_in_100_64_is_a_carriers_nat() -> None:
    v = verdict(Prefs(), mapping("100.72.1.9"), stun("203.0.113.50"))
    assert not v.reachable and v.cgnat and "carrier" in v.why and "VPS" in v.why


def test_netcheck_a_reflexive_address_other_than_the_mapped_one_is_another_nat() -> None:
    v = verdict(Prefs(), mapping("192.0.2.77"), stun("203.0.113.50"))
    assert not v.reachable and v.cgnat and "203.0.113.50" in v.why


def test_netcheck_no_mapping_says_what_to_turn_on() -> None:
    v = verdict(Prefs(), mapping(None), stun("203.0.113.50"))
    assert not v.reachable and "UPnP" in v.why and "51820" in v.why
    sym = verdict(Prefs(), None, stun("203.0.113.50", varies=True))
    assert not sym.reachable and "symmetric" in sym.why and "relay" in sym.why


def test_netcheck_no_stun_answer_says_udp_may_be_blocked() -> None:
    assert "UDP" in verdict(Prefs(), None, None).why
    r = report(Prefs(), None, None, [])
    assert r["udp"] is False and r["reachable"] is False
    assert "no STUN answer" in format_report(r)


def test_netcheck_a_hand_made_forward_is_believed_but_said_unchecked() -> None:
    prefs = Prefs(advertise_endpoints=(ep("198.51.100.1"),))
    v = verdict(prefs, None, stun("198.51.100.1"))
    assert v.reachable and "not checked" in v.why
