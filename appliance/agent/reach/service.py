"""Reachability, run by the agent beside its loop: port mapping on the home router
(portmap.py) and STUN from the WireGuard port (stun.py) give this node's candidate
endpoints, which go to control with what the node offers, and from there to peers.

It subscribes to the loop's `Applied` (bus.py): the WireGuard port and fwmark, and
the prefs, are what the kernel holds now. The loop's tick calls `tick()`, which
notices a new mapping or a new public address and has the link tell control.

Candidates, best first (a peer tries them in this order; the first is the one a
peer without meshpi, a phone, is given):
  1. what the owner says (prefs `advertise_endpoints`: a port forward, a DNS name's address);
  2. the mapped address (PCP, NAT-PMP or UPnP-IGD on the home router): reachable by anyone;
  3. the reflexive addresses STUN saw (IPv4 unless the NAT maps per destination, IPv6).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.agent.bus import Applied
from appliance.agent.reach.control_map import ControlMapper
from appliance.agent.reach.phones import PhoneReach, phones
from appliance.agent.reach.portmap import PortMapper
from appliance.agent.reach.stun import Port, StunDiscovery
from appliance.base.net import Endpoint
from appliance.core.prefs import Prefs

log = logging.getLogger(__name__)

MapperFactory = Callable[[int], PortMapper]
# Seconds between looks at the home router (PCP renewal, NAT-PMP/UPnP external address):
# the router knows its new WAN address at once, so this bounds how late it is noticed.
MAP_CHECK = 10.0


def _mapper(port: int) -> PortMapper:
    return PortMapper(port, probe_interval=MAP_CHECK).start()


def candidates(prefs: Prefs | None, mapped: Endpoint | None, stun: Any) -> tuple[Endpoint, ...]:
    """This node's candidate endpoints, best first, without repeats."""
    found: list[Endpoint] = list(prefs.advertise_endpoints) if prefs is not None else []
    if mapped is not None:
        found.append(mapped)
    if stun is not None:
        # A loopback answer (control's STUN on this very node) is no address for peers.
        if stun.v4 is not None and not stun.varies_by_destination and not stun.v4.host.is_loopback:
            found.append(stun.v4)
        if stun.v6 is not None:
            found.append(stun.v6)
    return tuple(dict.fromkeys(found))


class Reachability:
    def __init__(
        self,
        servers: Callable[[], Sequence[Endpoint]],
        announce: Callable[[], None],
        mapper: MapperFactory = _mapper,
        stun: Callable[[Callable[[], Port | None]], StunDiscovery] | None = None,
    ) -> None:
        """`announce()` is called (on the caller's thread of `tick`) when the
        candidates changed: the agent tells control then."""
        self._announce, self._make_mapper = announce, mapper
        self._lock = threading.Lock()
        self._port: Port | None = None
        self._prefs: Prefs | None = None
        self._mapper: PortMapper | None = None
        self._announced: tuple[Endpoint, ...] = ()
        self._seen: tuple[Endpoint | None, Endpoint | None] = (
            None,
            None,
        )  # (mapped, STUN v4) at the last tick
        self.stun = (stun or (lambda port: StunDiscovery(servers, port)))(lambda: self._port)
        self._started = False
        # Control on this node (control_map.py): its TCP port while it runs here, else None.
        self.local_control: Callable[[], int | None] = lambda: None
        # Called when this node's public address moved (the agent re-polls control then).
        self.on_moved: Callable[[], None] = lambda: None
        self.control = ControlMapper()

    def on_applied(self, event: Applied) -> None:
        """Subscriber of the bus: the kernel now holds this port, fwmark and prefs."""
        prefs = event.prefs
        port = Port(prefs.listen_port, prefs.fwmark)
        with self._lock:
            self._prefs = prefs
            moved = port != self._port
            self._port = port
            if self._mapper is not None and (moved or not prefs.port_mapping):
                self._close_mapper()
            if self._mapper is None and prefs.port_mapping:
                self._mapper = self._make_mapper(prefs.listen_port)
            if not self._started:
                self.stun.start()
                self._started = True
        if moved:
            self.stun.probe_now()

    def candidates(self) -> tuple[Endpoint, ...]:
        with self._lock:
            mapper, prefs = self._mapper, self._prefs
        mapped = mapper.state.external if mapper is not None else None
        return candidates(prefs, mapped, self.stun.last)

    def phones(self, prefs: Prefs | None = None) -> PhoneReach:
        """What a phone's config dials (phones.py); `prefs`: the owner's newest, if
        not yet applied."""
        with self._lock:
            mapper, applied = self._mapper, self._prefs
        mapping = mapper.state if mapper is not None else None
        return phones(prefs or applied or Prefs(), mapping, self.stun.last)

    def tick(self) -> None:
        """Tell control when the candidates changed (a mapping came or went, the
        public address moved): within one tick of the loop."""
        with self._lock:
            prefs = self._prefs
        # Before the first apply too: create-mesh shares control's public URL as soon as it can.
        self.control.follow(self.local_control(), prefs is None or prefs.port_mapping)
        self._cross_check()
        now = self.candidates()
        if now != self._announced:
            log.info("this node's endpoints: %s", ", ".join(map(str, now)) or "none known")
            self._announced = now
            self._announce()

    def _cross_check(self) -> None:
        """A new public address seen one way is checked the other way at once: the
        router's new WAN address makes STUN probe now, STUN's new reflexive address
        makes the mapper look at the router now. So both agree within a second and the
        candidates (and the phones' verdict) do not flap while one lags."""
        with self._lock:
            mapper = self._mapper
        mapped = mapper.state.external if mapper is not None else None
        last = self.stun.last
        seen = last.v4 if last is not None else None
        before_mapped, before_seen = self._seen
        self._seen = (mapped, seen)
        moved = False
        if mapped is not None and before_mapped is not None and mapped.host != before_mapped.host:
            log.info("the home router's mapping moved to %s: STUN again now", mapped)
            self.stun.probe_now()
            moved = True
        if seen is not None and before_seen is not None and seen.host != before_seen.host:
            if mapper is not None:
                log.info("STUN sees a new public address %s: asking the home router now", seen)
                mapper.check_now()
            moved = True
        if moved:  # connections through the NAT (control's long-poll) rode the old address
            self.on_moved()

    def status(self) -> dict[str, Any]:
        with self._lock:
            mapper = self._mapper
        stun = self.stun.last
        portmap = mapper.state if mapper is not None else None
        return {
            "endpoints": [str(e) for e in self.candidates()],
            "port_mapping": None if portmap is None else {
                "protocol": portmap.protocol,
                "external": str(portmap.external) if portmap.external else None,
                "lifetime": portmap.lifetime,
                "error": portmap.last_error,
            },
            "stun": None if stun is None else {
                "ipv4": str(stun.v4) if stun.v4 else None,
                "ipv6": str(stun.v6) if stun.v6 else None,
                "varies_by_destination": stun.varies_by_destination,
                "errors": list(stun.errors),
            },
            "phones": self.phones().to_json(),
            "control": self.control.verdict(stun).to_json(),
        }  # fmt: skip

    def report(self) -> dict[str, Any]:
        """netcheck's report on the last STUN round and the mapping, without probing."""
        from appliance.agent.reach.netcheck import report

        with self._lock:
            mapper, prefs = self._mapper, self._prefs
        stun = self.stun.last
        endpoints = [str(e) for e in self.candidates()]
        return report(prefs or Prefs(), mapper.state if mapper else None, stun, endpoints)

    def netcheck(self, timeout: float = 5.0) -> dict[str, Any]:
        """A STUN round now, then the report (netcheck.py)."""
        from appliance.agent.reach.netcheck import report

        self.stun.probe_now()
        stun = self.stun.wait_round(self.stun.round, timeout) or self.stun.last
        with self._lock:
            mapper, prefs = self._mapper, self._prefs
        mapping = mapper.state if mapper else None
        shown = report(prefs or Prefs(), mapping, stun, [str(e) for e in self.candidates()])
        return shown | {
            "phones": phones(prefs or Prefs(), mapping, stun).to_json(),
            "control": self.control.verdict(stun).to_json(),
        }

    def control_public(self) -> Endpoint | None:
        """Where nodes away from home reach the control on this node (None: they cannot)."""
        return self.control.public(self.stun.last)

    def release(self) -> None:
        """Remove the router's mapping (logout); the next apply maps again."""
        with self._lock:
            self._close_mapper()

    def close(self) -> None:
        """Stop probing and remove the router's mapping (the agent stops or logs out)."""
        with self._lock:
            self._close_mapper()
        self.control.close()
        if self._started:
            self.stun.close()

    def _close_mapper(self) -> None:
        if self._mapper is not None:
            self._mapper.close()
            self._mapper = None


STUN_PORT = 3478  # meshpi-control serves STUN here


def stun_servers(login_file: Path, extra: Sequence[Endpoint]) -> list[Endpoint]:
    """Control's own STUN server (the login URL's host, port 3478) and the prefs' others."""
    from appliance.agent.control.link import Login
    from appliance.wire.fields import ConfigError
    from appliance.wire.loginurl import parse_login_url

    found = list(extra)
    try:
        login = Login.load(login_file)
        if login is not None:
            host = urlsplit(parse_login_url(login.server)[0]).hostname or ""
            for info in socket.getaddrinfo(host, STUN_PORT, type=socket.SOCK_DGRAM):
                found.append(Endpoint(ip_address(info[4][0]), STUN_PORT))
    except (OSError, ValueError, ConfigError) as e:
        log.debug("no STUN server from the login: %s", e)
    return list(dict.fromkeys(found))
