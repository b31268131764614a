"""The pure halves of the WireGuard backends: UAPI text and netlink messages.

No root needed. The UAPI plumbing is driven against a fake daemon on a unix
socket named after `lo` (a link that exists in every namespace)."""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint
from appliance.core.model import Peer, sorted_networks
from appliance.kernel.base import (
    InterfaceNotFound,
    KernelError,
    PeerStats,
    PermissionDenied,
    WgUpdate,
)
from appliance.kernel.uapi_text import parse_device, parse_endpoint, render_update, reply_errno
from appliance.kernel.wireguard import check_ifname, check_update, summary
from appliance.kernel.wireguard_netlink import (
    build_messages,
    domain_error,
    peer_attrs,
)
from appliance.kernel.wireguard_read import parse_device as parse_netlink_dump
from appliance.kernel.wireguard_uapi import UapiWireGuard

SECRET = PrivateKey(bytes(range(32)))


def key(n: int) -> PublicKey:
    return PublicKey(bytes([n]) * 32)


def peer(n: int, *nets: str, endpoint: Endpoint | None = None, keepalive: int = 0) -> Peer:
    return Peer(key(n), sorted_networks(ip_network(x) for x in nets), endpoint, keepalive)


V4 = Endpoint(ip_address("192.0.2.1"), 51820)
V6 = Endpoint(ip_address("2001:db8::1"), 4500)


# --- UAPI text ----------------------------------------------------------------


def test_uapi_render_whole_update_as_one_transaction() -> None:
    update = WgUpdate(
        private_key=SECRET,
        listen_port=51820,
        fwmark=0x4D50,
        upsert=(
            peer(1, "10.0.0.1/32", "fd00::/64", endpoint=V6, keepalive=25),
            peer(2, "10.0.0.2/32"),
        ),
        remove=(key(3),),
    )
    assert render_update(update).decode().split("\n") == [
        "set=1",
        "private_key=" + SECRET.raw.hex(),
        "listen_port=51820",
        "fwmark=19792",
        "public_key=" + "01" * 32,
        "endpoint=[2001:db8::1]:4500",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=10.0.0.1/32",
        "allowed_ip=fd00::/64",
        "public_key=" + "02" * 32,
        "persistent_keepalive_interval=0",
        "replace_allowed_ips=true",
        "allowed_ip=10.0.0.2/32",
        "public_key=" + "03" * 32,
        "remove=true",
        "",
        "",
    ]


def test_uapi_render_empty_update_touches_nothing() -> None:
    assert render_update(WgUpdate()) == b"set=1\n\n"


GET_REPLY = f"""private_key={"00" * 32}
listen_port=51820
fwmark=7
public_key={"01" * 32}
preshared_key={"00" * 32}
protocol_version=1
endpoint=[2001:db8::1]:4500
last_handshake_time_sec=1700000000
last_handshake_time_nsec=500000000
tx_bytes=92
rx_bytes=148
persistent_keepalive_interval=25
allowed_ip=fd00::/64
allowed_ip=10.0.0.1/32
public_key={"02" * 32}
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
errno=0"""


def test_uapi_parse_device_and_stats() -> None:
    lines = GET_REPLY.split("\n")
    assert reply_errno(lines) == 0
    device = parse_device(lines[:-1])
    assert device.private_key is None  # all zeros: no key set
    assert (device.listen_port, device.fwmark) == (51820, 7)
    assert device.peers == {
        key(1): peer(1, "10.0.0.1/32", "fd00::/64", endpoint=V6, keepalive=25),
        key(2): peer(2),
    }
    assert device.peers[key(1)].allowed_ips == sorted_networks(device.peers[key(1)].allowed_ips)
    assert device.stats[key(1)] == PeerStats(1700000000.5, 148, 92, V6)
    assert device.stats[key(2)] == PeerStats(None, 0, 0, None)


def test_uapi_parse_device_reads_private_key() -> None:
    device = parse_device([f"private_key={SECRET.raw.hex()}", "listen_port=1"])
    assert device.private_key == SECRET and device.peers == {}


def test_uapi_parse_render_round_trip() -> None:
    peers = (peer(1, "10.0.0.0/8", endpoint=V4, keepalive=5), peer(2, "::/0", endpoint=V6))
    lines = render_update(WgUpdate(listen_port=9, upsert=peers)).decode().strip().split("\n")[1:]
    # A set transaction is a valid get reply once the set-only verbs are dropped.
    device = parse_device([ln for ln in lines if not ln.startswith("replace_allowed_ips")])
    assert device.peers == {p.public_key: p for p in peers}


@pytest.mark.parametrize(("text", "code"), [("errno=0", 0), ("errno=-22", 22), ("errno=98", 98)])
def test_uapi_reply_errno(text: str, code: int) -> None:
    assert reply_errno(["listen_port=1", text]) == code


@pytest.mark.parametrize("lines", [[], ["listen_port=1"], ["errno=x"]])
def test_uapi_reply_errno_rejects_malformed(lines: list[str]) -> None:
    with pytest.raises(KernelError, match="malformed"):
        reply_errno(lines)


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [("192.0.2.1:51820", V4), ("[2001:db8::1]:4500", V6)],
)
def test_uapi_endpoint_round_trip(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint and str(endpoint) == text


@pytest.mark.parametrize("text", ["192.0.2.1", "192.0.2.1:x", "[::1]"])
def test_uapi_endpoint_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        parse_endpoint(text)


# --- the shared checks ----------------------------------------------------------


def test_wireguard_check_update_rejects_ambiguous_peers() -> None:
    with pytest.raises(ValueError, match="upserted twice"):
        check_update(WgUpdate(upsert=(peer(1), peer(1, "10.0.0.1/32"))))
    with pytest.raises(ValueError, match="both upserted and removed"):
        check_update(WgUpdate(upsert=(peer(1),), remove=(key(1),)))


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", "a b"])
def test_wireguard_check_ifname_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="interface name"):
        check_ifname(name)


def test_wireguard_summary_names_peers_not_secrets() -> None:
    text = summary(WgUpdate(private_key=SECRET, upsert=tuple(peer(i) for i in range(1, 9))))
    assert SECRET.secret_base64() not in text and SECRET.raw.hex() not in text
    assert SECRET.public_key().short in text and "8 peer(s) set" in text and "3 more" in text


# --- the UAPI client against a fake daemon --------------------------------------


class FakeDaemon:
    """Answers each connection's one request with `reply`, recording requests."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            with conn:
                data = b""
                while not data.endswith(b"\n\n"):
                    data += conn.recv(65536)
                self.requests.append(data)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(timeout=5)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path / "lo.sock", b"errno=0\n\n")
    yield fake
    fake.close()


def test_uapi_configure_sends_one_request(daemon: FakeDaemon, tmp_path: Path) -> None:
    update = WgUpdate(listen_port=1, upsert=tuple(peer(i, f"10.0.{i}.0/24") for i in range(1, 100)))
    UapiWireGuard(socket_dir=tmp_path).configure("lo", update)
    assert daemon.requests == [render_update(update)]


def test_uapi_read_parses_reply(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.reply = (GET_REPLY + "\n\n").encode()
    device = UapiWireGuard(socket_dir=tmp_path).read("lo")
    assert device is not None and set(device.peers) == {key(1), key(2)}
    assert daemon.requests == [b"get=1\n\n"]


def test_uapi_errno_becomes_meaningful_error(
    daemon: FakeDaemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    daemon.reply = b"errno=-98\n\n"
    with pytest.raises(KernelError, match="listen port 51820: it is already in use") as err:
        UapiWireGuard(socket_dir=tmp_path).configure("lo", WgUpdate(SECRET, listen_port=51820))
    assert SECRET.raw.hex() not in str(err.value) + caplog.text
    daemon.reply = b"errno=-1\n\n"
    with pytest.raises(PermissionDenied):
        UapiWireGuard(socket_dir=tmp_path).configure("lo", WgUpdate())


def test_uapi_no_socket_means_no_device(tmp_path: Path) -> None:
    backend = UapiWireGuard(socket_dir=tmp_path)
    assert backend.read("lo") is None
    with pytest.raises(InterfaceNotFound):
        backend.configure("lo", WgUpdate())


# --- netlink translation ----------------------------------------------------------


def round_trip(msg: Any) -> Any:
    """Encode with pyroute2 and decode again, as the kernel would see it."""
    msg.encode()
    decoded = wgmsg(msg.data)
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
    err = domain_error(NetlinkError(code), "wg0", "configuring the device")
    assert type(err) is kind and "wg0" in str(err)
