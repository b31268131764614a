"""NAT-PMP (RFC 6886) and PCP (RFC 6887) codecs: round trips, strict refusals, garbage."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.wire import natpmp, pcp

NONCE = bytes(range(12))
PI = IPv4Address("192.168.77.2")


def _pcp_map_answer(result: int = 0, lifetime: int = 120, epoch: int = 7, external_port: int = 51820,
                    nonce: bytes = NONCE, options: bytes = b"") -> bytes:  # fmt: skip
    header = struct.pack("!BBBBII12s", 2, 129, 0, result, lifetime, epoch, bytes(12))
    payload = struct.pack("!12sB3sHH16s", nonce, 17, bytes(3), 51820, external_port,
                          pcp.encode_address(IPv4Address("5.5.5.1")))  # fmt: skip
    return header + payload + options


def test_natpmp_map_request_layout() -> None:
    assert natpmp.map_request("udp", 51820, 51820, 7200) == struct.pack(
        "!BBHHHI", 0, 1, 0, 51820, 51820, 7200
    )
    assert natpmp.map_request("tcp", 8080, 0, 60)[1] == 2
    assert natpmp.delete_request("udp", 51820) == struct.pack("!BBHHHI", 0, 1, 0, 51820, 0, 0)
    assert natpmp.external_address_request() == b"\x00\x00"


def test_natpmp_request_refuses_bad_values() -> None:
    with pytest.raises(natpmp.NatPmpError, match="internal port: 0"):
        natpmp.map_request("udp", 0, 1, 1)
    with pytest.raises(natpmp.NatPmpError, match="protocol: 'sctp'"):
        natpmp.map_request("sctp", 1, 1, 1)
    with pytest.raises(natpmp.NatPmpError, match="lifetime"):
        natpmp.map_request("udp", 1, 1, -1)


def test_natpmp_parses_answers() -> None:
    ext = natpmp.parse_response(struct.pack("!BBHI4s", 0, 128, 0, 99, bytes([5, 5, 5, 1])))
    assert ext == natpmp.ExternalAddress(99, IPv4Address("5.5.5.1"))
    mapped = natpmp.parse_response(struct.pack("!BBHIHHI", 0, 129, 0, 5, 51820, 40000, 3600))
    assert mapped == natpmp.MapResult("udp", 5, 51820, 40000, 3600)
    refused = natpmp.parse_response(struct.pack("!BBHI", 0, 129, 2, 5))
    assert refused == natpmp.Refusal(1, 2, 5) and refused.reason == "not authorized"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"\x00", "length"),
        (struct.pack("!BBHI4s", 1, 128, 0, 1, bytes(4)), "version"),
        (struct.pack("!BBHI4s", 0, 0, 0, 1, bytes(4)), "opcode"),
        (struct.pack("!BBHI4s", 0, 131, 0, 1, bytes(4)), "opcode"),
        (struct.pack("!BBHI4sB", 0, 128, 0, 1, bytes(4), 0), "length"),
        (struct.pack("!BBHIHHI", 0, 129, 0, 5, 0, 40000, 3600), "internal port"),
        (struct.pack("!BBHIHHI", 0, 129, 0, 5, 51820, 0, 3600), "external port"),
        (struct.pack("!BBHIHH", 0, 129, 0, 5, 51820, 1), "length"),
    ],
)
def test_natpmp_refuses_malformed_answers(data: bytes, field: str) -> None:
    with pytest.raises(natpmp.NatPmpError) as caught:
        natpmp.parse_response(data)
    assert caught.value.field == field
    assert repr(caught.value.value) in str(caught.value)


def test_natpmp_epoch_lost_on_reboot_and_on_a_slow_clock() -> None:
    assert not natpmp.epoch_lost(100.0, 1000, 110.0, 1010)
    assert natpmp.epoch_lost(100.0, 1000, 110.0, 3)  # went back: rebooted
    assert natpmp.epoch_lost(100.0, 1000, 200.0, 1010)  # 100 s for us, 10 for it: rebooted in between
    assert not natpmp.epoch_lost(100.0, 1000, 100.5, 1000)


def test_pcp_map_request_layout() -> None:
    req = pcp.map_request(NONCE, "udp", 51820, PI, 120, external_port=51820)
    assert len(req) == 60
    assert req[:2] == b"\x02\x01" and struct.unpack("!I", req[4:8])[0] == 120
    assert req[8:24] == bytes(10) + b"\xff\xff" + PI.packed
    assert req[24:36] == NONCE and req[36] == 17
    assert struct.unpack("!HH", req[40:44]) == (51820, 51820)
    assert req[44:60] == bytes(10) + b"\xff\xff" + bytes(4)  # no preferred external address
    assert len(pcp.announce_request(PI)) == 24


def test_pcp_request_refuses_bad_values() -> None:
    with pytest.raises(pcp.PcpError, match="nonce"):
        pcp.map_request(b"short", "udp", 1, PI, 1)
    with pytest.raises(pcp.PcpError, match="internal port: 70000"):
        pcp.map_request(NONCE, "udp", 70000, PI, 1)


def test_pcp_parses_map_answers_with_options() -> None:
    answer = pcp.parse_response(_pcp_map_answer(options=struct.pack("!BBH", 1, 0, 3) + b"abc\x00"))
    assert answer.ok and answer.lifetime == 120 and answer.epoch == 7
    assert answer.map == pcp.MapInfo(NONCE, 17, 51820, 51820, IPv4Address("5.5.5.1"))
    refused = pcp.parse_response(_pcp_map_answer(result=2)[:24])
    assert not refused.ok and refused.reason == "not authorized" and refused.map is None


def test_pcp_addresses_round_trip() -> None:
    for address in (IPv4Address("5.5.5.1"), IPv6Address("2001:db8::1")):
        assert pcp.decode_address(pcp.encode_address(address)) == address


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_pcp_map_answer()[:30], "length"),
        (_pcp_map_answer()[:59], "length"),
        (_pcp_map_answer() + b"\x01\x00\x00\x09", "option 1 length"),
        (_pcp_map_answer() + b"\x01\x00", "length"),
        (_pcp_map_answer(external_port=0), "assigned external port"),
        (bytes([2, 1]) + _pcp_map_answer()[2:], "opcode"),
        (_pcp_map_answer() + bytes(1100), "length"),
    ],
)
def test_pcp_refuses_malformed_answers(data: bytes, field: str) -> None:
    with pytest.raises(pcp.PcpError) as caught:
        pcp.parse_response(data)
    assert caught.value.field == field


def test_pcp_says_when_the_gateway_speaks_only_natpmp() -> None:
    with pytest.raises(pcp.PcpVersionMismatch) as caught:
        pcp.parse_response(struct.pack("!BBHI", 0, 129, 1, 5))
    assert caught.value.value == 0


# Garbage: whatever arrives, the only exception is the codec's own error.
_garbage = st.one_of(
    st.binary(max_size=1200),
    st.binary(min_size=8, max_size=16).map(lambda b: b"\x00" + bytes([b[0] | 0x80]) + b[2:]),
    st.binary(min_size=22, max_size=120).map(lambda b: b"\x02" + bytes([b[0] | 0x80]) + b[2:]),
    st.binary(max_size=64).map(lambda b: _pcp_map_answer() + b),
)


@settings(max_examples=2500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_garbage)
def test_natpmp_garbage_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(natpmp.NatPmpError):
        natpmp.parse_response(data)


@settings(max_examples=2500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_garbage)
def test_pcp_garbage_raises_only_its_error(data: bytes) -> None:
    with contextlib.suppress(pcp.PcpError):
        pcp.parse_response(data)
