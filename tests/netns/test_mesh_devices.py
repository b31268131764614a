"""Keys and devices in a mesh run by control (the world: meshworld.py).

- A node rotates its WireGuard key while a ping stream runs through it: the
  stream loses at most one packet, and peers know only the new key.
- The pi hosts a phone: the config the LocalAPI hands out, loaded into a stock
  client (wireguard-go + `wg setconf`) behind a NAT, reaches the internet server
  through the pi (NAT seen from the server), and the rest of the mesh reaches
  the phone through the pi. Revoking it cuts it off.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.lab.host import Host, wait_for
from tests.lab.phone import stock_client
from tests.lab.topology import HOME_WAN_V4, LANHOST_V4, PI_V4, SERVER_V4
from tests.netns.meshworld import Node, World, mesh_world

STREAM_INTERVAL = 0.1  # s between pings: a gap of 5 s (WireGuard's retry) would lose 50


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with mesh_world() as w:
        yield w


def _ping_stream(host: Host, dst: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", host.ns, "ping", "-n", "-q", "-c", str(count), "-i", str(STREAM_INTERVAL), dst],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _lost(stream: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = stream.communicate(timeout=60)
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+)", out).groups())  # type: ignore[union-attr]
    return sent - received, out


def _key(node: Node) -> str:
    return node.host.run(["wg", "show", node.interface, "public-key"]).stdout.strip()


@pytest.mark.parametrize("who", ["pi", "laptop"])
def test_rotating_a_node_key_loses_at_most_one_packet(world: World, who: str) -> None:
    pi, laptop = world.nodes["pi"], world.nodes["laptop"]
    rotating, other = world.nodes[who], laptop if who == "pi" else pi
    wait_for(lambda: laptop.host.ping(pi.mesh_v4(), count=1)[1] == 1, 10, "laptop -> pi")
    old = _key(rotating)
    # Both ways: the laptop pings the pi, the pi pings the laptop.
    streams = [_ping_stream(laptop.host, pi.mesh_v4(), 60), _ping_stream(pi.host, laptop.mesh_v4(), 60)]
    time.sleep(2)
    new = rotating.meshpi("rotate-key").stdout.strip()
    assert new != old and _key(rotating) == new
    for stream in streams:
        lost, out = _lost(stream)
        assert lost <= 1, out
    peers = other.peers_in_kernel()
    assert new in peers and old not in peers
    assert not (rotating.state / "node.key.next").exists()


def test_a_phone_hosted_by_the_pi_goes_out_through_home_and_is_reachable(world: World) -> None:
    lab, pi, laptop, laptop2 = world.lab, world.nodes["pi"], world.nodes["laptop"], world.nodes["laptop2"]
    lab.internet.whoami_server()
    # laptop2's namespace becomes the phone: a stock client behind the laptop router's NAT.
    laptop2.meshpi("down")
    answer = pi.api().post("/v1/devices", {"name": "alice phone", "mode": "all"}, timeout=20)
    device, config = answer["device"], answer["config"]
    assert f"Endpoint = {HOME_WAN_V4}:51820" in config  # the pi's advertised endpoint
    private_key = re.search(r"PrivateKey = (\S+)", config).group(1)  # type: ignore[union-attr]
    # Shown once, stored nowhere: not in the pi's state directory, not in its log.
    for path in [*pi.state.rglob("*"), lab.scratch / "pi-agent.log"]:
        if path.is_file():
            assert private_key not in path.read_text(errors="replace"), path
    assert [d["name"] for d in pi.api().get("/v1/devices")["devices"]] == ["alice phone"]

    phone = laptop2.host
    with stock_client(phone, config, f"{laptop2.interface}p", gateway="10.77.0.1") as quick:
        assert quick.allowed_ips == ("0.0.0.0/0", "::/0")
        # The internet server sees the home router: phone -> pi (NAT) -> home (NAT).
        wait_for(lambda: phone.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 10, "the phone out through home")
        lab.lanhost.whoami_server()
        assert phone.fetch_or_none(LANHOST_V4) == PI_V4  # the home LAN too, NATed by the pi
        phone_v4 = device["addresses"][0]
        # The rest of the mesh reaches the phone through the pi, and the phone the mesh.
        wait_for(lambda: phone_v4 + "/32" in laptop.peers_in_kernel(), 5, "the laptop to route the phone")
        assert laptop.host.ping(phone_v4, count=3)[1] == 3
        assert phone.ping(laptop.mesh_v4(), count=3)[1] == 3
        # Revoked: control forgets it, the pi drops the peer, the config stops working.
        pi.api().delete(f"/v1/devices/{device['id']}")
        assert pi.api().get("/v1/devices")["devices"] == []
        wait_for(lambda: device["public_key"] not in pi.peers_in_kernel(), 5, "the pi to drop the phone")
        assert phone.fetch_or_none(SERVER_V4) is None
        wait_for(lambda: phone_v4 + "/32" not in laptop.peers_in_kernel(), 5, "the laptop to forget it")
