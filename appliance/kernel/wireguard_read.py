"""Reading a kernel WireGuard device: WG_CMD_GET_DEVICE over generic netlink,
decoded here (nlattrs.py) rather than by pyroute2.

The device is read every second by path selection and traffic history, and on
every status. pyroute2 opened a socket with its own asyncio loop and resolved the
family for each read, then built objects for every attribute of every peer. With
100 peers under the image tier's emulation that kept the agent busy and its heap
large (issue 14). Here the family id is resolved once per process, and each read
is one dump on one socket, decoded straight into WgDevice.

The kernel puts the device's attributes in the first message only, and when a
peer does not fit it continues in the next message under the same public key with
the rest of its allowed IPs (wg(8) merges them the same way).
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint, IPNetwork
from appliance.core.model import Peer, sorted_networks
from appliance.kernel.base import KernelError, PeerStats, PermissionDenied, WgDevice
from appliance.kernel.nlattrs import NLM_F_DUMP, ask, attr, attrs, bound_socket

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 3, 1, 2
WG_CMD_GET_DEVICE, WG_GENL_VERSION = 0, 1
WGDEVICE_A_IFNAME, WGDEVICE_A_PRIVATE_KEY = 2, 3
WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FWMARK, WGDEVICE_A_PEERS = 6, 7, 8
WGPEER_A_PUBLIC_KEY, WGPEER_A_ENDPOINT, WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 1, 4, 5
WGPEER_A_LAST_HANDSHAKE_TIME, WGPEER_A_RX_BYTES, WGPEER_A_TX_BYTES, WGPEER_A_ALLOWEDIPS = 6, 7, 8, 9
WGALLOWEDIP_A_IPADDR, WGALLOWEDIP_A_CIDR_MASK = 2, 3  # the family follows from the address's size
TIMEOUT_S = 5.0

_family: int | None = None  # the wireguard family's id, once resolved
_family_lock = threading.Lock()


class NoWireGuardFamily(KernelError):
    """The kernel has no wireguard generic netlink family (no module)."""


def read_device(ifname: str) -> WgDevice | None:
    """The device, or None when there is no WireGuard link of that name (or no module)."""
    with bound_socket(NETLINK_GENERIC, TIMEOUT_S) as sock:
        try:
            family = family_id(sock)
        except NoWireGuardFamily:
            return None
        request = genl_header(WG_CMD_GET_DEVICE, WG_GENL_VERSION) + attr(
            WGDEVICE_A_IFNAME, ifname.encode() + b"\0"
        )
        try:
            return parse_device(body for _kind, body in ask(sock, family, NLM_F_DUMP, request, seq=2))
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.EOPNOTSUPP):
                return None
            if e.errno in (errno.EPERM, errno.EACCES):
                raise PermissionDenied(f"{ifname}: reading the device needs CAP_NET_ADMIN") from e
            if e.errno == errno.ENOENT:  # the module was reloaded: its family id changed
                forget_family()
            raise KernelError(f"{ifname}: reading the device failed: {e.strerror}") from e


def genl_header(cmd: int, version: int) -> bytes:
    return struct.pack("=BBH", cmd, version, 0)


def forget_family() -> None:
    global _family
    with _family_lock:
        _family = None


def family_id(sock: socket.socket) -> int:
    global _family
    with _family_lock:
        if _family is not None:
            return _family
        request = genl_header(CTRL_CMD_GETFAMILY, 1) + attr(CTRL_ATTR_FAMILY_NAME, b"wireguard\0")
        try:
            for _kind, body in ask(sock, GENL_ID_CTRL, 0, request, seq=1):
                found = dict(attrs(body[4:])).get(CTRL_ATTR_FAMILY_ID)
                if found is not None and len(found) >= 2:
                    _family = int(struct.unpack_from("=H", found)[0])
                    return _family
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EOPNOTSUPP):
                raise NoWireGuardFamily("the kernel has no wireguard module") from e
            raise KernelError(f"resolving the wireguard netlink family failed: {e.strerror}") from e
        raise NoWireGuardFamily("the kernel named no wireguard family id")


def parse_device(bodies: Iterable[bytes]) -> WgDevice:
    """Merge the messages (generic netlink header included) of one dump."""
    private_key: PrivateKey | None = None
    listen_port = fwmark = 0
    nets: dict[PublicKey, list[IPNetwork]] = {}
    base: dict[PublicKey, tuple[Endpoint | None, int, PeerStats]] = {}
    for body in bodies:
        for kind, value in attrs(body[4:]):
            if kind == WGDEVICE_A_PRIVATE_KEY and len(value) == 32:
                private_key = PrivateKey(value) if any(value) else None
            elif kind == WGDEVICE_A_LISTEN_PORT and len(value) >= 2:
                listen_port = struct.unpack_from("=H", value)[0]
            elif kind == WGDEVICE_A_FWMARK and len(value) >= 4:
                fwmark = struct.unpack_from("=I", value)[0]
            elif kind == WGDEVICE_A_PEERS:
                for _index, peer in attrs(value):
                    _peer(dict(attrs(peer)), nets, base)
    peers = {k: Peer(k, sorted_networks(nets[k]), ep, ka) for k, (ep, ka, _) in base.items()}
    stats = {k: st for k, (_, _, st) in base.items()}
    return WgDevice(private_key, listen_port, fwmark, peers, stats)


def _peer(
    a: dict[int, bytes],
    nets: dict[PublicKey, list[IPNetwork]],
    base: dict[PublicKey, tuple[Endpoint | None, int, PeerStats]],
) -> None:
    raw_key = a.get(WGPEER_A_PUBLIC_KEY, b"")
    if len(raw_key) != 32:
        return
    key = PublicKey(raw_key)
    nets.setdefault(key, []).extend(_allowed_ips(a.get(WGPEER_A_ALLOWEDIPS, b"")))
    if key in base and WGPEER_A_RX_BYTES not in a:
        return  # a continuation: allowed IPs only
    endpoint = _endpoint(a.get(WGPEER_A_ENDPOINT, b""))
    handshake = None
    hs = a.get(WGPEER_A_LAST_HANDSHAKE_TIME, b"")
    if len(hs) >= 16:
        sec, nsec = struct.unpack_from("=qq", hs)
        handshake = sec + nsec / 1e9 if sec else None
    keepalive = _u(a.get(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, b""), "=H")
    rx, tx = _u(a.get(WGPEER_A_RX_BYTES, b""), "=Q"), _u(a.get(WGPEER_A_TX_BYTES, b""), "=Q")
    stats = PeerStats(handshake, rx, tx, endpoint)
    base[key] = (endpoint, keepalive, stats)


def _u(value: bytes, fmt: str) -> int:
    return struct.unpack_from(fmt, value)[0] if len(value) >= struct.calcsize(fmt) else 0


def _allowed_ips(data: bytes) -> list[IPNetwork]:
    found: list[IPNetwork] = []
    for _index, entry in attrs(data):
        a = dict(attrs(entry))
        addr, mask = a.get(WGALLOWEDIP_A_IPADDR, b""), a.get(WGALLOWEDIP_A_CIDR_MASK, b"")
        if not mask:
            continue
        if len(addr) == 4 and mask[0] <= 32:
            found.append(IPv4Network((IPv4Address(addr), mask[0]), strict=False))
        elif len(addr) == 16 and mask[0] <= 128:
            found.append(IPv6Network((IPv6Address(addr), mask[0]), strict=False))
    return found


def _endpoint(raw: bytes) -> Endpoint | None:
    """A sockaddr_in or sockaddr_in6 (family in host order, port in network order)."""
    if len(raw) < 8:
        return None
    family, port = struct.unpack_from("=H", raw)[0], struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        host: IPv4Address | IPv6Address = IPv4Address(raw[4:8])
    elif family == socket.AF_INET6 and len(raw) >= 24:
        host = IPv6Address(raw[8:24])
    else:
        return None
    return None if host.is_unspecified else Endpoint(host, port)
