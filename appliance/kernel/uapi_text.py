"""The WireGuard cross-platform userspace API's text protocol
(https://www.wireguard.com/xplatform/): rendering a `set=1` transaction and parsing
a `get=1` reply. Pure; wireguard_uapi.py carries it over wireguard-go's socket."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_address

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint, IPNetwork
from appliance.core.model import Peer, sorted_networks
from appliance.kernel.base import KernelError, PeerStats, WgDevice, WgUpdate


def format_endpoint(endpoint: Endpoint) -> str:
    return str(endpoint)  # 192.0.2.1:51820 or [2001:db8::1]:51820, as UAPI wants


def parse_endpoint(text: str) -> Endpoint:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"endpoint {text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Endpoint(ip_address(host), int(port))


def parse_network(text: str) -> IPNetwork:
    # Twice as fast as ip_network(text), which matters at a few thousand per read.
    addr, _, plen = text.partition("/")
    try:
        if ":" in addr:
            return IPv6Network((int.from_bytes(socket.inet_pton(socket.AF_INET6, addr)), int(plen)))
        return IPv4Network((int.from_bytes(socket.inet_pton(socket.AF_INET, addr)), int(plen)))
    except (OSError, ValueError) as e:
        raise KernelError(f"malformed allowed_ip {text!r} in UAPI reply") from e


_PEERS_PER_CHUNK = 64


def iter_update(update: WgUpdate) -> Iterator[bytes]:
    """One `set=1` transaction for the whole update, in chunks of a few dozen peers.

    Sent chunk by chunk, wireguard-go starts on the first peers while the rest are
    still being rendered. Contains the private key."""
    lines = ["set=1"]
    if update.private_key is not None:
        lines.append("private_key=" + update.private_key.raw.hex())
    if update.listen_port is not None:
        lines.append(f"listen_port={update.listen_port}")
    if update.fwmark is not None:
        lines.append(f"fwmark={update.fwmark}")
    for i, peer in enumerate(update.upsert, 1):
        lines.append("public_key=" + peer.public_key.raw.hex())
        if peer.endpoint is not None:
            lines.append("endpoint=" + format_endpoint(peer.endpoint))
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend("allowed_ip=" + _net_text(net) for net in peer.allowed_ips)
        if i % _PEERS_PER_CHUNK == 0:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    for key in update.remove:
        lines.append("public_key=" + key.raw.hex())
        lines.append("remove=true")
    lines.append("\n")  # the empty line that ends the transaction
    yield "\n".join(lines).encode()


def _net_text(net: IPNetwork) -> str:
    """str(net), through the C formatter: ipaddress's own is the slowest step of
    rendering a thousand peers."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, net.network_address.packed)}/{net.prefixlen}"


def render_update(update: WgUpdate) -> bytes:
    return b"".join(iter_update(update))


def reply_errno(lines: list[str]) -> int:
    """The errno of a reply (wireguard-go sends it negated, the spec positive)."""
    if not lines or not lines[-1].startswith("errno="):
        raise KernelError(f"malformed UAPI reply: it ends with {lines[-1:]!r}, not errno=N")
    try:
        return abs(int(lines[-1][len("errno=") :]))
    except ValueError as e:
        raise KernelError(f"malformed UAPI reply: {lines[-1]!r}") from e


def parse_device(lines: list[str]) -> WgDevice:
    """Parse the key=value lines of a `get=1` reply (without the errno line)."""
    private_key: PrivateKey | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[PublicKey, Peer] = {}
    stats: dict[PublicKey, PeerStats] = {}

    key: PublicKey | None = None
    nets: list[IPNetwork] = []
    endpoint: Endpoint | None = None
    keepalive = 0
    handshake = 0.0
    rx = tx = 0

    def finish() -> None:
        if key is not None:
            peers[key] = Peer(key, sorted_networks(nets), endpoint, keepalive)
            stats[key] = PeerStats(handshake or None, rx, tx, endpoint)

    for line in lines:
        name, sep, value = line.partition("=")
        if not sep:
            raise KernelError(f"malformed UAPI line {name[:40]!r}")
        if name == "public_key":
            finish()
            key, nets, endpoint, keepalive, handshake, rx, tx = (
                PublicKey.from_hex(value),
                [],
                None,
                0,
                0.0,
                0,
                0,
            )
        elif key is None:
            if name == "private_key":
                # wireguard-go leaves the line out when unset; all-zero means unset too.
                raw = bytes.fromhex(value)
                private_key = PrivateKey(raw) if any(raw) else None
            elif name == "listen_port":
                listen_port = int(value)
            elif name == "fwmark":
                fwmark = int(value)
        elif name == "allowed_ip":
            nets.append(parse_network(value))
        elif name == "endpoint":
            endpoint = parse_endpoint(value)
        elif name == "persistent_keepalive_interval":
            keepalive = int(value)
        elif name == "last_handshake_time_sec":
            handshake += int(value)
        elif name == "last_handshake_time_nsec":
            handshake += int(value) / 1e9
        elif name == "rx_bytes":
            rx = int(value)
        elif name == "tx_bytes":
            tx = int(value)
        # preshared_key, protocol_version: not part of our model.
    finish()
    return WgDevice(private_key, listen_port, fwmark, peers, stats)
