"""The sealed transport of the control protocol (PROTOCOL.md, "Sealed requests").

Pure: no I/O, no clock. Both ends use it: the agent seals requests and opens
answers, the server opens requests and seals answers.

    request body   0x01 | machine public key (32) | nonce (24) | Box ciphertext
    answer body    nonce (24) | Box ciphertext

A request's plaintext always names its op (so a sealed request cannot be posted
to another op's URL) and an answer's always carries `re`, the request's nonce (so
an answer cannot be replayed to another request, nor a request reflected back as
an answer: the Box is the same both ways).

A private key never prints itself, as in core/keys.py: its repr names only the
public half. Errors quote what was wrong, never a key's secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, TypeVar

from nacl.exceptions import CryptoError
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey
from nacl.public import PublicKey as NaclPublicKey

from appliance.wire import mapzip

VERSION = 1
KEY_LEN = 32
NONCE_LEN = Box.NONCE_SIZE  # 24
MAC_LEN = 16
MAX_BODY = 1 << 20  # 1 MiB, the largest request the server reads (413 beyond)
# The nonce's last 8 bytes number the requests of a session (1, 2, ...), so the
# server can refuse replays with a fixed-size window instead of remembering every
# nonce; the first 16 are random, so nonces never repeat under the Box's key.
NONCE_RANDOM = 16
HEADER = 1 + KEY_LEN
MIN_REQUEST = HEADER + NONCE_LEN + MAC_LEN
# Curve25519's field prime: a public key (the u-coordinate, little-endian) at or
# above it, or with bit 255 set, is a non-canonical spelling of another key.
# X25519 ignores bit 255, so without this check one machine would have two identities.
_P = 2**255 - 19


# -- errors ----------------------------------------------------------------------


class SealError(Exception):
    """Bad sealed input. `status` is the HTTP answer; `message` is safe to send."""

    status: ClassVar[int] = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Malformed(SealError, ValueError):
    pass


class BadVersion(SealError, ValueError):
    pass


class Undecryptable(SealError, ValueError):
    """Wrong control key, tampered body, or a machine key that is no key."""


class NotJSONObject(SealError, ValueError):
    pass


class WrongOp(SealError, ValueError):
    pass


class TooBig(SealError, ValueError):
    status = 413


class BadResponse(SealError, ValueError):
    """An answer that did not come from the control server we pinned, for this
    request. Only the client raises it; status 502 is what a proxy would say."""

    status = 502


# -- keys --------------------------------------------------------------------------


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_key(text: str) -> bytes:
    """base64url without padding (the login URL's form); standard base64 and
    padding are accepted too, because people copy keys from other tools."""
    text = text.strip()
    cleaned = text.rstrip("=").replace("+", "-").replace("/", "_")
    try:
        raw = base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{text!r} is not base64url") from e
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != cleaned:
        raise ValueError(f"{text!r} is not base64url")
    if len(raw) != KEY_LEN:
        raise ValueError(f"{text!r} decodes to {len(raw)} bytes, an X25519 key has {KEY_LEN}")
    return raw


@dataclass(frozen=True, order=True)
class BoxPublicKey:
    """An X25519 public key. Text form: base64url without padding."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise ValueError(f"an X25519 public key has {KEY_LEN} bytes, not {len(self.raw)}")

    @classmethod
    def from_text(cls: type[_K], text: str) -> _K:
        return cls(_decode_key(text))

    @property
    def canonical(self) -> bool:
        return int.from_bytes(self.raw, "little") < _P

    def nacl(self) -> NaclPublicKey:
        return NaclPublicKey(self.raw)

    def __bytes__(self) -> bytes:
        return self.raw

    def __str__(self) -> str:
        return b64url(self.raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self})"


_K = TypeVar("_K", bound=BoxPublicKey)


class MachinePublicKey(BoxPublicKey):
    """Who a node is to control; stays when the node (WireGuard) key rotates."""


class ControlPublicKey(BoxPublicKey):
    """The server's key, in the login URL and pinned by the agent."""


@dataclass(frozen=True)
class BoxPrivateKey:
    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            # Say how long it was, never what it was.
            raise ValueError(f"an X25519 private key has {KEY_LEN} bytes, not {len(self.raw)}")

    @classmethod
    def generate(cls: type[_P_K]) -> _P_K:
        return cls(bytes(NaclPrivateKey.generate()))

    @classmethod
    def from_text(cls: type[_P_K], text: str) -> _P_K:
        try:
            return cls(_decode_key(text))
        except ValueError:
            raise ValueError("not a base64 X25519 private key") from None  # no secret quoted

    def nacl(self) -> NaclPrivateKey:
        return NaclPrivateKey(self.raw)

    def public_raw(self) -> bytes:
        return bytes(self.nacl().public_key)

    def secret_text(self) -> str:
        """The secret itself, for a 0600 file. Never for a log."""
        return b64url(self.raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(public={b64url(self.public_raw())})"

    __str__ = __repr__


_P_K = TypeVar("_P_K", bound=BoxPrivateKey)


class MachineKey(BoxPrivateKey):
    def public_key(self) -> MachinePublicKey:
        return MachinePublicKey(self.public_raw())


class ControlKey(BoxPrivateKey):
    def public_key(self) -> ControlPublicKey:
        return ControlPublicKey(self.public_raw())


# The server loads its key with PyNaCl (control/keys.py); take that as it is.
AnyControlKey = ControlKey | NaclPrivateKey
AnyControlPublicKey = ControlPublicKey | NaclPublicKey


def _nacl_private(key: AnyControlKey) -> NaclPrivateKey:
    return key.nacl() if isinstance(key, BoxPrivateKey) else key


# -- JSON, canonical ---------------------------------------------------------------------


def encode_json(obj: dict[str, Any]) -> bytes:
    """Canonical: sorted keys, no spaces, UTF-8, no NaN (not JSON)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def decode_json_object(data: bytes) -> dict[str, Any]:
    """Parse a plaintext; NotJSONObject for anything but one JSON object."""
    try:
        obj = json.loads(data, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        # RecursionError: `[[[[...` nested deeper than the parser's stack.
        raise NotJSONObject(f"plaintext is not JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise NotJSONObject(f"plaintext is JSON {type(obj).__name__}, not an object")
    return obj


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def request_number(nonce: bytes) -> int:
    """Which request of its session a nonce belongs to (its last 8 bytes)."""
    return int.from_bytes(nonce[NONCE_RANDOM:], "big")


def make_nonce(number: int) -> bytes:
    return secrets.token_bytes(NONCE_RANDOM) + number.to_bytes(NONCE_LEN - NONCE_RANDOM, "big")


# -- the client's side -----------------------------------------------------------------


def seal_request(
    machine: MachineKey,
    control_pub: ControlPublicKey,
    plaintext: dict[str, Any],
    number: int = 0,
) -> tuple[bytes, bytes]:
    """Seal one request; returns (body, nonce). `number` is the request's number in
    its session (0 for hello), carried in the nonce for the server's replay window."""
    nonce = make_nonce(number)
    box = Box(machine.nacl(), control_pub.nacl())
    sealed = box.encrypt(encode_json(plaintext), nonce)
    return bytes([VERSION]) + machine.public_raw() + bytes(sealed), nonce


def open_response(
    machine: MachineKey,
    control_pub: ControlPublicKey,
    body: bytes,
    request_nonce: bytes,
    max_inflated: int = mapzip.MAX_INFLATED,
) -> dict[str, Any]:
    """Open an answer and return its `body`; BadResponse unless it is control's
    answer to exactly this request. A compressed answer (wire/mapzip.py, which the
    agent asks for with capver 4) is inflated first, to at most `max_inflated` bytes."""
    box = Box(machine.nacl(), control_pub.nacl())
    if len(body) < NONCE_LEN + MAC_LEN:
        raise BadResponse(f"answer of {len(body)} bytes is too short to be sealed")
    try:
        plaintext = box.decrypt(body)
    except CryptoError:
        raise BadResponse("answer is not sealed by the pinned control key") from None
    if mapzip.compressed(plaintext):
        try:
            plaintext = mapzip.inflate(plaintext, max_inflated)
        except mapzip.MapZipError as e:
            raise BadResponse(str(e)) from None
    try:
        doc = decode_json_object(plaintext)
    except NotJSONObject as e:
        raise BadResponse(f"answer: {e.message}") from None
    if doc.get("re") != b64(request_nonce):
        raise BadResponse(f"answer is for another request (re={doc.get('re')!r})")
    answer = doc.get("body")
    if not isinstance(answer, dict):
        raise BadResponse(f"answer body is {type(answer).__name__}, not an object")
    return answer


# -- the server's side ------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """A request that was sealed by `machine` for us."""

    machine: MachinePublicKey
    nonce: bytes
    plaintext: dict[str, Any]
    box: Box = field(repr=False, compare=False)

    @property
    def number(self) -> int:
        return request_number(self.nonce)

    def reply(self, body: dict[str, Any]) -> bytes:
        return seal_response(self.box, self.nonce, body)


class Boxes:
    """The server's Box per machine key, kept: making one costs an X25519 operation,
    and every node comes back every few seconds (each long-poll is a request)."""

    def __init__(self, control: AnyControlKey, size: int = 16384) -> None:
        private = _nacl_private(control)
        self.get = lru_cache(maxsize=size)(lambda raw: Box(private, NaclPublicKey(raw)))


def open_request(control: AnyControlKey, body: bytes, op: str, boxes: Boxes | None = None) -> Opened:
    """Open a request posted to /v1/<op>; SealError (with its HTTP status) unless it
    is a well-formed request for this op, sealed for our key."""
    if len(body) > MAX_BODY:
        raise TooBig(f"request of {len(body)} bytes is over the {MAX_BODY}-byte limit")
    if not body:
        raise Malformed("empty request")
    if body[0] != VERSION:
        raise BadVersion(f"protocol version {body[0]} is not supported (this server speaks 1)")
    if len(body) < MIN_REQUEST:
        raise Malformed(f"request of {len(body)} bytes is shorter than {MIN_REQUEST}")
    machine = MachinePublicKey(bytes(body[1:HEADER]))
    if not machine.canonical:
        raise Malformed(f"machine key {machine} is not a canonical X25519 key")
    try:
        box = boxes.get(machine.raw) if boxes is not None else Box(_nacl_private(control), machine.nacl())
        plaintext = box.decrypt(bytes(body[HEADER:]))
    except CryptoError:
        # Also a low-order machine key (PyNaCl refuses an all-zero shared secret).
        raise Undecryptable(
            "request does not open with this server's key (wrong login URL, or tampered)"
        ) from None
    doc = decode_json_object(plaintext)
    if doc.get("op") != op:
        raise WrongOp(f"request was sealed for op {doc.get('op')!r}, posted to {op!r}")
    nonce = bytes(body[HEADER : HEADER + NONCE_LEN])
    return Opened(machine, nonce, doc, box)


def seal_response(box: Box, request_nonce: bytes, body: dict[str, Any]) -> bytes:
    """Seal the answer to the request with `request_nonce`."""
    plaintext = encode_json({"re": b64(request_nonce), "body": body})
    return bytes(box.encrypt(plaintext))
