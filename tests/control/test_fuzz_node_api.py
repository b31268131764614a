"""Hypothesis fuzzers of control's node API over real HTTP on loopback, as an internet
caller would send it: garbage behind a valid header, tampered and truncated seals,
replayed nonces, wrong and forged sessions, random plaintexts and random JSON bodies
inside valid seals (from a stranger, a pending node and an approved node).

Every answer is < 500; refusals are 4xx. 4,300 cases here (with test_app.py's
2,100, 6,400 for the node API). One server for the module: the cases share it, as
an attacker's requests share the real one; the checks below hold whatever earlier
cases left behind.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.base.keys import PrivateKey
from appliance.wire.seal import VERSION, MachineKey, open_response, seal_request
from tests.control.httpserver import Server, running_server

OPS = ["hello", "register", "map", "update", "device", "logout", "nope"]
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Caller:
    """A machine with a session, sending sealed requests by hand (no client logic)."""

    server: Server
    machine: MachineKey
    session: str = ""
    number: int = 0

    def send(self, op: str, plaintext: dict[str, Any], number: int | None = None) -> tuple[int, bytes, bytes]:
        if number is None:
            self.number += 1
            number = self.number
        sealed, nonce = seal_request(self.machine, self.server.control_pub, plaintext, number)
        status, data = post(self.server, f"/v1/{op}", sealed)
        return status, data, nonce

    def hello(self) -> Caller:
        status, data, nonce = self.send("hello", {"op": "hello"}, 0)
        assert status == 200, data
        self.session = str(open_response(self.machine, self.server.control_pub, data, nonce)["session"])
        self.number = 0
        return self

    def op(self, op: str, body: object) -> int:
        status, data, _ = self.send(op, {"op": op, "session": self.session, "body": body})
        assert status < 500, (op, body, status, data)
        return status


def post(server: Server, path: str, data: bytes) -> tuple[int, bytes]:
    host, _, port = server.url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class World:
    server: Server
    approved: Caller
    pending: Caller


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # Generous pending caps: the fuzzers register many strangers from 127.0.0.1.
    with running_server(
        tmp_path_factory.mktemp("fuzz"), map_timeout=0.05, pending_caps=(10**6, 10**6)
    ) as server:
        secret = server.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 3600})["key"]  # type: ignore[index]
        approved, pending = (
            Caller(server, MachineKey.generate()).hello(),
            Caller(server, MachineKey.generate()).hello(),
        )
        body = {"node_key": str(PrivateKey.generate().public_key()), "hostname": "fuzzed", "auth_key": secret}
        assert approved.op("register", body) == 200
        assert (
            pending.op("register", {"node_key": str(PrivateKey.generate().public_key()), "hostname": "p"})
            == 200
        )
        yield World(server, approved, pending)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)
_fields = st.sampled_from(["node_key", "hostname", "auth_key", "version", "endpoints", "advertise_routes",
                           "advertise_exit_node", "action", "public_key", "name"])  # fmt: skip
_route = st.sampled_from(
    ["0.0.0.0/0", "::/0", "10.0.0.0/8", "100.64.0.1/32", "192.168.1.0/24", "x", "1.2.3.4/33"]
)
_values = _json | st.lists(_route, max_size=80) | st.lists(st.text(max_size=30), max_size=5)
_bodies = st.dictionaries(_fields | st.text(max_size=8), _values, max_size=6) | _json


@settings(FUZZ, max_examples=800)
@given(op=st.sampled_from(OPS), tail=st.binary(max_size=400), key=st.binary(min_size=32, max_size=32))
def test_fuzz_garbage_behind_a_valid_header_is_4xx(world: World, op: str, tail: bytes, key: bytes) -> None:
    status, _ = post(world.server, f"/v1/{op}", bytes([VERSION]) + key + tail)
    assert 400 <= status < 500


@settings(FUZZ, max_examples=800)
@given(op=st.sampled_from(OPS), data=st.data())
def test_fuzz_tampered_or_truncated_seals_are_4xx(world: World, op: str, data: st.DataObject) -> None:
    caller = world.approved
    plaintext = {"op": op, "session": caller.session, "body": {"version": None}}
    sealed, _ = seal_request(caller.machine, world.server.control_pub, plaintext, 10**9)
    if data.draw(st.booleans(), "truncate"):
        sealed = sealed[: data.draw(st.integers(0, len(sealed) - 1), "length")]
    else:
        at = data.draw(st.integers(0, len(sealed) - 1), "byte")
        flip = data.draw(st.integers(1, 255), "flip")
        sealed = sealed[:at] + bytes([sealed[at] ^ flip]) + sealed[at + 1 :]
    status, _ = post(world.server, f"/v1/{op}", sealed)
    assert 400 <= status < 500


@settings(FUZZ, max_examples=600)
@given(op=st.sampled_from(["map", "update", "register", "device", "logout"]), gap=st.integers(0, 2000))
def test_fuzz_replayed_nonces_are_refused(world: World, op: str, gap: int) -> None:
    caller = Caller(world.server, MachineKey.generate()).hello()
    status, data, _ = caller.send(op, {"op": op, "session": caller.session, "body": {}})
    assert status < 500
    sealed, _ = seal_request(
        caller.machine, world.server.control_pub, {"op": op, "session": caller.session}, 1
    )
    assert post(world.server, f"/v1/{op}", sealed)[0] == 409  # number 1 again: a replay
    # A jump ahead is fine; then that number again is a replay, and number 2, now
    # seen or too far behind the newest (WINDOW), is refused as well.
    caller.number = gap + 2
    caller.op(op, {})
    for number in (caller.number, 2) if gap else (caller.number,):
        status, _, _ = caller.send(op, {"op": op, "session": caller.session, "body": {}}, number)
        assert status == 409 if number != 2 or gap + 3 - 2 >= 1024 else status < 500


@settings(FUZZ, max_examples=600)
@given(op=st.sampled_from(["map", "update", "register", "device", "logout"]),
       session=st.none() | st.integers() | st.text(max_size=40) | st.sampled_from(["other", "approved"]),
       number=st.integers(0, 2**64 - 1))  # fmt: skip
def test_fuzz_wrong_sessions_are_4xx(world: World, op: str, session: object, number: int) -> None:
    stranger = Caller(world.server, MachineKey.generate())
    if session == "approved":
        session = world.approved.session  # another machine's session: 401, and left alone
    elif session == "other":
        session = Caller(world.server, MachineKey.generate()).hello().session
    status, _, _ = stranger.send(op, {"op": op, "session": session, "body": {}}, number)
    assert 400 <= status < 500
    assert world.approved.op("map", {"version": None}) == 200  # the node's own session still works


@settings(FUZZ, max_examples=1500)
@given(who=st.sampled_from(["approved", "pending", "stranger"]),
       op=st.sampled_from(["register", "map", "update", "device", "logout"]), body=_bodies)  # fmt: skip
def test_fuzz_random_json_inside_valid_seals_is_never_5xx(world: World, who: str, op: str, body: Any) -> None:
    if op == "logout" and who != "stranger":
        op = "map"  # keep the module's nodes: logging them out would end the deeper cases
    caller = {"approved": world.approved, "pending": world.pending}.get(who)
    if caller is None:
        caller = Caller(world.server, MachineKey.generate()).hello()
    status = caller.op(op, body)
    if who != "approved":
        assert status != 200 or op in ("register", "logout"), (who, op, body)
    json.dumps(body)  # the body was JSON the whole way


@settings(FUZZ, max_examples=300)
@given(plaintext=st.dictionaries(st.text(max_size=10), _json, max_size=5), op=st.sampled_from(OPS))
def test_fuzz_random_plaintexts_are_4xx(world: World, plaintext: dict[str, Any], op: str) -> None:
    plaintext.setdefault("op", op)
    caller = Caller(world.server, MachineKey.generate())
    status, _, _ = caller.send(op, plaintext, 1)
    assert status < 500
    if op != "hello" or plaintext["op"] != "hello":
        assert status >= 400
