"""`Route` and `Rule` in rtnetlink's terms: the kernel's constants, the arguments
pyroute2 is given to add or remove one, and `parse_rule`, which reads a rule back.

Apart from netlink.py (the socket, its errors and the calls) because this is pure
translation, testable without a kernel: reading back must give objects *equal*
to the ones that were added, or the reconciler would see a change every time.
"""

from __future__ import annotations

from ipaddress import ip_network
from socket import AF_INET, AF_INET6
from typing import Any

from appliance.base.net import IPNetwork
from appliance.core.model import Route, Rule

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

_FAMILIES = {AF_INET: 4, AF_INET6: 6}
_AF = {4: AF_INET, 6: AF_INET6}

# Rule attributes `Rule` can express; a rule carrying any other selector (iif,
# src, uid range, ports...) is not ours to diff and is skipped on read.
_RULE_ATTRS = frozenset(
    {
        "FRA_TABLE",
        "FRA_PRIORITY",
        "FRA_FWMARK",
        "FRA_FWMASK",
        "FRA_DST",
        "FRA_SUPPRESS_PREFIXLEN",
        "FRA_SUPPRESS_IFGROUP",
        "FRA_PROTOCOL",
        "FRA_PAD",
    }
)

Msg = Any  # pyroute2 messages are untyped dict-likes


def net_of(address: str | None, prefixlen: int, family: int) -> IPNetwork:
    if address is None:  # the kernel omits the destination of a default route
        address = "0.0.0.0" if family == AF_INET else "::"
    return ip_network(f"{address}/{prefixlen}")


def route_kwargs(route: Route, index: int) -> dict[str, Any]:
    return {
        "family": _AF[route.dst.version],
        "dst": str(route.dst),
        "oif": index,
        "table": route.table,
    }


def rule_kwargs(rule: Rule) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "family": _AF[rule.family],
        "priority": rule.priority,
        "table": rule.table,
        "action": FR_ACT_TO_TBL,
        "flags": FIB_RULE_INVERT if rule.invert else 0,
    }
    if rule.fwmark:
        kw.update(fwmark=rule.fwmark, fwmask=FULL_MASK)
    if rule.dst is not None:
        kw.update(dst=str(rule.dst.network_address), dst_len=rule.dst.prefixlen)
    if rule.suppress_prefixlength is not None:
        kw["suppress_prefixlen"] = rule.suppress_prefixlength
    return kw


def parse_rule(msg: Msg) -> Rule | None:
    """The `Rule` a RTM_NEWRULE message describes, or None if `Rule` cannot say it."""
    family = _FAMILIES.get(msg["family"])  # also drops the ipmr/ip6mr families
    if family is None or msg["action"] != FR_ACT_TO_TBL:
        return None
    attrs = {name for name, _ in msg["attrs"]}
    if attrs - _RULE_ATTRS or msg["src_len"] or msg["tos"]:
        return None
    fwmark = msg.get_attr("FRA_FWMARK") or 0
    if fwmark and msg.get_attr("FRA_FWMASK", FULL_MASK) != FULL_MASK:
        return None
    suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
    dst = None
    if msg["dst_len"]:
        dst = net_of(msg.get_attr("FRA_DST"), msg["dst_len"], msg["family"])
    return Rule(
        priority=msg.get_attr("FRA_PRIORITY") or 0,
        family=family,
        # Tables above 255 only fit in the attribute; the header field says 252.
        table=msg.get_attr("FRA_TABLE") or msg["table"],
        fwmark=fwmark,
        invert=bool(msg["flags"] & FIB_RULE_INVERT),
        dst=dst,
        suppress_prefixlength=None if suppress in (None, _UNSET_U32, -1) else suppress,
    )
