"""Peers' endpoints and handshakes around what the planner says: after a key
rotation, and when reachability chose another path (the loop applies these).

The first three functions are pure; the last three take the desired state and
the kernel's view of the device.

WireGuard drops a handshake for a key it does not know, then waits 5 s before it
tries again. During a rotation both ends switch keys at slightly different times,
so whichever end switches *last* starts a handshake at once, and it succeeds:
- the node that rotated, with every peer it was talking to;
- every node, with a peer that kept its name but changed its key. If the netmap
  gives no endpoint for it (a node behind NAT), the new key's peer starts from
  the endpoint the old key's peer had roamed to: the NAT mapping is still open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPAddress
from appliance.core.model import State
from appliance.kernel.base import KernelError
from appliance.kernel.system import System
from appliance.wire.netmap import Netmap, Node

if TYPE_CHECKING:
    from appliance.agent.inputs import Inputs

log = logging.getLogger(__name__)

ACTIVE_WITHIN = 180.0  # a handshake this recent means a session is in use (rekey is every 120 s)


def handshake_targets(
    before: Netmap, after: Netmap, handshakes: Mapping[PublicKey, float | None], now: float
) -> list[IPAddress]:
    """One mesh address per peer to probe. `handshakes`: the last handshake time
    per peer key, as the kernel reports it (a key change keeps the peers' times)."""
    if before.self_node.public_key != after.self_node.public_key:
        return [
            p.addresses[0] for p in after.peers if p.addresses and _active(handshakes.get(p.public_key), now)
        ]
    return [p.addresses[0] for p in rotated_peers(before, after) if p.addresses]


def rotated_peers(before: Netmap, after: Netmap) -> list[Node]:
    """Peers (in `after`) that kept their name but changed their key."""
    old_keys = {p.name: p.public_key for p in before.peers}
    return [p for p in after.peers if old_keys.get(p.name, p.public_key) != p.public_key]


def _active(handshake: float | None, now: float) -> bool:
    return handshake is not None and now - handshake < ACTIVE_WITHIN


def carried_endpoints(
    before: Netmap, after: Netmap, learned: Mapping[PublicKey, Endpoint | None]
) -> dict[PublicKey, Endpoint]:
    """New key -> the endpoint the kernel had learned for the peer's old key, for
    peers that rotated and have no endpoint in the netmap."""
    old_keys = {p.name: p.public_key for p in before.peers}
    carried = {}
    for p in after.peers:
        old = old_keys.get(p.name, p.public_key)
        endpoint = learned.get(old)
        if old != p.public_key and p.endpoint is None and endpoint is not None:
            carried[p.public_key] = endpoint
    return carried


# -- applied by the loop, on the desired state and the kernel --------------------------


def carry_endpoints(system: System, before: Inputs, after: Inputs, desired: State) -> State:
    """A peer behind NAT that rotated its key: its new peer starts from where
    the old one had roamed to (carried_endpoints)."""
    if not after.netmap.removed_since(before.netmap) or not rotated_peers(before.netmap, after.netmap):
        return desired  # a rotation removes the old key: no removal, no rotation (O(1) for a delta)
    device = system.wireguard.read(after.scope.interface)
    learned = {k: s.endpoint for k, s in device.stats.items()} if device is not None else {}
    carried = carried_endpoints(before.netmap, after.netmap, learned)
    if not carried:
        return desired
    peers = dict(desired.peers)
    for key, endpoint in carried.items():
        peers[key] = replace(peers[key], endpoint=endpoint)
    return replace(desired, peers=peers)


def with_paths(
    before: Mapping[PublicKey, Endpoint], after: Mapping[PublicKey, Endpoint], desired: State
) -> State:
    """The endpoints reach/ chose (a working candidate, the relay's proxy)
    instead of the netmap's first. The plan's O(change) hint stays right:
    the peers whose chosen endpoint changed count as touched too."""
    if not after and not before:
        return desired
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    peers = dict(desired.peers)
    for key in set(after) | changed:
        if key in peers:
            peers[key] = replace(peers[key], endpoint=after.get(key, peers[key].endpoint))
    derived = desired.derived
    if derived is not None:
        derived = (derived[0], derived[1] | frozenset(changed))
    return replace(desired, peers=peers, derived=derived)


def start_handshakes(system: System, before: Inputs, after: Inputs) -> None:
    """After a rotation, start the handshakes WireGuard would otherwise delay."""
    same_self = before.netmap.self_node == after.netmap.self_node
    if same_self and not after.netmap.removed_since(before.netmap):
        return  # nothing rotated (O(1) for a delta)
    handshakes: dict[PublicKey, float | None] = {}
    if before.netmap.self_node.public_key != after.netmap.self_node.public_key:
        device = system.wireguard.read(after.scope.interface)
        if device is not None:
            handshakes = {k: s.last_handshake for k, s in device.stats.items()}
    for address in handshake_targets(before.netmap, after.netmap, handshakes, time.time()):
        try:
            system.links.probe(after.scope.interface, address)
        except KernelError as e:
            log.warning("could not start a handshake with %s: %s", address, e)
