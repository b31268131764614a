"""kernel/rtnl.py and nlattrs.py without a kernel: the requests meshpi sends, as
pyroute2 decodes them (the kernel's reading), and the answers it reads, as pyroute2
encodes them (the kernel's writing). The round trips against the real kernel are
tests/netns/test_kernel_links.py."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from appliance.kernel.nlattrs import HEADER, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLMSG_ERROR, ask, attr
from appliance.kernel.rtnl import (
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    address_request,
    link_request,
    parse_address,
    parse_link,
    parse_route,
    route_request,
)


def kernel_reads(cls: Any, kind: int, body: bytes) -> Any:
    msg = cls(HEADER.pack(HEADER.size + len(body), kind, 0, 1, 0) + body)
    msg.decode()
    return msg


def kernel_writes(msg: Any) -> bytes:
    msg.encode()
    return bytes(msg.data[HEADER.size : msg["header"]["length"]])


def test_rtnl_route_request_names_a_large_table_in_its_attribute() -> None:
    body = route_request(socket.AF_INET, bytes([10, 7, 0, 0]), 16, 51820, 3, protocol=4, scope=253, kind=1)
    msg = kernel_reads(rtmsg, RTM_NEWROUTE, body)
    assert (msg["table"], msg.get_attr("RTA_TABLE")) == (252, 51820)
    assert (msg.get_attr("RTA_DST"), msg["dst_len"], msg.get_attr("RTA_OIF")) == ("10.7.0.0", 16, 3)
    assert (msg["proto"], msg["scope"], msg["type"]) == (4, 253, 1)
    default = kernel_reads(rtmsg, RTM_NEWROUTE, route_request(socket.AF_INET6, bytes(16), 0, 254, 3,
                                                              protocol=4, scope=0, kind=1))  # fmt: skip
    assert default.get_attr("RTA_DST") is None and default["table"] == 254


def test_rtnl_reads_a_multipath_default_route_and_its_hops() -> None:
    msg = rtmsg()
    msg.update(family=socket.AF_INET, dst_len=0, table=254, proto=3, scope=0, type=1)
    msg["attrs"] = [("RTA_TABLE", 254), ("RTA_MULTIPATH", [{"oif": 2}, {"oif": 5}])]
    route = parse_route(kernel_writes(msg))
    assert (route.dst, route.oif, route.hops, route.table, route.protocol) == (None, None, (2, 5), 254, 3)


def test_rtnl_link_request_and_a_link_read_back() -> None:
    sent = kernel_reads(ifinfmsg, RTM_NEWLINK, link_request(name="meshpi0", kind="wireguard"))
    assert sent.get_attr("IFLA_IFNAME") == "meshpi0"
    assert sent.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "wireguard"
    up = kernel_reads(ifinfmsg, RTM_NEWLINK, link_request(7, mtu=1280, up=True))
    assert (up["index"], up["flags"], up["change"], up.get_attr("IFLA_MTU")) == (7, 1, 1, 1280)
    answer = ifinfmsg()
    answer.update(index=4, family=0)
    answer["attrs"] = [("IFLA_IFNAME", "wg0"), ("IFLA_MTU", 1420),
                       ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "wireguard")]})]  # fmt: skip
    link = parse_link(kernel_writes(answer))
    assert (link.index, link.name, link.mtu, link.kind) == (4, "wg0", 1420, "wireguard")


def test_rtnl_ipv4_address_carries_its_local_end() -> None:
    sent = kernel_reads(
        ifaddrmsg, RTM_NEWADDR, address_request(3, socket.AF_INET, bytes([100, 64, 0, 1]), 10)
    )
    assert sent.get_attr("IFA_LOCAL") == sent.get_attr("IFA_ADDRESS") == "100.64.0.1"
    assert sent["prefixlen"] == 10
    answer = ifaddrmsg()
    answer.update(family=socket.AF_INET, prefixlen=32, index=3)
    answer["attrs"] = [
        ("IFA_ADDRESS", "10.0.0.2"),
        ("IFA_LOCAL", "10.0.0.1"),
    ]  # point-to-point: local is ours
    address = parse_address(kernel_writes(answer))
    assert address is not None and address.address == bytes([10, 0, 0, 1])


class _Answers:
    """A netlink socket stand-in that answers with prepared datagrams."""

    def __init__(self, *datagrams: bytes) -> None:
        self.datagrams = list(datagrams)

    def send(self, data: bytes) -> int:
        return len(data)

    def recv(self, _size: int) -> bytes:
        return self.datagrams.pop(0)


def _error(seq: int, code: int, flags: int, tlvs: bytes = b"") -> bytes:
    body = struct.pack("=i", -code) + HEADER.pack(HEADER.size, RTM_NEWROUTE, 0, seq, 0) + tlvs
    return HEADER.pack(HEADER.size + len(body), NLMSG_ERROR, flags, seq, 0) + body


def test_nlattrs_error_carries_the_kernels_reason_and_skips_stale_answers() -> None:
    reason = attr(1, b"Device for nexthop is not up\0")
    stale = _error(6, errno.EEXIST, 0)  # an earlier request's answer: not ours
    sock = _Answers(stale + _error(7, errno.ENETDOWN, NLM_F_CAPPED | NLM_F_ACK_TLVS, reason))
    with pytest.raises(OSError, match="nexthop is not up") as raised:
        list(ask(sock, RTM_NEWROUTE, 0, b"", seq=7))  # type: ignore[arg-type]
    assert raised.value.errno == errno.ENETDOWN
    plain = _Answers(_error(8, errno.EPERM, NLM_F_CAPPED))
    with pytest.raises(PermissionError, match="not permitted"):
        list(ask(plain, RTM_NEWROUTE, 0, b"", seq=8))  # type: ignore[arg-type]
