"""The exit node with real traffic: the lab's laptop goes out through the pi.

The topology (tests/lab/topology.py) in short:

    laptop 10.77.0.2 ── laptop router (NAT 192.0.2.1) ──┐
                                                        inet ── server 203.0.113.10, 2001:db8:ff00::10
    pi 192.168.77.2 ─┬─ home router (NAT 198.51.100.1, ┘
    lanhost .77.3  ──┘   udp 51820 forwarded to the pi; ICMP "too big" black-holed here)

The pi runs meshpi as exit node and router for 192.168.77.0/24 (MTU 1280); the
laptop runs meshpi with the pi as its exit node, at a stock client's MTU of 1420.
One lab serves the whole module; tests that change it put it back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.lab.mesh import Mesh
from tests.lab.tools import pattern_sha256
from tests.lab.topology import (
    HOME_LAN_V4,
    HOME_WAN_V4,
    LANHOST_V4,
    LANHOST_V6,
    PI_V4,
    PI_V6,
    SERVER_V4,
    SERVER_V6,
    Lab,
    LabError,
    ToolServer,
)


@dataclass
class World:
    lab: Lab
    mesh: Mesh
    server: ToolServer
    lan_server: ToolServer


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab(pmtu_blackhole=True) as lab:
        server = lab.internet.whoami_server()
        lan_server = lab.lanhost.whoami_server()
        # wireguard-go's socket directory is shared by all namespaces: names of our
        # own keep this run clear of a demo or another run on the same machine.
        with Mesh.standard(lab, interface_prefix=f"mp{os.getpid() % 10000}w") as mesh:
            mesh["laptop"].prefs["mtu"] = 1420
            mesh.start()
            mesh.wait_until(
                lambda: lab.laptop.fetch(SERVER_V4, timeout=1) == HOME_WAN_V4,
                30,
                "the laptop to reach the internet through the pi",
            )
            yield World(lab, mesh, server, lan_server)


def nft_counter(world: World, comment: str) -> int:
    """Packets counted by the pi's meshpi rules carrying this comment."""
    text = world.lab.pi.run(["nft", "list", "table", "inet", "meshpi"]).stdout
    counts = [
        int(re.search(r"counter packets (\d+)", line).group(1))  # type: ignore[union-attr]
        for line in text.splitlines()
        if f'comment "{comment}"' in line
    ]
    assert counts, f"no rule with comment {comment!r} in:\n{text}"
    return sum(counts)


def unreachable(world: World, host_fetch: object, dst: str) -> bool:
    try:
        host_fetch(dst, timeout=1)  # type: ignore[operator]
    except LabError:
        return True
    return False


def test_dataplane_exit_node_carries_laptop_to_internet(world: World) -> None:
    lab = world.lab
    rx_before = world.mesh["pi"].transfer()
    assert lab.laptop.fetch(SERVER_V4) == HOME_WAN_V4
    # Checked on the server's side: it saw the home router's public address.
    assert world.server.peers()[-1] == HOME_WAN_V4
    # IPv6 goes out through the exit too, masqueraded to the pi's own address.
    assert lab.laptop.fetch(SERVER_V6) == PI_V6
    assert world.server.peers()[-1] == PI_V6
    rx_after = world.mesh["pi"].transfer()
    assert rx_before is not None and rx_after is not None and rx_after[0] > rx_before[0]
    # Without the tunnel the laptop's own router would be seen: prove the path.
    assert (
        lab.laptop.run(["ip", "route", "get", SERVER_V4]).stdout.split()[2] == world.mesh["laptop"].interface
    )


def test_dataplane_lan_reachable_only_when_shared(world: World) -> None:
    lab, pi = world.lab, world.mesh["pi"]
    # Shared and approved: the LAN host answers, and sees the pi (masqueraded).
    assert lab.laptop.fetch(LANHOST_V4) == PI_V4
    # The pi shares only its IPv4 LAN: the IPv6 LAN stays closed to the mesh.
    dropped = nft_counter(world, "the LAN is not shared")
    assert unreachable(world, lab.laptop.fetch, LANHOST_V6)
    assert nft_counter(world, "the LAN is not shared") > dropped

    # Stop sharing: the laptop still sends LAN traffic into the tunnel (the pi is
    # its exit node), and the pi drops it.
    pi.write_prefs(advertise_routes=[])
    world.mesh.write_netmaps()
    try:
        world.mesh.wait_until(
            lambda: unreachable(world, lab.laptop.fetch, LANHOST_V4), 10, "the LAN to close"
        )
        sent, received = lab.laptop.ping(LANHOST_V4, count=3, interval=0.2)
        assert received == 0
        assert lab.laptop.fetch(SERVER_V4) == HOME_WAN_V4  # the exit still works
    finally:
        pi.write_prefs(advertise_routes=[HOME_LAN_V4])
        world.mesh.write_netmaps()
    world.mesh.wait_until(lambda: lab.laptop.fetch(LANHOST_V4, timeout=1) == PI_V4, 10, "LAN again")


def test_dataplane_pi_is_not_an_open_relay(world: World) -> None:
    lab = world.lab
    routes = [("-4", f"{SERVER_V4}/32", PI_V4), ("-6", f"{SERVER_V6}/128", PI_V6),
              ("-4", "100.64.0.0/10", PI_V4)]  # fmt: skip
    for family, dst, via in routes:
        lab.lanhost.run(["ip", family, "route", "add", dst, "via", via])
    seen = len(world.server.peers())
    dropped = nft_counter(world, "not mesh traffic: this host routes only for the mesh")
    try:
        # The LAN host tries to use the pi as its router: to the internet, and into the mesh.
        assert unreachable(world, lab.lanhost.fetch, SERVER_V4)
        assert unreachable(world, lab.lanhost.fetch, SERVER_V6)
        sent, received = lab.lanhost.ping(world.mesh["laptop"].mesh_v4, count=2, interval=0.2)
        assert received == 0
    finally:
        for family, dst, via in routes:
            lab.lanhost.run(["ip", family, "route", "del", dst, "via", via])
    assert len(world.server.peers()) == seen, "the server must see nothing from the LAN host"
    assert nft_counter(world, "not mesh traffic: this host routes only for the mesh") > dropped
    # The pi's NAT counts mesh-sourced traffic only.
    assert lab.lanhost.fetch(SERVER_V4) == HOME_WAN_V4  # its own path, via the home router


def test_dataplane_tcp_across_1280_path_with_pmtu_black_hole(world: World) -> None:
    lab = world.lab
    size = 4_000_000
    # Download: the server sends full-size segments unless the pi clamped the MSS.
    count, digest = lab.laptop.fetch(SERVER_V4, f"send {size}", timeout=20).split()
    assert (int(count), digest) == (size, pattern_sha256(size))
    # Upload, and over IPv6 (MSS 1220 there).
    assert lab.laptop.fetch(SERVER_V4, f"recv {size}", timeout=20) == pattern_sha256(size)
    count, digest = lab.laptop.fetch(SERVER_V6, f"send {size}", timeout=20).split()
    assert (int(count), digest) == (size, pattern_sha256(size))
    clamp = lab.pi.run(["nft", "list", "chain", "inet", "meshpi", "mss_clamp"]).stdout
    counts = [int(n) for n in re.findall(r"counter packets (\d+)", clamp)]
    assert len(counts) == 3 and all(n > 0 for n in counts), clamp


def test_dataplane_bad_update_keeps_last_good_state(world: World) -> None:
    laptop = world.mesh["laptop"]
    good = laptop.netmap_path.read_text()
    log_before = laptop.agent_log()
    broken = json.loads(good)
    broken["peers"][0]["public_key"] = "garbage"
    laptop.netmap_path.write_text(json.dumps(broken))
    try:
        world.mesh.wait_until(
            lambda: "peers[0].public_key: 'garbage'" in laptop.agent_log()[len(log_before) :],
            5,
            "the agent to refuse the bad netmap",
        )
        assert world.lab.laptop.fetch(SERVER_V4) == HOME_WAN_V4
        assert laptop.agent_running()
    finally:
        laptop.netmap_path.write_text(good)


def _wg_go_pid(world: World) -> str:
    pi = world.mesh["pi"].interface
    return world.lab.pi.run(["pgrep", "-f", f"wireguard-go {pi}"]).stdout.strip()


def test_dataplane_agent_kill9_loses_at_most_one_packet(world: World) -> None:
    lab, pi = world.lab, world.mesh["pi"]
    ifindex = lab.pi.run(["cat", f"/sys/class/net/{pi.interface}/ifindex"]).stdout
    wg_pid = _wg_go_pid(world)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", lab.laptop.ns, "ping", "-n", "-q", "-c", "50", "-i", "0.1",
         "-W", "1", SERVER_V4],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # let the ping stream run before the crash
        assert pi.kill_agent(signal.SIGKILL) == -signal.SIGKILL
        log_len = len(pi.agent_log())
        pi.start_agent()
        world.mesh.wait_until(
            lambda: f"took over {pi.interface}" in pi.agent_log()[log_len:], 10, "the takeover"
        )
        out, _ = ping.communicate(timeout=30)
    finally:
        if ping.poll() is None:
            ping.kill()
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+)", out).groups())  # type: ignore[union-attr]
    assert sent == 50 and sent - received <= 1, out
    # Taken over, not rebuilt: the same interface, the same wireguard-go, no changes.
    assert lab.pi.run(["cat", f"/sys/class/net/{pi.interface}/ifindex"]).stdout == ifindex
    assert _wg_go_pid(world) == wg_pid
    assert "[#]" not in pi.agent_log()[log_len:]


def test_dataplane_down_leaves_nothing(world: World) -> None:
    """Last in the module: it takes the mesh down."""
    lab = world.lab
    for name in ("pi", "laptop"):
        node = world.mesh[name]
        res = node.down()
        assert res.returncode == 0, res.stderr
        host = node.host
        assert not node.agent_running()
        assert host.run(["ip", "link", "show", node.interface], check=False).returncode != 0
        assert host.run(["nft", "list", "table", "inet", "meshpi"], check=False).returncode != 0
        for family in ("-4", "-6"):
            rules = host.run(["ip", family, "rule", "show"]).stdout
            assert not re.search(r"^52\d\d:", rules, re.M), rules
        assert host.run(["ip", "route", "show", "table", "51820"], check=False).stdout == ""
        # The sysctls are back to what they were before meshpi (all 0 in the lab).
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
                    "net.ipv4.conf.all.src_valid_mark"):  # fmt: skip
            assert host.sysctl(key) == "0", key
        assert host.run(["pgrep", "-f", f"wireguard-go {node.interface}"], check=False).stdout == ""
        assert not (node.state_dir / "owned.json").exists()
    # And the laptop goes direct again.
    assert lab.laptop.fetch(SERVER_V4) == "192.0.2.1"
