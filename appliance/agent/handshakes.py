"""Which peers to start a WireGuard handshake with after a key rotation. Pure.

WireGuard drops a handshake for a key it does not know, then waits 5 s before it
tries again. During a rotation both ends switch keys at slightly different times,
so whichever end switches *last* starts a handshake at once, and it succeeds:
- the node that rotated, with every peer it was talking to;
- every node, with a peer that kept its name but changed its key. If the netmap
  gives no endpoint for it (a node behind NAT), the new key's peer starts from
  the endpoint the old key's peer had roamed to: the NAT mapping is still open.
"""

from __future__ import annotations

from collections.abc import Mapping

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPAddress
from appliance.wire.netmap import Netmap, Node

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
