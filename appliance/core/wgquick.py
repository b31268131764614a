"""The wg-quick config of a stock WireGuard client (a phone) this node hosts. Pure.

The format every WireGuard app imports, from a file or a QR code: one [Interface]
with the device's own key and addresses, one [Peer], this node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import IPNetwork
from appliance.core.model import sorted_networks
from appliance.wire.netmap import EXIT_ROUTES, Mesh

KEEPALIVE = 25  # the phone is behind NAT; the hub cannot reach it first


@dataclass(frozen=True)
class ClientConfig:
    private_key: PrivateKey
    prefixes: tuple[IPNetwork, ...]  # the device's own /32 and /128
    hub_key: PublicKey
    endpoint: str  # host:port of this node, as the internet reaches it
    allowed_ips: tuple[IPNetwork, ...]
    mtu: int
    dns: tuple[str, ...] = ()

    def render(self) -> str:
        lines = [
            "[Interface]",
            f"PrivateKey = {self.private_key.secret_base64()}",
            f"Address = {', '.join(str(p) for p in self.prefixes)}",
            f"MTU = {self.mtu}",
        ]
        if self.dns:
            lines.append(f"DNS = {', '.join(self.dns)}")
        lines += [
            "",
            "[Peer]",
            f"PublicKey = {self.hub_key}",
            f"Endpoint = {self.endpoint}",
            f"AllowedIPs = {', '.join(str(n) for n in self.allowed_ips)}",
            f"PersistentKeepalive = {KEEPALIVE}",
        ]
        return "\n".join(lines) + "\n"


def allowed_ips(mode: str, mesh: Mesh, lan: Sequence[IPNetwork]) -> tuple[IPNetwork, ...]:
    """ "all": everything through home. "lan": the mesh and the home LAN only."""
    if mode == "all":
        return EXIT_ROUTES
    if mode == "lan":
        return sorted_networks([mesh.ipv4, mesh.ipv6, *lan])
    raise ValueError(f"mode {mode!r} is not 'all' or 'lan'")
