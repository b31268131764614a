"""STUN Binding (RFC 5389) on the wire: build and parse requests and responses.

Pure: bytes in, typed values out. Everything that comes from the network goes
through `parse`, which checks every length against the bytes actually there and
raises `StunError` (a ValueError) for anything else: a caller that catches
StunError has caught every way a datagram can be wrong.

Only what endpoint discovery needs: Binding requests and answers, XOR-MAPPED-ADDRESS
(MAPPED-ADDRESS from old servers as a fallback), SOFTWARE, FINGERPRINT (checked when
present, never required), and MESSAGE-INTEGRITY-SHA256 (RFC 8489 14.6) for the
peers' connectivity checks (reach/checkcore.py): `encode(..., integrity=key)` and
`integrity_ok`. No long-term credentials,
no TURN, no classic RFC 3489 messages (they lack the magic cookie and are refused).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import zlib
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from appliance.base.net import Endpoint

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
TXID_LEN = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_REALM = 0x0014
ATTR_NONCE = 0x0015
ATTR_MESSAGE_INTEGRITY_SHA256 = 0x001C  # RFC 8489: HMAC-SHA256, 32 bytes here
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_PADDING = 0x0026  # RFC 5780: known, never sent (see binding_request)
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028

# Comprehension-required attributes (< 0x8000) we know: anything else of that range
# makes a response unusable (RFC 5389 7.3.3); comprehension-optional ones are skipped.
_CHANGE_REQUEST = 0x0003  # RFC 5780: clients send it; we never honour it
_KNOWN_REQUIRED = frozenset(
    {ATTR_MAPPED_ADDRESS, ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, ATTR_ERROR_CODE, ATTR_UNKNOWN_ATTRIBUTES,
     ATTR_REALM, ATTR_NONCE, ATTR_XOR_MAPPED_ADDRESS, ATTR_PADDING, _CHANGE_REQUEST,
     ATTR_MESSAGE_INTEGRITY_SHA256}
)  # fmt: skip
_FINGERPRINT_XOR = 0x5354554E
_FINGERPRINT_LEN = 8  # the whole attribute: type, length, CRC
INTEGRITY_LEN = 32  # HMAC-SHA256, never truncated
_INTEGRITY_ATTR_LEN = 4 + INTEGRITY_LEN
MAX_SOFTWARE = 763  # bytes: RFC 5389 15.10 (fewer than 128 characters)
MAX_MESSAGE = 1280  # what fits one IPv6 minimum-MTU datagram is all we accept

_HEADER = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")


class StunError(ValueError):
    """A datagram that is not the STUN message it should be; says what and where."""


@dataclass(frozen=True)
class Message:
    type: int
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...]  # (type, value), in order, FINGERPRINT left out
    fingerprint: bool = False  # the message carried a FINGERPRINT (already checked)

    def attribute(self, kind: int) -> bytes | None:
        """The first attribute of that type; RFC 5389 says later duplicates are ignored."""
        for t, value in self.attributes:
            if t == kind:
                return value
        return None

    @property
    def software(self) -> str | None:
        value = self.attribute(ATTR_SOFTWARE)
        return None if value is None else value.decode("utf-8", errors="replace")


def new_transaction_id() -> bytes:
    """96 random bits: unguessable, so an off-path sender cannot forge our answer."""
    return secrets.token_bytes(TXID_LEN)


def looks_like_stun(data: bytes) -> bool:
    """The cheap test a demultiplexer uses (RFC 5389 7.3): header size, the top two
    bits zero, the magic cookie, a length that is a multiple of 4. Not a full parse."""
    if len(data) < HEADER_LEN or data[0] & 0xC0:
        return False
    length, cookie = struct.unpack_from("!HI", data, 2)
    return bool(cookie == MAGIC_COOKIE and length % 4 == 0)


# -- building --------------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    return _ATTR.pack(kind, len(value)) + value + b"\0" * (-len(value) % 4)


def _check_txid(transaction_id: bytes) -> None:
    if len(transaction_id) != TXID_LEN:
        raise StunError(f"transaction id {transaction_id.hex()!r}: must be {TXID_LEN} bytes")


def encode(
    kind: int,
    transaction_id: bytes,
    attributes: list[tuple[int, bytes]],
    *,
    fingerprint: bool = True,
    integrity: bytes | None = None,
) -> bytes:
    """One message; MESSAGE-INTEGRITY-SHA256 (keyed by `integrity`, if given)
    covers the attributes before it, the FINGERPRINT (if asked) everything before it."""
    _check_txid(transaction_id)
    body = b"".join(_attr(t, v) for t, v in attributes)
    if integrity is not None:
        # RFC 8489 14.6: the header's length counts up to the end of this attribute.
        head = _HEADER.pack(kind, len(body) + _INTEGRITY_ATTR_LEN, MAGIC_COOKIE, transaction_id)
        body += _attr(ATTR_MESSAGE_INTEGRITY_SHA256, hmac.digest(integrity, head + body, hashlib.sha256))
    extra = _FINGERPRINT_LEN if fingerprint else 0
    head = _HEADER.pack(kind, len(body) + extra, MAGIC_COOKIE, transaction_id)
    if not fingerprint:
        return head + body
    crc = (zlib.crc32(head + body) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
    return head + body + _attr(ATTR_FINGERPRINT, struct.pack("!I", crc))


def integrity_ok(data: bytes, key: bytes) -> bool:
    """True when `data` (a message `parse` accepted) carries a MESSAGE-INTEGRITY-SHA256
    that `key` made, followed by nothing but a FINGERPRINT. Compared in constant time."""
    offset = HEADER_LEN
    while offset + 4 <= len(data):
        t, n = _ATTR.unpack_from(data, offset)
        if t == ATTR_MESSAGE_INTEGRITY_SHA256:
            end = offset + 4 + n
            rest = len(data) - end
            if n != INTEGRITY_LEN or rest not in (0, _FINGERPRINT_LEN):
                return False
            if rest and _ATTR.unpack_from(data, end)[0] != ATTR_FINGERPRINT:
                return False
            head = data[:2] + struct.pack("!H", end - HEADER_LEN) + data[4:HEADER_LEN]
            want = hmac.digest(key, head + data[HEADER_LEN:offset], hashlib.sha256)
            return hmac.compare_digest(want, data[offset + 4 : end])
        offset += 4 + n + (-n % 4)
    return False


def binding_request(transaction_id: bytes, software: str | None = None, size: int = 0) -> bytes:
    """A Binding request of at least `size` bytes, its SOFTWARE padded with spaces.

    The size lets a server that never answers with more than it was asked (ours)
    afford a full answer. Not RFC 5780's PADDING: servers that know it (coturn) pad
    their answer to match, up to a whole MTU."""
    text = software or ""
    plain = HEADER_LEN + 4 + len(text.encode()) + _FINGERPRINT_LEN
    if size > plain:
        text += " " * (size - plain)
    attrs = [(ATTR_SOFTWARE, _software(text))] if text else []
    return encode(BINDING_REQUEST, transaction_id, attrs)


def _software(text: str) -> bytes:
    value = text.encode()
    if len(value) > MAX_SOFTWARE:
        raise StunError(f"SOFTWARE {text[:40]!r}...: {len(value)} bytes, at most {MAX_SOFTWARE}")
    return value


def xor_address(mapped: Endpoint, transaction_id: bytes) -> bytes:
    """The value of an XOR-MAPPED-ADDRESS attribute."""
    _check_txid(transaction_id)
    port = mapped.port ^ (MAGIC_COOKIE >> 16)
    if isinstance(mapped.host, IPv4Address):
        addr = int(mapped.host) ^ MAGIC_COOKIE
        return struct.pack("!BBHI", 0, 1, port, addr)
    mask = int.from_bytes(struct.pack("!I", MAGIC_COOKIE) + transaction_id, "big")
    return struct.pack("!BBH", 0, 2, port) + (int(mapped.host) ^ mask).to_bytes(16, "big")


def binding_response(
    transaction_id: bytes, mapped: Endpoint, software: str | None = None, fingerprint: bool = True
) -> bytes:
    attrs = [(ATTR_XOR_MAPPED_ADDRESS, xor_address(mapped, transaction_id))]
    if software is not None:
        attrs.append((ATTR_SOFTWARE, _software(software)))
    return encode(BINDING_SUCCESS, transaction_id, attrs, fingerprint=fingerprint)


def response_size(mapped: Endpoint, software: str | None, fingerprint: bool) -> int:
    """What binding_response would weigh, without building it."""
    size = HEADER_LEN + (12 if isinstance(mapped.host, IPv4Address) else 24)
    if software is not None:
        n = len(software.encode())
        size += 4 + n + (-n % 4)
    return size + (_FINGERPRINT_LEN if fingerprint else 0)


# -- parsing ---------------------------------------------------------------------


def parse(data: bytes) -> Message:
    """Any STUN message, every length checked; FINGERPRINT checked when present."""
    if len(data) < HEADER_LEN:
        raise StunError(f"{len(data)} bytes: shorter than a STUN header ({HEADER_LEN})")
    if len(data) > MAX_MESSAGE:
        raise StunError(f"{len(data)} bytes: larger than {MAX_MESSAGE}, not a Binding message")
    kind, length, cookie, txid = _HEADER.unpack_from(data)
    if kind & 0xC000:
        raise StunError(f"message type 0x{kind:04x}: top two bits set, not STUN")
    if cookie != MAGIC_COOKIE:
        raise StunError(f"magic cookie 0x{cookie:08x}: expected 0x{MAGIC_COOKIE:08x}")
    if length % 4:
        raise StunError(f"message length {length}: not a multiple of 4")
    if length != len(data) - HEADER_LEN:
        raise StunError(f"message length {length}: the datagram carries {len(data) - HEADER_LEN}")
    attrs: list[tuple[int, bytes]] = []
    offset, fingerprint = HEADER_LEN, False
    while offset < len(data):
        if fingerprint:
            raise StunError(f"attribute at offset {offset}: after FINGERPRINT, which must be last")
        if len(data) - offset < 4:
            raise StunError(f"attribute at offset {offset}: {len(data) - offset} bytes, no room for a header")
        t, n = _ATTR.unpack_from(data, offset)
        end = offset + 4 + n
        if end + (-n % 4) > len(data):
            raise StunError(f"attribute 0x{t:04x} at offset {offset}: length {n} runs past the message")
        if t == ATTR_FINGERPRINT:
            _check_fingerprint(data, offset, n)
            fingerprint = True
        else:
            attrs.append((t, data[offset + 4 : end]))
        offset = end + (-n % 4)
    return Message(kind, txid, tuple(attrs), fingerprint)


def _check_fingerprint(data: bytes, offset: int, n: int) -> None:
    if n != 4:
        raise StunError(f"FINGERPRINT length {n}: must be 4")
    (got,) = struct.unpack_from("!I", data, offset + 4)
    want = (zlib.crc32(data[:offset]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
    if got != want:
        raise StunError(f"FINGERPRINT 0x{got:08x}: the message's CRC says 0x{want:08x}")


def parse_request(data: bytes) -> Message:
    """A Binding request, as a server sees it."""
    msg = parse(data)
    if msg.type != BINDING_REQUEST:
        raise StunError(f"message type 0x{msg.type:04x}: not a Binding request (0x0001)")
    software = msg.attribute(ATTR_SOFTWARE)
    if software is not None and len(software) > MAX_SOFTWARE:
        raise StunError(f"SOFTWARE: {len(software)} bytes, at most {MAX_SOFTWARE}")
    return msg


def parse_response(data: bytes, transaction_id: bytes) -> Endpoint:
    """The reflexive address from the answer to our request `transaction_id`."""
    msg = parse(data)
    if msg.transaction_id != transaction_id:
        raise StunError(f"transaction id {msg.transaction_id.hex()}: not ours ({transaction_id.hex()})")
    if msg.type == BINDING_ERROR:
        raise StunError(f"the server refused the Binding request: {_error_text(msg)}")
    if msg.type != BINDING_SUCCESS:
        raise StunError(f"message type 0x{msg.type:04x}: not a Binding success response (0x0101)")
    for t, _ in msg.attributes:
        if t < 0x8000 and t not in _KNOWN_REQUIRED:
            raise StunError(f"attribute 0x{t:04x}: comprehension-required and unknown to us")
    xored = msg.attribute(ATTR_XOR_MAPPED_ADDRESS)
    if xored is not None:
        return decode_address(xored, transaction_id)
    plain = msg.attribute(ATTR_MAPPED_ADDRESS)
    if plain is not None:
        return decode_address(plain, None)
    raise StunError("Binding response: neither XOR-MAPPED-ADDRESS nor MAPPED-ADDRESS")


def decode_address(value: bytes, transaction_id: bytes | None) -> Endpoint:
    """(XOR-)MAPPED-ADDRESS: XORed with the cookie (and txid) when transaction_id is given."""
    name = "MAPPED-ADDRESS" if transaction_id is None else "XOR-MAPPED-ADDRESS"
    if len(value) < 4:
        raise StunError(f"{name}: {len(value)} bytes, too short")
    _, family, port = struct.unpack_from("!BBH", value)
    raw = value[4:]
    if family == 1 and len(raw) == 4:
        addr = int.from_bytes(raw, "big")
        if transaction_id is not None:
            addr ^= MAGIC_COOKIE
        host: IPv4Address | IPv6Address = IPv4Address(addr)
    elif family == 2 and len(raw) == 16:
        addr = int.from_bytes(raw, "big")
        if transaction_id is not None:
            addr ^= int.from_bytes(struct.pack("!I", MAGIC_COOKIE) + transaction_id, "big")
        host = IPv6Address(addr)
    else:
        raise StunError(f"{name}: family {family} with a {len(raw)}-byte address (want 1/4 or 2/16)")
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
    return Endpoint(host, port)


def _error_text(msg: Message) -> str:
    value = msg.attribute(ATTR_ERROR_CODE)
    if value is None or len(value) < 4:
        return "no ERROR-CODE"
    code = (value[2] & 0x7) * 100 + value[3]
    return f"{code} {value[4:].decode('utf-8', errors='replace')}".strip()
