"""Reachability's tick (reach/service.py), with the port mapper and STUN faked: a new
public address seen one way is checked the other way at once and re-announced, the
agent is told to re-poll control, and control on this node is mapped while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from appliance.agent.bus import Applied
from appliance.agent.reach.portmap import PortMapState
from appliance.agent.reach.service import Reachability
from appliance.agent.reach.stun import Discovery
from appliance.base.net import Endpoint
from appliance.core.prefs import Prefs


def ep(host: str, port: int = 51820) -> Endpoint:
    return Endpoint(IPv4Address(host), port)


@dataclass
class FakeMapper:
    state: PortMapState = field(default_factory=lambda: PortMapState("udp", 51820))
    checks: int = 0

    def check_now(self) -> None:
        self.checks += 1

    def close(self) -> None:
        pass

    def map(self, host: str) -> None:
        self.state = PortMapState("udp", 51820, "pcp", external=ep(host))


@dataclass
class FakeStun:
    last: Discovery | None = None
    probes: int = 0

    def start(self) -> None:
        pass

    def probe_now(self) -> None:
        self.probes += 1

    def close(self) -> None:
        pass

    def see(self, host: str) -> None:
        self.last = Discovery(ep(host, 40000), None, 0.0, None, None, False)


def test_reach_service_a_new_wan_address_is_cross_checked_announced_and_repolled() -> None:
    mapper, stun = FakeMapper(), FakeStun()
    announced: list[int] = []
    moved: list[int] = []
    reach = Reachability(lambda: [], lambda: announced.append(1), lambda _port: mapper,  # type: ignore[arg-type, return-value]
                         lambda _port: stun)  # type: ignore[arg-type, return-value]  # fmt: skip
    reach.on_moved = lambda: moved.append(1)
    reach.on_applied(Applied(None, Prefs(), 0))
    mapper.map("5.5.5.1")
    stun.see("5.5.5.1")
    reach.tick()
    assert reach.candidates() == (ep("5.5.5.1"), ep("5.5.5.1", 40000)) and len(announced) == 1
    probes = stun.probes

    mapper.map("5.5.5.77")  # the router knows its new address first
    reach.tick()
    assert stun.probes == probes + 1 and moved == [1]  # STUN now, and control's poll renewed
    assert reach.candidates()[0] == ep("5.5.5.77") and len(announced) == 2
    # STUN agrees a moment later (probed at once): the phones dial the new address, no CGNAT.
    stun.see("5.5.5.77")
    reach.tick()
    assert mapper.checks == 1 and moved == [1, 1]
    assert reach.phones().endpoint == "5.5.5.77:51820" and not reach.phones().cgnat

    stun.see("5.5.5.99")  # STUN sees it first this time: the router is asked at once
    reach.tick()
    assert mapper.checks == 2


def test_reach_service_maps_control_while_it_runs_here() -> None:
    made: list[tuple[int, str]] = []

    class ControlFake(FakeMapper):
        pass

    reach = Reachability(lambda: [], lambda: None, lambda _port: FakeMapper(),  # type: ignore[arg-type, return-value]
                         lambda _port: FakeStun())  # type: ignore[arg-type, return-value]  # fmt: skip
    reach.control._make = lambda port, transport: made.append((port, transport)) or ControlFake()  # type: ignore[assignment, func-returns-value]
    reach.tick()
    assert made == [] and not reach.status()["control"]["local"]
    reach.local_control = lambda: 8080
    reach.tick()
    assert made == [(8080, "tcp"), (3478, "udp")]
    assert reach.status()["control"]["local"] and "phones" in reach.status()
