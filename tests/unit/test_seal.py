"""The sealed transport, without HTTP: keys, login URL, request and answer sealing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey

from appliance.wire.loginurl import LoginUrlError, login_url, parse_login_url
from appliance.wire.seal import (
    MAX_BODY,
    BadResponse,
    BadVersion,
    ControlKey,
    MachineKey,
    MachinePublicKey,
    Malformed,
    NotJSONObject,
    SealError,
    TooBig,
    Undecryptable,
    WrongOp,
    b64url,
    open_request,
    open_response,
    request_number,
    seal_request,
    seal_response,
)

MACHINE = MachineKey.generate()
CONTROL = ControlKey.generate()
CONTROL_PUB = CONTROL.public_key()
NON_CANONICAL = b64url(b"\xff" * 32)


def _sealed(plaintext: dict[str, Any] | None = None, op: str = "echo", number: int = 1) -> bytes:
    body, _ = seal_request(MACHINE, CONTROL_PUB, plaintext or {"op": op, "body": {}}, number)
    return body


def _raw_request(plaintext: bytes) -> bytes:
    """A request whose plaintext is any bytes at all, not necessarily JSON."""
    box = Box(MACHINE.nacl(), CONTROL_PUB.nacl())
    return b"\x01" + MACHINE.public_raw() + bytes(box.encrypt(plaintext))


# -- keys and the login URL


def test_seal_private_key_never_shows_its_secret() -> None:
    secret = MACHINE.secret_text()
    for text in (repr(MACHINE), str(MACHINE), f"{MACHINE}", repr([MACHINE])):
        assert secret not in text
        assert str(MACHINE.public_key()) in text
    with pytest.raises(ValueError) as e:
        MachineKey.from_text(secret[:-2])
    assert secret[:-2] not in str(e.value)


def test_seal_key_text_round_trip() -> None:
    assert MachineKey.from_text(MACHINE.secret_text()) == MACHINE
    pub = MACHINE.public_key()
    assert "=" not in str(pub) and len(str(pub)) == 43
    assert MachinePublicKey.from_text(str(pub)) == pub


def test_seal_login_url_round_trip() -> None:
    url = login_url("http://192.0.2.7:8080/", CONTROL_PUB)
    assert url == f"http://192.0.2.7:8080/#{CONTROL_PUB}"
    assert parse_login_url(url) == ("http://192.0.2.7:8080", CONTROL_PUB)
    # PyNaCl's key, as control/keys.py loads it, gives the same URL.
    assert login_url("http://192.0.2.7:8080", CONTROL.nacl().public_key) == url


def test_seal_login_url_accepts_standard_base64_and_a_path() -> None:
    import base64

    std = base64.b64encode(CONTROL_PUB.raw).decode()
    assert parse_login_url(f"https://ctl.example/mesh/#{std}") == (
        "https://ctl.example/mesh",
        CONTROL_PUB,
    )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"ftp://h/#{CONTROL_PUB}", "http:// or https://"),
        ("http://h:8080/", "no control key"),
        (f"http:///#{CONTROL_PUB}", "no host"),
        (f"http://h:99999/#{CONTROL_PUB}", "not a URL"),
        (f"http://h:0/#{CONTROL_PUB}", "port 0"),
        (f"http://u:p@h/#{CONTROL_PUB}", "user name or password"),
        (f"http://h/?x=1#{CONTROL_PUB}", "query"),
        ("http://h/#not*base64", "not base64url"),
        (f"http://h/#{b64url(bytes(31))}", "decodes to 31 bytes"),
        (f"http://h/#{NON_CANONICAL}", "not a canonical"),
    ],
)
def test_seal_login_url_errors_quote_the_url(url: str, reason: str) -> None:
    with pytest.raises(LoginUrlError) as e:
        parse_login_url(url)
    assert reason in str(e.value)
    assert repr(url) in str(e.value)


# -- requests


def test_seal_request_opens_to_machine_nonce_and_plaintext() -> None:
    plaintext = {"op": "echo", "session": "s", "body": {"ü": [1, 2.5, None, True]}}
    body, nonce = seal_request(MACHINE, CONTROL_PUB, plaintext, 7)
    opened = open_request(CONTROL, body, "echo")
    assert (opened.machine, opened.nonce, opened.plaintext) == (
        MACHINE.public_key(),
        nonce,
        plaintext,
    )
    assert opened.number == request_number(nonce) == 7


def test_seal_request_accepts_a_pynacl_control_key() -> None:
    assert open_request(CONTROL.nacl(), _sealed(), "echo").machine == MACHINE.public_key()


def test_seal_request_plaintext_is_canonical_json() -> None:
    body = _sealed({"op": "echo", "b": 1, "a": {"y": 2, "x": 1}})
    box = Box(CONTROL.nacl(), MACHINE.public_key().nacl())
    assert box.decrypt(body[33:]) == b'{"a":{"x":1,"y":2},"b":1,"op":"echo"}'


@pytest.mark.parametrize(
    ("body", "error", "status"),
    [
        (b"", Malformed, 400),
        (b"\x02" + bytes(100), BadVersion, 400),
        (b"\x01" + bytes(40), Malformed, 400),
        (b"\x01" + bytes(MAX_BODY), TooBig, 413),
        # an all-zero (low-order) machine key: no shared secret, so no Box
        (b"\x01" + bytes(32) + bytes(60), Undecryptable, 400),
        (b"\x01" + b"\xff" * 32 + bytes(60), Malformed, 400),
        (_raw_request(b"\xff\xfe not utf-8"), NotJSONObject, 400),
        (_raw_request(b"[1, 2]"), NotJSONObject, 400),
        (_raw_request(b'{"op": "echo", "x": NaN}'), NotJSONObject, 400),
        (_raw_request(b'{"op": "echo", "op": "logout"}'), NotJSONObject, 400),
        (_raw_request(b"[" * 100_000 + b"]" * 100_000), NotJSONObject, 400),
        (_sealed(op="logout"), WrongOp, 400),
    ],
)
def test_seal_bad_requests_raise_seal_errors_with_status(
    body: bytes, error: type[SealError], status: int
) -> None:
    with pytest.raises(error) as e:
        open_request(CONTROL, body, "echo")
    assert e.value.status == status
    assert e.value.message and CONTROL.secret_text() not in e.value.message


def test_seal_request_for_another_control_key_is_undecryptable() -> None:
    with pytest.raises(Undecryptable):
        open_request(ControlKey.generate(), _sealed(), "echo")


def test_seal_request_with_high_bit_flipped_machine_key_is_refused() -> None:
    # X25519 ignores bit 255: without the canonical check, this would open as the
    # same key under another identity.
    body = bytearray(_sealed())
    body[32] |= 0x80
    with pytest.raises(Malformed):
        open_request(CONTROL, bytes(body), "echo")


# -- answers


def test_seal_answer_round_trip_and_re_check() -> None:
    body, nonce = seal_request(MACHINE, CONTROL_PUB, {"op": "echo"}, 1)
    opened = open_request(CONTROL, body, "echo")
    answer = opened.reply({"ok": [1]})
    assert open_response(MACHINE, CONTROL_PUB, answer, nonce) == {"ok": [1]}
    _, other_nonce = seal_request(MACHINE, CONTROL_PUB, {"op": "echo"}, 2)
    with pytest.raises(BadResponse, match="another request"):
        open_response(MACHINE, CONTROL_PUB, answer, other_nonce)


def test_seal_reflected_request_is_not_an_answer() -> None:
    # The Box is the same both ways: a request sent back must not pass as an answer.
    body, nonce = seal_request(MACHINE, CONTROL_PUB, {"op": "echo", "body": {}}, 1)
    with pytest.raises(BadResponse):
        open_response(MACHINE, CONTROL_PUB, body[33:], nonce)


@pytest.mark.parametrize(
    "answer",
    [b"", bytes(39), bytes(200), b"plain text error"],
)
def test_seal_garbled_answers_are_bad_responses(answer: bytes) -> None:
    with pytest.raises(BadResponse) as e:
        open_response(MACHINE, CONTROL_PUB, answer, bytes(24))
    assert e.value.status == 502


def test_seal_answer_from_another_server_is_rejected() -> None:
    body, nonce = seal_request(MACHINE, CONTROL_PUB, {"op": "echo"}, 1)
    impostor = Box(NaclPrivateKey.generate(), MACHINE.public_key().nacl())
    with pytest.raises(BadResponse, match="not sealed by the pinned"):
        open_response(MACHINE, CONTROL_PUB, seal_response(impostor, nonce, {}), nonce)


# -- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=6)


@given(body=json_objects, number=st.integers(0, 2**64 - 1))
def test_seal_round_trip_of_any_json_object(body: dict[str, Any], number: int) -> None:
    plaintext = {"op": "echo", "body": body}
    sealed, nonce = seal_request(MACHINE, CONTROL_PUB, plaintext, number)
    opened = open_request(CONTROL, sealed, "echo")
    assert opened.plaintext == json.loads(json.dumps(plaintext))
    assert opened.number == number
    assert open_response(MACHINE, CONTROL_PUB, opened.reply(body), nonce) == opened.plaintext["body"]


@given(data=st.binary(max_size=400) | st.binary(max_size=400).map(lambda b: b"\x01" + b))
@settings(max_examples=300)
def test_seal_arbitrary_bytes_raise_only_seal_errors(data: bytes) -> None:
    try:
        open_request(CONTROL, data, "echo")
    except SealError as e:
        assert e.status in (400, 413)
    else:
        pytest.fail("random bytes opened as a request")


_GOOD = _sealed({"op": "echo", "session": "abc", "body": {"x": 1}})


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    body = bytearray(_GOOD)
    kind = draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if kind == "flip":
        i = draw(st.integers(0, len(body) - 1))
        body[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del body[draw(st.integers(0, len(body) - 1)) :]
    elif kind == "append":
        body += draw(st.binary(min_size=1, max_size=40))
    else:
        i = draw(st.integers(0, len(body) - 1))
        body[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(body)


@given(mutated=mutations())
@settings(max_examples=400)
def test_seal_mutated_requests_are_always_rejected(mutated: bytes) -> None:
    with pytest.raises(SealError):
        open_request(CONTROL, mutated, "echo")
