"""Subnet routes with real traffic in the lab (tests/lab/topology.py):

- a peer whose public endpoint lies inside one of its own approved subnet routes
  still handshakes: the route lives in meshpi's table behind `not fwmark`, and
  WireGuard's own packets (fwmark) use main;
- a laptop whose own network has the home LAN's prefix (tests/lab/samelan.py)
  keeps the whole mesh and its exit node: only the pi's 192.168.77.0/24 is set
  aside, and the local network wins for it.
"""

from __future__ import annotations

import os

from tests.lab.mesh import Mesh
from tests.lab.samelan import give_laptop_the_home_prefix
from tests.lab.topology import (
    HOME_LAN_V4,
    HOME_WAN_V4,
    LANHOST_V4,
    PI_V4,
    SERVER_V4,
    WIREGUARD_PORT,
    Lab,
)

# A subnet holding the pi's public endpoint (the home router's WAN address, which
# forwards udp 51820 to the pi) as the laptop sees it.
ENDPOINT_SUBNET = "198.51.100.0/24"


def _prefix(tag: str) -> str:
    return f"mp{os.getpid() % 10000}{tag}"


def _allowed(mesh: Mesh, on: str, of: str) -> set[str]:
    node = mesh[on]
    out = node.host.run(["wg", "show", node.interface, "allowed-ips"]).stdout
    for line in out.splitlines():
        key, _, nets = line.partition("\t")
        if key == mesh[of].public_key:
            return set(nets.split())
    raise AssertionError(f"{of} is not a peer of {on}:\n{out}")


def test_lab_routes_endpoint_inside_the_peers_own_subnet_route_handshakes() -> None:
    with Lab() as lab:
        server = lab.lanhost.whoami_server()
        with Mesh(lab, interface_prefix=_prefix("e")) as mesh:
            mesh.add("pi", lab.pi, advertise_exit_node=True,
                     advertise_routes=[HOME_LAN_V4, ENDPOINT_SUBNET])  # fmt: skip
            laptop = mesh.add("laptop", lab.laptop)  # no exit node: subnet routes only
            pi = mesh["pi"]
            # First without the pi's endpoint: the route over it is in place before
            # WireGuard ever sends to the endpoint (no handshake can pin the path).
            pi.endpoint = None
            mesh.start()
            mesh.wait_until(
                lambda: (
                    f"dev {laptop.interface}" in lab.laptop.run(["ip", "route", "get", HOME_WAN_V4]).stdout
                ),
                20,
                "the route over the pi's endpoint",
            )
            pi.endpoint = f"{HOME_WAN_V4}:{WIREGUARD_PORT}"
            mesh.write_netmaps()
            mesh.wait_until(
                lambda: lab.laptop.ping(pi.mesh_v4, count=1)[1] == 1, 20, "the laptop to ping the pi"
            )
            assert ENDPOINT_SUBNET in _allowed(mesh, "laptop", "pi")
            # The route into the tunnel is in meshpi's table, not main.
            table = lab.laptop.run(["ip", "route", "show", "table", "51820"]).stdout
            assert f"{ENDPOINT_SUBNET} dev {laptop.interface}" in table
            assert ENDPOINT_SUBNET not in lab.laptop.run(["ip", "route", "show"]).stdout
            # WireGuard's packets go to the endpoint directly, everything else to the pi.
            marked = lab.laptop.run(["ip", "route", "get", HOME_WAN_V4, "mark", "0xca6c"]).stdout
            assert "dev eth0" in marked
            assert f"dev {laptop.interface}" in lab.laptop.run(["ip", "route", "get", HOME_WAN_V4]).stdout
            handshakes = lab.laptop.run(["wg", "show", laptop.interface, "latest-handshakes"]).stdout
            assert int(handshakes.split()[1]) > 0
            # The LAN behind the pi, over the tunnel (the LAN host sees the pi).
            assert lab.laptop.ping(LANHOST_V4)[1] > 0
            assert lab.laptop.fetch(LANHOST_V4) == PI_V4
            assert server.peers()[-1] == PI_V4


def test_lab_routes_laptop_on_the_home_lans_prefix_keeps_mesh_and_exit() -> None:
    with Lab() as lab:
        laptop_v4 = give_laptop_the_home_prefix(lab)
        internet = lab.internet.whoami_server()
        lab.lanhost.whoami_server()
        local_router = lab.lrouter.whoami_server()  # 192.168.77.1 on the laptop's own network
        with Mesh.standard(lab, interface_prefix=_prefix("s")) as mesh:
            mesh.start()
            pi, laptop = mesh["pi"], mesh["laptop"]
            # The exit node carries the laptop to the internet.
            mesh.wait_until(
                lambda: lab.laptop.fetch(SERVER_V4, timeout=1) == HOME_WAN_V4, 30, "exit via the pi"
            )
            assert internet.peers()[-1] == HOME_WAN_V4
            # Every peer, on both its mesh addresses.
            for address in pi.addresses:
                assert lab.laptop.ping(address)[1] > 0, address
            # Only the colliding route is set aside: not routed, not taken from the pi.
            assert HOME_LAN_V4 not in _allowed(mesh, "laptop", "pi")
            assert {"0.0.0.0/0", "::/0", "100.64.0.1/32"} <= _allowed(mesh, "laptop", "pi")
            assert HOME_LAN_V4 not in lab.laptop.run(["ip", "route", "show", "table", "51820"]).stdout
            assert (
                "overlaps" not in laptop.agent_log()
                and "keeping the last good state" not in laptop.agent_log()
            )
            # Without LAN access the laptop's LAN traffic goes to its exit node, whose
            # LAN answers (the LAN host sees the pi) ...
            assert lab.laptop.fetch(LANHOST_V4) == PI_V4
            # ... with LAN access the local network wins: its router answers directly.
            laptop.write_prefs(exit_node_allow_lan_access=True)
            mesh.wait_until(
                lambda: lab.laptop.fetch("192.168.77.1", timeout=1) == laptop_v4,
                20,
                "the local router, direct",
            )
            assert local_router.peers()[-1] == laptop_v4
            assert lab.laptop.fetch(SERVER_V4) == HOME_WAN_V4
