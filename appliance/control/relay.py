"""The relay: WireGuard datagrams between nodes that cannot reach each other directly.

A WebSocket at /v1/relay, on control's HTTP port. WebSocket rather than a bare
upgraded stream because aiohttp serves it as it is (framing, ping/pong, size
limits, close codes) and it passes the HTTP proxies and load balancers a VPS puts
in front of control; the agent speaks it with a small synchronous client.

    server -> client   0x01 | challenge (32 random bytes)
    client -> server   a sealed request (wire/seal.py), op "relay", {"challenge": b64}
    server -> client   the sealed answer: {"node_key": ..., "max_frame": ...}
    then, both ways    binary messages: node key (32) | one WireGuard datagram

The challenge is new for every connection, so an answer recorded from one
connection opens no other (no clock involved: a Pi boots with the wrong time),
and the sealed answer tells the client it is talking to the control it pinned.
The machine key names the node; it must be approved and its key unexpired, and
its *current* node key is its address on the relay (the client does not choose
it). A client addresses a frame to the destination's node key; the relay hands
it over with the sender's node key in its place, so a receiver knows which peer
it came from and no node can pretend to be another. One control serves one mesh,
so "a node of the same mesh" is "a node of this store".

The relay only ever carries WireGuard ciphertext: it cannot read the frames and
does not try. Limits per node (relay_limits.RelayLimits): frames over the rate or
byte budget are dropped and counted, a message over MAX_FRAME closes the
connection (1009), one live connection per node (a newer one replaces the older:
a node that lost its link reconnects before the server noticed), at most
`max_connections` nodes at once (and as many being set up; past that 1013). Frames to keys
not connected are dropped and counted, logged once a minute per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

from appliance.base.keys import KEY_LEN, PublicKey
from appliance.control.admin import METRIC_SOURCES
from appliance.control.relay_limits import LogOnce, RelayLimits, RelayMetrics, TokenBucket
from appliance.control.service import ControlService
from appliance.control.store_records import DeltaUnavailable, NodeRecord, NodeState
from appliance.wire.seal import AnyControlKey, Boxes, SealError, b64, open_request

log = logging.getLogger(__name__)

PATH = "/v1/relay"
VERSION = 1
CHALLENGE_LEN = 32
MAX_FRAME = 64 * 1024  # a whole message: key + datagram (WireGuard's are <= 65535 - 60)
AUTH_TIMEOUT = 10.0
HEARTBEAT = 25.0  # under the usual 60 s proxy idle timeout; also finds dead peers

# Close codes (4000-4999 are the application's own).
UNAUTHENTICATED = 4401
NOT_APPROVED = 4403
REPLACED = 4409


@dataclass(eq=False)
class _Conn:
    node_id: int
    name: str
    machine: bytes
    node_key: bytes
    ws: web.WebSocketResponse
    frames: TokenBucket
    volume: TokenBucket
    queue: asyncio.Queue[bytes]
    writer: asyncio.Task[None] | None = field(default=None, repr=False)


class Relay:
    def __init__(
        self,
        service: ControlService,
        control_key: AnyControlKey,
        boxes: Boxes | None = None,
        limits: RelayLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service, self.control_key = service, control_key
        self.boxes = boxes if boxes is not None else Boxes(control_key)
        self.limits, self.clock = limits or RelayLimits(), clock
        self.metrics = RelayMetrics()
        self._by_key: dict[bytes, _Conn] = {}
        self._by_node: dict[int, _Conn] = {}
        self._log_once = LogOnce()
        self._watcher: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[bool]] = set()
        self._proving = 0  # connections between accept and authenticated

    # -- connections ------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            max_msg_size=MAX_FRAME, compress=False, heartbeat=HEARTBEAT, receive_timeout=None
        )
        await ws.prepare(request)
        peer = request.remote or "?"
        cap = self.limits.max_connections
        if self._proving >= cap:  # a flood of connections that never answer holds no more than this
            await self._refuse(ws, peer, "full", f"the relay is full ({cap} connections being set up)")
            return ws
        self._proving += 1
        try:
            node = await self._authenticate(ws, peer)
        finally:
            self._proving -= 1
        if node is None:
            return ws
        if len(self._by_node) >= cap and node.id not in self._by_node:
            await self._refuse(ws, peer, "full", f"the relay is full ({cap} nodes): try again later")
            return ws
        conn = self._attach(node, ws)
        log.info("relay: %s (%s) connected from %s", node.name, node.node_key.short, peer)
        try:
            await self._pump(conn)
        finally:
            self._detach(conn)
            log.info("relay: %s (%s) disconnected", node.name, node.node_key.short)
        return ws

    async def _authenticate(self, ws: web.WebSocketResponse, peer: str) -> NodeRecord | None:
        challenge = secrets.token_bytes(CHALLENGE_LEN)
        await ws.send_bytes(bytes([VERSION]) + challenge)
        try:
            msg = await ws.receive(timeout=AUTH_TIMEOUT)
        except TimeoutError:
            await self._refuse(ws, peer, "timeout", "no answer to the challenge in time")
            return None
        if msg.type is not WSMsgType.BINARY:
            await self._refuse(ws, peer, "auth", f"expected a sealed answer, got {msg.type.name}")
            return None
        try:
            opened = open_request(self.control_key, msg.data, "relay", self.boxes)
        except SealError as e:
            await self._refuse(ws, peer, "auth", e.message)
            return None
        if opened.plaintext.get("challenge") != b64(challenge):
            # Sealed by a real machine key, but for another connection: a replay.
            await self._refuse(ws, peer, "replay", "the answer is not for this connection's challenge")
            return None
        machine = PublicKey(bytes(opened.machine))
        svc = self.service
        node = await svc.db(svc.store.get_node_by_machine_key, machine)
        if node is None:
            await self._refuse(ws, peer, "unknown", "this machine is not registered")
            return None
        if node.state is not NodeState.APPROVED:
            await self._refuse(ws, peer, "pending", "waiting for an admin to approve this node")
            return None
        if node.key_expired(svc.now()):
            await self._refuse(ws, peer, "expired", "this node's key has expired: log in again")
            return None
        answer = {"node_key": str(node.node_key), "max_frame": MAX_FRAME}
        await ws.send_bytes(opened.reply(answer))
        return node

    async def _refuse(self, ws: web.WebSocketResponse, peer: str, reason: str, message: str) -> None:
        self.metrics.refused[reason] += 1
        self._log_once(peer, reason, self.clock(), "relay: refused %s (%s): %s", peer, reason, message)
        code = NOT_APPROVED if reason in ("pending", "expired", "unknown") else UNAUTHENTICATED
        if reason == "full":
            code = WSCloseCode.TRY_AGAIN_LATER
        await ws.close(code=code, message=message.encode()[:120])

    def _attach(self, node: NodeRecord, ws: web.WebSocketResponse) -> _Conn:
        lim = self.limits
        conn = _Conn(
            node.id, node.name, node.machine_key.raw, node.node_key.raw, ws,
            TokenBucket(lim.frames_per_s, lim.frame_burst),
            TokenBucket(lim.bytes_per_s, lim.byte_burst),
            asyncio.Queue(lim.queue),
        )  # fmt: skip
        old = self._by_node.get(node.id)
        if old is not None:
            self.metrics.refused["replaced"] += 1
            log.info("relay: %s reconnected: closing its older connection", node.name)
            self._drop(old, REPLACED, "replaced by a newer connection of this node")
        self._by_node[node.id] = conn
        self._by_key[conn.node_key] = conn
        self.metrics.connections = len(self._by_node)
        conn.writer = asyncio.get_running_loop().create_task(self._write(conn))
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return conn

    def _detach(self, conn: _Conn) -> None:
        if self._by_node.get(conn.node_id) is conn:
            del self._by_node[conn.node_id]
        if self._by_key.get(conn.node_key) is conn:
            del self._by_key[conn.node_key]
        self.metrics.connections = len(self._by_node)
        if conn.writer is not None:
            conn.writer.cancel()

    def _drop(self, conn: _Conn, code: int, message: str) -> None:
        """Take a connection off the relay at once and close it in the background."""
        self._detach(conn)
        task = asyncio.get_running_loop().create_task(conn.ws.close(code=code, message=message.encode()))
        # Held until done: the loop keeps only a weak reference to a task.
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- frames -----------------------------------------------------------------------

    async def _pump(self, conn: _Conn) -> None:
        ws, metrics = conn.ws, self.metrics
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.BINARY:
                self._forward(conn, msg.data)
                continue
            if msg.type is WSMsgType.ERROR:
                code = getattr(msg.data, "code", None)
                if code == WSCloseCode.MESSAGE_TOO_BIG:
                    metrics.refused["oversize"] += 1
                    what = "relay: %s sent a message over %d bytes: closed"
                    self._log_once(conn.name, "oversize", self.clock(), what, conn.name, MAX_FRAME)
                return
            if msg.type is WSMsgType.TEXT:
                metrics.drops["malformed"] += 1
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"binary frames only")
                return
            return  # CLOSE, CLOSING, CLOSED

    def _forward(self, conn: _Conn, data: bytes) -> None:
        metrics, now = self.metrics, self.clock()
        if len(data) <= KEY_LEN:
            metrics.drops["malformed"] += 1
            return
        size = len(data) - KEY_LEN
        if not conn.frames.take(1, now):
            metrics.drops["rate"] += 1
            self._log_once(conn.name, "rate", now, "relay: %s is over its frame rate: dropping", conn.name)
            return
        if not conn.volume.take(size, now):
            metrics.drops["bytes"] += 1
            self._log_once(conn.name, "bytes", now, "relay: %s is over its byte rate: dropping", conn.name)
            return
        dst = data[:KEY_LEN]
        target = self._by_key.get(dst)
        if target is None:
            metrics.drops["unknown"] += 1
            key = str(PublicKey(dst))
            what = "relay: %s sends to %s, which is not on the relay: dropping"
            self._log_once(key, "unknown", now, what, conn.name, key)
            return
        if target is conn:
            metrics.drops["self"] += 1
            return
        try:
            target.queue.put_nowait(conn.node_key + data[KEY_LEN:])
        except asyncio.QueueFull:
            metrics.drops["queue"] += 1
            self._log_once(target.name, "queue", now, "relay: %s receives too slowly: dropping", target.name)
            return
        metrics.frames += 1
        metrics.bytes += size

    async def _write(self, conn: _Conn) -> None:
        """One writer per connection, so a slow receiver fills its own queue and
        never holds up the sender's reading."""
        queue = conn.queue
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await conn.ws.send_bytes(await queue.get())

    # -- the mesh changes -------------------------------------------------------------

    async def _watch(self) -> None:
        """Follow the store: a node removed, no longer approved, expired or with a new
        node key leaves the relay at once (it reconnects under its new key)."""
        svc = self.service
        version = svc.watch.version
        while True:
            current = await svc.watch.wait(version, 3600.0)
            if current <= version:
                continue
            try:
                changes = await svc.db(svc.store.changes_since, version)
                changed: list[NodeRecord] = list(changes.nodes)
                gone = {t.public_key.raw for t in changes.tombstones}
                version = changes.version
            except DeltaUnavailable:
                changed = list(await svc.db(svc.store.list_nodes))
                present = {r.id for r in changed}
                gone = {c.node_key for c in self._by_node.values() if c.node_id not in present}
                version = current
            self.revalidate(changed, gone)

    def revalidate(self, changed: list[NodeRecord], gone_keys: set[bytes]) -> None:
        now = self.service.now()
        for record in changed:
            conn = self._by_node.get(record.id)
            if conn is None:
                continue
            if record.state is not NodeState.APPROVED or record.key_expired(now):
                self._drop(conn, NOT_APPROVED, "this node is no longer approved")
            elif record.node_key.raw != conn.node_key:
                self._drop(conn, REPLACED, "this node's key changed: connect again")
        for key in gone_keys:
            conn = self._by_key.get(key)
            if conn is not None:
                self._drop(conn, NOT_APPROVED, "this node was removed")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for conn in list(self._by_node.values()):
            self._detach(conn)
            with contextlib.suppress(Exception):
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"control is shutting down")

    def metric_lines(self) -> list[str]:
        return self.metrics.lines()


RELAY: web.AppKey[Relay] = web.AppKey("relay", Relay)


def add_relay(app: web.Application, relay: Relay) -> None:
    """Serve the relay at PATH of this app, and its counters in /metrics."""
    app[RELAY] = relay
    app.router.add_get(PATH, relay.handle)
    app.setdefault(METRIC_SOURCES, []).append(relay.metric_lines)

    async def close(_app: web.Application) -> None:
        await relay.close()

    app.on_shutdown.append(close)
