"""The kernel's connection tracking, read only: which flows pass through this host.

Used for one question: who uses this node as exit node? A flow tracked with an
original source in the mesh and a destination outside the mesh and every private
range went out to the internet through here (agent/localapi/connected.py). The
netmap cannot tell: a peer's choice of exit node is its own and not announced.
"""

from __future__ import annotations

import logging
import socket
from ipaddress import ip_address

from appliance.base.net import IPAddress

log = logging.getLogger(__name__)

MAX_FLOWS = 65536  # a Pi's conntrack table holds fewer; a bound on one read's cost


def flows() -> list[tuple[IPAddress, IPAddress]]:
    """(original source, original destination) of every tracked flow, v4 and v6.
    Empty where conntrack is not there (no module: nothing was ever NATed)."""
    from pyroute2.conntrack import Conntrack

    found: list[tuple[IPAddress, IPAddress]] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            ct = Conntrack(nfgen_family=family)
        except OSError as e:
            log.debug("conntrack not readable: %s", e)
            return found
        try:
            for entry in ct.dump_entries():
                orig = entry.tuple_orig
                if orig.saddr and orig.daddr:
                    found.append((ip_address(orig.saddr), ip_address(orig.daddr)))
                if len(found) >= MAX_FLOWS:
                    break
        except (OSError, ValueError) as e:
            log.debug("conntrack dump failed: %s", e)
        finally:
            ct.close()
    return found
