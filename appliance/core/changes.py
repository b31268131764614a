"""The steps that move the kernel from one State to another.

Each change is one thing done to the system, and `str(change)` is its log line,
written for a person and free of secrets (a private key shows as its public key).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import IPInterface
from appliance.core.model import NftRuleset, Peer, Route, Rule


@dataclass(frozen=True)
class CreateInterface:
    name: str
    mtu: int

    def __str__(self) -> str:
        return f"create WireGuard interface {self.name} (mtu {self.mtu})"


@dataclass(frozen=True)
class SetMtu:
    name: str
    mtu: int

    def __str__(self) -> str:
        return f"set mtu of {self.name} to {self.mtu}"


@dataclass(frozen=True)
class ConfigureDevice:
    name: str
    private_key: PrivateKey
    listen_port: int
    fwmark: int

    def __str__(self) -> str:
        fwmark = f", fwmark {self.fwmark:#x}" if self.fwmark else ""
        return (
            f"configure {self.name}: public key {self.private_key.public_key()}, "
            f"listen port {self.listen_port}{fwmark}"
        )


def _peer_details(peer: Peer) -> str:
    allowed = ", ".join(map(str, peer.allowed_ips)) or "nothing"
    endpoint = f", endpoint {peer.endpoint}" if peer.endpoint else ""
    keepalive = f", keepalive {peer.persistent_keepalive}s" if peer.persistent_keepalive else ""
    return f"allowed {allowed}{endpoint}{keepalive}"


@dataclass(frozen=True)
class AddPeer:
    dev: str
    peer: Peer

    def __str__(self) -> str:
        return f"add peer {self.peer.label} on {self.dev}: {_peer_details(self.peer)}"


@dataclass(frozen=True)
class UpdatePeer:
    """Replace a peer's allowed IPs, endpoint and keepalive, in place."""

    dev: str
    peer: Peer

    def __str__(self) -> str:
        return f"update peer {self.peer.label} on {self.dev}: {_peer_details(self.peer)}"


@dataclass(frozen=True)
class RemovePeer:
    dev: str
    public_key: PublicKey
    name: str = ""

    def __str__(self) -> str:
        label = f"{self.name} ({self.public_key.short})" if self.name else self.public_key.short
        return f"remove peer {label} from {self.dev}"


@dataclass(frozen=True)
class AddAddress:
    dev: str
    address: IPInterface

    def __str__(self) -> str:
        return f"add address {self.address} to {self.dev}"


@dataclass(frozen=True)
class RemoveAddress:
    dev: str
    address: IPInterface

    def __str__(self) -> str:
        return f"remove address {self.address} from {self.dev}"


@dataclass(frozen=True)
class AddRoute:
    route: Route

    def __str__(self) -> str:
        return f"add route {self.route}"


@dataclass(frozen=True)
class RemoveRoute:
    route: Route

    def __str__(self) -> str:
        return f"remove route {self.route}"


@dataclass(frozen=True)
class AddRule:
    rule: Rule

    def __str__(self) -> str:
        return f"add rule {self.rule}"


@dataclass(frozen=True)
class RemoveRule:
    rule: Rule

    def __str__(self) -> str:
        return f"remove rule {self.rule}"


@dataclass(frozen=True)
class SetSysctl:
    key: str
    value: str

    def __str__(self) -> str:
        return f"set sysctl {self.key} = {self.value}"


@dataclass(frozen=True)
class RestoreSysctl:
    key: str

    def __str__(self) -> str:
        return f"restore sysctl {self.key} to its value before meshpi"


@dataclass(frozen=True)
class ReplaceNft:
    ruleset: NftRuleset

    def __str__(self) -> str:
        return f"replace nft table inet meshpi (ruleset {self.ruleset.digest})"


@dataclass(frozen=True)
class DeleteNft:
    def __str__(self) -> str:
        return "delete nft table inet meshpi"


@dataclass(frozen=True)
class DeleteInterface:
    name: str

    def __str__(self) -> str:
        return f"delete interface {self.name} (its peers, addresses and routes go with it)"


Change = (
    CreateInterface
    | SetMtu
    | ConfigureDevice
    | AddPeer
    | UpdatePeer
    | RemovePeer
    | AddAddress
    | RemoveAddress
    | AddRoute
    | RemoveRoute
    | AddRule
    | RemoveRule
    | SetSysctl
    | RestoreSysctl
    | ReplaceNft
    | DeleteNft
    | DeleteInterface
)
