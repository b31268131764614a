"""Roaming: the laptop leaves its network for another, and meshpi follows.

The lab (tests/lab/topology.py) plus a second uplink for the laptop, straight
to the internet router, on a network that happens to use the pi's LAN prefix
(a hotel or a friend's home numbered like ours):

    inet 192.168.77.1/24 ──veth── wlan0 laptop (down, no address until the move)
         (masquerades 192.168.77.0/24 towards the pi's home router)

The move: the laptop's eth0 loses its address and goes down, wlan0 comes up
with 192.168.77.20/24 and a default route. The agent hears it over rtnetlink
(appliance/agent/netwatch.py), re-plans from the new host facts within 2 s
(its own log says how long after the first event), sets aside the pi's LAN
route that now collides with the laptop's own network, moves the exit node's
"LAN into the tunnel" rule to the new network, and the exit node keeps working.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest

from tests.lab.mesh import Mesh
from tests.lab.topology import HOME_LAN_V4, HOME_WAN_V4, LAPTOP_V4, SERVER_V4, Lab

NEW_NET, NEW_GW, NEW_ADDR = "192.168.77.0/24", "192.168.77.1", "192.168.77.20"
# The new network sits behind a NAT of its own, as a hotel's would.
HOTEL_NAT = f"""
table ip lab_hotel {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "home" ip saddr {NEW_NET} masquerade
    }}
}}
"""
REPLANNED = re.compile(r"re-planned (\d+) ms after the host's networks changed: (.*)")


@pytest.fixture(scope="module")
def roaming() -> Iterator[tuple[Lab, Mesh]]:
    with Lab() as lab:
        lab.internet.whoami_server()
        lab.internet.run(["ip", "-batch", "-"], input="\n".join([
            f"link add roam index 107 type veth peer name wlan0 netns {lab.laptop.ns}",
            f"addr add {NEW_GW}/24 dev roam",
            "link set roam up",
        ]) + "\n")  # fmt: skip
        lab.internet.run(["nft", "-f", "-"], input=HOTEL_NAT)
        with Mesh.standard(lab, interface_prefix=f"mp{os.getpid() % 10000}r") as mesh:
            mesh.start()
            mesh.wait_until(
                lambda: lab.laptop.fetch(SERVER_V4, timeout=1) == HOME_WAN_V4, 30, "the exit node to work"
            )
            yield lab, mesh


def lan_rules(lab: Lab) -> set[str]:
    """The destinations the laptop's exit-node rules send into the tunnel."""
    text = lab.laptop.run(["ip", "-4", "rule", "show", "priority", "5230"]).stdout
    return set(re.findall(r"to (\S+)", text))


def test_roaming_laptop_moves_network_exit_keeps_working(roaming: tuple[Lab, Mesh]) -> None:
    lab, mesh = roaming
    laptop = mesh["laptop"]
    assert lan_rules(lab) == {"10.77.0.0/24"}
    assert HOME_LAN_V4 in lab.laptop.run(["ip", "route", "show", "table", "51820"]).stdout
    mark = len(laptop.agent_log())
    moved = time.monotonic()
    lab.laptop.run(["ip", "-batch", "-"], input="\n".join([
        f"addr del {LAPTOP_V4}/24 dev eth0",
        "link set eth0 down",
        f"addr add {NEW_ADDR}/24 dev wlan0",
        "link set wlan0 up",
        f"route add default via {NEW_GW}",
    ]) + "\n")  # fmt: skip

    def replanned() -> tuple[int, str] | None:
        found = REPLANNED.findall(laptop.agent_log()[mark:])
        return (int(found[-1][0]), found[-1][1]) if found and lan_rules(lab) == {NEW_NET} else None

    took, why = mesh.wait_until(replanned, 5, "the agent to re-plan for the new network", interval=0.05)
    seen = time.monotonic() - moved
    # The agent's own measure: from the first netlink event of the burst to the applied plan.
    assert took < 2000, f"re-planned {took} ms after the event: {why}"
    assert seen < 3.0, f"the new rules appeared {seen:.1f}s after the move"
    assert "address 10.77.0.2/24 removed on eth0" in why, why
    print(f"re-planned {took} ms after the first event, seen by the test {seen:.2f}s after the move")
    log = laptop.agent_log()[mark:]
    # The pi's LAN route now collides with the laptop's own network: set aside, not routed.
    assert f"route {HOME_LAN_V4} from pi set aside" in log
    assert HOME_LAN_V4 not in lab.laptop.run(["ip", "route", "show", "table", "51820"]).stdout

    # The exit node keeps carrying the laptop, from its new address.
    mesh.wait_until(
        lambda: lab.laptop.fetch(SERVER_V4, timeout=1) == HOME_WAN_V4, 10, "the exit after the move"
    )
    assert lab.laptop.run(["ip", "route", "get", SERVER_V4]).stdout.split()[2] == laptop.interface


def test_roaming_own_changes_do_not_wake_the_agent(roaming: tuple[Lab, Mesh]) -> None:
    """Routes and addresses on meshpi's interface or in its table are its own:
    no re-plan for them (an apply must never trigger the next)."""
    lab, mesh = roaming
    laptop = mesh["laptop"]
    mark = len(laptop.agent_log())
    lab.laptop.run(["ip", "-batch", "-"], input="\n".join([
        "route add 198.18.0.0/24 dev lo table 51820",
        f"addr add 100.127.0.9/32 dev {laptop.interface}",
        "route del 198.18.0.0/24 dev lo table 51820",
        f"addr del 100.127.0.9/32 dev {laptop.interface}",
        # The host's own, and a new network the exit node's rules must cover: this one counts.
        "addr add 198.18.1.1/24 dev wlan0",
    ]) + "\n")  # fmt: skip
    took, why = mesh.wait_until(
        lambda: (REPLANNED.findall(laptop.agent_log()[mark:]) or [None])[-1], 5, "the re-plan"
    )
    assert why == "address 198.18.1.1/24 added on wlan0, route 198.18.1.0/24 added on wlan0", why
    assert "198.18.1.0/24" in lan_rules(lab)
    lab.laptop.run(["ip", "addr", "del", "198.18.1.1/24", "dev", "wlan0"])
