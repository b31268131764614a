"""Routes approved without an admin: for a node registered with a pre-auth key
tagged AUTO_APPROVE (the node carries its key's tags), whatever it advertises is
approved as it advertises it. Pure.

Why: a mesh created on the Pi (`POST /v1/mesh/create`) is the owner's own; the
owner already said "exit node" and "share the LAN" on the Pi's setup page, so the
Pi's login key carries the tag and nothing waits for the owner to approve their
own Pi (issue 16). An admin can hand out such keys on purpose too
(`meshpi-control keys create --tag meshpi:auto-approve-routes`), as headscale's
autoApprovers do. A route the node stops advertising stays approved but is not
served (peers get approved ∩ advertised); an admin's later narrowing is overridden
at the node's next advertisement, which is what the tag means.
"""

from __future__ import annotations

from collections.abc import Iterable

from appliance.base.net import IPNetwork
from appliance.core.model import sorted_networks

AUTO_APPROVE = "meshpi:auto-approve-routes"


def auto_approved(
    tags: Iterable[str], approved: Iterable[IPNetwork], advertised: Iterable[IPNetwork]
) -> tuple[IPNetwork, ...] | None:
    """The node's new approved set, or None when nothing changes (no tag, or
    everything advertised is approved already: no version bump for nothing)."""
    if AUTO_APPROVE not in tags:
        return None
    have = set(approved)
    new = set(advertised) - have
    return sorted_networks(have | new) if new else None
