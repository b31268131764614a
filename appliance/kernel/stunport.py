"""STUN at the WireGuard listen port, kept open: the peers' connectivity checks.

The same trick as stun.py's one-shot probe, held for as long as the port is WireGuard's:
one raw IPPROTO_UDP socket per family, whose classic BPF filter passes only datagrams
to the WireGuard port with the STUN magic cookie at payload offset 4 (WireGuard's
ciphertext never reaches this process), that sends datagrams with source port = the
WireGuard port. A check sent from here leaves through the NAT exactly as WireGuard's
own packets do, so the mapping it opens is the one WireGuard's handshake then uses.

What arrives is handed up as (source, STUN payload); the caller authenticates it
(agent/reach/checkcore.py). Reading is bounded per call (`MAX_READ`): a flood at the
port costs the kernel's socket buffer, not unbounded work here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address

from appliance.base.net import Endpoint
from appliance.kernel.base import KernelError, PermissionDenied
from appliance.kernel.stun import (
    IPV6_CHECKSUM,
    SO_MARK,
    _attach,
    _drain,
    _source_address,
    stun_filter,
    udp_datagram,
)

log = logging.getLogger(__name__)

MAX_READ = 256  # datagrams per receive() call
SOURCE_TTL = 10.0  # seconds a destination's route-chosen source address is reused
_UDP_CHECKSUM_OFFSET = 6


@dataclass(frozen=True)
class Datagram:
    source: Endpoint
    payload: bytes


class StunPort:
    """Raw sockets for STUN at `listen_port` (v4 always, v6 where the host has it)."""

    def __init__(self, listen_port: int, fwmark: int) -> None:
        self.listen_port, self.fwmark = listen_port, fwmark
        self._socks: dict[int, socket.socket] = {}
        self._sources: dict[Endpoint, tuple[Endpoint, float]] = {}
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    self._socks[family] = self._open(family)
                except OSError as e:
                    if family == socket.AF_INET or e.errno not in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                        raise
        except BaseException:
            self.close()
            raise

    def _open(self, family: int) -> socket.socket:
        try:
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
        except PermissionError as e:
            raise PermissionDenied(f"path checks: a raw UDP socket needs CAP_NET_RAW: {e.strerror}") from e
        try:
            _attach(sock, stun_filter(family, self.listen_port))
            _drain(sock)
            if self.fwmark:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
                except PermissionError as e:
                    raise PermissionDenied(f"path checks: fwmark needs CAP_NET_ADMIN: {e.strerror}") from e
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, _UDP_CHECKSUM_OFFSET)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def fileno_list(self) -> list[socket.socket]:
        return list(self._socks.values())

    def send(self, dest: Endpoint, payload: bytes) -> None:
        """One datagram from the WireGuard port to `dest`; KernelError if it cannot go."""
        family = socket.AF_INET if dest.host.version == 4 else socket.AF_INET6
        sock = self._socks.get(family)
        if sock is None:
            raise KernelError(f"path check to {dest}: no IPv{dest.host.version} here")
        try:
            source = self._source(dest)
            sock.sendto(udp_datagram(source, dest, payload), (str(dest.host), 0))
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise PermissionDenied(f"path check to {dest}: sending refused: {e.strerror}") from e
            raise KernelError(f"path check to {dest}: {e.strerror or e}") from e

    def _source(self, dest: Endpoint) -> Endpoint:
        """The address the kernel sends from to `dest` (the IPv4 checksum covers it)."""
        now = time.monotonic()
        cached = self._sources.get(dest)
        if cached is not None and now - cached[1] < SOURCE_TTL:
            return cached[0]
        local = _source_address(dest, self.fwmark)
        source = Endpoint(local.host, self.listen_port)
        if len(self._sources) > 1024:
            self._sources.clear()
        self._sources[dest] = (source, now)
        return source

    def wait(self, timeout: float) -> bool:
        """True when something can be read within `timeout` seconds."""
        if not self._socks:
            return False
        ready, _, _ = select.select(list(self._socks.values()), [], [], max(0.0, timeout))
        return bool(ready)

    def receive(self) -> list[Datagram]:
        """What the filter passed since the last call (at most MAX_READ), not blocking."""
        out: list[Datagram] = []
        for family, sock in self._socks.items():
            while len(out) < MAX_READ:
                try:
                    packet, sender = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # an ICMP error reported on the socket: nothing to read
                got = _payload(packet, sender[0], family, self.listen_port)
                if got is not None:
                    out.append(got)
        return out

    def close(self) -> None:
        for sock in self._socks.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._socks.clear()


def _payload(packet: bytes, sender: str, family: int, listen_port: int) -> Datagram | None:
    """The UDP payload and its source, or None for anything malformed."""
    if family == socket.AF_INET:
        if len(packet) < 20 or len(packet) < (packet[0] & 0x0F) * 4:
            return None
        packet = packet[(packet[0] & 0x0F) * 4 :]
    if len(packet) < 8:
        return None
    sport, dport, length = struct.unpack_from("!HHH", packet)
    if dport != listen_port or not 8 <= length <= len(packet) or sport == 0:
        return None
    try:
        host = ip_address(sender.partition("%")[0])
    except ValueError:
        return None
    if isinstance(host, IPv6Address) and host.ipv4_mapped is not None:
        return None
    return Datagram(Endpoint(host, sport), packet[8:length])
