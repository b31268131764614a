"""PortMapper's decisions, driven by tick(now) against scripted protocol clients (no network).

The real protocols against a real router are tests/netns/test_portmap*.py; here, the
order of protocols, renewal times, reboots, WAN changes, a moved gateway, back-off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from appliance.agent.reach.portmap import PortMapper
from appliance.agent.reach.portmap_base import (
    Client,
    Lease,
    NoGateway,
    NotSpoken,
    PortMapError,
    Refused,
    Seen,
    default_gateway,
)
from appliance.base.net import Endpoint

GW = IPv4Address("127.0.0.1")  # local_address() connects a UDP socket to it: loopback needs no lab
WAN = IPv4Address("5.5.5.1")


class Script:
    """What each protocol answers, and every call made."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.refuse: dict[str, PortMapError] = {}
        self.epoch = 1000
        self.wan = WAN
        self.present: bool | None = None
        self.lifetime = 100

    def factory(self, protocol: str, gateway: IPv4Address, local: IPv4Address,
                cancel: threading.Event) -> Client:  # fmt: skip
        script = self

        class Fake:
            name = protocol

            def map(self, transport: str, internal_port: int, external_port: int, lifetime: int) -> Lease:
                script.calls.append((protocol, "map"))
                if protocol in script.refuse:
                    raise script.refuse[protocol]
                epoch = script.epoch if protocol != "upnp" else None
                return Lease(protocol, transport, Endpoint(local, internal_port),
                             Endpoint(script.wan, external_port), min(lifetime, script.lifetime), epoch)  # fmt: skip

            def probe(self, lease: Lease) -> Seen:
                script.calls.append((protocol, "probe"))
                return Seen(script.epoch if protocol != "upnp" else None, script.wan, script.present)

            def unmap(self, lease: Lease) -> None:
                script.calls.append((protocol, "unmap"))

            def close(self) -> None:
                pass

        return Fake()


def mapper(script: Script, gateway: Callable[[], IPv4Address] = lambda: GW, **kw: object) -> PortMapper:
    return PortMapper(51820, client_factory=script.factory, gateway=gateway, **kw)  # type: ignore[arg-type]


def test_portmap_asks_pcp_then_natpmp_then_upnp() -> None:
    script = Script()
    script.refuse = {"pcp": NotSpoken("PCP: silent"), "nat-pmp": Refused("NAT-PMP: not authorized")}
    m = mapper(script)
    m.tick(0.0)
    assert [c for c in script.calls if c[1] == "map"] == [("pcp", "map"), ("nat-pmp", "map"), ("upnp", "map")]
    state = m.state
    assert state.protocol == "upnp" and state.external == Endpoint(WAN, 51820) and state.last_error is None


def test_portmap_renews_at_half_the_lifetime_and_probes_between() -> None:
    script = Script()
    m = mapper(script, lifetime=100, probe_interval=30)
    assert m.tick(0.0) == 30.0  # the first probe comes before the renewal at 50
    script.epoch += 30  # the gateway's clock runs with ours
    assert m.tick(30.0) == 50.0
    assert script.calls[-1] == ("pcp", "probe") and m.state.remaps == 0
    script.epoch += 20
    m.tick(50.0)
    assert script.calls[-1] == ("pcp", "map") and m.state.renewals == 1 and m.state.remaps == 0


def test_portmap_maps_again_when_the_epoch_goes_back() -> None:
    script = Script()
    m = mapper(script, probe_interval=1)
    m.tick(0.0)
    script.epoch = 3  # the router rebooted
    m.tick(1.0)
    assert script.calls[-2:] == [("pcp", "probe"), ("pcp", "map")]
    assert m.state.remaps == 1 and m.state.epoch == 3


def test_portmap_keeps_the_mapping_while_the_epoch_advances() -> None:
    script = Script()
    m = mapper(script, probe_interval=1)
    m.tick(0.0)
    for now in range(1, 6):
        script.epoch += 1
        m.tick(float(now))
    assert m.state.remaps == 0 and m.state.epoch == script.epoch


def test_portmap_maps_again_on_a_new_wan_address() -> None:
    script = Script()
    m = mapper(script, probe_interval=1)
    m.tick(0.0)
    script.wan = IPv4Address("5.5.5.77")
    script.epoch += 1
    m.tick(1.0)
    assert m.state.external == Endpoint(IPv4Address("5.5.5.77"), 51820) and m.state.remaps == 1


def test_portmap_maps_again_when_upnp_lost_the_mapping() -> None:
    script = Script()
    m = mapper(script, protocols=("upnp",), probe_interval=1)
    m.tick(0.0)
    script.present = False
    m.tick(1.0)
    assert script.calls[-2:] == [("upnp", "probe"), ("upnp", "map")] and m.state.remaps == 1


def test_portmap_starts_over_when_the_gateway_moves() -> None:
    script = Script()
    gateways = [GW]
    m = mapper(script, gateway=lambda: gateways[0], probe_interval=1)
    m.tick(0.0)
    gateways[0] = IPv4Address("127.0.0.2")
    m.tick(1.0)
    assert m.state.external is None and "127.0.0.2" in (m.state.last_error or "")
    m.tick(2.0)
    assert m.state.gateway == IPv4Address("127.0.0.2") and m.state.external is not None


def test_portmap_backs_off_while_nothing_answers() -> None:
    script = Script()
    script.refuse = {p: NotSpoken(f"{p}: silent") for p in ("pcp", "nat-pmp", "upnp")}
    m = mapper(script, retry_interval=5)
    due = [m.tick(0.0)]
    for _ in range(3):
        due.append(m.tick(due[-1]))
    assert due == [5.0, 15.0, 35.0, 75.0]
    assert m.state.last_error == "pcp: silent; nat-pmp: silent; upnp: silent"


def test_portmap_without_a_default_route_says_so() -> None:
    def none() -> IPv4Address:
        raise NoGateway("no IPv4 default route via a gateway")

    m = mapper(Script(), gateway=none)
    m.tick(0.0)
    assert m.state.last_error == "no IPv4 default route via a gateway"


def test_portmap_close_removes_the_mapping_once() -> None:
    script = Script()
    m = mapper(script)
    m.tick(0.0)
    m.close()
    m.close()
    assert script.calls.count(("pcp", "unmap")) == 1
    assert m.state.external is None and m.tick(100.0) == float("inf")


def test_portmap_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'sctp'"):
        PortMapper(51820, transport="sctp")
    with pytest.raises(ValueError, match="'igd'"):
        PortMapper(51820, protocols=("igd",))
    with pytest.raises(ValueError, match="0"):
        PortMapper(0)


def test_portmap_default_gateway_reads_the_route_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t014DA8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
    )
    assert default_gateway(table) == IPv4Address("192.168.77.1")
    table.write_text("Iface\tDestination\tGateway\n")
    with pytest.raises(NoGateway):
        default_gateway(table)
