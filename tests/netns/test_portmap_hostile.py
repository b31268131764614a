"""Port mapping under hostile answers: garbage from the gateway, well-formed answers from
another address of the LAN (with the request's own PCP nonce, the strongest spoof a
LAN host can make), an IGD that is not the gateway, and no router at all.

A fake gateway (a thread started in the router namespace, miniupnpd not running)
answers every request with a spoof from 192.168.77.254 and garbage from 192.168.77.1;
only when told to does it also send the true answer from 192.168.77.1.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from appliance.agent.reach.portmap import PortMapper
from appliance.agent.reach.portmap_base import NotSpoken
from appliance.agent.reach.portmap_udp import NatPmpClient, PcpClient
from appliance.base.net import Endpoint
from appliance.wire import pcp
from tests.lab import netns as ns
from tests.lab.host import WIREGUARD_PORT, wait_for
from tests.lab.portmap_lab import GATEWAY_ALT_V4, GATEWAY_V4, PI_V4, Miniupnpd, PortmapLab

GATEWAY, PI = IPv4Address(GATEWAY_V4), IPv4Address(PI_V4)
GARBAGE = [b"", b"\x00", b"\x02\x81" + bytes(10), b"\xff" * 60, b"\x00\x81\x00\x00" + b"\x00" * 3,
           b"\x02\x81\x00\x00" + bytes(20) + b"\x01" * 36 + b"\x01\x00\xff\xff"]  # fmt: skip


def _natpmp_answers(request: bytes, external: bytes, port: int) -> bytes | None:
    if request[:2] == b"\x00\x00":
        return struct.pack("!BBHI4s", 0, 128, 0, 1000, external)
    if len(request) == 12 and request[0] == 0 and request[1] in (1, 2):
        _, op, _, internal, _, lifetime = struct.unpack("!BBHHHI", request)
        return struct.pack("!BBHIHHI", 0, 128 + op, 0, 1000, internal, port, lifetime)
    return None


def _pcp_answers(request: bytes, external: bytes, port: int) -> bytes | None:
    if len(request) != 60 or request[0] != 2:
        return None
    lifetime = struct.unpack("!I", request[4:8])[0]
    nonce, proto, internal = request[24:36], request[36], struct.unpack("!H", request[40:42])[0]
    header = struct.pack("!BBBBII12s", 2, 129, 0, 0, lifetime, 1000, bytes(12))
    payload = struct.pack("!12sB3sHH16s", nonce, proto, bytes(3), internal, port,
                          pcp.encode_address(IPv4Address(external)))  # fmt: skip
    return header + payload


class FakeGateway:
    def __init__(self, router_ns: str) -> None:
        self.honest = threading.Event()
        self.stop = threading.Event()
        self.requests = 0
        with ns.entered(router_ns):
            self.gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.gw.bind((GATEWAY_V4, pcp.PORT))
            self.spoof = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.spoof.bind((GATEWAY_ALT_V4, pcp.PORT))
            self.thread = threading.Thread(target=self._serve, daemon=True)
            self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.gw], [], [], 0.05)
            if not ready:
                continue
            request, client = self.gw.recvfrom(2048)
            self.requests += 1
            answer = _pcp_answers if request[:1] == b"\x02" else _natpmp_answers
            lie = answer(request, bytes([6, 6, 6, 6]), 6666)
            if lie:
                self.spoof.sendto(lie, client)
            for junk in GARBAGE:
                self.gw.sendto(junk, client)
            truth = answer(request, bytes([5, 5, 5, 1]), WIREGUARD_PORT)
            if self.honest.is_set() and truth:
                self.gw.sendto(truth, client)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.gw.close()
        self.spoof.close()


@pytest.fixture
def fake() -> Iterator[tuple[PortmapLab, FakeGateway]]:
    with PortmapLab() as lab:
        gateway = FakeGateway(lab.router.ns)
        try:
            yield lab, gateway
        finally:
            gateway.close()


@pytest.mark.parametrize("client_class", [PcpClient, NatPmpClient])
def test_portmap_ignores_garbage_and_answers_from_another_address(
    fake: tuple[PortmapLab, FakeGateway], client_class: type[PcpClient | NatPmpClient],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    lab, gateway = fake
    with ns.entered(lab.pi.ns):
        client = client_class(GATEWAY, PI, threading.Event())
        with caplog.at_level(logging.WARNING), pytest.raises(NotSpoken, match="no answer"):
            client.map("udp", WIREGUARD_PORT, WIREGUARD_PORT, 120)
        assert gateway.requests >= 3  # every retransmission met only lies and junk
        ignored = [r for r in caplog.records if "ignoring a datagram" in r.getMessage()]
        assert 1 <= len(ignored) <= 3  # once per exchange, not once per datagram

        gateway.honest.set()
        lease = client.map("udp", WIREGUARD_PORT, WIREGUARD_PORT, 120)
    assert lease.external == Endpoint(
        IPv4Address("5.5.5.1"), WIREGUARD_PORT
    )  # never the spoofed 6.6.6.6:6666
    assert lease.internal == Endpoint(PI, WIREGUARD_PORT)


def test_portmap_with_no_router_says_why_and_stops_promptly() -> None:
    with PortmapLab() as lab:  # nothing answers on the router: no miniupnpd, no fake
        with ns.entered(lab.pi.ns):
            mapper = PortMapper(WIREGUARD_PORT, retry_interval=60).start()
        try:
            wait_for(lambda: mapper.state.last_error, 15, "the mapper to give up")
            error = mapper.state.last_error or ""
            assert "PCP" in error and "NAT-PMP" in error and "UPnP" in error, error
            assert mapper.state.external is None
        finally:
            started = time.monotonic()
            mapper.close()
            stopped_in = time.monotonic() - started
        assert stopped_in < 1.0, f"close() took {stopped_in:.2f}s"


def test_portmap_stops_promptly_while_waiting_for_an_answer(fake: tuple[PortmapLab, FakeGateway]) -> None:
    lab, gateway = fake  # the fake never answers honestly: the mapper is always waiting
    with ns.entered(lab.pi.ns):
        mapper = PortMapper(WIREGUARD_PORT, protocols=("pcp",)).start()
    wait_for(lambda: gateway.requests >= 1, 5, "the first request")
    started = time.monotonic()
    mapper.close()
    assert time.monotonic() - started < 0.5
    with contextlib.suppress(AttributeError):
        assert not mapper._thread.is_alive()  # type: ignore[union-attr]


def test_portmap_upnp_trusts_only_an_igd_on_the_gateway() -> None:
    with PortmapLab() as lab:
        upnpd = Miniupnpd(lab, natpmp=False).start()
        # The pi's gateway is now the router's other address, so the IGD that answers
        # discovery (at 192.168.77.1) is, as far as the pi can tell, some other LAN host.
        lab.pi.run(["ip", "route", "replace", "default", "via", GATEWAY_ALT_V4])
        with ns.entered(lab.pi.ns):
            mapper = PortMapper(WIREGUARD_PORT, protocols=("upnp",), retry_interval=60).start()
        try:
            wait_for(lambda: mapper.state.last_error, 15, "the mapper to give up")
            assert f"not on the gateway {GATEWAY_ALT_V4}" in (mapper.state.last_error or "")
            assert mapper.state.external is None and upnpd.redirects() == []
        finally:
            mapper.close()
