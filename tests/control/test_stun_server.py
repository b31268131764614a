"""meshpi-control's STUN server (appliance/control/stun.py) on real loopback sockets:
answers, no amplification, rate limits logged once, floods and garbage survived."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from appliance.base.net import Endpoint
from appliance.control import cli
from appliance.control import stun as server_mod
from appliance.wire import stun


class Running:
    """The server on its own event loop thread, as `meshpi-control serve` runs it."""

    def __init__(self, host: str, limits: server_mod.Limits) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(server_mod.start(host, 0, limits), self.loop).result(5)
        self.address = self.server.addresses[0]

    def sync(self) -> None:
        """Wait until the loop has handled everything queued before this call."""
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running("127.0.0.1", server_mod.Limits(rate=5, burst=10, max_sources=64))
    try:
        yield r
    finally:
        r.close()


def client(source: str = "127.0.0.1", family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.settimeout(2)
    return s


def ask(s: socket.socket, server: Endpoint, request: bytes) -> bytes:
    s.sendto(request, (str(server.host), server.port))
    data, _ = s.recvfrom(2048)
    return data


def test_stun_server_answers_with_the_source_address(running: Running) -> None:
    with client() as s:
        txid = stun.new_transaction_id()
        reply = ask(s, running.address, stun.binding_request(txid, "test", size=64))
        assert stun.parse_response(reply, txid) == Endpoint(ip_address("127.0.0.1"), s.getsockname()[1])
        msg = stun.parse(reply)
        assert msg.fingerprint and msg.software == "meshpi"
        assert len(reply) <= 64


def test_stun_server_answer_never_larger_than_request(running: Running) -> None:
    """A 20-byte request (what coturn's client sends) gets the bare 32-byte answer;
    anything bigger gets at most its own size back."""
    with client() as s:
        for size in (20, 28, 32, 40, 48, 64, 200):
            txid = stun.new_transaction_id()
            if size == 20:
                request = stun.encode(stun.BINDING_REQUEST, txid, [], fingerprint=False)
            else:
                request = stun.binding_request(txid, size=size)
            reply = ask(s, running.address, request)
            assert stun.parse_response(reply, txid).port == s.getsockname()[1]
            assert len(reply) <= max(len(request), 32), (size, len(reply))


def test_stun_server_ipv6(running: Running) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    r6 = Running("::1", server_mod.Limits())
    try:
        with client("::1", socket.AF_INET6) as s:
            txid = stun.new_transaction_id()
            reply = ask(s, r6.address, stun.binding_request(txid, size=64))
            assert stun.parse_response(reply, txid) == Endpoint(ip_address("::1"), s.getsockname()[1])
    finally:
        r6.close()


def test_stun_server_ignores_non_binding(running: Running) -> None:
    """Garbage, a WireGuard initiation, a Binding response, a classic RFC 3489 request:
    no answer to any, and a real request right after is answered."""
    txid = stun.new_transaction_id()
    junk = [
        b"",
        b"\x01\x00\x00\x00" + bytes(144),
        stun.binding_response(txid, Endpoint(ip_address("192.0.2.1"), 1)),
        b"\x00\x01\x00\x08" + bytes(16) + b"\x00\x03\x00\x04\x00\x00\x00\x00",
        stun.binding_request(txid)[:-1],
    ]
    with client() as s:
        s.settimeout(0.3)
        for data in junk:
            s.sendto(data, (str(running.address.host), running.address.port))
        s.settimeout(2)
        reply = ask(s, running.address, stun.binding_request(txid, size=64))
        assert stun.parse_response(reply, txid)
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recvfrom(2048)  # nothing else was queued for us
    running.sync()
    assert running.server.counters.ignored == len(junk)


def test_stun_server_rate_limit_logged_once_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    limiter = server_mod.RateLimiter(server_mod.Limits(rate=1, burst=2), clock=lambda: now[0])
    host = ip_address("192.0.2.9")
    with caplog.at_level(logging.WARNING, logger="appliance.control.stun"):
        allowed = [limiter.allow(host) for _ in range(100)]
        assert allowed[:2] == [True, True] and not any(allowed[2:])
        now[0] += 30
        assert limiter.allow(host)  # refilled
        for _ in range(50):
            limiter.allow(host)
        assert len(caplog.records) == 1
        now[0] += 31
        for _ in range(200):
            limiter.allow(host)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "192.0.2.9" in lines[0] and "dropped 1 " in lines[0]
    assert "dropped" in lines[1]


def test_stun_server_v6_sources_share_a_bucket_per_64() -> None:
    limiter = server_mod.RateLimiter(server_mod.Limits(rate=0.001, burst=3), clock=lambda: 0.0)
    answers = [limiter.allow(ip_address(f"2001:db8:1:2::{i:x}")) for i in range(1, 10)]
    assert answers.count(True) == 3
    assert limiter.allow(ip_address("2001:db8:1:3::1"))


def test_stun_server_survives_a_flood_and_answers_right_after(running: Running) -> None:
    """10,000 datagrams: valid requests from one host far over its rate, garbage,
    oversized datagrams, requests from 200 other addresses (more than the table
    holds). The server stays up, its memory stays bounded (the bucket table never
    grows past max_sources), and a legit request right after is answered."""
    target = (str(running.address.host), running.address.port)
    txid = stun.new_transaction_id()
    request = stun.binding_request(txid, size=64)
    socks = [client(f"127.0.{i // 250}.{i % 250 + 2}") for i in range(200)]
    flooder = client("127.0.0.1")
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    try:
        sent = 0
        for i in range(10_000):
            match i % 4:
                case 0:
                    data, s = request, flooder
                case 1:
                    data, s = bytes([i % 256]) * (i % 1400), flooder
                case 2:
                    data, s = request, socks[i % len(socks)]
                case _:
                    data, s = b"\x00\x01" + bytes(60_000), flooder
            try:
                s.sendto(data, target)
                sent += 1
            except BlockingIOError:  # pragma: no cover - loopback sendto blocks instead
                pass
        running.sync()
        assert running.thread.is_alive()
        counters, limiter = running.server.counters, running.server.limiter
        print(f"flood: {counters}")
        assert len(limiter.buckets) <= 64
        assert counters.limited > 0  # the one hot source was held back
        with client("127.0.9.9") as fresh:
            legit = stun.new_transaction_id()
            reply = ask(fresh, running.address, stun.binding_request(legit, size=64))
            assert stun.parse_response(reply, legit).port == fresh.getsockname()[1]
        assert sent == 10_000
    finally:
        for s in [*socks, flooder]:
            s.close()


def test_stun_server_listen_parsing() -> None:
    assert server_mod.parse_listen("off") is None
    assert server_mod.parse_listen("0.0.0.0:3478") == ("0.0.0.0", 3478)
    assert server_mod.parse_listen("[::]:3478") == ("::", 3478)
    for bad in ("3478", "host:3478", "1.2.3.4:0", "1.2.3.4:x", "1.2.3.4:70000"):
        with pytest.raises(ValueError, match="stun-listen|does not appear"):
            server_mod.parse_listen(bad)


def test_stun_server_cli_refuses_a_bad_listen_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--state-dir", str(tmp_path), "serve", "--stun-listen", "nowhere"]) == 1
    assert "--stun-listen 'nowhere': expected HOST:PORT or off" in capsys.readouterr().err
    assert not (tmp_path / "control.key").exists()  # refused before anything was made
