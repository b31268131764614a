"""The network-namespace lab itself, without meshpi: topology, NAT, port forward, teardown."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import cleanup, demo, netns
from tests.lab.tools import pattern_sha256
from tests.lab.topology import (
    HOME_WAN_V4,
    LANHOST_V6,
    LAPTOP_ROUTER_WAN_V4,
    SERVER_V4,
    SERVER_V6,
    WIREGUARD_PORT,
    Lab,
    ToolServer,
)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(laptop2=True) as lab:
        yield lab


@pytest.fixture(scope="module")
def server(lab: Lab) -> ToolServer:
    return lab.internet.whoami_server()


def _net_inodes(namespaces: list[str]) -> set[int]:
    return {os.stat(f"/var/run/netns/{name}").st_ino for name in namespaces}


def _processes_in(inodes: set[int]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "net").st_ino in inodes:
                    found.append(int(entry.name))
            except OSError:  # exited while we looked
                continue
    return found


def test_lab_laptop_whoami_shows_laptop_router_nat(lab: Lab, server: ToolServer) -> None:
    assert lab.laptop.fetch(SERVER_V4) == LAPTOP_ROUTER_WAN_V4
    assert server.peers()[-1] == LAPTOP_ROUTER_WAN_V4


def test_lab_laptop2_shares_the_laptop_router(lab: Lab, server: ToolServer) -> None:
    assert lab.laptop2 is not None
    assert lab.laptop2.fetch(SERVER_V4) == LAPTOP_ROUTER_WAN_V4


def test_lab_pi_whoami_shows_home_router_nat(lab: Lab, server: ToolServer) -> None:
    assert lab.pi.fetch(SERVER_V4) == HOME_WAN_V4
    assert server.peers()[-1] == HOME_WAN_V4


def test_lab_lanhost_v6_is_routed_not_natted(lab: Lab, server: ToolServer) -> None:
    assert lab.lanhost.fetch(SERVER_V6) == LANHOST_V6
    assert server.peers()[-1] == LANHOST_V6


def test_lab_laptop_has_no_ipv6_underlay(lab: Lab) -> None:
    routes = lab.laptop.run(["ip", "-6", "route", "show", "default"]).stdout
    assert routes.strip() == ""


def test_lab_port_forward_reaches_pi(lab: Lab) -> None:
    echo = lab.pi.udp_echo_server(WIREGUARD_PORT)
    try:
        assert lab.laptop.udp(HOME_WAN_V4, WIREGUARD_PORT, "knock") == "knock"
        # DNAT only: the pi sees the laptop's public (laptop router) address.
        assert echo.peers() == [LAPTOP_ROUTER_WAN_V4]
    finally:
        echo.stop()


def test_lab_forwarding_only_on_routers(lab: Lab) -> None:
    forwarding = {
        role: (host.sysctl("net.ipv4.ip_forward"), host.sysctl("net.ipv6.conf.all.forwarding"))
        for role, host in lab.hosts.items()
    }
    routers = {"inet", "home", "lrouter"}
    assert forwarding == {role: ("1", "1") if role in routers else ("0", "0") for role in lab.hosts}


def test_lab_send_and_recv_carry_intact_bytes(lab: Lab, server: ToolServer) -> None:
    n = 300_000
    assert lab.laptop.fetch(SERVER_V4, f"send {n}") == f"{n} {pattern_sha256(n)}"
    assert lab.laptop.fetch(SERVER_V4, f"recv {n}") == pattern_sha256(n)
    assert server.events()[-1]["sha256"] == pattern_sha256(n)


def test_lab_ping_counts_sent_and_received(lab: Lab) -> None:
    assert lab.laptop.ping(SERVER_V4, count=3, interval=0.05) == (3, 3)
    # inet has no route to 203.0.113.99: unreachable, answered at once, nothing received.
    sent, received = lab.laptop.ping("203.0.113.99", count=2, interval=0.05)
    assert (sent, received) == (2, 0)


def test_lab_demo_sample_without_agent_shows_direct_path(lab: Lab, server: ToolServer) -> None:
    s = demo.sample(lab)
    assert s.whoami == LAPTOP_ROUTER_WAN_V4
    assert s.rtt_ms is not None
    assert s.transfer is None
    assert "direct, not via the mesh" in demo.format_sample(s)


def _too_big_reported(host_ping: subprocess.CompletedProcess[str]) -> bool:
    # iputils prints "Frag needed and DF set (mtu = 1300)" / "Packet too big: mtu=1300",
    # then "local error: message too long, mtu=1300" once the route caches the PMTU.
    return re.search(r"mtu ?= ?1300", host_ping.stdout + host_ping.stderr) is not None


@pytest.mark.parametrize("blackhole", [False, True], ids=["normal", "blackhole"])
def test_lab_pmtu_blackhole_hides_too_big_errors(blackhole: bool) -> None:
    with Lab(pmtu_blackhole=blackhole) as lab:
        lab.home.run(["ip", "link", "set", "wan", "mtu", "1300"])
        big = ["-M", "do", "-s", "1400", "-c", "2", "-i", "0.1", "-W", "0.5"]
        v4 = lab.pi.run(["ping", "-n", *big, SERVER_V4], check=False)
        v6 = lab.lanhost.run(["ping", "-n", *big, SERVER_V6], check=False)
        # The path is too small either way; only the blackhole hides that from the hosts.
        assert (_too_big_reported(v4), _too_big_reported(v6)) == (not blackhole, not blackhole)
        if blackhole:  # and it was the home router that swallowed them
            rules = lab.home.run(["nft", "list", "table", "inet", "lab_pmtu_blackhole"]).stdout
            assert len(re.findall(r"counter packets [1-9]", rules)) == 2


def test_lab_teardown_leaves_nothing() -> None:
    with Lab() as lab:
        server = lab.internet.whoami_server()
        echo = lab.pi.udp_echo_server()
        stray = lab.laptop.popen(["sleep", "600"])
        inodes = _net_inodes(lab.namespaces)
        assert set(lab.leftovers()) == set(lab.namespaces)
    assert lab.leftovers() == []
    assert _processes_in(inodes) == []
    assert all(p.poll() is not None for p in (server.proc, echo.proc, stray))
    assert not lab.scratch.exists()


def test_lab_exception_in_block_leaves_nothing() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        lab.internet.whoami_server()
        inodes = _net_inodes(lab.namespaces)
        raise RuntimeError("boom")
    assert lab.leftovers() == []
    assert _processes_in(inodes) == []
    assert not lab.scratch.exists()


def test_lab_keep_preserves_scratch_dir() -> None:
    with Lab(keep=True) as lab:
        (lab.scratch / "note").write_text("kept")
    try:
        assert lab.leftovers() == []
        assert (lab.scratch / "note").read_text() == "kept"
    finally:
        shutil.rmtree(lab.scratch)


def test_lab_down_removes_crashed_runs_only(lab: Lab) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    crashed = f"mp{finished.pid}-pi"  # a run whose process is gone
    netns.create(crashed)
    try:
        assert f"deleted namespace {crashed}" in cleanup.cleanup()
        assert netns.leftovers(crashed) == []
        assert set(lab.leftovers()) == set(lab.namespaces)  # a live run is left alone
    finally:
        netns.delete(crashed)
