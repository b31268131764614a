"""diff(current, desired) -> the ordered changes between them. Pure.

Order, as Tailscale's router does it: add before delete, so a working path is
never removed before its replacement exists; within adds, the firewall exists
before forwarding is switched on, and routes exist before the rules that use them.
Nothing changed → no changes.
"""

from __future__ import annotations

from collections.abc import Mapping

from appliance.base.keys import PublicKey
from appliance.base.net import IPInterface
from appliance.core.changes import (
    AddAddress,
    AddPeer,
    AddRoute,
    AddRule,
    Change,
    ConfigureDevice,
    CreateInterface,
    DeleteInterface,
    DeleteNft,
    RemoveAddress,
    RemovePeer,
    RemoveRoute,
    RemoveRule,
    ReplaceNft,
    RestoreSysctl,
    SetMtu,
    SetSysctl,
    UpdatePeer,
)
from appliance.core.model import Device, Peer, Rule, State


def _peer_differs(current: Peer, desired: Peer) -> bool:
    if (current.allowed_ips, current.persistent_keepalive) != (
        desired.allowed_ips,
        desired.persistent_keepalive,
    ):
        return True
    # No endpoint wanted: keep whatever the peer roamed to.
    return desired.endpoint is not None and current.endpoint != desired.endpoint


def _device_settings(dev: Device) -> tuple[object, ...]:
    return (dev.private_key, dev.listen_port, dev.fwmark)


def diff(current: State, desired: State) -> list[Change]:
    adds: list[Change] = []
    deletes: list[Change] = []
    cur, want = current.device, desired.device
    # An interface that goes away takes its peers, addresses and routes with it.
    dropped = cur.name if cur is not None and (want is None or want.name != cur.name) else None
    fresh = want is not None and (cur is None or dropped is not None)

    if want is not None:
        if fresh:
            adds.append(CreateInterface(want.name, want.mtu))
        elif cur is not None and cur.mtu != want.mtu:
            adds.append(SetMtu(want.name, want.mtu))
        if fresh or cur is None or _device_settings(cur) != _device_settings(want):
            assert want.private_key is not None, "a desired device always has a key"
            adds.append(ConfigureDevice(want.name, want.private_key, want.listen_port, want.fwmark))
        live_peers: Mapping[PublicKey, Peer] = {} if fresh else current.peers
        live_addresses = frozenset() if fresh else current.addresses
        adds += [AddAddress(want.name, a) for a in _sorted(desired.addresses - live_addresses)]
        # Find what differs first, sort only that. A State planned from `current`
        # by a delta says which peers it touched: only those are compared.
        touched = None if fresh else desired.changed_peers_since(current)
        wanted = (
            desired.peers if touched is None else {k: desired.peers[k] for k in touched if k in desired.peers}
        )
        new = [p for k, p in wanted.items() if k not in live_peers]
        changed = [p for k, p in wanted.items() if k in live_peers and _peer_differs(live_peers[k], p)]
        adds += [AddPeer(want.name, p) for p in sorted(new, key=_by_key)]
        adds += [UpdatePeer(want.name, p) for p in sorted(changed, key=_by_key)]
        if not fresh:
            was = (
                current.peers
                if touched is None
                else {k: current.peers[k] for k in touched if k in current.peers}
            )
            gone = [p for k, p in was.items() if k not in desired.peers]
            deletes += [RemovePeer(want.name, p.public_key, p.name) for p in sorted(gone, key=_by_key)]
            deletes += [RemoveAddress(want.name, a) for a in _sorted(current.addresses - desired.addresses)]

    live_routes = frozenset(r for r in current.routes if r.dev != dropped)
    adds += [AddRoute(r) for r in sorted(desired.routes - live_routes, key=str)]
    if desired.nft is not None and desired.nft != current.nft:
        adds.append(ReplaceNft(desired.nft))
    adds += [SetSysctl(k, v) for k, v in desired.sysctls.items() if current.sysctls.get(k) != v]
    adds += [AddRule(r) for r in sorted(desired.rules - current.rules, key=_rule_order)]

    # Deletes run in the reverse order of adds: rules stop using routes before
    # the routes go, forwarding stops before the firewall goes.
    removes: list[Change] = [RemoveRule(r) for r in sorted(current.rules - desired.rules, key=_rule_order)]
    removes += [RestoreSysctl(k) for k in current.sysctls if k not in desired.sysctls]
    if desired.nft is None and current.nft is not None:
        removes.append(DeleteNft())
    removes += [RemoveRoute(r) for r in sorted(live_routes - desired.routes, key=str)]
    removes += deletes
    if dropped is not None:
        removes.append(DeleteInterface(dropped))
    return adds + removes


def _by_key(peer: Peer) -> bytes:
    return peer.public_key.raw


def _rule_order(rule: Rule) -> tuple[int, int, str]:
    return (rule.priority, rule.family, str(rule))


def _sorted(addresses: frozenset[IPInterface]) -> list[IPInterface]:
    return sorted(addresses, key=lambda a: (a.version, int(a.ip), a.network.prefixlen))
