"""WireGuard in the kernel, through generic netlink (pyroute2 0.9 `WireGuard`).

pyroute2's `WireGuard.set()` takes one peer per call, and calling its peer builder
repeatedly would add several WGDEVICE_A_PEERS attributes, of which the kernel
reads only the last. So this module builds the `wgmsg` itself: all peers nested in
one WGDEVICE_A_PEERS, the way wg(8) does it (src/ipc-linux.h), split into a few
messages only when one would get large (wg splits at a page; we allow more).

Reads are wireguard_read.py's (one dump, decoded without pyroute2). The pure half
(`build_messages`) is unit-tested without root.
"""

from __future__ import annotations

import errno
import logging
import os
from base64 import b64encode
from collections.abc import Iterator
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    AsyncWireGuard,
    WireGuard,
    wgmsg,
)

from appliance.base.keys import PublicKey
from appliance.base.net import IPNetwork
from appliance.core.model import Peer
from appliance.kernel.base import (
    InterfaceNotFound,
    KernelError,
    PermissionDenied,
    WgDevice,
    WgUpdate,
    WireGuardUnavailable,
)
from appliance.kernel.wireguard import check_ifname, check_update, summary
from appliance.kernel.wireguard_read import read_device

log = logging.getLogger(__name__)
# pyroute2 dumps every netlink message at DEBUG, WGDEVICE_A_PRIVATE_KEY included
# (found by the contract test in the image VM). Its dumps never reach our logs,
# whatever level meshpi runs at.
logging.getLogger("pyroute2").setLevel(logging.INFO)

# Bytes of peer attributes per message. The kernel takes any size that fits the
# socket's send buffer (pyroute2 asks for 1 MiB); 64 KiB stays far below that.
MESSAGE_BUDGET = 64 * 1024
_PEER_OVERHEAD = 100  # key, flags, endpoint, keepalive and nest headers
_ALLOWED_IP_SIZE = 36

_NO_MODULE = "kernel has no wireguard module"
_GENL_MISSING = (errno.ENOENT, errno.EOPNOTSUPP)


class _QuietAsyncWireGuard(AsyncWireGuard):  # type: ignore[misc]
    # pyroute2 logs "protocol not found" at error level when the module is absent;
    # that is an answer we ask for (backend probing), not an error.
    module_err_level = "debug"


class _WireGuardSocket(WireGuard):  # type: ignore[misc]
    async_class = _QuietAsyncWireGuard


# --- translation: update -> messages -------------------------------------------


def _key(raw: bytes) -> str:
    return b64encode(raw).decode()


def _allowed_ip(net: IPNetwork) -> dict[str, Any]:
    family = AF_INET if net.version == 4 else AF_INET6
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
            ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen],
        ]
    }


def peer_attrs(peer: Peer) -> dict[str, Any]:
    """An upsert: allowed IPs replaced, keepalive set, endpoint only if given."""
    attrs: list[list[Any]] = [
        ["WGPEER_A_PUBLIC_KEY", _key(peer.public_key.raw)],
        ["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.persistent_keepalive],
    ]
    if peer.endpoint is not None:
        host = peer.endpoint.host
        if host.version == 6 and host.scope_id:
            # pyroute2 0.9 packs sin6_scope_id big-endian; the kernel reads host order.
            raise KernelError(
                f"peer {peer.label}: endpoint {peer.endpoint} has a zone, "
                "which the kernel backend cannot pass on"
            )
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": str(host), "port": peer.endpoint.port}])
    attrs.append(["WGPEER_A_ALLOWEDIPS", [_allowed_ip(net) for net in peer.allowed_ips]])
    return {"attrs": attrs}


def removal_attrs(key: PublicKey) -> dict[str, Any]:
    return {"attrs": [["WGPEER_A_PUBLIC_KEY", _key(key.raw)], ["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME]]}


def _chunks(update: WgUpdate, budget: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
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


def build_messages(ifname: str, update: WgUpdate, budget: int = MESSAGE_BUDGET) -> list[wgmsg]:
    """WG_CMD_SET_DEVICE messages for the update (not yet encoded).

    Device fields go in the first; each peer goes whole into one message, upserts
    before removals (add before delete). Holds the private key: never log these."""
    messages = []
    for i, peers in enumerate(_chunks(update, budget)):
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
        if i == 0:
            if update.private_key is not None:
                msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", update.private_key.secret_base64()])
            if update.listen_port is not None:
                msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", update.listen_port])
            if update.fwmark is not None:
                msg["attrs"].append(["WGDEVICE_A_FWMARK", update.fwmark])
        if peers:
            msg["attrs"].append(["WGDEVICE_A_PEERS", peers])
        messages.append(msg)
    return messages


# --- errors ---------------------------------------------------------------------


def domain_error(e: NetlinkError, ifname: str, what: str) -> KernelError:
    code = e.code
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
    """Does the kernel know the wireguard genl family (loading the module if it can)?"""
    try:
        _WireGuardSocket().close()
    except NetlinkError as e:
        if e.code in _GENL_MISSING:
            return False
        raise
    return True


def _open() -> _WireGuardSocket:
    try:
        return _WireGuardSocket()
    except NetlinkError as e:
        if e.code in _GENL_MISSING:
            raise WireGuardUnavailable(f"{_NO_MODULE} (no wireguard generic netlink family)") from e
        raise KernelError(f"opening the wireguard netlink family failed: {os_strerror(e.code)}") from e


# --- the backend -----------------------------------------------------------------


class NetlinkWireGuard:
    """Kernel WireGuard devices (`ip link add … type wireguard`)."""

    name = "kernel"

    def create(self, ifname: str) -> None:
        check_ifname(ifname)
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=ifname, kind="wireguard")
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    self._check_is_wireguard(ipr, ifname)
                    return
                if e.code in (errno.EOPNOTSUPP, errno.ENODEV, errno.ENOENT):
                    raise WireGuardUnavailable(
                        f"{_NO_MODULE} (ip link add {ifname} type wireguard: {os_strerror(e.code)})"
                    ) from e
                raise domain_error(e, ifname, "creating the link") from e
        log.info("created %s (kernel WireGuard)", ifname)

    def read(self, ifname: str) -> WgDevice | None:
        """One dump, decoded by wireguard_read.py without pyroute2."""
        check_ifname(ifname)
        return read_device(ifname)

    def configure(self, ifname: str, update: WgUpdate) -> None:
        check_ifname(ifname)
        check_update(update)
        messages = build_messages(ifname, update)
        try:
            with _open() as wg:
                for msg in messages:
                    tuple(wg.nlm_request(msg, msg_type=wg.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))
        except WireGuardUnavailable as e:
            raise InterfaceNotFound(f"{ifname}: no WireGuard device ({_NO_MODULE})") from e
        except NetlinkError as e:
            raise domain_error(e, ifname, "configuring the device") from e
        log.info("%s: applied %s", ifname, summary(update))

    @staticmethod
    def _check_is_wireguard(ipr: IPRoute, ifname: str) -> None:
        try:
            (link,) = ipr.link("get", ifname=ifname)
        except NetlinkError as e:
            raise domain_error(e, ifname, "looking up the existing link") from e
        kind = link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
        if kind != "wireguard":
            raise KernelError(f"{ifname}: exists, but is a {kind or 'plain'} link, not WireGuard")
        log.debug("%s: already exists", ifname)
