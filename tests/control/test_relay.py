"""The relay over real WebSockets on loopback: the agent's RelayClient against the
aiohttp app, its UDP proxies with plain sockets standing in for WireGuard, and
hostile clients (no, garbage or replayed answers, pending nodes, unknown keys,
oversized frames, floods): refused or dropped, counted, logged once, no crash,
and the other nodes' frames still flow. tests/netns/test_relay.py does it with
wireguard-go and a blocked direct path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from aiohttp import web
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from appliance.agent.control.client import ControlClient
from appliance.agent.reach.relay import RelayClient
from appliance.base.keys import PrivateKey, PublicKey
from appliance.control import relay as relay_mod
from appliance.control.app import create_admin_app, create_app
from appliance.control.cli import admin_call
from appliance.control.keys import load_admin_token, load_control_key
from appliance.control.relay import RELAY, Relay
from appliance.control.relay_limits import RelayLimits
from appliance.control.service import ControlService
from appliance.control.store import open_store
from appliance.wire.seal import ControlPublicKey, MachineKey, b64, seal_request
from tests.lab.host import wait_for

LIMITS = RelayLimits(frames_per_s=200, frame_burst=400, bytes_per_s=2_000_000, byte_burst=1_000_000)


@dataclass
class Server:
    url: str
    control_pub: ControlPublicKey
    token: str
    relay: Relay
    secret: str  # a reusable pre-auth key
    admin_url: str  # the loopback admin listener: admin API and /metrics

    def admin(self, method: str, path: str, body: object = None) -> object:
        return admin_call(self.admin_url, self.token, method, path, body)

    def node(self, name: str, approved: bool = True) -> Node:
        machine, wg = MachineKey.generate(), PrivateKey.generate()
        client = ControlClient(self.url, machine, self.control_pub, timeout=10)
        body = {"node_key": str(wg.public_key()), "hostname": name,
                "auth_key": self.secret if approved else None}  # fmt: skip
        client.call("register", body)
        return Node(name, machine, wg.public_key())

    def metrics(self) -> str:
        return str(urllib.request.urlopen(self.admin_url + "/metrics", timeout=5).read().decode())

    def raw(self) -> ClientConnection:
        return connect(self.url.replace("http", "ws") + "/v1/relay", compression=None, proxy=None)  # noqa: SIM115


@dataclass
class Node:
    name: str
    machine: MachineKey
    key: PublicKey


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setattr(relay_mod, "AUTH_TIMEOUT", 0.5)
    key, token = load_control_key(tmp_path), load_admin_token(tmp_path)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, object] = {}

    async def start() -> list[web.AppRunner]:
        service = ControlService(lambda: open_store(tmp_path / "control.db"), map_timeout=1, batch=0.02)
        app = create_app(service, key)
        app[RELAY].limits = LIMITS
        runners = [web.AppRunner(app, shutdown_timeout=1),
                   web.AppRunner(create_admin_app(service, token, app), shutdown_timeout=1)]  # fmt: skip
        for runner in runners:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        box["port"], box["admin_port"], box["relay"] = (
            runners[0].addresses[0][1],
            runners[1].addresses[0][1],
            app[RELAY],
        )
        return runners

    def run() -> None:
        asyncio.set_event_loop(loop)
        box["runner"] = loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    url, admin_url = f"http://127.0.0.1:{box['port']}", f"http://127.0.0.1:{box['admin_port']}"
    secret = admin_call(admin_url, token, "POST", "/admin/v1/keys", {"reusable": True, "expires_in": 600})[
        "key"
    ]  # type: ignore[index]
    try:
        yield Server(url, ControlPublicKey(bytes(key.public_key)), token, box["relay"], secret, admin_url)  # type: ignore[arg-type]
    finally:
        for runner in reversed(box["runner"]):  # type: ignore[attr-defined]
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class FakeWireGuard:
    """A UDP socket on 127.0.0.1 standing in for WireGuard's listen port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]

    def send(self, endpoint: object, data: bytes) -> None:
        host, _, port = str(endpoint).rpartition(":")
        self.sock.sendto(data, (host, int(port)))

    def recv(self) -> tuple[bytes, tuple[str, int]]:
        data, source = self.sock.recvfrom(65535)
        return data, source


@dataclass
class Side:
    node: Node
    wg: FakeWireGuard
    client: RelayClient


@pytest.fixture
def pair(server: Server) -> Iterator[tuple[Side, Side]]:
    sides = []
    for name in ("a", "b"):
        node, wg = server.node(name), FakeWireGuard()
        client = RelayClient(server.url, node.machine, server.control_pub, node.key, listen_port=wg.port)
        sides.append(Side(node, wg, client))
    try:
        for side in sides:
            assert side.client.wait_connected(10)
        yield sides[0], sides[1]
    finally:
        for side in sides:
            side.client.close()
            side.wg.sock.close()


def _exchange(a: Side, b: Side, payload: bytes) -> None:
    """a's WireGuard sends to its endpoint for b; b's WireGuard gets it from its endpoint for a."""
    to_b, from_a = a.client.endpoint_for(b.node.key), b.client.endpoint_for(a.node.key)
    a.wg.send(to_b, payload)
    data, source = b.wg.recv()
    assert data == payload
    assert source == ("127.0.0.1", from_a.port)


def test_relay_carries_datagrams_both_ways_between_proxies(server: Server, pair: tuple[Side, Side]) -> None:
    a, b = pair
    b.client.endpoint_for(a.node.key)  # b's proxy for a must exist before a's frames arrive
    payloads = [b"\x01handshake" * 10, b"\x02response", bytes(range(256)) * 200]  # the last: 51,200 bytes
    _exchange(a, b, payloads[0])
    _exchange(b, a, payloads[1])
    _exchange(a, b, payloads[2])
    # Counted just after the datagram went out: wait for the count, not the datagram.
    wait_for(lambda: b.client.stats().received == 2, 5, "b's counters")
    stats = b.client.stats()
    assert stats.connected and stats.sent == 1 and stats.peers == 1
    metrics = server.metrics()
    assert "meshpi_relay_frames_total 3" in metrics
    assert f"meshpi_relay_bytes_total {sum(map(len, payloads))}" in metrics
    assert "meshpi_relay_connections 2" in metrics


def test_relay_latency_is_a_ping_to_control_and_none_when_closed(
    server: Server, pair: tuple[Side, Side]
) -> None:
    a, _ = pair
    latency = a.client.latency()
    assert latency is not None and 0 < latency < 2, latency
    a.client.close()
    assert a.client.latency() is None


def test_relay_datagrams_not_from_wireguard_port_are_not_relayed(pair: tuple[Side, Side]) -> None:
    a, b = pair
    stranger = FakeWireGuard()
    stranger.send(a.client.endpoint_for(b.node.key), b"injected")
    _exchange(a, b, b"real")  # in order behind the injected one: it was dropped, not queued
    assert a.client.stats().dropped_foreign == 1
    stranger.sock.close()


def _answer(
    conn: ClientConnection, machine: MachineKey, server: Server, challenge: bytes | None = None
) -> bytes:
    hello = conn.recv(timeout=5)
    assert isinstance(hello, bytes) and len(hello) == 33 and hello[0] == 1
    plaintext = {"op": "relay", "challenge": b64(challenge if challenge is not None else hello[1:])}
    return seal_request(machine, server.control_pub, plaintext)[0]


def _refusal(conn: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as e:
        while True:
            conn.recv(timeout=5)
    assert e.value.rcvd is not None
    return e.value.rcvd.code, e.value.rcvd.reason


def test_relay_refuses_unauthenticated_connections(server: Server, pair: tuple[Side, Side]) -> None:
    a, b = pair
    node = server.node("c")
    # No answer at all: closed when the challenge times out.
    with server.raw() as conn:
        conn.recv(timeout=5)
        assert _refusal(conn)[0] == 4401
    # Garbage, text, and an answer sealed for another control key.
    for junk in (
        b"\x01" + bytes(100),
        b"",
        "hello",
        seal_request(node.machine, MachineKey.generate().public_key(), {})[0],
    ):
        with server.raw() as conn:
            conn.recv(timeout=5)
            conn.send(junk)
            assert _refusal(conn)[0] == 4401
    # A real answer, recorded, replayed on another connection (another challenge).
    with server.raw() as conn:
        recorded = _answer(conn, node.machine, server)
        conn.send(recorded)
        assert conn.recv(timeout=5)  # accepted: the sealed answer
    with server.raw() as conn:
        conn.recv(timeout=5)
        conn.send(recorded)
        code, reason = _refusal(conn)
        assert code == 4401 and "challenge" in reason
    refused = server.relay.metrics.refused
    assert (refused["timeout"], refused["auth"], refused["replay"]) == (1, 4, 1)
    _exchange(a, b, b"still fine")


def test_relay_refuses_pending_and_unknown_machines(server: Server) -> None:
    pending = server.node("waiting", approved=False)
    for machine in (pending.machine, MachineKey.generate()):
        with server.raw() as conn:
            conn.send(_answer(conn, machine, server))
            code, reason = _refusal(conn)
            assert code == 4403, reason
    client = RelayClient(server.url, pending.machine, server.control_pub, listen_port=9)
    try:
        assert not client.wait_connected(1.0)
    finally:
        client.close()
    assert server.relay.metrics.refused["pending"] >= 2


def test_relay_drops_frames_to_unknown_keys_and_logs_once(
    server: Server, pair: tuple[Side, Side], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    stray = PrivateKey.generate().public_key()
    caplog.set_level(logging.WARNING, logger="appliance.control.relay_limits")
    endpoint = a.client.endpoint_for(stray)
    for _ in range(50):
        a.wg.send(endpoint, b"to nobody")
    b.client.endpoint_for(a.node.key)
    _exchange(a, b, b"after the strays")  # same connection, in order: all 50 were handled
    assert server.relay.metrics.drops["unknown"] == 50
    lines = [r for r in caplog.records if str(stray) in r.getMessage()]
    assert len(lines) == 1


def test_relay_closes_on_oversized_frame_and_others_carry_on(server: Server, pair: tuple[Side, Side]) -> None:
    a, b = pair
    node = server.node("big")
    with server.raw() as conn:
        conn.send(_answer(conn, node.machine, server))
        conn.recv(timeout=5)
        conn.send(bytes(b.node.key.raw) + bytes(64 * 1024))  # key + 64 KiB: over by 32 bytes
        assert _refusal(conn)[0] == 1009
    assert server.relay.metrics.refused["oversize"] == 1
    _exchange(a, b, b"unaffected")


def test_relay_flood_over_the_rate_limit_is_dropped(server: Server, pair: tuple[Side, Side]) -> None:
    a, b = pair
    node = server.node("flood")
    with server.raw() as conn:
        conn.send(_answer(conn, node.machine, server))
        conn.recv(timeout=5)
        for _ in range(3000):
            conn.send(b.node.key.raw + b"x" * 100)
        # Far over its burst of 400 frames and 200/s: most of it is dropped.
        metrics = server.relay.metrics
        wait_for(lambda: metrics.drops["rate"] >= 2000, 10, "the flood to be dropped")
        _exchange(a, b, b"through the flood")
    _exchange(b, a, b"and back")


def test_relay_new_connection_replaces_the_old(server: Server, pair: tuple[Side, Side]) -> None:
    a, b = pair
    with server.raw() as conn:
        conn.send(_answer(conn, a.node.machine, server))
        conn.recv(timeout=5)  # now this connection is a's
        wait_for(lambda: server.relay.metrics.refused["replaced"] >= 1, 5, "a's old connection replaced")
        # a's client was told it was replaced; it reconnects (replacing this one).
        code, _ = _refusal(conn)
        assert code == 4409
    assert a.client.wait_connected(10)
    _exchange(a, b, b"a is back")


def test_relay_removed_node_is_disconnected(server: Server, pair: tuple[Side, Side]) -> None:
    a, b = pair
    nodes = server.admin("GET", "/admin/v1/nodes")
    b_id = next(n["id"] for n in nodes if n["name"] == "b")  # type: ignore[union-attr, index]
    server.admin("DELETE", f"/admin/v1/nodes/{b_id}")
    wait_for(lambda: server.relay.metrics.connections == 1, 5, "b to leave the relay")
    assert "meshpi_relay_connections 1" in server.metrics()


def test_relay_max_connections_refuses_the_next_node_and_lets_it_in_later(
    server: Server, pair: tuple[Side, Side]
) -> None:
    a, b = pair
    server.relay.limits = replace(LIMITS, max_connections=2)
    third = server.node("third")
    with server.raw() as conn:
        conn.send(_answer(conn, third.machine, server))
        code, reason = _refusal(conn)
        assert code == 1013 and "full" in reason, reason
    assert server.relay.metrics.refused["full"] == 1
    assert 'meshpi_relay_refused_total{reason="full"} 1' in server.metrics()
    # Unanswered handshakes count too: with 2 already proving who they are, a third waits its turn.
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(server.raw()).recv(timeout=5)  # the challenge: this one is being set up
        with server.raw() as conn:
            assert _refusal(conn)[0] == 1013
    _exchange(a, b, b"the two on the relay carry on")
    a.client.close()  # a leaves: room for the third
    wait_for(lambda: server.relay.metrics.connections == 1, 5, "a to leave")
    with server.raw() as conn:
        conn.send(_answer(conn, third.machine, server))
        assert isinstance(conn.recv(timeout=5), bytes)  # the sealed welcome
