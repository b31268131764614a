"""kernel/wireguard_read.py: dump messages encoded by pyroute2's wgmsg (the format the
kernel sends), decoded. The real kernel's dumps are read by the image tier's contract
tests (tests/image: kernel WireGuard in the VM)."""

from __future__ import annotations

import hashlib
from base64 import b64encode
from ipaddress import ip_address, ip_network
from typing import Any

from pyroute2.netlink.generic.wireguard import wgmsg

from appliance.base.keys import PrivateKey
from appliance.base.net import Endpoint
from appliance.core.model import Peer
from appliance.kernel.base import PeerStats
from appliance.kernel.wireguard_read import parse_device


def _key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def _pub(label: str) -> str:
    return b64encode(PrivateKey(_key(label)).public_key().raw).decode()


def _allowed(net: str) -> dict[str, Any]:
    n = ip_network(net)
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", 2 if n.version == 4 else 10],
                      ["WGALLOWEDIP_A_IPADDR", n.network_address.packed],
                      ["WGALLOWEDIP_A_CIDR_MASK", n.prefixlen]]}  # fmt: skip


def _peer(
    label: str, nets: list[str], endpoint: tuple[str, int] | None, hs: int, rx: int, tx: int
) -> dict[str, Any]:
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", _pub(label)]]
    if endpoint is not None:
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": endpoint[0], "port": endpoint[1]}])
    attrs += [["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25 if label != "quiet" else 0],
              ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": hs, "tv_nsec": 500_000_000 if hs else 0}],
              ["WGPEER_A_RX_BYTES", rx], ["WGPEER_A_TX_BYTES", tx],
              ["WGPEER_A_ALLOWEDIPS", [_allowed(n) for n in nets]], ["WGPEER_A_PROTOCOL_VERSION", 1]]  # fmt: skip
    return {"attrs": attrs}


def _message(first: bool, peers: list[dict[str, Any]]) -> bytes:
    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    msg["attrs"].append(["WGDEVICE_A_IFINDEX", 7])
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "meshpi0"])
    if first:
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", b64encode(_key("self")).decode()])
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", 51820])
        msg["attrs"].append(["WGDEVICE_A_FWMARK", 0xCA6C])
    msg["attrs"].append(["WGDEVICE_A_PEERS", peers])
    msg.encode()
    return bytes(msg.data)


def _dump() -> list[bytes]:
    continued = {"attrs": [["WGPEER_A_PUBLIC_KEY", _pub("router")],
                           ["WGPEER_A_ALLOWEDIPS", [_allowed("192.168.77.0/24"), _allowed("fd00:77::/64")]]]}  # fmt: skip
    return [
        _message(True, [
            _peer("laptop", ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"], ("198.51.100.7", 41641), 1_796_000_000, 1234, 5678),
            _peer("phone", ["100.64.0.3/32"], ("2001:db8::3", 51820), 1_796_000_100, 2**40, 3),
            _peer("router", ["100.64.0.4/32"], ("203.0.113.4", 51820), 0, 0, 148),
        ]),
        _message(False, [continued, _peer("quiet", ["100.64.0.5/32"], None, 0, 0, 0)]),
    ]  # fmt: skip


def test_wireguard_read_decodes_a_dump_of_two_messages() -> None:
    ours = parse_device(data[16:] for data in _dump())  # without the nlmsghdr
    assert len(ours.peers) == 4
    laptop = PrivateKey(_key("laptop")).public_key()
    assert ours.peers[laptop] == Peer(laptop, tuple(ip_network(n) for n in ("100.64.0.2/32", "fd7a:115c:a1e0::2/128")),
                                      Endpoint(ip_address("198.51.100.7"), 41641), 25)  # fmt: skip
    assert ours.stats[laptop] == PeerStats(
        1_796_000_000.5, 1234, 5678, Endpoint(ip_address("198.51.100.7"), 41641)
    )
    assert ours.private_key == PrivateKey(_key("self"))
    assert ours.private_key is not None and ours.listen_port == 51820 and ours.fwmark == 0xCA6C
    router = PrivateKey(_key("router")).public_key()
    assert [str(n) for n in ours.peers[router].allowed_ips] == [
        "100.64.0.4/32", "192.168.77.0/24", "fd00:77::/64"]  # fmt: skip
    assert ours.stats[router].last_handshake is None and ours.stats[router].tx_bytes == 148
    phone = PrivateKey(_key("phone")).public_key()
    assert str(ours.peers[phone].endpoint) == "[2001:db8::3]:51820" and ours.stats[phone].rx_bytes == 2**40
    quiet = PrivateKey(_key("quiet")).public_key()
    assert ours.peers[quiet].endpoint is None and ours.peers[quiet].persistent_keepalive == 0


def test_wireguard_read_refuses_garbage_without_an_exception() -> None:
    """Cut short, or with attributes of the wrong size: what can be read is, the rest
    is left out; nothing raises."""
    raw = _dump()[0][16:]
    for cut in range(0, len(raw), 7):
        parse_device([raw[:cut]])
    assert parse_device([b""]).peers == {}
    assert parse_device([b"\x00" * 4 + b"\x08\x00\x06\x00"]).listen_port == 0  # a 4-byte attr, no value
