"""`/v1/status`'s `connected`: ONE list of everything that talks to this node,
mesh peers and the phones it hosts, as the kernel sees them. Pure.

- state: `online` when the last handshake is under ONLINE_WITHIN (180 s) old
  and traffic passed within ACTIVE_WITHIN (2 min; a handshake is traffic);
  `idle` when a handshake is known but older; `never` without one.
- path: only a path a recent handshake proves: "direct <endpoint>" or
  "relayed" (reach/paths.py), "trying" while candidates are being tried, else
  null (a peer that never answered has no path, relayed or not). A hosted phone
  is direct by nature (it dials this node): the endpoint the kernel last saw it at.
- uses_exit: the peer sends its internet traffic through this node. A hosted
  phone: its config is "all traffic" (mode all) and it is online. A mesh peer:
  netmaps do not say which exit a peer chose, so it is what this node saw: the
  peer's mesh address opened flows through this node to an address outside the
  mesh and the private ranges (`exit_users`, from conntrack), while online.
- kind: "phone" for a hosted device; a peer that routes for the mesh (exit node
  or subnet routes) is a "pi", any other a "computer" (netmaps carry no kind).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.base.keys import PublicKey
from appliance.base.net import IPAddress, IPNetwork
from appliance.core.nft import PRIVATE_V4, PRIVATE_V6
from appliance.kernel.base import PeerStats
from appliance.wire.netmap import Netmap

# WireGuard rekeys every 2 minutes while traffic flows: a handshake in the last
# 3 minutes means the peer is there.
ONLINE_WITHIN = 180.0
ACTIVE_WITHIN = 120.0


@dataclass(frozen=True)
class HostedRow:
    """A device this node hosts, enabled or not (devices/hosted.py's entry)."""

    id: str
    name: str
    public_key: PublicKey
    addresses: tuple[IPAddress, ...]
    mode: str
    enabled: bool


def exit_sources(
    flows: Iterable[tuple[IPAddress, IPAddress]], mesh: Iterable[IPNetwork]
) -> frozenset[IPAddress]:
    """Mesh addresses with a flow through this node to the internet: a destination
    outside the mesh and every private range (the LAN is not "exit")."""
    ranges = tuple(mesh)
    return frozenset(
        src for src, dst in flows
        if any(src in n for n in ranges) and not dst.is_multicast
        and not any(dst in n for n in (*ranges, *PRIVATE_V4, *PRIVATE_V6))
    )  # fmt: skip


def peer_state(handshake: float | None, active: float | None, now: float) -> str:
    if handshake is None:
        return "never"
    last_traffic = max(handshake, active or 0.0)
    if now - handshake < ONLINE_WITHIN and now - last_traffic < ACTIVE_WITHIN:
        return "online"
    return "idle"


def connected_rows(
    netmap: Netmap | None,
    devices: Sequence[HostedRow],
    stats: Mapping[PublicKey, PeerStats],
    now: float,
    paths: Mapping[PublicKey, str] | None = None,
    active: Mapping[PublicKey, float] | None = None,
    exit_users: Collection[IPAddress] = (),
    dns_names: Mapping[PublicKey, str] | None = None,
) -> list[dict[str, Any]]:
    """`active`: when each peer's counters last grew (traffic.py); `exit_users`:
    mesh addresses seen going to the internet through this node."""
    rows = []
    for peer in netmap.peers if netmap is not None else ():
        s = stats.get(peer.public_key)
        row = _row(peer.public_key, s, now, active)
        label = None if paths is None else paths.get(peer.public_key, "trying")  # not chosen yet: unproven
        endpoint = s.endpoint if s is not None else None
        if label == "trying":
            path: str | None = "trying"
        elif row["state"] != "online":
            path = None
        else:
            path = label or (f"direct {endpoint}" if endpoint else None)
        row.update(
            name=peer.name,
            kind="pi" if peer.routes else "computer",
            device_id=None,
            addresses=[str(a) for a in peer.addresses],
            path=path,
            uses_exit=row["state"] == "online" and any(a in exit_users for a in peer.addresses),
            enabled=True,
        )
        rows.append(row)
    for d in devices:
        s = stats.get(d.public_key) if d.enabled else None
        row = _row(d.public_key, s, now, active)
        online = row["state"] == "online"
        endpoint = s.endpoint if s is not None else None
        row.update(
            name=d.name,
            kind="phone",
            device_id=d.id,
            addresses=[str(a) for a in d.addresses],
            path=f"direct {endpoint}" if endpoint else None,
            uses_exit=online and d.mode == "all",
            enabled=d.enabled,
        )
        rows.append(row)
    names = {str(k): v for k, v in (dns_names or {}).items()}
    for row in rows:
        row["dns_name"] = names.get(row["id"])
    return [{k: row[k] for k in _ORDER} for row in rows]


_ORDER = ("id", "name", "kind", "device_id", "addresses", "dns_name", "state", "last_seen", "last_handshake",
          "path", "uses_exit", "rx_bytes", "tx_bytes", "enabled")  # fmt: skip


def _row(
    key: PublicKey, s: PeerStats | None, now: float, active: Mapping[PublicKey, float] | None
) -> dict[str, Any]:
    handshake = s.last_handshake if s is not None else None
    grew = (active or {}).get(key)
    seen = [t for t in (handshake, grew) if t is not None]
    return {
        "id": str(key),
        "state": peer_state(handshake, grew, now),
        "last_seen": int(max(seen)) if seen else None,
        "last_handshake": handshake,
        "rx_bytes": s.rx_bytes if s is not None else 0,
        "tx_bytes": s.tx_bytes if s is not None else 0,
    }
