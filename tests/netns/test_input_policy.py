"""The appliance's input policy with real traffic: a port scan of the pi.

    laptop ── laptop router ──┐
                              inet (the internet: 203.0.113.10, 2001:db8:ff00::10)
    pi 192.168.77.2  ─┬─ home router (NAT 198.51.100.1; tcp 80 forwarded to the pi
    lanhost .77.3   ──┘   here; 2001:db8:1::/64 routed, not filtered)

The pi runs meshpi as the image does (dashboard_port 80, ssh_port 22): a small TCP
server on each of 80, 22 and 8080 (control's public port) stands in for the dashboard,
sshd and control. The LAN host reaches all three; the laptop, through the tunnel,
reaches SSH and control but not the dashboard until the owner allows it; the internet
(IPv6 routed to the pi, IPv4 through the home router's port forward) reaches control only.
"The LAN" is the connected networks and the private ranges (not 100.64.0.0/10).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.lab.mesh import Mesh, MeshNode
from tests.lab.topology import HOME_WAN_V4, LANHOST_V4, LANHOST_V6, PI_V4, PI_V6, Host, Lab, LabError

DASHBOARD, SSH, CONTROL = 80, 22, 8080


@dataclass
class World:
    lab: Lab
    mesh: Mesh
    pi: MeshNode


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        for port in (DASHBOARD, SSH, CONTROL):
            lab.pi.whoami_server(port=port)
        # A hand-made port forward of the dashboard's port, as a careless owner might set up.
        lab.home.run(["nft", "add", "rule", "inet", "lab_home", "prerouting", "iifname", "wan",
                      "tcp", "dport", str(DASHBOARD), "dnat", "ip", "to", f"{PI_V4}:{DASHBOARD}"])  # fmt: skip
        with Mesh.standard(lab, interface_prefix=f"mp{os.getpid() % 10000}i") as mesh:
            mesh["pi"].prefs.update(dashboard_port=DASHBOARD, ssh_port=SSH)
            mesh.start()
            pi = mesh["pi"]
            mesh.wait_until(lambda: lab.laptop.fetch(pi.mesh_v4, port=SSH, timeout=1), 30,
                            "the laptop to reach the pi's SSH port through the tunnel")  # fmt: skip
            yield World(lab, mesh, pi)


def reaches(host: Host, dst: str, port: int) -> bool:
    try:
        host.fetch(dst, port=port, timeout=1)
    except LabError:
        return False
    return True


def test_input_policy_lan_reaches_dashboard_ssh_and_control(world: World) -> None:
    lan = world.lab.lanhost
    for dst in (PI_V4, PI_V6):
        for port in (DASHBOARD, SSH, CONTROL):
            assert reaches(lan, dst, port), f"LAN -> {dst}:{port}"
    # The pi saw the LAN host itself (nothing in between rewrote it).
    assert world.lab.lanhost.fetch(PI_V4, port=DASHBOARD) == LANHOST_V4
    assert world.lab.lanhost.fetch(PI_V6, port=DASHBOARD) == LANHOST_V6


def test_input_policy_internet_reaches_control_only(world: World) -> None:
    inet = world.lab.internet
    assert not reaches(inet, PI_V6, DASHBOARD), "IPv6 is routed to the pi: the dashboard must not answer"
    assert not reaches(inet, PI_V6, SSH)
    assert not reaches(inet, HOME_WAN_V4, DASHBOARD), "a port forward must not open the dashboard"
    assert reaches(inet, PI_V6, CONTROL), "control's public port stays open"


def test_input_policy_mesh_reaches_dashboard_only_when_the_owner_allows(world: World) -> None:
    lab, mesh, pi = world.lab, world.mesh, world.pi
    assert not reaches(lab.laptop, pi.mesh_v4, DASHBOARD)
    assert reaches(lab.laptop, pi.mesh_v4, SSH)
    assert reaches(lab.laptop, pi.mesh_v4, CONTROL)
    pi.write_prefs(dashboard_from_mesh=True)
    mesh.write_netmaps()
    try:
        mesh.wait_until(
            lambda: reaches(lab.laptop, pi.mesh_v4, DASHBOARD), 10, "the dashboard to open to the mesh"
        )
        assert lab.laptop.fetch(pi.mesh_v4, port=DASHBOARD) == mesh["laptop"].mesh_v4
        assert not reaches(lab.internet, PI_V6, DASHBOARD), "the internet still may not"
    finally:
        pi.write_prefs(dashboard_from_mesh=False)
        mesh.write_netmaps()
    mesh.wait_until(
        lambda: not reaches(lab.laptop, pi.mesh_v4, DASHBOARD), 10, "the dashboard to close again"
    )
