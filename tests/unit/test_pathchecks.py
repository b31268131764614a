"""Connectivity checks (appliance/agent/reach/checkcore.py) and their codec
(MESSAGE-INTEGRITY-SHA256 in appliance/wire/stun.py): built, parsed and
authenticated; hostile datagrams (garbage, a wrong key, tampering, replays,
floods) refused, never answered."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from ipaddress import ip_address

import pytest

from appliance.agent.reach import checkcore
from appliance.agent.reach.checks import Checker
from appliance.agent.reach.netcheck import format_checks
from appliance.base.keys import PrivateKey
from appliance.base.net import Endpoint
from appliance.kernel.stunport import Datagram
from appliance.wire import stun

ALICE, BOB, EVE = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
SEEN = Endpoint(ip_address("203.0.113.9"), 40123)
SEEN6 = Endpoint(ip_address("2001:db8::9"), 40123)


def test_pathchecks_pair_key_is_the_same_on_both_sides_and_differs_per_pair() -> None:
    ab = checkcore.pair_key(ALICE, BOB.public_key())
    assert ab == checkcore.pair_key(BOB, ALICE.public_key())
    assert len(ab) == 32
    assert ab != checkcore.pair_key(ALICE, EVE.public_key())
    assert ab != checkcore.pair_key(EVE, BOB.public_key())


def test_pathchecks_low_order_peer_key_is_refused() -> None:
    from appliance.base.keys import PublicKey

    with pytest.raises(checkcore.CheckRefused):
        checkcore.pair_key(ALICE, PublicKey(bytes(32)))


def test_pathchecks_request_round_trip() -> None:
    key = checkcore.pair_key(ALICE, BOB.public_key())
    txid = stun.new_transaction_id()
    data = checkcore.request(txid, ALICE.public_key(), key)
    got = checkcore.classify(data)
    assert got.kind == stun.BINDING_REQUEST and got.txid == txid and got.sender == ALICE.public_key()
    assert checkcore.authentic(data, checkcore.pair_key(BOB, ALICE.public_key()))
    assert stun.looks_like_stun(data) and stun.parse(data).fingerprint


def test_pathchecks_answer_is_never_bigger_than_the_request() -> None:
    key = checkcore.pair_key(ALICE, BOB.public_key())
    txid = stun.new_transaction_id()
    request = checkcore.request(txid, ALICE.public_key(), key)
    for seen in (SEEN, SEEN6):
        answer = checkcore.answer(txid, seen, key)
        assert len(answer) <= len(request), (len(answer), len(request))
        assert checkcore.classify(answer).kind == stun.BINDING_SUCCESS
        assert checkcore.authentic(answer, key)
        assert checkcore.mapped_address(answer, txid) == seen


def test_pathchecks_integrity_matches_rfc8489_construction() -> None:
    """Checked independently of the encoder: HMAC over the header (length up to
    the end of MESSAGE-INTEGRITY-SHA256) and the attributes before it."""
    key = os.urandom(32)
    txid = stun.new_transaction_id()
    data = stun.encode(stun.BINDING_REQUEST, txid, [(stun.ATTR_USERNAME, b"abcd")], integrity=key)
    mi_at = 20 + 8
    head = data[:2] + struct.pack("!H", 8 + 36) + data[4:20]
    assert data[mi_at + 4 : mi_at + 36] == hmac.digest(key, head + data[20:mi_at], hashlib.sha256)
    assert stun.integrity_ok(data, key)


def test_pathchecks_wrong_key_tampering_and_truncation_are_refused() -> None:
    key = checkcore.pair_key(ALICE, BOB.public_key())
    data = checkcore.request(stun.new_transaction_id(), ALICE.public_key(), key)
    assert not checkcore.authentic(data, checkcore.pair_key(EVE, BOB.public_key()))
    # Eve claims to be Alice with a key of her own making.
    forged = checkcore.request(stun.new_transaction_id(), ALICE.public_key(), os.urandom(32))
    assert not checkcore.authentic(forged, key)
    for i in range(20, len(data) - 8):  # every byte of the body (the FINGERPRINT would catch it too)
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        assert not checkcore.authentic(bytes(flipped), key), i
    no_mi = stun.encode(stun.BINDING_REQUEST, stun.new_transaction_id(), [(stun.ATTR_USERNAME, b"x" * 44)])
    with pytest.raises(checkcore.CheckRefused):
        checkcore.classify(no_mi)
    assert not checkcore.authentic(no_mi, key)


def test_pathchecks_attribute_after_integrity_is_refused() -> None:
    key = os.urandom(32)
    txid = stun.new_transaction_id()
    data = stun.encode(
        stun.BINDING_REQUEST, txid, [(stun.ATTR_USERNAME, b"abcd")], integrity=key, fingerprint=False
    )
    extra = struct.pack("!HH", stun.ATTR_SOFTWARE, 4) + b"evil"
    longer = data[:2] + struct.pack("!H", len(data) - 20 + 8) + data[4:] + extra
    assert not stun.integrity_ok(longer, key)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 19,
        os.urandom(1400),
        b"\x00\x01\x00\x00" + struct.pack("!I", stun.MAGIC_COOKIE) + os.urandom(12),  # no attributes
        stun.binding_request(os.urandom(12), "meshpi", 64),  # a plain request: no integrity
        stun.binding_response(os.urandom(12), SEEN, "evil"),  # a server's answer
    ],
    ids=["empty", "short", "random", "bare", "plain-request", "server-answer"],
)
def test_pathchecks_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(checkcore.CheckRefused):
        checkcore.classify(data)


def test_pathchecks_username_that_is_no_key_is_refused() -> None:
    key = os.urandom(32)
    for name in (b"not base64!!", b"QUJD", b"A" * 400):
        data = stun.encode(stun.BINDING_REQUEST, os.urandom(12), [(stun.ATTR_USERNAME, name)], integrity=key)
        with pytest.raises(checkcore.CheckRefused):
            checkcore.classify(data)


def test_pathchecks_replay_is_refused_and_the_cache_is_bounded() -> None:
    cache = checkcore.ReplayCache(keep=100, for_seconds=60.0)
    txid = os.urandom(12)
    assert cache.fresh(txid, 0.0)
    assert not cache.fresh(txid, 1.0)
    assert not cache.fresh(txid, 59.0)
    for i in range(1000):
        assert cache.fresh(os.urandom(12), 2.0 + i * 0.001)
    assert len(cache._seen) <= 100


def test_pathchecks_rate_limit_per_source_and_in_all() -> None:
    rate = checkcore.RateLimit(per_source=10.0, total=50.0, sources=8)
    allowed = sum(rate.allow("flooder", 0.0) for _ in range(1000))
    assert allowed == 10
    assert rate.allow("peer", 0.0)  # another source is not starved by one flooder
    assert sum(rate.allow("flooder", 1.0) for _ in range(1000)) == 10  # refilled at 10/s
    # Many sources: the total caps them.
    total = sum(rate.allow(f"s{i}", 2.0) for i in range(1000))
    assert total <= 50
    assert len(rate._buckets) <= 8


class _FakePort:
    """kernel/stunport.py's StunPort, in memory: what arrives, what was sent."""

    def __init__(self, listen_port: int, fwmark: int) -> None:
        self.inbox: list[Datagram] = []
        self.sent: list[tuple[Endpoint, bytes]] = []

    def send(self, dest: Endpoint, payload: bytes) -> None:
        self.sent.append((dest, payload))

    def receive(self) -> list[Datagram]:
        got, self.inbox = self.inbox, []
        return got

    def wait(self, timeout: float) -> bool:
        return bool(self.inbox)

    def close(self) -> None:
        pass


def test_pathchecks_refusals_are_counted_by_reason_and_nothing_answered() -> None:
    ours, peer = PrivateKey.generate(), PrivateKey.generate()
    checker = Checker(lambda: ours, _FakePort)  # type: ignore[arg-type]
    checker.open(51820, 0)
    port = checker.port
    assert isinstance(port, _FakePort)
    key = checkcore.pair_key(peer, ours.public_key())
    src = Endpoint(ip_address("203.0.113.5"), 40000)
    genuine = checkcore.request(os.urandom(12), peer.public_key(), key)
    port.inbox = [Datagram(src, p) for p in (
        b"garbage",
        stun.binding_request(os.urandom(12), "evil", 64),
        checkcore.request(os.urandom(12), peer.public_key(), os.urandom(32)),
        checkcore.request(os.urandom(12), PrivateKey.generate().public_key(), key),
        genuine, genuine, genuine,
    )]  # fmt: skip
    heard = checker.read({peer.public_key()}, 100.0)
    assert heard.asked == {peer.public_key(): (src,)} and len(port.sent) == 1  # the genuine one, once
    counters = checker.counters()
    assert counters["answered"] == 1 and counters["sent"] == 0 and counters["proven"] == 0
    assert counters["refused"] == {
        "malformed": 2, "unknown_peer": 1, "bad_integrity": 1, "replay": 2, "over_rate": 0,
        "unsolicited_answer": 0, "answer_from_elsewhere": 0, "answer_bad_integrity": 0,
    }  # fmt: skip
    text = format_checks(counters)
    assert "1 answered" in text and "2 replay" in text and "1 bad integrity" in text, text
