"""Peer-to-peer connectivity checks, the pure part (as ICE's): STUN Binding
requests from one agent's WireGuard port to a candidate of a peer, answered by
the peer's agent from its WireGuard port (paths.py sends and reads them through
kernel/stunport.py). An answer proves the path both ways, outside WireGuard; the
request itself opens the sender's NAT for the peer, on WireGuard's own mapping.

Authentication: MESSAGE-INTEGRITY-SHA256 keyed per pair of nodes by
BLAKE2b(X25519(our node key, the peer's node key), both public keys). Both agents
can compute it from what they already hold (their own private key, the netmap's
public key), nothing new travels through control, outsiders cannot, and a check
for one pair is worthless to another pair. The derivation is one-way, so the key
says nothing of WireGuard's own static-static secret. USERNAME carries the
sender's public key, which picks the key to check with.

Refused without an answer (and never trusted): anything that does not parse,
a sender that is not a peer, a wrong HMAC, a transaction id seen before
(`ReplayCache`), a source over its rate (`RateLimit`). An answer goes only to an
authenticated request and is never bigger than it (no amplification). Only an
authenticated answer to a transaction of ours, from the address we sent it to,
proves a path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import CryptoError

from appliance.base.keys import KEY_LEN, PrivateKey, PublicKey
from appliance.base.net import Endpoint
from appliance.wire import stun

_PERSON = b"meshpi-check-v1"  # BLAKE2b personalisation (at most 16 bytes)
REPLAY_KEEP = 4096  # transaction ids remembered
REPLAY_FOR = 600.0  # seconds: a check is retransmitted for a few seconds at most


class CheckRefused(ValueError):
    """A datagram at the WireGuard port that is not a check to answer or an answer to take."""


class ServerAnswer(CheckRefused):
    """A STUN server's answer to endpoint discovery (reach/stun.py reads it): not ours."""


def pair_key(ours: PrivateKey, peer: PublicKey) -> bytes:
    """The checks' HMAC key for this pair of nodes: the same on both sides."""
    try:
        shared = crypto_scalarmult(ours.raw, peer.raw)
    except CryptoError as e:  # a low-order point: no shared secret
        raise CheckRefused(f"peer key {peer.short}: no shared secret with it") from e
    a, b = sorted((ours.public_key().raw, peer.raw))
    return hashlib.blake2b(shared + a + b, digest_size=32, person=_PERSON).digest()


def request(txid: bytes, sender: PublicKey, key: bytes) -> bytes:
    """A check: Binding request, USERNAME = our public key, HMAC, FINGERPRINT (112 bytes)."""
    username = str(sender).encode()
    return stun.encode(stun.BINDING_REQUEST, txid, [(stun.ATTR_USERNAME, username)], integrity=key)


def answer(txid: bytes, seen_from: Endpoint, key: bytes) -> bytes:
    """The answer to a check: where its request came from, HMAC, FINGERPRINT (76/88 bytes)."""
    mapped = stun.xor_address(seen_from, txid)
    return stun.encode(stun.BINDING_SUCCESS, txid, [(stun.ATTR_XOR_MAPPED_ADDRESS, mapped)], integrity=key)


@dataclass(frozen=True)
class Incoming:
    """A datagram that parsed as a check or an answer (not yet authenticated)."""

    kind: int  # stun.BINDING_REQUEST or stun.BINDING_SUCCESS
    txid: bytes
    sender: PublicKey | None  # requests: who says it sent it


def classify(data: bytes) -> Incoming:
    """What a datagram claims to be; CheckRefused for anything else (server answers
    of endpoint discovery arrive here too: they carry no integrity and are refused)."""
    try:
        msg = stun.parse(data)
    except stun.StunError as e:
        raise CheckRefused(str(e)) from None
    if msg.attribute(stun.ATTR_MESSAGE_INTEGRITY_SHA256) is None:
        if msg.type in (stun.BINDING_SUCCESS, stun.BINDING_ERROR):
            raise ServerAnswer("a STUN server's answer")
        raise CheckRefused("no MESSAGE-INTEGRITY-SHA256: not a peer's check")
    if msg.type == stun.BINDING_SUCCESS:
        return Incoming(msg.type, msg.transaction_id, None)
    if msg.type != stun.BINDING_REQUEST:
        raise CheckRefused(f"message type 0x{msg.type:04x}: not a check")
    name = msg.attribute(stun.ATTR_USERNAME)
    if name is None:
        raise CheckRefused("check without USERNAME")
    try:
        raw = base64.b64decode(name, validate=True)
    except (binascii.Error, ValueError):
        raise CheckRefused(f"USERNAME {name[:48]!r}: not a node key") from None
    if len(raw) != KEY_LEN:
        raise CheckRefused(f"USERNAME {name[:48]!r}: not a node key")
    return Incoming(msg.type, msg.transaction_id, PublicKey(raw))


def authentic(data: bytes, key: bytes) -> bool:
    return stun.integrity_ok(data, key)


def mapped_address(data: bytes, txid: bytes) -> Endpoint | None:
    """Where the peer saw our check come from (an authenticated answer's)."""
    try:
        return stun.parse_response(data, txid)
    except stun.StunError:
        return None


class ReplayCache:
    """Transaction ids of checks already answered: the same one again is a replay.
    Bounded in size and time; no I/O."""

    def __init__(self, keep: int = REPLAY_KEEP, for_seconds: float = REPLAY_FOR) -> None:
        self.keep, self.for_seconds = keep, for_seconds
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def fresh(self, txid: bytes, now: float) -> bool:
        """True the first time a transaction id comes (and remembers it)."""
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at < self.for_seconds and len(self._seen) < self.keep:
                break
            del self._seen[oldest]
        if txid in self._seen:
            return False
        self._seen[txid] = now
        return True


class RateLimit:
    """A token bucket per source address, and one for all: checks answered per second.
    An honest peer sends a few per candidate per second at most."""

    def __init__(self, per_source: float = 20.0, total: float = 200.0, sources: int = 1024) -> None:
        self.per_source, self.total, self.sources = per_source, total, sources
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()
        self._all = (total, 0.0)

    def allow(self, source: object, now: float) -> bool:
        tokens, at = self._buckets.pop(source, (self.per_source, now))
        tokens = min(self.per_source, tokens + (now - at) * self.per_source)
        all_tokens, all_at = self._all
        all_tokens = min(self.total, all_tokens + (now - all_at) * self.total)
        ok = tokens >= 1.0 and all_tokens >= 1.0
        if ok:
            tokens, all_tokens = tokens - 1.0, all_tokens - 1.0
        self._buckets[source] = (tokens, now)
        if len(self._buckets) > self.sources:
            self._buckets.popitem(last=False)
        self._all = (all_tokens, now)
        return ok
