"""meshpi-control's STUN server: answers Binding requests on UDP 3478 with the
address and port each request came from (its reflexive address).

It is on the internet, so it is built to be useless as a weapon and cheap to flood:
- no amplification: an answer carries XOR-MAPPED-ADDRESS, and FINGERPRINT and
  SOFTWARE only when they fit in the size of the request. The one exception is the
  bare answer to a request smaller than it (20-byte requests, which stock clients
  such as coturn's send): 32 bytes for IPv4, 44 for IPv6, never more;
- a token bucket per source address (not per port: a flood from many ports of one
  host is one source); a source over its budget is dropped and logged once a minute;
- a global bucket caps the answers per second whatever the number of sources;
- the table of buckets has a fixed size (least recently seen evicted), so a flood of
  spoofed sources costs bounded memory;
- anything that is not a well-formed Binding request is ignored (counted, not logged
  per packet): no error answers, which would be answers to spoofed addresses too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from typing import cast

from appliance.base.net import Endpoint, IPAddress
from appliance.wire import stun

log = logging.getLogger(__name__)

DEFAULT_PORT = 3478
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
SOFTWARE = "meshpi"
LOG_EVERY = 60.0  # seconds between two "dropped" lines about the same source


@dataclass(frozen=True)
class Limits:
    rate: float = 20.0  # answers per second per source, sustained
    burst: float = 40.0  # answers a source may get at once
    global_rate: float = 5000.0  # answers per second over all sources
    max_sources: int = 4096  # buckets kept; least recently seen evicted beyond


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    dropped: int = 0
    logged_at: float = -LOG_EVERY


@dataclass
class Counters:
    answered: int = 0
    ignored: int = 0  # not a Binding request
    limited: int = 0  # over a rate limit
    by_reason: dict[str, int] = field(default_factory=dict)


def source_key(host: IPAddress) -> IPAddress:
    """One bucket per IPv4 address, one per IPv6 /64 (what one host can pick from)."""
    if isinstance(host, IPv6Address) and host.ipv4_mapped is None:
        return IPv6Address(int(host) >> 64 << 64)
    return host


class RateLimiter:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self.buckets: OrderedDict[IPAddress, _Bucket] = OrderedDict()
        self._global = _Bucket(limits.global_rate, clock())

    def allow(self, host: IPAddress) -> bool:
        now, key = self.clock(), source_key(host)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.limits.burst, now)
            self.buckets[key] = bucket
            if len(self.buckets) > self.limits.max_sources:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        _refill(bucket, now, self.limits.rate, self.limits.burst)
        _refill(self._global, now, self.limits.global_rate, self.limits.global_rate)
        if bucket.tokens < 1 or self._global.tokens < 1:
            bucket.dropped += 1
            if now - bucket.logged_at >= LOG_EVERY:
                log.warning(
                    "STUN: rate limit for %s: dropped %d request(s) since the last report",
                    key, bucket.dropped,
                )  # fmt: skip
                bucket.logged_at, bucket.dropped = now, 0
            return False
        bucket.tokens -= 1
        self._global.tokens -= 1
        return True


def _refill(bucket: _Bucket, now: float, rate: float, cap: float) -> None:
    bucket.tokens = min(cap, bucket.tokens + (now - bucket.stamp) * rate)
    bucket.stamp = now


def answer(data: bytes, source: Endpoint) -> bytes:
    """The answer to one datagram, or raise StunError: no larger than the request,
    except the bare XOR-MAPPED-ADDRESS answer (see the module's docstring)."""
    request = stun.parse_request(data)
    budget = len(data)
    fingerprint = request.fingerprint and stun.response_size(source, None, True) <= budget
    software: str | None = SOFTWARE
    if stun.response_size(source, software, fingerprint) > budget:
        software = None
    return stun.binding_response(request.transaction_id, source, software, fingerprint)


class StunProtocol(asyncio.DatagramProtocol):
    def __init__(self, limiter: RateLimiter, counters: Counters) -> None:
        self.limiter, self.counters = limiter, counters
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector transport is not a DatagramTransport subclass, only shaped like one.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        # Cheapest test first: most junk never gets to the parser or the limiter.
        if not stun.looks_like_stun(data):
            self._ignore("not STUN")
            return
        try:
            host = ip_address(str(addr[0]).partition("%")[0])
            source = Endpoint(host, int(str(addr[1])))
            if isinstance(host, IPv6Address) and host.ipv4_mapped is not None:
                source = Endpoint(host.ipv4_mapped, source.port)
        except ValueError:
            self._ignore("odd source address")
            return
        try:
            reply = answer(data, source)
        except stun.StunError as e:
            self._ignore("malformed")
            log.debug("STUN: ignored from %s: %s", source, e)
            return
        if not self.limiter.allow(source.host):
            self.counters.limited += 1
            return
        if self.transport is not None:
            self.transport.sendto(reply, addr)
            self.counters.answered += 1

    def _ignore(self, reason: str) -> None:
        self.counters.ignored += 1
        self.counters.by_reason[reason] = self.counters.by_reason.get(reason, 0) + 1

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a spoofed or gone source: nothing to do, keep serving.
        log.debug("STUN: socket error: %s", exc)


@dataclass
class StunServer:
    transports: list[asyncio.DatagramTransport]
    counters: Counters
    limiter: RateLimiter

    @property
    def addresses(self) -> list[Endpoint]:
        out = []
        for t in self.transports:
            host, port = t.get_extra_info("sockname")[:2]
            out.append(Endpoint(ip_address(host), port))
        return out

    def close(self) -> None:
        for t in self.transports:
            t.close()


def parse_listen(text: str) -> tuple[str, int] | None:
    """`HOST:PORT`, `[V6]:PORT` or `off` (None)."""
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--stun-listen {text!r}: expected HOST:PORT or off")
    if host:
        ip_address(host)  # ValueError names the host
    return host, int(port)


async def start(host: str, port: int = DEFAULT_PORT, limits: Limits | None = None) -> StunServer:
    """Listen on host:port. 0.0.0.0 also listens on [::] where this host has IPv6."""
    loop = asyncio.get_running_loop()
    counters, limiter = Counters(), RateLimiter(limits or Limits())
    hosts = [host]
    if host in ("", "0.0.0.0") and socket.has_ipv6:
        hosts = ["0.0.0.0", "::"]
    transports: list[asyncio.DatagramTransport] = []
    for h in hosts:
        family = socket.AF_INET6 if ":" in h else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((h, port))
        except OSError as e:
            sock.close()
            if h == "::" and len(hosts) > 1:
                log.info("STUN: no IPv6 here (%s); IPv4 only", e.strerror)
                continue
            raise OSError(e.errno, f"STUN: cannot listen on {h}:{port}: {e.strerror}") from e
        transport, _ = await loop.create_datagram_endpoint(lambda: StunProtocol(limiter, counters), sock=sock)
        transports.append(transport)
    server = StunServer(transports, counters, limiter)
    log.info("STUN on %s", ", ".join(str(a) for a in server.addresses))
    return server
