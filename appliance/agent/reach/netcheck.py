"""`meshpi netcheck`: what this node's network allows, and whether the internet
(a phone with the stock WireGuard app, a laptop away from home) can reach it.

`verdict` is pure: from the prefs, the port mapping's state and a STUN round, it
says "reachable from outside: yes/no" and why, in words an owner can act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from appliance.agent.reach.phones import cgnat_reason
from appliance.agent.reach.portmap import PortMapState
from appliance.agent.reach.stun import Discovery
from appliance.base.net import Endpoint
from appliance.core.prefs import Prefs

CGNAT = IPv4Network("100.64.0.0/10")  # RFC 6598: a carrier's NAT in front of the home router


@dataclass(frozen=True)
class Verdict:
    reachable: bool
    why: str
    cgnat: bool = False


_ELSEWHERE = "run control (and its relay) on a reachable host, a VPS: meshpi-control serve"
_TURN_ON = "turn on UPnP or NAT-PMP/PCP on the router"


def verdict(prefs: Prefs, mapping: PortMapState | None, stun: Discovery | None) -> Verdict:
    mapped = mapping.external if mapping is not None else None
    seen = stun.v4 if stun is not None else None
    if mapped is not None and mapped.host.version == 4 and mapped.host in CGNAT:
        why = f"no: the home router's WAN address {mapped.host} is behind a carrier's NAT (100.64.0.0/10)"
        return Verdict(False, f"{why}; {_ELSEWHERE}", cgnat=True)
    if mapped is not None and seen is not None and cgnat_reason(mapping, stun) is not None:
        why = f"no: the router maps {mapped} but the internet sees this node as {seen.host}"
        return Verdict(False, f"{why} (another NAT in front of the router); {_ELSEWHERE}", cgnat=True)
    if mapped is not None:
        via = mapping.protocol if mapping is not None else "?"
        return Verdict(True, f"yes: the home router forwards {mapped} to this node ({via})")
    if prefs.advertise_endpoints:
        shown = ", ".join(map(str, prefs.advertise_endpoints))
        return Verdict(True, f"yes, if the router forwards {shown} to this node (set by hand, not checked)")
    if stun is None or (stun.v4 is None and stun.v6 is None):
        return Verdict(False, "no: no STUN server answered (UDP blocked, or control not reachable)")
    if stun.v6 is not None:
        return Verdict(True, f"over IPv6 only, if the router lets it in ({stun.v6}); over IPv4: {_TURN_ON}")
    if stun.varies_by_destination:
        why = "no: the NAT maps the WireGuard port per destination (symmetric) and granted no mapping"
        return Verdict(False, f"{why}; {_TURN_ON}; meshpi nodes still connect through the relay")
    why = f"no: the router granted no port mapping; {_TURN_ON}, or forward UDP {prefs.listen_port} here"
    return Verdict(
        False, f"{why} and give it with --advertise-endpoint; meshpi nodes can still punch to {seen}"
    )


def _public(seen: Endpoint | None) -> str | None:
    """A reflexive address as the internet sees it; a control on this very node
    answers STUN from loopback, which says nothing about the internet."""
    return None if seen is None or seen.host.is_loopback else str(seen)


def report(prefs: Prefs, mapping: PortMapState | None, stun: Discovery | None,
           endpoints: list[str]) -> dict[str, Any]:  # fmt: skip
    """The LocalAPI's /v1/netcheck."""
    v = verdict(prefs, mapping, stun)
    return {
        "udp": stun is not None and (stun.v4 is not None or stun.v6 is not None),
        "ipv4": _public(stun.v4 if stun is not None else None),
        "ipv6": _public(stun.v6 if stun is not None else None),
        "varies_by_destination": stun.varies_by_destination if stun is not None else None,
        "stun_errors": list(stun.errors) if stun is not None else [],
        "port_mapping": mapping.protocol if mapping is not None else None,
        "mapped": str(mapping.external) if mapping is not None and mapping.external else None,
        "endpoints": endpoints,
        "reachable": v.reachable,
        "why": v.why,
        "cgnat": v.cgnat,
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"UDP: {'works' if r['udp'] else 'no STUN answer'}",
        f"IPv4 as the internet sees it: {r['ipv4'] or '-'}",
        f"IPv6 as the internet sees it: {r['ipv6'] or '-'}",
        "mapping varies by destination (symmetric NAT): "
        + {True: "yes", False: "no", None: "unknown (one STUN server)"}[r["varies_by_destination"]],
        f"port mapping: {r['port_mapping'] or 'none'}{' ' + r['mapped'] if r['mapped'] else ''}",
        f"endpoints told to peers: {', '.join(r['endpoints']) or 'none'}",
        "relay: " + ("not connected" if r.get("relay_ms") is None else f"{r['relay_ms']} ms round trip"),
        f"reachable from outside: {r['why']}",
    ]
    checks = r.get("checks")
    if checks is not None:
        lines.append(format_checks(checks))
    phones = r.get("phones")
    if phones is not None and phones["endpoint"] is not None:
        lines.append(f"phones dial: {phones['endpoint']} ({phones['source']}: {phones['why']})")
    elif phones is not None:
        lines.append(f"{phones['why']}; fix: {phones['fix']}")
    control = r.get("control")
    if control is not None and control["local"]:
        fix = f"; fix: {control['fix']}" if control["fix"] else ""
        url = control["url"] or "not reachable from outside"
        lines.append(f"control on this node: {url} ({control['why']}{fix})")
    return "\n".join(lines)


def format_checks(checks: dict[str, Any]) -> str:
    """The peers' connectivity checks at the WireGuard port (reach/checks.py's counters)."""
    refused = {k: n for k, n in checks["refused"].items() if n}
    why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(refused.items())) or "none"
    return (f"path checks: {checks['sent']} sent, {checks['proven']} proven, "
            f"{checks['answered']} answered; refused: {why}")  # fmt: skip
