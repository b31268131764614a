"""Hostile input at the resolver's sockets: hypothesis throws malformed packets at the
UDP port (5,000+) and broken streams at the TCP port. The server must not crash (no
internal error logged, a probe query answered after every packet), and no UDP answer
may be larger than its query allows (512 bytes, or the query's EDNS0 size up to 1232):
no amplification.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.message
import dns.query
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.agent.dns.answer import PARSE_ERRORS, udp_limit
from appliance.agent.dns.server import DnsServer
from appliance.agent.dns.zone import Upstreams
from appliance.base.net import Endpoint
from tests.dns.conftest import LOOPBACK, MESH, free_port, start_dnsmasq

NAMES = [b"pi.mesh.internal", b"many.mesh.internal", b"nobody.mesh.internal", b"2.0.64.100.in-addr.arpa",
         b"www.example.test", b"big.example.test", b"", b"x" * 63 + b".mesh.internal"]  # fmt: skip


class Errors(logging.Handler):
    """What the resolver logs: `records` its warnings and errors, `lines` everything."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.started = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if record.levelno >= logging.WARNING:
            self.records.append(record)

    def failures(self) -> list[str]:
        """The warnings and errors, each with its traceback if it had one."""
        formatter = logging.Formatter()
        return [formatter.format(record) for record in self.records]


@dataclass
class Target:
    server: DnsServer
    bind: Endpoint
    fuzz: socket.socket
    probe: socket.socket
    errors: Errors
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    allowed: dict[int, int] = field(default_factory=dict)
    answers: list[tuple[int, int]] = field(default_factory=list)

    def drain(self) -> None:
        self.fuzz.setblocking(False)
        try:
            while True:
                wire = self.fuzz.recv(65535)
                self.answers.append((int.from_bytes(wire[:2], "big"), len(wire)))
        except BlockingIOError:
            pass

    def probe_answered(self) -> bool:
        query = dns.message.make_query("pi.mesh.internal", "A")
        self.probe.sendto(query.to_wire(), (str(self.bind.host), self.bind.port))
        while True:
            wire = self.probe.recv(65535)
            if dns.message.from_wire(wire).id == query.id:
                return True


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    home = start_dnsmasq(tmp_path_factory.mktemp("dnsmasq"), {"www.example.test": ["192.0.2.10"],
                         "big.example.test": [f"198.51.100.{i}" for i in range(1, 101)]}, "test")  # fmt: skip
    bind = Endpoint(LOOPBACK, free_port())
    server = DnsServer([bind], MESH, Upstreams(default=(home.endpoint,)), upstream_timeout=0.5)
    errors = Errors()
    logger = logging.getLogger("appliance.agent.dns")
    logger.addHandler(errors)
    level = logger.level
    logger.setLevel(logging.INFO)
    server.start()
    fuzz, probe = (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
    )
    probe.settimeout(5)
    try:
        yield Target(server, bind, fuzz, probe, errors)
    finally:
        server.stop()
        fuzz.close()
        probe.close()
        logger.removeHandler(errors)
        logger.setLevel(level)
        home.process.kill()


def allowed_size(packet: bytes) -> int:
    try:
        return udp_limit(dns.message.from_wire(packet))
    except PARSE_ERRORS:
        return 512


def send(target: Target, packet: bytes) -> None:
    if len(packet) >= 2:
        ident = next(target.ids) & 0xFFFF
        packet = ident.to_bytes(2, "big") + packet[2:]
        target.allowed[ident] = allowed_size(packet)
    target.fuzz.sendto(packet, (str(target.bind.host), target.bind.port))
    assert target.probe_answered()
    target.drain()


def encode_name(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(label) & 0xFF]) + label[:255] for label in labels) + b"\0"


labels = st.lists(st.one_of(st.binary(max_size=70), st.sampled_from([b"pi", b"mesh", b"internal", b"test",
                  "bücher".encode(), b"xn--bcher-kva", b"\x00", b"a.b", b"*"])), max_size=8)  # fmt: skip
names = st.one_of(
    labels.map(encode_name),
    st.sampled_from(NAMES).map(lambda n: encode_name(n.split(b".")) if n else b"\0"),
    st.binary(max_size=40).map(lambda b: b + b"\xc0\x0c"),  # compression pointers, loops included
)
opt_rr = st.builds(
    lambda payload, ttl, options: b"\0" + struct.pack("!HHIH", 41, payload, ttl, len(options)) + options,
    st.integers(0, 0xFFFF),
    st.one_of(st.just(0), st.just(0x8000), st.integers(0, 0xFFFFFFFF)),
    st.one_of(st.just(b""), st.binary(max_size=40), st.just(b"\x00\x0a\x00\x08" + b"c" * 8)),
)
structured = st.builds(
    lambda ident, flags, counts, name, qtype, qclass, opt, tail: (
        struct.pack("!HHHHHH", ident, flags, *counts) + name + struct.pack("!HH", qtype, qclass) + opt + tail
    ),
    st.integers(0, 0xFFFF),
    st.one_of(st.just(0x0100), st.just(0x0000), st.integers(0, 0xFFFF)),
    st.tuples(
        st.sampled_from([1, 1, 1, 0, 2, 0xFFFF]),
        st.sampled_from([0, 0, 1]),
        st.sampled_from([0, 0, 1]),
        st.sampled_from([0, 1, 1, 2, 0xFFFF]),
    ),  # fmt: skip
    names,
    st.one_of(st.sampled_from([1, 28, 12, 255, 252, 251, 41, 250, 6, 16, 0, 65535]), st.integers(0, 0xFFFF)),
    st.one_of(st.just(1), st.sampled_from([3, 4, 254, 255, 0]), st.integers(0, 0xFFFF)),
    st.one_of(st.just(b""), opt_rr),
    st.one_of(st.just(b""), st.binary(max_size=20)),
)


def mutated(base: bytes, edits: list[tuple[int, int]], cut: int, junk: bytes) -> bytes:
    packet = bytearray(base)
    for position, value in edits:
        packet[position % len(packet)] = value
    return bytes(packet[: max(0, len(packet) - cut)]) + junk


valid = st.sampled_from(
    [dns.message.make_query(n.decode() or ".", t, use_edns=e, payload=p).to_wire()
     for n in NAMES for t in ("A", "AAAA", "PTR", "ANY", "TXT") for e, p in ((False, 512), (0, 1232), (0, 4096))]
)  # fmt: skip
mutations = st.builds(
    mutated,
    valid,
    st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=4),
    st.one_of(st.just(0), st.integers(0, 30)),
    st.one_of(st.just(b""), st.binary(max_size=30)),
)


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )


@fuzz(1500)
@given(packet=st.binary(max_size=600))
def test_dns_fuzz_udp_random_bytes(target: Target, packet: bytes) -> None:
    send(target, packet)


@fuzz(2000)
@given(packet=structured)
def test_dns_fuzz_udp_structured(target: Target, packet: bytes) -> None:
    send(target, packet)


@fuzz(2000)
@given(packet=mutations)
def test_dns_fuzz_udp_mutated_queries(target: Target, packet: bytes) -> None:
    send(target, packet)


def test_dns_fuzz_udp_no_answer_above_the_allowed_size(target: Target) -> None:
    """Runs after the three above (file order): every answer they got, forwarded ones included."""
    sent = len(target.allowed)
    assert sent >= 5000, sent
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # forwarded questions answer late; let them come
        time.sleep(0.2)
        target.drain()
    assert target.answers, "no answers at all"
    too_big = [
        (i, size, target.allowed[i]) for i, size in target.answers if size > target.allowed.get(i, 512)
    ]
    assert too_big == []
    assert target.errors.failures() == []
    # Thousands of refusals, a handful of log lines: at most one per kind per minute.
    refusals = [line for line in target.errors.lines if line.startswith(("dns: refused", "dns: servfail"))]
    kinds = {line.split(" (from ")[0] for line in refusals}
    minutes = 1 + int((time.monotonic() - target.errors.started) // 60)
    assert len(kinds) >= 3 and len(refusals) <= len(kinds) * minutes, refusals
    stats = target.server.stats()
    assert stats["queries"] >= 2 * sent and stats["refused"] > 500, stats


def tcp_exchange(bind: Endpoint, stream: bytes) -> bytes:
    with socket.create_connection((str(bind.host), bind.port), timeout=5) as sock:
        sock.sendall(stream)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65535):
            received += chunk
    return received


frames = st.lists(
    st.one_of(
        mutations.map(lambda m: len(m).to_bytes(2, "big") + m),
        structured.map(lambda m: len(m).to_bytes(2, "big") + m),
        st.binary(max_size=100),
        st.builds(lambda n, b: n.to_bytes(2, "big") + b, st.integers(0, 0xFFFF), st.binary(max_size=50)),
    ),
    max_size=4,
)


@fuzz(300)
@given(stream=frames.map(b"".join))
def test_dns_fuzz_tcp_streams(target: Target, stream: bytes) -> None:
    received = tcp_exchange(target.bind, stream)
    while received:  # whatever came back is well framed DNS
        size = int.from_bytes(received[:2], "big")
        dns.message.from_wire(received[2 : 2 + size])
        assert len(received) >= 2 + size
        received = received[2 + size :]
    query = dns.message.make_query("pi.mesh.internal", "A")
    assert dns.query.tcp(query, str(target.bind.host), port=target.bind.port, timeout=5).answer
    assert target.errors.failures() == []
