"""The pure half of the kernel WireGuard backend: the netlink messages it builds from
an update, the device dumps it reads back, and the netlink errors it turns into
domain errors.

No root needed: the messages built are decoded by pyroute2, as the kernel would
read them, and the dumps read are encoded by pyroute2. The keys and peers are test_wireguard_parsing.py's."""

from __future__ import annotations

import errno
import os
import socket
import struct
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from pyroute2.netlink.generic.wireguard import (
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint
from appliance.kernel.base import (
    InterfaceNotFound,
    KernelError,
    PeerStats,
    PermissionDenied,
    WgUpdate,
)
from appliance.kernel.wireguard_netlink import (
    build_messages,
    domain_error,
    peer_attrs,
)
from appliance.kernel.wireguard_read import parse_device as parse_netlink_dump
from tests.unit.test_wireguard_parsing import SECRET, V4, V6, key, peer

# --- netlink translation ----------------------------------------------------------


def round_trip(body: bytes) -> Any:
    """Decode a built message with pyroute2, as the kernel would read it."""
    decoded = wgmsg(struct.pack("=IHHII", 16 + len(body), 0x15, 5, 1, 0) + body)
    decoded.decode()
    return decoded


def test_netlink_messages_carry_the_whole_update() -> None:
    update = WgUpdate(
        private_key=SECRET,
        listen_port=51820,
        fwmark=7,
        upsert=(
            peer(1, "10.0.0.0/8", "fd00::/64", endpoint=V6, keepalive=25),
            peer(2, "10.0.0.2/32"),
        ),
        remove=(key(3),),
    )
    (msg,) = [round_trip(m) for m in build_messages("wg0", update)]
    assert msg.get_attr("WGDEVICE_A_IFNAME") == "wg0"
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY") == SECRET.secret_base64().encode()
    assert (msg.get_attr("WGDEVICE_A_LISTEN_PORT"), msg.get_attr("WGDEVICE_A_FWMARK")) == (51820, 7)
    first, second, gone = msg.get_attr("WGDEVICE_A_PEERS")
    assert first.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS
    assert first.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 25
    endpoint = first.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["addr"], endpoint["port"]) == ("2001:db8::1", 4500)
    assert [a["addr"] for a in first.get_attr("WGPEER_A_ALLOWEDIPS")] == ["10.0.0.0/8", "fd00::/64"]
    assert second.get_attr("WGPEER_A_ENDPOINT") is None  # None keeps the roamed endpoint
    assert gone.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert gone.get_attr("WGPEER_A_ALLOWEDIPS") is None


def test_netlink_device_only_update_has_no_peers_attr() -> None:
    (msg,) = [round_trip(m) for m in build_messages("wg0", WgUpdate(fwmark=0))]
    assert msg.get_attr("WGDEVICE_A_FWMARK") == 0 and msg.get_attr("WGDEVICE_A_PEERS") is None


def test_netlink_large_update_splits_by_peer() -> None:
    peers = tuple(peer(i, f"10.0.{i}.0/24") for i in range(1, 101))
    update = WgUpdate(listen_port=1, upsert=peers, remove=(key(200),))
    messages = [round_trip(m) for m in build_messages("wg0", update, budget=2000)]
    assert len(messages) > 1
    assert [m.get_attr("WGDEVICE_A_LISTEN_PORT") for m in messages[:2]] == [1, None]
    sent = [p.get_attr("WGPEER_A_PUBLIC_KEY") for m in messages for p in m.get_attr("WGDEVICE_A_PEERS")]
    expected = [p.public_key for p in peers] + [key(200)]
    assert [PublicKey.from_base64(k.decode()) for k in sent] == expected


def test_netlink_zoned_endpoint_is_refused() -> None:
    zoned = peer(1, endpoint=Endpoint(ip_address("fe80::1%2"), 1))
    with pytest.raises(KernelError, match="zone"):
        peer_attrs(zoned)


def dump_message(attrs: list[list[Any]]) -> bytes:
    """A dump message as the kernel sends it, encoded by pyroute2, without its nlmsghdr."""
    msg = wgmsg()
    msg["cmd"] = 0
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)[16:]


def allowed(*nets: str) -> list[dict[str, Any]]:
    out = []
    for text in nets:
        net = ip_network(text)
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        out.append(
            {
                "attrs": [
                    ["WGALLOWEDIP_A_FAMILY", family],
                    ["WGALLOWEDIP_A_IPADDR", net.network_address.packed],
                    ["WGALLOWEDIP_A_CIDR_MASK", net.prefixlen],
                ]
            }
        )
    return out


def test_netlink_read_merges_continued_peers() -> None:
    pk1, pk2 = str(key(1)), str(key(2))
    first = dump_message(
        [
            ["WGDEVICE_A_LISTEN_PORT", 51820],
            ["WGDEVICE_A_FWMARK", 7],
            ["WGDEVICE_A_IFNAME", "wg0"],
            ["WGDEVICE_A_PRIVATE_KEY", SECRET.secret_base64()],
            [
                "WGDEVICE_A_PEERS",
                [
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", pk1],
                            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 0}],
                            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                            ["WGPEER_A_TX_BYTES", 92],
                            ["WGPEER_A_RX_BYTES", 148],
                            ["WGPEER_A_ENDPOINT", {"addr": "192.0.2.1", "port": 51820}],
                            ["WGPEER_A_ALLOWEDIPS", allowed("fd00::/64", "10.0.0.1/32")],
                        ]
                    }
                ],
            ],
        ]
    )
    # The kernel continues a peer that did not fit with its key and more allowed IPs.
    second = dump_message(
        [
            [
                "WGDEVICE_A_PEERS",
                [
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", pk1],
                            ["WGPEER_A_ALLOWEDIPS", allowed("10.9.0.0/16")],
                        ]
                    },
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", pk2],
                            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}],
                            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 0],
                            ["WGPEER_A_TX_BYTES", 0],
                            ["WGPEER_A_RX_BYTES", 0],
                        ]
                    },
                ],
            ]
        ]
    )
    device = parse_netlink_dump([first, second])
    assert device.private_key == SECRET
    assert (device.listen_port, device.fwmark) == (51820, 7)
    assert device.peers == {
        key(1): peer(1, "10.0.0.1/32", "10.9.0.0/16", "fd00::/64", endpoint=V4, keepalive=25),
        key(2): peer(2),
    }
    assert device.stats[key(1)] == PeerStats(1700000000.0, 148, 92, V4)
    assert device.stats[key(2)] == PeerStats(None, 0, 0, None)
    assert SECRET.secret_base64() not in repr(device)


def test_netlink_read_of_empty_device() -> None:
    device = parse_netlink_dump([dump_message([["WGDEVICE_A_LISTEN_PORT", 0], ["WGDEVICE_A_FWMARK", 0]])])
    assert (device.private_key, device.listen_port, device.fwmark, device.peers) == (None, 0, 0, {})


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENODEV, InterfaceNotFound),
        (errno.EOPNOTSUPP, InterfaceNotFound),
        (errno.EPERM, PermissionDenied),
        (errno.EADDRINUSE, KernelError),
        (errno.EINVAL, KernelError),
    ],
)
def test_netlink_errno_maps_to_domain_error(code: int, kind: type[KernelError]) -> None:
    err = domain_error(OSError(code, os.strerror(code)), "wg0", "configuring the device")
    assert type(err) is kind and "wg0" in str(err)


def test_netlink_v4_endpoint_and_allowed_ips_as_the_kernel_reads_them() -> None:
    (msg,) = [
        round_trip(m) for m in build_messages("wg0", WgUpdate(upsert=(peer(4, "10.1.0.0/16", endpoint=V4),)))
    ]
    (only,) = msg.get_attr("WGDEVICE_A_PEERS")
    endpoint = only.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["addr"], endpoint["port"]) == (str(V4.host), V4.port)
    (net,) = only.get_attr("WGPEER_A_ALLOWEDIPS")
    assert (net["addr"], net.get_attr("WGALLOWEDIP_A_FAMILY")) == ("10.1.0.0/16", socket.AF_INET)
