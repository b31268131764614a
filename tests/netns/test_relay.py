"""The relay fallback in the lab: two nodes that cannot reach each other directly
talk through control's relay, the data plane still WireGuard (wireguard-go here).

    control 203.0.113.10:8443 in inet, relay at /v1/relay
    inet forwards no UDP between its two sites (an nft rule): no direct path
    pi      home LAN, wireguard-go, port 51820 (the port forward exists, but UDP dies in inet)
    laptop  behind its router's NAT, wireguard-go, port 51821
    lanhost an attacker on the home LAN with a registered node of its own

Each side runs a RelayClient (tests/netns/relay_node.py) and points its peer's
WireGuard endpoint at the local proxy. A capture on every interface of inet
(where the relay runs) shows the relay carries ciphertext only: the ping
payload's pattern never appears there, though the same ping sent in the clear
past the capture shows it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nacl.public import PrivateKey as NaclPrivateKey

from appliance.base.keys import PrivateKey
from appliance.wire.seal import b64url
from tests.lab import netns
from tests.lab.host import REPO_ROOT, Host, wait_for
from tests.lab.topology import HOME_WAN_V4, SERVER_V4, Lab
from tests.netns.meshworld import BIN, CONTROL, start_control

PATTERN = b"meshpirl"  # ping -p fills its payload with it
_BLOCK_UDP = """
table inet lab_no_udp {
    chain forward {
        type filter hook forward priority filter; policy accept;
        meta l4proto udp iifname { "home", "lrouter" } oifname { "home", "lrouter" } counter drop
    }
}
"""


@dataclass
class Side:
    name: str
    host: Host
    interface: str
    port: int
    address: str
    key: PrivateKey
    relay: subprocess.Popen[bytes] | None = None
    ready: Path = field(default_factory=Path)


@dataclass
class World:
    lab: Lab
    control_state: Path
    control_key: str
    auth: str
    pi: Side
    laptop: Side


class Capture:
    """Every frame on every interface of a namespace, as one growing byte string."""

    def __init__(self, ns: str) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.settimeout(0.1)
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.data += self.sock.recv(65535)
            except TimeoutError:
                continue

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return bytes(self.data)


def _admin(lab: Lab, state: Path, *args: str) -> str:
    cmd = [str(BIN / "meshpi-control"), "--state-dir", str(state), *args]  # the loopback admin listener
    return lab.internet.run(cmd).stdout


def _wireguard(side: Side, peer: Side, endpoint: str | None) -> None:
    host = side.host
    host.run(["wireguard-go", side.interface])
    key_file = host.lab.scratch / f"{side.name}.key"
    key_file.write_text(side.key.secret_base64() + "\n")
    key_file.chmod(0o600)
    cmd = ["wg", "set", side.interface, "private-key", str(key_file), "listen-port", str(side.port),
           "peer", str(peer.key.public_key()), "allowed-ips", f"{peer.address}/32"]  # fmt: skip
    host.run(cmd + (["endpoint", endpoint] if endpoint else []))
    host.run(["ip", "address", "add", f"{side.address}/24", "dev", side.interface])
    host.run(["ip", "link", "set", side.interface, "mtu", "1280", "up"])


def _start_relay(world: World, side: Side, peer: Side) -> None:
    side.ready = world.lab.scratch / f"{side.name}-relay.json"
    side.relay = side.host.popen(
        [sys.executable, "-m", "tests.netns.relay_node", "serve", "--control", CONTROL,
         "--control-key", world.control_key, "--auth-key", world.auth, "--hostname", side.name,
         "--node-key", str(side.key.public_key()), "--interface", side.interface,
         "--listen-port", str(side.port), "--peer", str(peer.key.public_key()), "--ready", str(side.ready)],
        log=world.lab.scratch / f"{side.name}-relay.log",
    )  # fmt: skip

    def ready() -> bool:
        assert side.relay is not None and side.relay.poll() is None, (
            world.lab.scratch / f"{side.name}-relay.log"
        ).read_text()
        return side.ready.exists()

    wait_for(ready, 20, f"{side.name}'s relay client")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab(keep=bool(os.environ.get("MESHPI_KEEP_LAB"))) as lab:
        state = lab.scratch / "control"
        start_control(lab, state)
        raw = base64.b64decode((state / "control.key").read_text().strip())
        control_key = b64url(bytes(NaclPrivateKey(raw).public_key))
        auth = _admin(lab, state, "keys", "create", "--reusable", "--expires", "600").strip()
        tag = f"mpr{os.getpid() % 10000}"
        pi = Side("pi", lab.pi, f"{tag}p", 51820, "10.99.0.1", PrivateKey.generate())
        laptop = Side("laptop", lab.laptop, f"{tag}l", 51821, "10.99.0.2", PrivateKey.generate())
        lab.internet.run(["nft", "-f", "-"], input=_BLOCK_UDP)
        _wireguard(pi, laptop, None)
        _wireguard(laptop, pi, f"{HOME_WAN_V4}:51820")  # the port forward: direct, if UDP passed
        try:
            yield World(lab, state, control_key, auth, pi, laptop)
        finally:
            for side in (pi, laptop):
                side.host.run(["ip", "link", "del", side.interface], check=False)


def _metrics(world: World) -> str:
    # /metrics is on control's loopback admin listener, inside its namespace.
    host, _, port = (
        (world.control_state / "admin.url").read_text().strip().removeprefix("http://").rpartition(":")
    )
    with netns.entered(world.lab.internet.ns):
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
    # A socket made inside the namespace, used from here: HTTP/1.0 by hand.
    sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: control\r\n\r\n")
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks).decode()


def _metric(text: str, name: str) -> int:
    match = re.search(rf"^{re.escape(name)} (\d+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return int(match[1])


def test_relay_carries_wireguard_when_the_direct_path_is_blocked(world: World) -> None:
    pi, laptop = world.pi, world.laptop
    # The direct path is dead: the handshake never completes.
    assert laptop.host.ping_result(pi.address, count=2, interval=0.5, wait=1).received == 0
    _start_relay(world, pi, laptop)
    _start_relay(world, laptop, pi)
    capture = Capture(world.lab.internet.ns)
    try:
        wait_for(
            lambda: laptop.host.ping_result(pi.address, count=1, wait=1).received == 1,
            15,
            "laptop -> pi via relay",
        )
        cmd = ["ping", "-n", "-q", "-c", "20", "-i", "0.05", "-s", "200", "-p", PATTERN.hex(), pi.address]
        out = laptop.host.run(cmd, check=False).stdout
        assert " 20 received" in out, out
        out = pi.host.run(
            ["ping", "-n", "-q", "-c", "5", "-i", "0.1", "-p", PATTERN.hex(), laptop.address]
        ).stdout
        assert " 5 received" in out, out
    finally:
        seen = capture.stop()
    assert pi.key.public_key().raw in seen  # the relay's frames to the laptop name the pi: captured
    assert PATTERN * 2 not in seen  # ... and carry no plaintext
    # The capture would have seen the pattern in the clear: the same ping past it, no tunnel.
    clear = Capture(world.lab.internet.ns)
    laptop.host.run(["ping", "-n", "-q", "-c", "2", "-i", "0.1", "-p", PATTERN.hex(), SERVER_V4], check=False)
    assert PATTERN * 2 in clear.stop()
    # WireGuard itself sees the relay's proxy as the peer's endpoint.
    endpoint = laptop.host.run(["wg", "show", laptop.interface, "endpoints"]).stdout
    assert "127.0.0.1:" in endpoint
    metrics = _metrics(world)
    assert _metric(metrics, "meshpi_relay_frames_total") >= 50
    assert _metric(metrics, "meshpi_relay_connections") == 2


def test_relay_hostile_clients_do_not_disturb_relayed_pings(world: World) -> None:
    pi, laptop = world.pi, world.laptop
    if pi.relay is None:
        pytest.skip("needs the relay from the test before")
    stream = subprocess.Popen(
        ["ip", "netns", "exec", laptop.host.ns, "ping", "-n", "-q", "-c", "100", "-i", "0.1", pi.address],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    before = _metrics(world)
    res = world.lab.lanhost.run(
        [sys.executable, "-m", "tests.netns.relay_node", "hostile", "--control", CONTROL,
         "--control-key", world.control_key, "--auth-key", world.auth, "--hostname", "mallory",
         "--target", str(pi.key.public_key()), "--strays", "3000", "--flood", "20000"],
        timeout=120, cwd=REPO_ROOT,
    )  # fmt: skip
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen == {"silent": 4401, "garbage": 4401, "replayed": 4401, "pending": 4403, "oversize": 1009}
    out, _ = stream.communicate(timeout=60)
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+)", out).groups())  # type: ignore[union-attr]
    assert sent == 100 and received >= 99, out
    after = _metrics(world)
    unknown = 'meshpi_relay_drops_total{reason="unknown"}'
    # The strays come first, within the new connection's burst: each one counted.
    assert _metric(after, unknown) - _metric(before, unknown) == 3000
    over = ('meshpi_relay_drops_total{reason="rate"}', 'meshpi_relay_drops_total{reason="bytes"}')
    assert sum(_metric(after, m) - _metric(before, m) for m in over) >= 5000
    assert world.lab.internet.run(["pgrep", "-f", "meshpi-control"]).stdout.strip()  # still serving
    log = (world.lab.scratch / "control.log").read_text()
    assert len(re.findall(r"which is not on the relay", log)) == 7  # once per stray key (7 of them)
