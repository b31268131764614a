"""The exit node's fast paths, as the planner wants them. Pure.

Two things make a Pi forward faster without changing what it forwards:

- an nft *flowtable*: once a forwarded flow is established, its packets skip
  the forward and postrouting chains and go from one device's ingress straight
  to the other's transmit (software offload, nf_flow_table). Only flows meshpi
  accepted ever get there (core/nft.py adds them from `to_mesh`, on the reply);
- *UDP GRO forwarding* on the uplink (`rx-udp-gro-forwarding`, a netdev feature
  set through ethtool): WireGuard's UDP datagrams arriving there are merged
  before routing, as Tailscale recommends for Linux exit nodes.

The feature is changed and restored through the same bookkeeping as a sysctl
(kernel/sysctl.py keeps its value from before meshpi), under a key of its own
that no /proc/sys path can have: `ethtool.<device>.<feature>`.
"""

from __future__ import annotations

from collections.abc import Iterable

from appliance.core.model import HostFacts

FLOWTABLE = "fastpath"
UDP_GRO_FORWARDING = "rx-udp-gro-forwarding"
FEATURE_PREFIX = "ethtool."
ON, OFF = "on", "off"


def feature_key(dev: str, feature: str) -> str:
    return f"{FEATURE_PREFIX}{dev}.{feature}"


def parse_feature_key(key: str) -> tuple[str, str] | None:
    """(device, feature) of an `ethtool.<device>.<feature>` key; None for any other key.

    Device names may hold dots (a VLAN eth0.100); feature names never do."""
    if not key.startswith(FEATURE_PREFIX):
        return None
    dev, dot, feature = key[len(FEATURE_PREFIX) :].rpartition(".")
    if not dot or not dev or not feature:
        return None
    return dev, feature


def flowtable_devices(interface: str, facts: HostFacts, wanted: bool) -> tuple[str, ...]:
    """The devices of the flowtable (none: no flowtable): the mesh interface and
    every other device this node forwards between, the uplinks and the LANs."""
    if not wanted or not facts.flowtable:
        return ()
    others: Iterable[str] = (*facts.uplinks, *(c.dev for c in facts.connected))
    return (interface, *sorted({d for d in others if d != interface}))


def udp_gro_settings(facts: HostFacts, wanted: bool) -> dict[str, str]:
    """The feature keys to turn on: each uplink whose driver lets it be changed."""
    if not wanted:
        return {}
    return {feature_key(dev, UDP_GRO_FORWARDING): ON for dev in facts.udp_gro if dev in facts.uplinks}
