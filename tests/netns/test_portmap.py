"""Port mapping against Debian's miniupnpd (nftables backend) in a lab router namespace.

One test per protocol, each making that protocol the one that answers; the pi has
no port forward, only what its PortMapper asks for. tests/lab/portmap_lab.py draws
the topology. The mapper runs in this process, in a thread started inside the pi's
namespace (a thread keeps the namespace it was created in).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import pytest

from appliance.agent.reach.portmap import PortMapper, PortMapState
from appliance.base.net import Endpoint
from tests.lab import netns as ns
from tests.lab.host import WIREGUARD_PORT, LabError, wait_for
from tests.lab.portmap_lab import INET_V4, PI_V4, WAN_V4, Miniupnpd, PortmapLab

logger = logging.getLogger(__name__)
PI = IPv4Address(PI_V4)


@pytest.fixture
def lab() -> Iterator[PortmapLab]:
    with PortmapLab() as built:
        yield built


@contextlib.contextmanager
def mapper_on_pi(lab: PortmapLab, **kw: Any) -> Iterator[PortMapper]:
    with ns.entered(lab.pi.ns):
        mapper = PortMapper(WIREGUARD_PORT, **kw).start()
    try:
        yield mapper
    finally:
        mapper.close()


def mapped(mapper: PortMapper, timeout: float = 15) -> PortMapState:
    def ready() -> PortMapState | None:
        state = mapper.state
        return state if state.external is not None else None

    try:
        return wait_for(ready, timeout, "a mapping")  # type: ignore[return-value]
    except LabError as exc:
        raise LabError(f"{exc} (the mapper's last error: {mapper.state.last_error})") from exc


def reaches_pi(lab: PortmapLab, host: str, port: int, message: str) -> bool:
    try:
        return lab.internet.udp(host, port, message, timeout=1) == message
    except LabError:
        return False


def test_portmap_pcp_maps_renews_and_removes(lab: PortmapLab) -> None:
    upnpd = Miniupnpd(lab).start()
    lab.pi.udp_echo_server(WIREGUARD_PORT)
    assert not reaches_pi(lab, WAN_V4, WIREGUARD_PORT, "before"), "the router forwards with no mapping"
    started = time.monotonic()
    with mapper_on_pi(lab, lifetime=3, probe_interval=600) as mapper:
        state = mapped(mapper)
        logger.info("PCP mapping in %.2fs", time.monotonic() - started)
        assert state.protocol == "pcp"  # the first one asked, and miniupnpd speaks it
        assert state.internal == Endpoint(PI, WIREGUARD_PORT)
        assert state.external == Endpoint(IPv4Address(WAN_V4), WIREGUARD_PORT)
        assert state.lifetime == 3 and state.last_error is None
        assert reaches_pi(lab, WAN_V4, WIREGUARD_PORT, "through the mapping")
        assert [ln for ln in upnpd.lease_lines() if f"{PI_V4}:{WIREGUARD_PORT}" in ln]

        # Three renewals at half the lifetime: the mapping outlives its first lease twice over.
        wait_for(lambda: mapper.state.renewals >= 4, 15, "renewals")
        assert upnpd.redirects(), "the mapping expired although it was renewed"
        assert reaches_pi(lab, WAN_V4, WIREGUARD_PORT, "still there")

        # A reboot is mended by the next renewal at the latest (PCP's check is a renewal).
        wait_for(lambda: (mapper.state.epoch or 0) >= 3, 10, "the gateway's epoch to reach 3 s")
        upnpd.reboot()
        wait_for(lambda: mapper.state.remaps >= 1 and upnpd.redirects(), 5, "a fresh PCP mapping")
        assert reaches_pi(lab, WAN_V4, WIREGUARD_PORT, "after the reboot")

        mapper.close()
        assert mapper.state.external is None and mapper.state.protocol is None
        assert upnpd.redirects() == []
        assert not [ln for ln in upnpd.lease_lines() if f"{PI_V4}:{WIREGUARD_PORT}" in ln]
        assert not reaches_pi(lab, WAN_V4, WIREGUARD_PORT, "after close")


def test_portmap_natpmp_follows_a_router_reboot_and_a_new_wan_address(lab: PortmapLab) -> None:
    upnpd = Miniupnpd(lab).start()
    lab.pi.udp_echo_server(WIREGUARD_PORT)
    with mapper_on_pi(lab, protocols=("nat-pmp",), lifetime=120, probe_interval=0.5) as mapper:
        state = mapped(mapper)
        assert state.protocol == "nat-pmp"
        assert state.external == Endpoint(IPv4Address(WAN_V4), WIREGUARD_PORT)
        assert reaches_pi(lab, WAN_V4, WIREGUARD_PORT, "nat-pmp")
        # A router that has been up a few seconds, so that its epoch can go back.
        wait_for(lambda: (mapper.state.epoch or 0) >= 3, 10, "the gateway's epoch to reach 3 s")

        rebooted = time.monotonic()
        upnpd.reboot()
        assert upnpd.redirects() == []  # the reboot forgot the mapping
        wait_for(
            lambda: mapper.state.remaps >= 1 and upnpd.redirects(), 10, "a fresh mapping after the reboot"
        )
        logger.info("re-mapped %.2fs after the router restarted", time.monotonic() - rebooted)
        assert reaches_pi(lab, WAN_V4, WIREGUARD_PORT, "after the reboot")

        changed = time.monotonic()
        lab.change_wan_address("5.5.5.77")
        wait_for(lambda: mapper.state.external == Endpoint(IPv4Address("5.5.5.77"), WIREGUARD_PORT), 10,
                 "the new WAN address in the state")  # fmt: skip
        logger.info("new WAN address reported %.2fs after it changed", time.monotonic() - changed)
        assert reaches_pi(lab, "5.5.5.77", WIREGUARD_PORT, "at the new address")


def _wireguard_pair(lab: PortmapLab, port: int) -> tuple[str, str]:
    """wireguard-go on the pi (listen port 51820) and on the internet host, the latter
    knowing the pi only by its mapped address. Returns (pi interface, inet interface)."""
    keys = {}
    for role in ("pi", "inet"):
        private = lab.internet.run(["wg", "genkey"]).stdout.strip()
        public = lab.internet.run(["wg", "pubkey"], input=private).stdout.strip()
        key_file = lab.scratch / f"{role}.key"
        key_file.touch(mode=0o600)
        key_file.write_text(private + "\n")
        keys[role] = (key_file, public)
    suffix = lab.run_id.replace("x", "")[-5:]
    pi_if, inet_if = f"meshpi9{suffix}0", f"meshpi9{suffix}1"  # /var/run/wireguard is shared
    lab.pi.run(["wireguard-go", pi_if])
    lab.pi.run(["wg", "set", pi_if, "listen-port", str(WIREGUARD_PORT), "private-key", str(keys["pi"][0]),
                "peer", keys["inet"][1], "allowed-ips", "10.99.0.2/32"])  # fmt: skip
    lab.pi.run(["ip", "addr", "add", "10.99.0.1/24", "dev", pi_if])
    lab.pi.run(["ip", "link", "set", pi_if, "up"])
    lab.internet.run(["wireguard-go", inet_if])
    lab.internet.run(["wg", "set", inet_if, "private-key", str(keys["inet"][0]), "peer", keys["pi"][1],
                      "endpoint", f"{WAN_V4}:{port}", "allowed-ips", "10.99.0.1/32"])  # fmt: skip
    lab.internet.run(["ip", "addr", "add", "10.99.0.2/24", "dev", inet_if])
    lab.internet.run(["ip", "link", "set", inet_if, "up"])
    return pi_if, inet_if


def test_portmap_upnp_when_pcp_and_natpmp_are_off_carries_a_wireguard_handshake(lab: PortmapLab) -> None:
    upnpd = Miniupnpd(lab, natpmp=False).start()
    with mapper_on_pi(lab, lifetime=60, probe_interval=0.5) as mapper:
        state = mapped(mapper)
        assert state.protocol == "upnp"  # PCP and NAT-PMP were asked first, and refused by the port
        assert state.external == Endpoint(IPv4Address(WAN_V4), WIREGUARD_PORT)
        assert any(f"{PI_V4}:{WIREGUARD_PORT}" in ln for ln in upnpd.lease_lines())

        pi_if, inet_if = _wireguard_pair(lab, state.external.port)
        try:
            ping = lab.internet.ping_result("10.99.0.1", count=5, interval=0.2, wait=2)
            assert ping.received > 0, "no WireGuard handshake through the UPnP mapping"
            handshakes = lab.pi.run(["wg", "show", pi_if, "endpoints"]).stdout
            assert INET_V4 in handshakes  # the pi saw the handshake come from the internet host
        finally:
            lab.pi.run(["ip", "link", "del", pi_if], check=False)
            lab.internet.run(["ip", "link", "del", inet_if], check=False)

        rebooted = time.monotonic()
        upnpd.reboot()
        wait_for(lambda: mapper.state.remaps >= 1 and upnpd.redirects(), 15, "a fresh UPnP mapping")
        logger.info("UPnP re-mapped %.2fs after the router restarted", time.monotonic() - rebooted)

        mapper.close()
        assert upnpd.redirects() == []
        lab.pi.udp_echo_server(WIREGUARD_PORT)
        assert not reaches_pi(lab, WAN_V4, WIREGUARD_PORT, "after close")


def test_portmap_maps_a_tcp_port_for_control(lab: PortmapLab) -> None:
    Miniupnpd(lab).start()
    lab.pi.whoami_server(8080)
    with ns.entered(lab.pi.ns):
        mapper = PortMapper(8080, transport="tcp", lifetime=60).start()
    try:
        state = mapped(mapper)
        assert state.transport == "tcp" and state.external == Endpoint(IPv4Address(WAN_V4), 8080)
        assert lab.internet.fetch(WAN_V4, "whoami", port=8080, timeout=3) == INET_V4
    finally:
        mapper.close()
    with pytest.raises(LabError):
        lab.internet.fetch(WAN_V4, "whoami", port=8080, timeout=1)


@pytest.mark.parametrize("protocol", ["pcp", "nat-pmp", "upnp"])
def test_portmap_takes_the_port_the_router_gives_when_its_own_is_taken(
    lab: PortmapLab, protocol: str
) -> None:
    Miniupnpd(lab).start()
    with ns.entered(lab.rogue.ns):  # another host of the LAN holds external port 51820 already
        squatter = PortMapper(WIREGUARD_PORT, protocols=("nat-pmp",), lifetime=120).start()
    try:
        assert mapped(squatter).external == Endpoint(IPv4Address(WAN_V4), WIREGUARD_PORT)
        lab.pi.udp_echo_server(WIREGUARD_PORT)
        with mapper_on_pi(lab, protocols=(protocol,), lifetime=120) as mapper:
            state = mapped(mapper)
            assert state.protocol == protocol and state.external is not None
            assert state.external.port != WIREGUARD_PORT and state.internal == Endpoint(PI, WIREGUARD_PORT)
            assert reaches_pi(lab, WAN_V4, state.external.port, f"via {protocol}")
    finally:
        squatter.close()
