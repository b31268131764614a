"""The pure parts of the STUN prober (appliance/kernel/stun.py): the UDP datagram it
writes by hand and the classic BPF program it attaches."""

from __future__ import annotations

import struct
from ipaddress import ip_address

from appliance.base.net import Endpoint
from appliance.kernel import stun as kstun


def _ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_kernel_stun_udp_checksum_verifies() -> None:
    """What a receiver checks (RFC 768): the sum over pseudo-header and datagram is all ones."""
    src = Endpoint(ip_address("192.168.77.2"), 51820)
    dst = Endpoint(ip_address("203.0.113.10"), 3478)
    for payload in (b"", b"x", b"hello stun" * 7, bytes(63)):
        datagram = kstun.udp_datagram(src, dst, payload)
        sport, dport, length, checksum = struct.unpack_from("!HHHH", datagram)
        assert (sport, dport, length) == (51820, 3478, 8 + len(payload))
        assert checksum != 0
        pseudo = src.host.packed + dst.host.packed + struct.pack("!BBH", 0, 17, length)
        assert _ones_complement_sum(pseudo + datagram) == 0xFFFF


def test_kernel_stun_ipv6_checksum_left_to_the_kernel() -> None:
    src, dst = Endpoint(ip_address("2001:db8:1::2"), 51820), Endpoint(ip_address("2001:db8::10"), 3478)
    assert kstun.udp_datagram(src, dst, b"abcd")[6:8] == b"\0\0"  # IPV6_CHECKSUM fills it in


def test_kernel_stun_filter_jumps_stay_inside_the_program() -> None:
    for family in (2, 10):
        program = kstun.stun_filter(family, 51820)
        for i, (code, jt, jf, _) in enumerate(program):
            if code == 0x15:
                assert i + 1 + max(jt, jf) < len(program)
        assert program[-1] == (0x06, 0, 0, 0) and program[-2] == (0x06, 0, 0, 0xFFFF)
