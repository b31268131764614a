"""WireGuard in the kernel, through generic netlink (nlattrs.py's wire format).

Like wg(8) (src/ipc-linux.h), all peers of an update go nested in one
WGDEVICE_A_PEERS, split into a few messages only when one would get large (wg
splits at a page; we allow more). pyroute2 0.9's `WireGuard.set()` took one peer
per call, packed a v6 endpoint's scope id in the wrong byte order, and ran an
asyncio loop per socket (issue 14's footprint); it is not used.

Reads are wireguard_read.py's (one dump, decoded the same way). The pure half
(`build_messages`) is unit-tested without root, against pyroute2's decoder.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import struct
from collections.abc import Iterator
from socket import AF_INET, AF_INET6

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPNetwork
from appliance.core.model import Peer
from appliance.kernel.base import (
    InterfaceNotFound,
    KernelError,
    PermissionDenied,
    WgDevice,
    WgUpdate,
    WireGuardUnavailable,
)
from appliance.kernel.nlattrs import NLM_F_CREATE, NLM_F_EXCL, acknowledged, attr, bound_socket, nest
from appliance.kernel.rtnl import RTM_NEWLINK, Rtnl, link_request
from appliance.kernel.wireguard import check_ifname, check_update, summary
from appliance.kernel.wireguard_read import (
    NETLINK_GENERIC,
    TIMEOUT_S,
    WG_GENL_VERSION,
    NoWireGuardFamily,
    family_id,
    forget_family,
    genl_header,
    read_device,
)

log = logging.getLogger(__name__)

WG_CMD_SET_DEVICE = 1
WGDEVICE_A_IFNAME, WGDEVICE_A_PRIVATE_KEY = 2, 3
WGDEVICE_A_LISTEN_PORT, WGDEVICE_A_FWMARK, WGDEVICE_A_PEERS = 6, 7, 8
WGPEER_A_PUBLIC_KEY, WGPEER_A_FLAGS, WGPEER_A_ENDPOINT = 1, 3, 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, WGPEER_A_ALLOWEDIPS = 5, 9
WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS = 1, 2
WGALLOWEDIP_A_FAMILY, WGALLOWEDIP_A_IPADDR, WGALLOWEDIP_A_CIDR_MASK = 1, 2, 3

# Bytes of peer attributes per message. The kernel takes any size that fits the
# socket's send buffer; 64 KiB stays far below that.
MESSAGE_BUDGET = 64 * 1024
_PEER_OVERHEAD = 100  # key, flags, endpoint, keepalive and nest headers
_ALLOWED_IP_SIZE = 36

_NO_MODULE = "kernel has no wireguard module"
_SEQ = itertools.count(3)  # 1 and 2 are wireguard_read.py's


# --- translation: update -> messages -------------------------------------------


def _allowed_ip(net: IPNetwork) -> bytes:
    family = AF_INET if net.version == 4 else AF_INET6
    return nest(0, attr(WGALLOWEDIP_A_FAMILY, struct.pack("=H", family)),
                attr(WGALLOWEDIP_A_IPADDR, net.network_address.packed),
                attr(WGALLOWEDIP_A_CIDR_MASK, bytes([net.prefixlen])))  # fmt: skip


def sockaddr(endpoint: Endpoint) -> bytes:
    """A sockaddr_in or sockaddr_in6: family in host order, port in network order."""
    host = endpoint.host
    if host.version == 4:
        return struct.pack("=H", AF_INET) + struct.pack("!H", endpoint.port) + host.packed + bytes(8)
    return struct.pack("=H", AF_INET6) + struct.pack("!HI", endpoint.port, 0) + host.packed + bytes(4)


def peer_attrs(peer: Peer) -> bytes:
    """An upsert: allowed IPs replaced, keepalive set, endpoint only if given."""
    parts = [
        attr(WGPEER_A_PUBLIC_KEY, peer.public_key.raw),
        attr(WGPEER_A_FLAGS, struct.pack("=I", WGPEER_F_REPLACE_ALLOWEDIPS)),
        attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", peer.persistent_keepalive)),
    ]
    if peer.endpoint is not None:
        if peer.endpoint.host.version == 6 and peer.endpoint.host.scope_id:
            # The kernel's dump of the endpoint would not give the zone back either,
            # so the device would never read as configured.
            raise KernelError(
                f"peer {peer.label}: endpoint {peer.endpoint} has a zone, "
                "which the kernel backend cannot pass on"
            )
        parts.append(attr(WGPEER_A_ENDPOINT, sockaddr(peer.endpoint)))
    parts.append(nest(WGPEER_A_ALLOWEDIPS, *(_allowed_ip(net) for net in peer.allowed_ips)))
    return nest(0, *parts)


def removal_attrs(key: PublicKey) -> bytes:
    return nest(
        0, attr(WGPEER_A_PUBLIC_KEY, key.raw), attr(WGPEER_A_FLAGS, struct.pack("=I", WGPEER_F_REMOVE_ME))
    )


def _chunks(update: WgUpdate, budget: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    sized = [(peer_attrs(p), _PEER_OVERHEAD + _ALLOWED_IP_SIZE * len(p.allowed_ips)) for p in update.upsert]
    sized += [(removal_attrs(k), _PEER_OVERHEAD) for k in update.remove]
    for attrs, cost in sized:
        if chunk and size + cost > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(attrs)
        size += cost
    yield chunk


def build_messages(ifname: str, update: WgUpdate, budget: int = MESSAGE_BUDGET) -> list[bytes]:
    """WG_CMD_SET_DEVICE messages for the update (generic netlink header and
    attributes, without the nlmsghdr).

    Device fields go in the first; each peer goes whole into one message, upserts
    before removals (add before delete). Holds the private key: never log these."""
    messages = []
    for i, peers in enumerate(_chunks(update, budget)):
        body = genl_header(WG_CMD_SET_DEVICE, WG_GENL_VERSION) + attr(
            WGDEVICE_A_IFNAME, ifname.encode() + b"\0"
        )
        if i == 0:
            if update.private_key is not None:
                body += attr(WGDEVICE_A_PRIVATE_KEY, update.private_key.raw)
            if update.listen_port is not None:
                body += attr(WGDEVICE_A_LISTEN_PORT, struct.pack("=H", update.listen_port))
            if update.fwmark is not None:
                body += attr(WGDEVICE_A_FWMARK, struct.pack("=I", update.fwmark))
        if peers:
            body += nest(WGDEVICE_A_PEERS, *peers)
        messages.append(body)
    return messages


# --- errors ---------------------------------------------------------------------


def domain_error(e: OSError, ifname: str, what: str) -> KernelError:
    code = e.errno or 0
    if code == errno.ENODEV:
        return InterfaceNotFound(f"{ifname}: no such interface ({what})")
    if code == errno.EOPNOTSUPP:
        return InterfaceNotFound(f"{ifname}: not a WireGuard interface ({what})")
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{ifname}: {what} needs CAP_NET_ADMIN")
    if code == errno.EADDRINUSE:
        return KernelError(f"{ifname}: {what}: the listen port is already in use")
    return KernelError(f"{ifname}: {what} failed: {os_strerror(code)}")


def os_strerror(code: int) -> str:
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def genl_family_available() -> bool:
    """Does the kernel know the wireguard genl family? Asking for it by name makes
    the kernel load the module if it can (genetlink's request_module)."""
    try:
        with bound_socket(NETLINK_GENERIC, TIMEOUT_S) as sock:
            family_id(sock)
    except NoWireGuardFamily:
        return False
    return True


# --- the backend -----------------------------------------------------------------


class NetlinkWireGuard:
    """Kernel WireGuard devices (`ip link add … type wireguard`)."""

    name = "kernel"

    def create(self, ifname: str) -> None:
        check_ifname(ifname)
        with Rtnl() as rtnl:
            try:
                rtnl.change(
                    RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, link_request(name=ifname, kind="wireguard")
                )
            except OSError as e:
                if e.errno == errno.EEXIST:
                    self._check_is_wireguard(rtnl, ifname)
                    return
                if e.errno in (errno.EOPNOTSUPP, errno.ENODEV, errno.ENOENT):
                    raise WireGuardUnavailable(
                        f"{_NO_MODULE} (ip link add {ifname} type wireguard: {os_strerror(e.errno)})"
                    ) from e
                raise domain_error(e, ifname, "creating the link") from e
        log.info("created %s (kernel WireGuard)", ifname)

    def read(self, ifname: str) -> WgDevice | None:
        """One dump, decoded by wireguard_read.py."""
        check_ifname(ifname)
        return read_device(ifname)

    def configure(self, ifname: str, update: WgUpdate) -> None:
        check_ifname(ifname)
        check_update(update)
        messages = build_messages(ifname, update)
        try:
            with bound_socket(NETLINK_GENERIC, TIMEOUT_S) as sock:
                family = family_id(sock)
                for body in messages:
                    acknowledged(sock, family, 0, body, next(_SEQ))
        except NoWireGuardFamily as e:
            raise InterfaceNotFound(f"{ifname}: no WireGuard device ({_NO_MODULE})") from e
        except OSError as e:
            if e.errno == errno.ENOENT:  # the module was reloaded: its family id changed
                forget_family()
            raise domain_error(e, ifname, "configuring the device") from e
        log.info("%s: applied %s", ifname, summary(update))

    @staticmethod
    def _check_is_wireguard(rtnl: Rtnl, ifname: str) -> None:
        try:
            kind = rtnl.link(ifname).kind
        except OSError as e:
            raise domain_error(e, ifname, "looking up the existing link") from e
        if kind != "wireguard":
            raise KernelError(f"{ifname}: exists, but is a {kind or 'plain'} link, not WireGuard")
        log.debug("%s: already exists", ifname)
