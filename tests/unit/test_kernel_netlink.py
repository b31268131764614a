"""Pure logic of appliance/kernel/netlink_msgs.py and rtnl.py: reading rules back from
netlink messages (encoded by pyroute2, as the kernel would send them) and the
requests that add them (decoded by pyroute2)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Network, IPv6Network

import pytest
from pyroute2.netlink.rtnl.fibmsg import fibmsg

from appliance.core.model import Rule
from appliance.kernel.netlink_msgs import parse_rule, rule_request_for
from appliance.kernel.rtnl import RuleEntry
from appliance.kernel.rtnl import parse_fib_rule as decode_rule

UNSET = 0xFFFFFFFF


def _msg(
    family: int = 2,
    flags: int = 0,
    action: int = 1,
    dst_len: int = 0,
    src_len: int = 0,
    **attrs: object,
) -> RuleEntry:
    msg = fibmsg()
    msg.update(
        family=family,
        flags=flags,
        action=action,
        dst_len=dst_len,
        src_len=src_len,
        tos=0,
        table=252,
    )
    msg["attrs"] = [(f"FRA_{k.upper()}", v) for k, v in attrs.items()]
    msg.encode()
    return decode_rule(bytes(msg.data[16 : msg["header"]["length"]]))  # without its nlmsghdr


@pytest.mark.parametrize(
    ("msg", "rule"),
    [
        (
            _msg(table=254, priority=5210, fwmark=0xCA6C, fwmask=UNSET, suppress_prefixlen=UNSET),
            Rule(5210, 4, 254, fwmark=0xCA6C),
        ),
        (
            _msg(family=10, dst_len=48, table=51820, priority=5230, dst="fd7a:115c:a1e0::"),
            Rule(5230, 6, 51820, dst=IPv6Network("fd7a:115c:a1e0::/48")),
        ),
        (
            _msg(table=254, priority=5250, suppress_prefixlen=0),
            Rule(5250, 4, 254, suppress_prefixlength=0),
        ),
        (
            _msg(flags=2, table=51820, priority=5270, fwmark=0xCA6C, fwmask=UNSET),
            Rule(5270, 4, 51820, fwmark=0xCA6C, invert=True),
        ),
        (
            _msg(dst_len=24, table=7, priority=5230, dst="10.77.0.0", protocol=4),
            Rule(5230, 4, 7, dst=IPv4Network("10.77.0.0/24")),
        ),
    ],
)
def test_netlink_parse_rule_shapes(msg: RuleEntry, rule: Rule) -> None:
    assert parse_rule(msg) == rule


@pytest.mark.parametrize(
    "rule",
    [
        Rule(5210, 4, 254, fwmark=0xCA6C),
        Rule(5230, 6, 51820, dst=IPv6Network("fd7a:115c:a1e0::/48")),
        Rule(5250, 4, 254, suppress_prefixlength=0),
        Rule(5270, 4, 51820, fwmark=0xCA6C, invert=True),
    ],
)
def test_netlink_rule_request_reads_back_as_the_rule(rule: Rule) -> None:
    """What add_rule sends, as pyroute2 decodes it, and as parse_rule reads it back."""
    body = rule_request_for(rule)
    msg = fibmsg(struct.pack("=IHHII", 16 + len(body), 32, 0, 0, 0) + body)  # RTM_NEWRULE, on the wire
    msg.decode()
    assert msg.get_attr("FRA_PRIORITY") == rule.priority and msg.get_attr("FRA_TABLE") == rule.table
    assert parse_rule(decode_rule(body)) == rule


@pytest.mark.parametrize(
    "msg",
    [
        _msg(family=128, table=253, priority=5210),  # ipmr: not v4/v6 routing
        _msg(action=6, priority=5210),  # blackhole, not "lookup"
        _msg(table=254, priority=5210, iifname="eth0"),  # a selector Rule has no field for
        _msg(src_len=8, table=254, priority=5210, src="10.0.0.0"),
        _msg(table=254, priority=5210, fwmark=1, fwmask=0xFF),  # not a full mask
    ],
)
def test_netlink_parse_rule_skips_what_rule_cannot_express(msg: RuleEntry) -> None:
    assert parse_rule(msg) is None
