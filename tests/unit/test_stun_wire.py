"""STUN Binding codec (appliance/wire/stun.py): round trips, RFC 5769 test vectors,
and random or mangled datagrams, which must only ever raise StunError."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.base.net import Endpoint
from appliance.wire import stun

TXID = bytes(range(12))

# RFC 5769 2.2 and 2.3: sample IPv4 and IPv6 responses (they carry MESSAGE-INTEGRITY,
# which we skip, and a FINGERPRINT, which we check).
RFC5769_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
RFC5769_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf1"
    "1784c97c8292c275bfe3ed4180280004c8fb0b4c"
)
RFC5769_TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def ep(text: str, port: int) -> Endpoint:
    return Endpoint(ip_address(text), port)


def test_stun_rfc5769_ipv4_response() -> None:
    assert stun.parse_response(RFC5769_V4, RFC5769_TXID) == ep("192.0.2.1", 32853)
    assert stun.parse(RFC5769_V4).software == "test vector"


def test_stun_rfc5769_ipv6_response() -> None:
    assert stun.parse_response(RFC5769_V6, RFC5769_TXID) == ep("2001:db8:1234:5678:11:2233:4455:6677", 32853)


def test_stun_fingerprint_mismatch_is_refused() -> None:
    bad = RFC5769_V4[:-1] + bytes([RFC5769_V4[-1] ^ 1])
    with pytest.raises(stun.StunError, match="FINGERPRINT"):
        stun.parse(bad)


def test_stun_request_round_trip_and_padding() -> None:
    req = stun.binding_request(TXID, software="meshpi", size=64)
    assert len(req) >= 64 and len(req) % 4 == 0
    msg = stun.parse_request(req)
    assert (msg.type, msg.transaction_id, msg.fingerprint) == (1, TXID, True)
    assert msg.software is not None and msg.software.rstrip() == "meshpi"
    assert [t for t, _ in msg.attributes] == [stun.ATTR_SOFTWARE]  # no PADDING: coturn would echo it
    assert len(stun.binding_request(TXID)) == 28  # header + FINGERPRINT


@pytest.mark.parametrize("size", range(0, 80))
def test_stun_request_padding_reaches_every_size(size: int) -> None:
    req = stun.binding_request(TXID, software="x", size=size)
    assert len(req) >= size
    assert len(req) < max(size, 36) + 4  # never much more than asked
    stun.parse_request(req)


@pytest.mark.parametrize("where", [ep("203.0.113.7", 51820), ep("2001:db8::7", 1), ep("0.0.0.0", 65535)])
@pytest.mark.parametrize("fingerprint", [True, False])
def test_stun_response_round_trip(where: Endpoint, fingerprint: bool) -> None:
    data = stun.binding_response(TXID, where, "meshpi", fingerprint)
    assert len(data) == stun.response_size(where, "meshpi", fingerprint)
    assert stun.parse_response(data, TXID) == where


def test_stun_mapped_address_fallback() -> None:
    value = struct.pack("!BBH", 0, 1, 4242) + IPv4Address("198.51.100.1").packed
    data = stun.encode(stun.BINDING_SUCCESS, TXID, [(stun.ATTR_MAPPED_ADDRESS, value)])
    assert stun.parse_response(data, TXID) == ep("198.51.100.1", 4242)


def test_stun_xor_mapped_preferred_over_mapped() -> None:
    plain = struct.pack("!BBH", 0, 1, 1) + IPv4Address("10.0.0.1").packed
    xored = stun.xor_address(ep("198.51.100.1", 51820), TXID)
    data = stun.encode(stun.BINDING_SUCCESS, TXID,
                       [(stun.ATTR_MAPPED_ADDRESS, plain), (stun.ATTR_XOR_MAPPED_ADDRESS, xored)])  # fmt: skip
    assert stun.parse_response(data, TXID) == ep("198.51.100.1", 51820)


def test_stun_response_refusals_say_why() -> None:
    good = stun.binding_response(TXID, ep("192.0.2.1", 1))
    with pytest.raises(stun.StunError, match="not ours"):
        stun.parse_response(good, bytes(12))
    err = stun.encode(stun.BINDING_ERROR, TXID, [(stun.ATTR_ERROR_CODE, b"\0\0\x04\x14Unknown")])
    with pytest.raises(stun.StunError, match="420 Unknown"):
        stun.parse_response(err, TXID)
    empty = stun.encode(stun.BINDING_SUCCESS, TXID, [])
    with pytest.raises(stun.StunError, match="neither"):
        stun.parse_response(empty, TXID)
    unknown = stun.encode(stun.BINDING_SUCCESS, TXID, [(0x7777, b"")])
    with pytest.raises(stun.StunError, match="0x7777"):
        stun.parse_response(unknown, TXID)
    with pytest.raises(stun.StunError, match="not a Binding request"):
        stun.parse_request(good)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "shorter than a STUN header"),
        (b"\x00\x01\x00\x00!\x12\xa4B" + bytes(11), "shorter"),
        (b"\xc0\x01\x00\x00!\x12\xa4B" + bytes(12), "top two bits"),
        (b"\x00\x01\x00\x00\x00\x00\x00\x00" + bytes(12), "magic cookie"),
        (b"\x00\x01\x00\x02!\x12\xa4B" + bytes(12), "multiple of 4"),
        (b"\x00\x01\x00\x04!\x12\xa4B" + bytes(12), "carries 0"),
        (b"\x00\x01\x00\x04!\x12\xa4B" + bytes(12) + b"\x00\x20\x00\x08", "runs past"),
        (b"\x00\x01\x00\x08!\x12\xa4B" + bytes(12) + b"\x80\x28\x00\x02\0\0\0\0", "must be 4"),
        (bytes(2000), "larger than"),
    ],
)
def test_stun_parse_garbage_names_the_fault(data: bytes, why: str) -> None:
    with pytest.raises(stun.StunError, match=why):
        stun.parse(data)


def test_stun_attribute_after_fingerprint_refused() -> None:
    data = stun.binding_request(TXID)
    tail = b"\x80\x22\x00\x00"
    data = data[:2] + struct.pack("!H", len(data) - 20 + 4) + data[4:] + tail
    with pytest.raises(stun.StunError, match="FINGERPRINT"):
        stun.parse(data)


@pytest.mark.parametrize(
    "value",
    [b"", b"\0\1\0", b"\0\3\0\0\0\0\0\0", b"\0\1\0\0\0\0\0", b"\0\2\0\0" + bytes(4), b"\0\1\0\0" + bytes(16)],
)
def test_stun_bad_addresses_refused(value: bytes) -> None:
    with pytest.raises(stun.StunError, match="MAPPED-ADDRESS"):
        stun.decode_address(value, TXID)


def test_stun_looks_like_stun() -> None:
    assert stun.looks_like_stun(stun.binding_request(TXID))
    assert not stun.looks_like_stun(b"\x01\x00\x00\x00" + bytes(144))  # a WireGuard initiation
    assert not stun.looks_like_stun(b"\x00\x01\x00\x08" + bytes(24))  # RFC 3489: no cookie


def _only_stun_errors(data: bytes) -> None:
    for call in (stun.parse, stun.parse_request, lambda d: stun.parse_response(d, TXID)):
        with contextlib.suppress(stun.StunError):
            call(data)
    stun.looks_like_stun(data)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=1400))
def test_stun_random_bytes_only_raise_stun_error(data: bytes) -> None:
    _only_stun_errors(data)


_attr = st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=40))


@settings(max_examples=1500, deadline=None)
@given(
    kind=st.integers(0, 0x3FFF),
    attrs=st.lists(_attr, max_size=6),
    fingerprint=st.booleans(),
    cut=st.integers(0, 400),
    flip=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=3),
    length_delta=st.integers(-8, 8),
)
def test_stun_mangled_messages_only_raise_stun_error(
    kind: int, attrs: list[tuple[int, bytes]], fingerprint: bool, cut: int,
    flip: list[tuple[int, int]], length_delta: int,
) -> None:  # fmt: skip
    """Well-formed messages, then cut, bit-flipped and given wrong lengths: garbage that
    gets past the cheap checks, which random bytes rarely do."""
    data = bytearray(stun.encode(kind, TXID, attrs, fingerprint=fingerprint))
    _only_stun_errors(bytes(data))
    for pos, mask in flip:
        if pos < len(data):
            data[pos] ^= mask
    length = max(0, struct.unpack_from("!H", data, 2)[0] + length_delta)
    struct.pack_into("!H", data, 2, length & 0xFFFF)
    _only_stun_errors(bytes(data[: max(cut, 20)]))
    _only_stun_errors(bytes(data))


@settings(max_examples=500, deadline=None)
@given(
    host=st.one_of(
        st.builds(IPv4Address, st.integers(0, 2**32 - 1)), st.builds(IPv6Address, st.integers(0, 2**128 - 1))
    ),  # fmt: skip
    port=st.integers(0, 65535),
    txid=st.binary(min_size=12, max_size=12),
    software=st.one_of(st.none(), st.text(max_size=60)),
)
def test_stun_response_round_trips_any_address(
    host: IPv4Address | IPv6Address, port: int, txid: bytes, software: str | None
) -> None:
    where = Endpoint(host, port)
    data = stun.binding_response(txid, where, software)
    assert stun.parse_response(data, txid) == where
