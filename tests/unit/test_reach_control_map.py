"""Control on this node: its TCP port and STUN mapped while it runs here, and the
verdict netcheck gives (reach/control_map.py), with the mappers faked."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address

from appliance.agent.reach.control_map import ControlMapper
from appliance.agent.reach.portmap import PortMapState
from appliance.agent.reach.stun import Discovery
from appliance.base.net import Endpoint


@dataclass
class FakeMapper:
    port: int
    transport: str
    state: PortMapState = field(init=False)
    closed: bool = False

    def __post_init__(self) -> None:
        self.state = PortMapState(self.transport, self.port)

    def close(self) -> None:
        self.closed = True


def world() -> tuple[ControlMapper, list[FakeMapper]]:
    made: list[FakeMapper] = []

    def make(port: int, transport: str) -> FakeMapper:
        made.append(FakeMapper(port, transport))
        return made[-1]

    return ControlMapper(make), made  # type: ignore[arg-type]


def granted(m: FakeMapper, host: str) -> None:
    m.state = PortMapState(m.transport, m.port, "pcp", external=Endpoint(IPv4Address(host), m.port))


def seen(host: str) -> Discovery:
    return Discovery(Endpoint(IPv4Address(host), 40000), None, 0.0, None, None, False)


def test_control_map_maps_tcp_and_stun_while_control_runs_here() -> None:
    mapper, made = world()
    assert not mapper.verdict(None).local
    mapper.follow(8080, True)
    mapper.follow(8080, True)  # nothing new
    assert [(m.port, m.transport) for m in made] == [(8080, "tcp"), (3478, "udp")]
    v = mapper.verdict(None)
    assert v.local and not v.reachable and "still asking" in v.why and "VPS" in (v.fix or "")
    granted(made[0], "5.5.5.1")
    assert mapper.public(seen("5.5.5.1")) == Endpoint(IPv4Address("5.5.5.1"), 8080)
    assert mapper.verdict(seen("127.0.0.1")).url == "http://5.5.5.1:8080"
    mapper.follow(None, True)  # control stopped: the mappings go
    assert all(m.closed for m in made) and not mapper.verdict(None).local


def test_control_map_behind_a_carriers_nat_says_control_must_run_elsewhere() -> None:
    mapper, made = world()
    mapper.follow(8080, True)
    granted(made[0], "100.70.0.3")
    v = mapper.verdict(seen("203.0.113.9"))
    assert v.local and not v.reachable and v.url is None and "CGNAT" in v.why
    assert v.fix is not None and "VPS" in v.fix and "meshpi-control serve" in v.fix
    assert mapper.public(seen("203.0.113.9")) is None


def test_control_map_off_says_what_to_forward() -> None:
    mapper, made = world()
    mapper.follow(8080, False)
    assert made == []
    v = mapper.verdict(None)
    assert v.local and not v.reachable and "port mapping is off" in v.why
    assert "TCP 8080 and UDP 3478" in (v.fix or "")
