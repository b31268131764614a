"""The resolver each node runs: UDP and TCP on each of its bind addresses (the node's
own mesh addresses, port 53), mesh names from memory, other names forwarded.

One asyncio event loop in its own thread owns every socket, both caches and the
counters: it sleeps in epoll while nothing arrives (no polling) and answers a
repeated query with a dict look-up (cache.PacketCache). Other threads only swap in a
new (zone, upstreams) value (`update`, one attribute assignment: atomic) and read the
counters.

Recursion is for whoever reaches the bind addresses, and only those: a wildcard bind
is refused, so the resolver is never open on the host's other interfaces. Refusals
are logged at most once a minute per kind, with a count, never per packet.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dns.rcode
import dns.rdatatype

from appliance.agent.dns import answer
from appliance.agent.dns.cache import AnswerCache, Packet, PacketCache
from appliance.agent.dns.local import LocalZone
from appliance.agent.dns.upstream import Forwarder, Overloaded
from appliance.agent.dns.zone import Upstreams, Zone
from appliance.base.net import Endpoint

log = logging.getLogger(__name__)

STATS = ("queries", "answered_local", "forwarded", "failed", "refused", "cache_hits")
# A mesh answer changes only with the zone (its generation): keep it this long anyway.
_LOCAL_PACKET_SECONDS = 3600.0
TCP_IDLE = 10.0  # seconds a TCP client may stay silent (RFC 7766 suggests a few seconds)
TCP_CLIENTS = 64  # connections at once; a client over the limit is closed at once
_LOG_EVERY = 60.0
_UDP_BATCH = 64  # datagrams answered per wake-up before the loop serves others
# Linux: bind an address the interface does not have yet (the agent adds the mesh
# address after it starts the resolver), as dnsmasq --bind-dynamic does.
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


class BindError(OSError):
    """Some bind addresses could not be bound (the others are serving)."""


@dataclass(frozen=True)
class _State:
    generation: int  # every update: packet-cache entries of older ones are stale
    upstream_generation: int  # every change of upstreams: the answer cache is flushed
    local: LocalZone
    upstreams: Upstreams


class _RateLog:
    """One log line per kind of refusal per minute at most, with how many were not logged."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def due(self, kind: str) -> int | None:
        """None if this kind was logged within the minute; else how many went unlogged."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < _LOG_EVERY:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._quiet.pop(kind, 0)

    def note(self, kind: str, peer: object) -> None:
        quiet = self.due(kind)
        if quiet is not None:
            log.info(
                "dns: refused a query (%s) from %s; %d more of that kind since the last log",
                kind,
                peer,
                quiet,
            )


def _check_binds(binds: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    for bind in binds:
        if not isinstance(bind, Endpoint) or bind.host.is_unspecified or not 0 < bind.port < 65536:
            raise ValueError(
                f"dns bind must be one address and a port (no wildcard: no open resolver): {bind!r}"
            )
    return tuple(dict.fromkeys(binds))


def _socket(endpoint: Endpoint, kind: socket.SocketKind) -> socket.socket:
    family = socket.AF_INET6 if endpoint.host.version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(endpoint.host), endpoint.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _send(sock: socket.socket, reply: bytes, peer: tuple[Any, ...]) -> None:
    try:
        sock.sendto(reply, peer)
    except OSError as e:  # a full send buffer in a flood, or the client's address went away: UDP drops
        log.debug("dns: udp send to %s: %s", peer, e)


class DnsServer:
    def __init__(
        self, binds: Sequence[Endpoint], zone: Zone, upstreams: Upstreams, *, upstream_timeout: float = 1.5
    ) -> None:
        self._binds = _check_binds(binds)
        self._lock = threading.Lock()
        self._state = _State(0, 0, LocalZone.build(zone), upstreams)
        self._answers: AnswerCache[tuple[str, int, bool]] = AnswerCache()
        self._answers_generation = 0
        self._packets = PacketCache()
        self._forwarder = Forwarder(timeout=upstream_timeout)
        self._stats = dict.fromkeys(STATS, 0)
        self._refusals = _RateLog()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listening: dict[Endpoint, tuple[socket.socket, asyncio.Server]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_clients = 0

    # -- the interface other threads use --------------------------------------------

    def start(self) -> None:
        """Serve on every bind address. BindError names those that failed; the others
        serve all the same (stop() ends it either way)."""
        if self._loop is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dns", daemon=True)
        self._thread.start()
        try:
            self._call(self._bind(self._binds))
        except BindError:
            raise
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._call(self._close_all())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = self._thread = None

    def update(self, zone: Zone, upstreams: Upstreams) -> None:
        """Serve a new zone and upstreams from the next query on; answers forwarded
        under other upstreams are forgotten (they may be what the old ones said)."""
        local = LocalZone.build(zone)
        with self._lock:
            old = self._state
            upstream_generation = old.upstream_generation + (upstreams != old.upstreams)
            self._state = _State(old.generation + 1, upstream_generation, local, upstreams)

    def rebind(self, binds: Sequence[Endpoint]) -> None:
        wanted = _check_binds(binds)
        self._binds = wanted
        if self._loop is not None:
            self._call(self._bind(wanted))

    def stats(self) -> Mapping[str, int]:
        return dict(self._stats)

    @property
    def bound(self) -> tuple[Endpoint, ...]:
        return tuple(self._listening)

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    # -- sockets (in the loop) -------------------------------------------------------

    async def _bind(self, wanted: tuple[Endpoint, ...]) -> None:
        for endpoint in [e for e in self._listening if e not in wanted]:
            await self._close(endpoint)
        errors = []
        loop = asyncio.get_running_loop()
        for endpoint in wanted:
            if endpoint in self._listening:
                continue
            try:
                udp = _socket(endpoint, socket.SOCK_DGRAM)
                try:
                    tcp = _socket(endpoint, socket.SOCK_STREAM)
                    server = await asyncio.start_server(self._tcp, sock=tcp, backlog=TCP_CLIENTS)
                except OSError:
                    udp.close()
                    raise
            except OSError as e:
                errors.append(f"{endpoint}: {e.strerror or e}")
                continue
            loop.add_reader(udp, self._udp, udp)
            self._listening[endpoint] = (udp, server)
            log.info("dns: serving on %s (udp and tcp)", endpoint)
        if errors:
            raise BindError(f"dns: could not bind {', '.join(errors)}")

    async def _close(self, endpoint: Endpoint) -> None:
        udp, server = self._listening.pop(endpoint)
        asyncio.get_running_loop().remove_reader(udp)
        udp.close()
        server.close()
        log.info("dns: stopped serving on %s", endpoint)

    async def _close_all(self) -> None:
        for endpoint in list(self._listening):
            await self._close(endpoint)
        tasks = list(self._tasks)  # TCP clients and questions upstream
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- queries (in the loop) -------------------------------------------------------

    def _udp(self, sock: socket.socket) -> None:
        """The UDP socket is readable: answer what is queued (a burst costs one wake-up), up
        to a bound, so TCP clients and upstream answers get their turn in a flood."""
        for _ in range(_UDP_BATCH):
            try:
                wire, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error for an earlier answer: nothing to do
                log.debug("dns: udp: %s", e)
                continue
            try:
                reply = self._answer(wire, False, peer)
            except Exception:  # noqa: BLE001 - one bad packet must never stop the resolver
                self._internal_error(peer)
                continue
            if isinstance(reply, bytes):
                _send(sock, reply, peer)
            elif reply is not None:
                task = asyncio.get_running_loop().create_task(self._send_later(reply, peer, sock))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send_later(
        self, pending: Coroutine[Any, Any, bytes], peer: tuple[Any, ...], sock: socket.socket
    ) -> None:
        try:
            reply = await pending
        except Exception:  # noqa: BLE001 - one bad answer upstream must never stop the resolver
            self._internal_error(peer)
            return
        if sock.fileno() >= 0:  # not closed by a rebind meanwhile
            _send(sock, reply, peer)

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._tcp_clients >= TCP_CLIENTS:
            self._refused("too many tcp clients", peer)
            writer.close()
            return
        self._tcp_clients += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TCP_IDLE), "big")
                wire = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                try:
                    reply = self._answer(wire, True, peer)
                    if reply is not None and not isinstance(reply, bytes):
                        reply = await reply
                except Exception:  # noqa: BLE001 - one bad message must never stop the resolver
                    self._internal_error(peer)
                    reply = None
                if reply is None:
                    break  # nothing to say to this client (it sent a response): hang up
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass  # the client left, went quiet, or broke the framing
        finally:
            self._tcp_clients -= 1
            self._tasks.discard(task)
            writer.close()

    def _answer(self, wire: bytes, tcp: bool, peer: object) -> bytes | Coroutine[Any, Any, bytes] | None:
        """The reply now (bytes), later (a coroutine: the question went upstream), or none."""
        stats = self._stats
        stats["queries"] += 1
        state = self._state
        now = time.monotonic()
        key = (tcp, wire[2:])
        hit = self._packets.get(key, now, state.generation)
        if hit is not None:
            stats[hit.kind] += 1
            return wire[:2] + hit.wire[2:]
        try:
            query = answer.parse(wire, tcp)
            if state.local.serves(query):
                reply = state.local.answer(query)
                stats["answered_local"] += 1
                self._packets.put(
                    key, Packet(reply, "answered_local", state.generation, now + _LOCAL_PACKET_SECONDS)
                )
                return reply
            if query.qtype == dns.rdatatype.ANY:
                raise answer.refuse(query, "any", dns.rcode.REFUSED)
        except answer.Refused as refusal:
            self._refused(refusal.kind, peer)
            return refusal.reply
        if state.upstream_generation != self._answers_generation:
            self._answers.clear()
            self._answers_generation = state.upstream_generation
        cache_key = (query.name, int(query.qtype), query.dnssec)
        cached = self._answers.get(cache_key, now)
        if cached is not None:
            age = int(now - cached.stored)
            reply = answer.forwarded_answer(query, cached.message, age)
            stats["cache_hits"] += 1
            until = min(cached.expires, cached.stored + age + 1)  # the TTLs count down each second
            self._packets.put(key, Packet(reply, "cache_hits", state.generation, until))
            return reply
        endpoints = tuple(e for e in state.upstreams.for_name(query.name) if e not in self._listening)
        if not endpoints:
            stats["failed"] += 1
            self._refusals.note("servfail: no upstream for this name (fail closed)", peer)
            return answer.failure(query)
        return self._forward(query, cache_key, endpoints, state)

    async def _forward(
        self, query: answer.Query, key: tuple[str, int, bool], endpoints: tuple[Endpoint, ...], state: _State
    ) -> bytes:
        self._stats["forwarded"] += 1
        try:
            result = await self._forwarder.ask(
                (*key, state.upstream_generation), answer.upstream_query(query), endpoints
            )
        except Overloaded:
            result = None
            self._refusals.note("servfail: too many questions upstream", "many clients")
        if result is None:
            self._stats["failed"] += 1
            self._refusals.note("servfail: no upstream answered", ", ".join(map(str, endpoints)))
            return answer.failure(query)
        if state.upstream_generation == self._state.upstream_generation:
            self._answers.put(key, result, time.monotonic(), answer.cache_ttl(result))
        return answer.forwarded_answer(query, result, 0)

    def _refused(self, kind: str, peer: object) -> None:
        self._stats["refused"] += 1
        self._refusals.note(f"refused: {kind}", peer)

    def _internal_error(self, peer: object) -> None:
        """Called in an except block: log the traceback once a minute at most."""
        self._stats["failed"] += 1
        quiet = self._refusals.due("internal-error")
        if quiet is not None:
            log.exception("dns: internal error answering %s (%d more since the last log)", peer, quiet)
