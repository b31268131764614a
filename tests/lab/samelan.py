"""A variant of the lab: the laptop's network gets the home LAN's own prefix.

Home, café and office LANs share a handful of prefixes; here the laptop's router
serves 192.168.77.0/24 too (the laptop at .50, its router at .1, masquerading it),
so the pi's approved route 192.168.77.0/24 collides with the laptop's own network:

    laptop 192.168.77.50 ── lrouter br0 192.168.77.1 (NAT 192.0.2.1) ── inet
    pi 192.168.77.2, lanhost .3 ── home br0 192.168.77.1 (NAT 198.51.100.1) ── inet

Call before the mesh starts (the agent then starts on the colliding network).
"""

from __future__ import annotations

from ipaddress import IPv4Network, ip_network

from tests.lab.topology import LAPTOP_V4, Lab

SAME_LAN_LAPTOP_V4 = "192.168.77.50"


def give_laptop_the_home_prefix(lab: Lab, prefix: str = "192.168.77.0/24") -> str:
    """Re-address the laptop's network to `prefix`; returns the laptop's new address."""
    net = ip_network(prefix)
    assert isinstance(net, IPv4Network)
    gateway, laptop = f"{net.network_address + 1}/{net.prefixlen}", f"{net.network_address + 50}"
    lab.lrouter.run(["ip", "addr", "flush", "dev", "br0"])
    lab.lrouter.run(["ip", "addr", "add", gateway, "dev", "br0"])
    lab.lrouter.run(["nft", "-f", "-"], input=(
        "flush table inet lab_lrouter\n"
        "table inet lab_lrouter {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "wan" ip saddr {net} masquerade\n'
        "  }\n"
        "}\n"
    ))  # fmt: skip
    lab.laptop.run(["ip", "addr", "del", f"{LAPTOP_V4}/24", "dev", "eth0"])
    lab.laptop.run(["ip", "addr", "add", f"{laptop}/{net.prefixlen}", "dev", "eth0"])
    lab.laptop.run(["ip", "route", "replace", "default", "via", str(net.network_address + 1)])
    return laptop
