"""`Route` and `Rule` in rtnetlink's terms: the kernel's constants, the requests
that add or remove one (rtnl.py's encoders), and `parse_rule`, which reads a rule
back.

Apart from netlink.py (the socket, its errors and the calls) because this is pure
translation, testable without a kernel: reading back must give objects *equal*
to the ones that were added, or the reconciler would see a change every time.
"""

from __future__ import annotations

import struct
from ipaddress import ip_address, ip_network
from socket import AF_INET, AF_INET6

from appliance.base.net import IPInterface, IPNetwork
from appliance.core.model import Route, Rule
from appliance.kernel.rtnl import (
    FRA_DST,
    FRA_FWMARK,
    FRA_FWMASK,
    FRA_PAD,
    FRA_PRIORITY,
    FRA_PROTOCOL,
    FRA_SUPPRESS_IFGROUP,
    FRA_SUPPRESS_PREFIXLEN,
    FRA_TABLE,
    RuleEntry,
    address_request,
    route_request,
    rule_request,
)

# Kernel constants (linux/rtnetlink.h, linux/fib_rules.h, linux/if_addr.h).
RTPROT_KERNEL = 2
RTPROT_STATIC = 4
RTN_UNICAST = 1
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
IFA_F_NODAD = 0x2
FULL_MASK = 0xFFFFFFFF
# An unset FRA_SUPPRESS_PREFIXLEN is reported as (u32)-1.
_UNSET_U32 = 0xFFFFFFFF

_FAMILIES: dict[int, int] = {AF_INET: 4, AF_INET6: 6}
_AF = {4: AF_INET, 6: AF_INET6}

# Rule attributes `Rule` can express; a rule carrying any other selector (iif,
# src, uid range, ports...) is not ours to diff and is skipped on read.
_RULE_ATTRS = frozenset(
    {
        FRA_TABLE,
        FRA_PRIORITY,
        FRA_FWMARK,
        FRA_FWMASK,
        FRA_DST,
        FRA_SUPPRESS_PREFIXLEN,
        FRA_SUPPRESS_IFGROUP,
        FRA_PROTOCOL,
        FRA_PAD,
    }
)


def net_of(address: bytes | None, prefixlen: int, family: int) -> IPNetwork:
    if address is None:  # the kernel omits the destination of a default route
        address = bytes(4 if family == AF_INET else 16)
    return ip_network((ip_address(address), prefixlen))


def address_request_for(index: int, address: IPInterface, flags: int = 0) -> bytes:
    return address_request(index, _AF[address.version], address.ip.packed, address.network.prefixlen, flags)


def route_request_for(route: Route, index: int, *, protocol: int, scope: int, kind: int) -> bytes:
    """The request that adds or removes `route` via interface `index`."""
    return route_request(_AF[route.dst.version], route.dst.network_address.packed, route.dst.prefixlen,
                         route.table, index, protocol=protocol, scope=scope, kind=kind)  # fmt: skip


def rule_request_for(rule: Rule) -> bytes:
    return rule_request(
        _AF[rule.family],
        rule.priority,
        rule.table,
        FR_ACT_TO_TBL,
        FIB_RULE_INVERT if rule.invert else 0,
        fwmark=(rule.fwmark, FULL_MASK) if rule.fwmark else None,
        dst=None if rule.dst is None else (rule.dst.network_address.packed, rule.dst.prefixlen),
        suppress_prefixlen=rule.suppress_prefixlength,
    )


def _u32(entry: RuleEntry, kind: int) -> int | None:
    raw = entry.attrs.get(kind)
    return None if raw is None or len(raw) < 4 else int(struct.unpack_from("=I", raw)[0])


def parse_rule(entry: RuleEntry) -> Rule | None:
    """The `Rule` a RTM_NEWRULE message describes, or None if `Rule` cannot say it."""
    family = _FAMILIES.get(entry.family)  # also drops the ipmr/ip6mr families
    if family is None or entry.action != FR_ACT_TO_TBL:
        return None
    if set(entry.attrs) - _RULE_ATTRS or entry.src_len or entry.tos:
        return None
    fwmark = _u32(entry, FRA_FWMARK) or 0
    mask = _u32(entry, FRA_FWMASK)
    if fwmark and mask is not None and mask != FULL_MASK:
        return None
    suppress = _u32(entry, FRA_SUPPRESS_PREFIXLEN)
    dst = None
    if entry.dst_len:
        dst = net_of(entry.attrs.get(FRA_DST), entry.dst_len, entry.family)
    return Rule(
        priority=_u32(entry, FRA_PRIORITY) or 0,
        family=family,
        table=entry.table,
        fwmark=fwmark,
        invert=bool(entry.flags & FIB_RULE_INVERT),
        dst=dst,
        suppress_prefixlength=None if suppress in (None, _UNSET_U32) else suppress,
    )
