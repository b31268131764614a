"""STUN from the WireGuard listen port, while WireGuard (kernel or wireguard-go) owns it.

A UDP socket cannot bind a port that WireGuard holds, so the Binding request leaves
through a raw IPPROTO_UDP socket that writes its own UDP header (source port = the
WireGuard port; the kernel adds the IP header). The NAT in front of us then maps the
request exactly as it maps WireGuard's own packets, and the answer names the public
address and port that peers must use.

The answer arrives at the WireGuard port: WireGuard gets it and drops it (not one of
its messages), and the same raw socket gets a copy. A raw UDP socket would see every
UDP datagram of the host, the tunnel's included, so a classic BPF filter, attached
before anything is read, passes only datagrams to the WireGuard port whose payload
has the STUN magic cookie at offset 4: WireGuard ciphertext never reaches this
process. What the filter passes is still parsed strictly (wire/stun.py) and must
come from the server asked, with our transaction id.

Sent packets carry WireGuard's fwmark, so on a node that uses an exit node they take
the same route as WireGuard's own (outside the tunnel), not the exit node's table.

Needs CAP_NET_RAW (raw sockets) and CAP_NET_ADMIN (SO_MARK), which the agent has.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

from appliance.base.net import Endpoint
from appliance.kernel.base import KernelError, PermissionDenied
from appliance.wire import stun

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; Python's socket module lacks it
SO_MARK = 36
IPV6_CHECKSUM = 7
_UDP_CHECKSUM_OFFSET = 6
SOFTWARE = "meshpi"
# Requests are padded so that a server that never answers more than it was asked
# (meshpi-control's) can afford XOR-MAPPED-ADDRESS (v6), SOFTWARE and FINGERPRINT.
REQUEST_SIZE = 64
FIRST_RTO = 0.25  # seconds before the first retransmission; doubles after each


class StunProbeError(KernelError):
    """Endpoint discovery failed: no answer, a bad answer, or no way to send."""


class StunTimeout(StunProbeError, TimeoutError):
    pass


@dataclass(frozen=True)
class Mapping:
    """What two servers saw of the same local port."""

    first: Endpoint
    second: Endpoint
    servers: tuple[Endpoint, Endpoint]

    @property
    def varies_by_destination(self) -> bool:
        """True behind a symmetric NAT: peers cannot use the address STUN found."""
        return self.first != self.second


# -- the filter --------------------------------------------------------------------


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]  # fmt: skip


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_LD_H_ABS, _LD_W_ABS, _LDX_B_MSH = 0x28, 0x20, 0xB1
_LD_H_IND, _LD_W_IND, _JEQ_K, _RET_K = 0x48, 0x40, 0x15, 0x06


def stun_filter(family: int, port: int) -> list[tuple[int, int, int, int]]:
    """cBPF: accept UDP to `port` with the magic cookie at payload offset 4, drop the rest.

    A raw IPv4 socket's filter sees the packet from its IP header (whose length X
    is read from the header), a raw IPv6 socket's from the UDP header."""
    if family == socket.AF_INET:
        return [
            (_LDX_B_MSH, 0, 0, 0),  # X = 4 * (IP header length)
            (_LD_H_IND, 0, 0, 2),  # A = UDP destination port
            (_JEQ_K, 0, 3, port),
            (_LD_W_IND, 0, 0, 8 + 4),  # A = payload[4:8]
            (_JEQ_K, 0, 1, stun.MAGIC_COOKIE),
            (_RET_K, 0, 0, 0xFFFF),
            (_RET_K, 0, 0, 0),
        ]
    return [
        (_LD_H_ABS, 0, 0, 2),
        (_JEQ_K, 0, 3, port),
        (_LD_W_ABS, 0, 0, 8 + 4),
        (_JEQ_K, 0, 1, stun.MAGIC_COOKIE),
        (_RET_K, 0, 0, 0xFFFF),
        (_RET_K, 0, 0, 0),
    ]


def _attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    insns = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    prog = _SockFprog(len(program), ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))  # the kernel copies it


def _drain(sock: socket.socket) -> int:
    """Drop what was queued before the filter was attached (it may be anything)."""
    dropped = 0
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while True:
            sock.recv(65535, socket.MSG_DONTWAIT)
            dropped += 1
    return dropped


# -- the packet --------------------------------------------------------------------


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_datagram(src: Endpoint, dst: Endpoint, payload: bytes) -> bytes:
    """A UDP header and payload; the checksum is ours for IPv4, the kernel's for IPv6."""
    length = 8 + len(payload)
    header = struct.pack("!HHHH", src.port, dst.port, length, 0)
    if not isinstance(src.host, IPv4Address):
        return header + payload  # IPV6_CHECKSUM has the kernel fill it in
    pseudo = src.host.packed + dst.host.packed + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    checksum = 0xFFFF - _ones_sum(pseudo + header + payload)
    return struct.pack("!HHHH", src.port, dst.port, length, checksum or 0xFFFF) + payload


def _source_address(server: Endpoint, fwmark: int) -> Endpoint:
    """The local address the kernel would send from to `server` (marked like WireGuard)."""
    family = socket.AF_INET if server.host.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        if fwmark:
            probe.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
        probe.connect((str(server.host), server.port))  # routes, sends nothing
        return Endpoint(ip_address(probe.getsockname()[0]), 0)


@contextlib.contextmanager
def stun_socket(family: int, listen_port: int, fwmark: int, source: Endpoint) -> Iterator[socket.socket]:
    """A raw UDP socket that sends as `source` and reads only STUN to `listen_port`."""
    try:
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except PermissionError as e:
        raise PermissionDenied(f"STUN: a raw UDP socket needs CAP_NET_RAW: {e.strerror}") from e
    try:
        _attach(sock, stun_filter(family, listen_port))
        _drain(sock)
        if fwmark:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
            except PermissionError as e:
                raise PermissionDenied(f"STUN: fwmark 0x{fwmark:x} needs CAP_NET_ADMIN: {e.strerror}") from e
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, _UDP_CHECKSUM_OFFSET)
        sock.bind((str(source.host), 0))  # the source address our checksum assumed
        yield sock
    finally:
        sock.close()


def _answer(
    packet: bytes, sender: str, family: int, server: Endpoint, listen_port: int, txid: bytes
) -> Endpoint:
    """The reflexive address in one datagram the filter passed; StunError if it is not ours.

    A raw IPv4 socket reads the IP header too, a raw IPv6 socket from the UDP header."""
    if family == socket.AF_INET:
        if len(packet) < 20 or len(packet) < (packet[0] & 0x0F) * 4:
            raise stun.StunError(f"{len(packet)} bytes: no room for an IPv4 header")
        packet = packet[(packet[0] & 0x0F) * 4 :]
    src = ip_address(sender.partition("%")[0])
    if len(packet) < 8:
        raise stun.StunError(f"{len(packet)} bytes: no room for a UDP header")
    sport, dport, length = struct.unpack_from("!HHH", packet)
    if dport != listen_port or src != server.host or sport != server.port:
        raise stun.StunError(f"from {src}:{sport} to port {dport}: not the server asked ({server})")
    if not 8 <= length <= len(packet):
        raise stun.StunError(f"UDP length {length}: the packet carries {len(packet)}")
    return stun.parse_response(packet[8:length], txid)


def probe(server: Endpoint, listen_port: int, fwmark: int, timeout: float = 2.0) -> Endpoint:
    """Ask `server` which address and port our `listen_port` appears from.

    Retransmits (RFC 5389 7.2.1, shortened) until `timeout`; raises StunTimeout when no
    valid answer came, PermissionDenied without the capabilities, StunProbeError when
    the route or the socket fails."""
    family = socket.AF_INET if server.host.version == 4 else socket.AF_INET6
    try:
        local = _source_address(server, fwmark)
    except OSError as e:
        raise StunProbeError(f"STUN: no route to {server}: {e.strerror}") from e
    source = Endpoint(local.host, listen_port)
    txid = stun.new_transaction_id()
    request = stun.binding_request(txid, SOFTWARE, REQUEST_SIZE)
    datagram = udp_datagram(source, server, request)
    dest = (str(server.host), 0)
    rejected: list[str] = []
    with stun_socket(family, listen_port, fwmark, local) as sock:
        deadline = time.monotonic() + timeout
        rto, next_send = FIRST_RTO, 0.0
        while (now := time.monotonic()) < deadline:
            if now >= next_send:
                try:
                    sock.sendto(datagram, dest)
                except OSError as e:
                    if e.errno in (errno.EPERM, errno.EACCES):
                        raise PermissionDenied(f"STUN to {server}: sending refused: {e.strerror}") from e
                    raise StunProbeError(f"STUN to {server}: cannot send: {e.strerror}") from e
                next_send, rto = now + rto, rto * 2
            ready, _, _ = select.select([sock], [], [], max(0.0, min(next_send, deadline) - now))
            if not ready:
                continue
            try:
                packet, sender = sock.recvfrom(65535)
            except OSError as e:  # e.g. ECONNREFUSED from an ICMP error: keep waiting
                rejected.append(e.strerror or str(e))
                continue
            try:
                mapped = _answer(packet, sender[0], family, server, listen_port, txid)
            except stun.StunError as e:
                rejected.append(str(e))
                continue
            log.debug("STUN %s: port %d is %s", server, listen_port, mapped)
            return mapped
    why = f"; ignored {len(rejected)} datagram(s), the last: {rejected[-1]}" if rejected else ""
    raise StunTimeout(f"STUN: no answer from {server} to port {listen_port} within {timeout:g}s{why}")


def probe_mapping(
    servers: tuple[Endpoint, Endpoint], listen_port: int, fwmark: int, timeout: float = 2.0
) -> Mapping:
    """Ask two servers (different addresses) about the same port: behind an
    endpoint-independent NAT both see one address, behind a symmetric one they differ."""
    first = probe(servers[0], listen_port, fwmark, timeout)
    second = probe(servers[1], listen_port, fwmark, timeout)
    return Mapping(first, second, servers)
