"""Status's `dataplane`: the forwarding fast paths this node uses, and why not. Pure."""

from __future__ import annotations

from typing import Any

from appliance.core.model import HostFacts, State
from appliance.core.offload import FLOWTABLE, ON, UDP_GRO_FORWARDING, parse_feature_key


def dataplane_status(facts: HostFacts | None, state: State | None) -> dict[str, Any]:
    """uplinks; flowtable (in use) and flowtable_supported (by this kernel);
    udp_gro_forwarding (the uplinks it is on for) and udp_gro_capable."""
    text = state.nft.text if state is not None and state.nft is not None else ""
    sysctls = state.sysctls if state is not None else {}
    gro = sorted(
        parsed[0]
        for key, value in sysctls.items()
        if (parsed := parse_feature_key(key)) is not None and parsed[1] == UDP_GRO_FORWARDING and value == ON
    )
    return {
        "uplinks": list(facts.uplinks) if facts is not None else [],
        "flowtable": f"flowtable {FLOWTABLE} {{" in text,
        "flowtable_supported": facts.flowtable if facts is not None else None,
        "udp_gro_forwarding": gro,
        "udp_gro_capable": list(facts.udp_gro) if facts is not None else [],
    }
