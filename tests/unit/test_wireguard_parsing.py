"""The pure half of the userspace WireGuard backend: the UAPI text protocol, the checks
both backends share, and the UAPI client itself.

No root needed. The UAPI plumbing is driven against a fake daemon on a unix
socket named after `lo` (a link that exists in every namespace). The kernel
backend's netlink messages are tested in test_wireguard_parsing_netlink.py, which
imports this file's keys and peers."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

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
