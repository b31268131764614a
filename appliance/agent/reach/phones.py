"""What a phone's WireGuard config should dial to reach this node from outside.

A stock WireGuard app cannot punch through a NAT, nor follow candidates: its config
holds one `Endpoint =`, and this node is its hub. The best one, in order:

  1. the owner's name (prefs `public_endpoint`, host[:port]: dynamic DNS, which
     follows the home's address when the provider changes it);
  2. the mapped port (PCP, NAT-PMP, UPnP-IGD): the router forwards it, checked;
  3. a forward the owner made by hand (prefs `advertise_endpoints`): at the
     address the internet sees now (STUN), else as typed.

None of these: phones cannot reach this node from outside, and `why` and `fix` say
so in words an owner can act on. A carrier's NAT in front of the home router (its
WAN address in 100.64.0.0/10, or the internet seeing another address than the
router's) makes a mapping worthless and is said first.

Pure: `phones(prefs, mapping, stun)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, ip_network
from typing import Any

from appliance.agent.reach.portmap import PortMapState
from appliance.agent.reach.stun import Discovery
from appliance.base.net import Endpoint
from appliance.core.prefs import Prefs

CGNAT = IPv4Network("100.64.0.0/10")  # RFC 6598: a carrier's NAT in front of the home router
# What a STUN server on this host or its LAN sees (documentation ranges are not among them).
_LOCAL = tuple(ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))

FIX_CGNAT = (
    "ask the internet provider for a public IPv4 address (or IPv6), or make a host with one (a VPS) "
    "the phones' hub; meshpi laptops still connect through the relay"
)


@dataclass(frozen=True)
class PhoneReach:
    endpoint: str | None  # host:port for `Endpoint =`; None: nothing outside can dial
    source: str | None  # "public_endpoint" | "port-mapping" | "stun" | "advertise_endpoints"
    reachable: bool
    why: str
    fix: str | None = None  # what the owner can do, when not reachable (or doubtful)
    cgnat: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "source": self.source, "reachable": self.reachable,
                "why": self.why, "fix": self.fix, "cgnat": self.cgnat}  # fmt: skip


def cgnat_reason(mapping: PortMapState | None, stun: Discovery | None) -> str | None:
    """Why a carrier's NAT is in front of the home router, or None when none is seen."""
    mapped = mapping.external if mapping is not None else None
    if mapped is None or mapped.host.version != 4:
        return None
    if mapped.host in CGNAT:
        return (f"the home router's WAN address {mapped.host} is in 100.64.0.0/10: "
                "the provider's carrier-grade NAT (CGNAT) is in front of it")  # fmt: skip
    seen = stun.v4 if stun is not None else None
    # A STUN server on this host or LAN (control on the Pi itself) sees a local address:
    # that says nothing about the internet.
    if seen is not None and seen.host != mapped.host and not local_address(seen):
        return (f"the home router's WAN address is {mapped.host} but the internet sees {seen.host}: "
                "another NAT (the provider's CGNAT) is in front of it")  # fmt: skip
    return None


def local_address(endpoint: Endpoint) -> bool:
    """Seen from this host or its LAN: loopback, link-local, RFC 1918 or ULA."""
    host = endpoint.host
    return host.is_loopback or host.is_link_local or any(host in net for net in _LOCAL)


def phones(prefs: Prefs, mapping: PortMapState | None, stun: Discovery | None) -> PhoneReach:
    cgnat = cgnat_reason(mapping, stun)
    mapped = mapping.external if mapping is not None else None
    protocol = mapping.protocol if mapping is not None else None
    seen = stun.v4 if stun is not None and not stun.varies_by_destination else None
    if seen is not None and local_address(seen):
        seen = None
    port = prefs.listen_port
    if prefs.public_endpoint is not None:
        # The owner's word wins; a mapping's external port is the one to dial when the name has none.
        endpoint = prefs.public_endpoint.with_port(mapped.port if mapped is not None else port)
        why = f"the owner's name {prefs.public_endpoint} (public_endpoint); not checked from here"
        if cgnat is not None:
            return PhoneReach(endpoint, "public_endpoint", True, f"{why}; but {cgnat}", FIX_CGNAT, cgnat=True)
        return PhoneReach(endpoint, "public_endpoint", True, why)
    if cgnat is not None:
        return PhoneReach(None, None, False, f"phones cannot reach this Pi from outside: {cgnat}",
                          FIX_CGNAT, cgnat=True)  # fmt: skip
    if mapped is not None:
        via = {"pcp": "PCP", "nat-pmp": "NAT-PMP", "upnp": "UPnP-IGD"}.get(protocol or "", "?")
        why = f"the home router forwards {mapped} to this Pi ({via} port mapping)"
        return PhoneReach(str(mapped), "port-mapping", True, why)
    if prefs.advertise_endpoints:
        forward = prefs.advertise_endpoints[0]
        if forward.host.version == 4 and seen is not None:
            # A forward follows the home's address; the address typed may be an old one.
            now = Endpoint(seen.host, forward.port)
            why = (f"the router forwards port {forward.port} (advertise_endpoints) and the internet "
                   f"sees this Pi at {seen.host}")  # fmt: skip
            return PhoneReach(str(now), "stun", True, why)
        why = f"the owner says the router forwards {forward} here (advertise_endpoints); not checked"
        return PhoneReach(str(forward), "advertise_endpoints", True, why)
    forward_fix = (f"forward UDP {port} on the router to this Pi and set public_endpoint to the "
                   "home's name (dynamic DNS) or address")  # fmt: skip
    if not prefs.port_mapping:
        why = "port mapping is off (prefs port_mapping) and no port forward is known"
        return PhoneReach(None, None, False, f"phones cannot reach this Pi from outside: {why}",
                          f"turn port_mapping on, or {forward_fix}")  # fmt: skip
    error = mapping.last_error if mapping is not None else None
    if error is None:
        why = "no port mapping yet (still asking the home router)"
    else:
        why = f"the home router granted no port mapping ({error})"
    return PhoneReach(None, None, False, f"phones cannot reach this Pi from outside: {why}",
                      f"turn on UPnP-IGD or NAT-PMP/PCP on the router, or {forward_fix}")  # fmt: skip
