"""PCP and NAT-PMP clients: the codecs of appliance.wire over one UDP socket to the gateway.

Only the gateway is listened to: the socket is connected to gateway:5351, so the kernel
drops datagrams from any other source (a spoofer elsewhere on the LAN), and what does
come is parsed strictly and must answer the request in flight (opcode, port, PCP
nonce); anything else is counted, logged once per exchange and ignored.
Retransmission follows RFC 6886 3.1 (250 ms, doubling), cut short to a few tries: a
gateway that does not answer within ~2 s is taken not to speak the protocol.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import TypeVar, cast

from appliance.agent.reach.portmap_base import Lease, NotSpoken, PortMapError, Refused, Seen
from appliance.base.net import Endpoint
from appliance.wire import natpmp, pcp

logger = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_WAIT = 0.25
TRIES = 3
_POLL = 0.1  # how often a wait looks at the cancel event


def exchange(
    gateway: IPv4Address,
    request: bytes,
    accept: Callable[[bytes], T | None],
    cancel: threading.Event,
    what: str,
    tries: int = TRIES,
) -> T:
    """Send request to gateway:5351 until accept() returns an answer for it; NotSpoken after
    `tries` silent rounds or a port-unreachable. accept() returns None to ignore a datagram
    and may raise PortMapError to end the exchange."""
    ignored = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((str(gateway), pcp.PORT))
        wait = FIRST_WAIT
        for _ in range(tries):
            try:
                sock.send(request)
            except OSError as exc:
                raise NotSpoken(f"{what}: cannot send to {gateway}: {exc.strerror}") from exc
            deadline = time.monotonic() + wait
            while (remaining := deadline - time.monotonic()) > 0:
                if cancel.is_set():
                    raise PortMapError(f"{what}: stopped")
                sock.settimeout(min(remaining, _POLL))
                try:
                    data, source = sock.recvfrom(2048)
                except TimeoutError:
                    continue
                except ConnectionRefusedError as exc:
                    raise NotSpoken(f"{what}: {gateway}:{pcp.PORT} is closed (port unreachable)") from exc
                if source != (str(gateway), pcp.PORT):  # a connected socket never gives these; be sure
                    continue
                answer = accept(data)
                if answer is not None:
                    return answer
                ignored += 1
                if ignored == 1:
                    logger.warning("%s: ignoring a datagram from %s that answers nothing asked: %r",
                                   what, gateway, data[:64])  # fmt: skip
            wait *= 2
    raise NotSpoken(f"{what}: no answer from {gateway}:{pcp.PORT} after {tries} tries")


class PcpClient:
    name = "pcp"

    def __init__(self, gateway: IPv4Address, local: IPv4Address, cancel: threading.Event) -> None:
        self.gateway, self.local, self.cancel = gateway, local, cancel
        # One nonce per mapping for its whole life: renewals and the deletion must carry it.
        self._nonces: dict[tuple[str, int], bytes] = {}

    def _nonce(self, transport: str, port: int) -> bytes:
        return self._nonces.setdefault((transport, port), os.urandom(pcp.NONCE_SIZE))

    def _ask(self, transport: str, internal_port: int, external_port: int, lifetime: int,
             external_address: IPv4Address | None, cancel: threading.Event) -> pcp.Response:  # fmt: skip
        nonce = self._nonce(transport, internal_port)
        request = pcp.map_request(nonce, transport, internal_port, self.local, lifetime, external_port,
                                  external_address)  # fmt: skip

        def accept(data: bytes) -> pcp.Response | None:
            try:
                answer = pcp.parse_response(data)
            except pcp.PcpVersionMismatch as exc:
                raise NotSpoken(f"PCP: {self.gateway} speaks NAT-PMP only") from exc
            except pcp.PcpError as exc:
                logger.debug("PCP: ignored: %s", exc)
                return None
            if answer.opcode != pcp.OP_MAP:
                return None
            if answer.map is None:  # an error cut short: nothing to match it with but the source
                return answer if not answer.ok else None
            if answer.map.nonce != nonce or answer.map.internal_port != internal_port:
                return None
            return answer

        answer = exchange(self.gateway, request, accept, cancel, "PCP")
        if answer.result == pcp.Result.UNSUPP_VERSION:
            raise NotSpoken(f"PCP: {self.gateway} does not support PCP version {pcp.VERSION}")
        if not answer.ok:
            raise Refused(f"PCP: {self.gateway} refused to map {transport} {internal_port}: {answer.reason}")
        return answer

    def map(self, transport: str, internal_port: int, external_port: int, lifetime: int) -> Lease:
        answer = self._ask(transport, internal_port, external_port, lifetime, None, self.cancel)
        if answer.map is None:  # _ask returns successes with a payload only
            raise PortMapError(f"PCP: {self.gateway} granted a mapping without saying where")
        external = Endpoint(answer.map.external_address, answer.map.external_port)
        internal = Endpoint(self.local, internal_port)
        return Lease("pcp", transport, internal, external, answer.lifetime, answer.epoch)

    def probe(self, lease: Lease) -> Seen:
        # PCP has no cheap "what is my address": a renewal (allowed at any time, RFC 6887
        # 11.2.1) is the look, and tells the epoch and the external address too.
        renewed = self.map(lease.transport, lease.internal.port, lease.external.port, lease.lifetime)
        address = renewed.external.host if isinstance(renewed.external.host, IPv4Address) else None
        return Seen(renewed.epoch, address, renewed.external == lease.external)

    def unmap(self, lease: Lease) -> None:
        never = threading.Event()  # a removal on the way out is not cut short
        self._ask(lease.transport, lease.internal.port, 0, 0, None, never)

    def close(self) -> None:
        pass


class NatPmpClient:
    name = "nat-pmp"

    def __init__(self, gateway: IPv4Address, local: IPv4Address, cancel: threading.Event) -> None:
        self.gateway, self.local, self.cancel = gateway, local, cancel

    @staticmethod
    def _parse(data: bytes) -> natpmp.Answer | None:
        try:
            return natpmp.parse_response(data)
        except natpmp.NatPmpError as exc:
            logger.debug("NAT-PMP: ignored: %s", exc)
            return None

    def _refused(self, answer: natpmp.Refusal, what: str) -> PortMapError:
        if answer.result in (natpmp.Result.UNSUPPORTED_VERSION, natpmp.Result.UNSUPPORTED_OPCODE):
            return NotSpoken(f"NAT-PMP: {self.gateway}: {answer.reason}")
        return Refused(f"NAT-PMP: {self.gateway} refused {what}: {answer.reason}")

    def external_address(self, cancel: threading.Event) -> natpmp.ExternalAddress:
        def accept(data: bytes) -> natpmp.ExternalAddress | natpmp.Refusal | None:
            answer = self._parse(data)
            if isinstance(answer, natpmp.ExternalAddress):
                return answer
            if isinstance(answer, natpmp.Refusal) and answer.opcode == natpmp.OP_EXTERNAL_ADDRESS:
                return answer
            return None

        # (mypy cannot solve T from a union return type: say it)
        request = natpmp.external_address_request()
        answer = cast(natpmp.ExternalAddress | natpmp.Refusal,
                      exchange(self.gateway, request, accept, cancel, "NAT-PMP"))  # fmt: skip
        if isinstance(answer, natpmp.Refusal):
            raise self._refused(answer, "to tell its external address")
        return answer

    def _map(self, transport: str, internal_port: int, external_port: int, lifetime: int,
             cancel: threading.Event) -> natpmp.MapResult:  # fmt: skip
        opcode = natpmp.OP_MAP_UDP if transport == "udp" else natpmp.OP_MAP_TCP

        def accept(data: bytes) -> natpmp.MapResult | natpmp.Refusal | None:
            answer = self._parse(data)
            if isinstance(answer, natpmp.MapResult):
                ours = answer.protocol == transport and answer.internal_port == internal_port
                return answer if ours else None
            if isinstance(answer, natpmp.Refusal) and answer.opcode == opcode:
                return answer
            return None

        request = natpmp.map_request(transport, internal_port, external_port, lifetime)
        answer = cast(
            natpmp.MapResult | natpmp.Refusal, exchange(self.gateway, request, accept, cancel, "NAT-PMP")
        )
        if isinstance(answer, natpmp.Refusal):
            raise self._refused(answer, f"to map {transport} {internal_port}")
        return answer

    def map(self, transport: str, internal_port: int, external_port: int, lifetime: int) -> Lease:
        address = self.external_address(self.cancel)
        mapped = self._map(transport, internal_port, external_port, lifetime, self.cancel)
        external = Endpoint(address.address, mapped.external_port)
        internal = Endpoint(self.local, internal_port)
        return Lease("nat-pmp", transport, internal, external, mapped.lifetime, mapped.epoch)

    def probe(self, lease: Lease) -> Seen:
        address = self.external_address(self.cancel)
        return Seen(address.epoch, address.address, None)

    def unmap(self, lease: Lease) -> None:
        self._map(lease.transport, lease.internal.port, 0, 0, threading.Event())

    def close(self) -> None:
        pass
