"""Shared, compressed full maps over real HTTP: an old agent (no capver, or 3) still
gets the uncompressed JSON it always got, today's agent (capver 4) gets the same
JSON deflated; what one node may not see stays out of every other node's answer;
and the agent's client refuses a hostile compressed answer from a control that
holds the pinned key (a bomb, a lie) with a clear error, keeping nothing."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nacl.public import Box

from appliance.agent.control.client import ControlBadResponse, ControlClient
from appliance.base.keys import PrivateKey
from appliance.wire import mapzip
from appliance.wire.netmap import CAPVER
from appliance.wire.seal import (
    ControlKey,
    MachineKey,
    b64,
    decode_json_object,
    encode_json,
    open_request,
    open_response,
    seal_request,
)
from tests.control.httpserver import Server, running_server
from tests.unit.test_mapzip import bomb


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path) as s:
        yield s


class RawAgent:
    """An agent that shows the sealed answer's plaintext as it came (compressed or not)."""

    def __init__(self, server: Server) -> None:
        self.server, self.machine = server, MachineKey.generate()
        self.client = server.client(self.machine)
        self.number = 0

    def raw_map(self, body: dict[str, Any]) -> bytes:
        session = self.client.hello()
        data, nonce = seal_request(self.machine, self.server.control_pub,
                                   {"op": "map", "session": session, "body": body}, 1)  # fmt: skip
        import urllib.request

        req = urllib.request.Request(self.server.url + "/v1/map", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            sealed = resp.read()
        plaintext = Box(self.machine.nacl(), self.server.control_pub.nacl()).decrypt(sealed)
        assert open_response(self.machine, self.server.control_pub, sealed, nonce)["version"] >= 1
        return bytes(plaintext)


def _join(server: Server, n: int) -> list[RawAgent]:
    secret = server.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 600})["key"]  # type: ignore[index]
    agents = []
    for i in range(1, n + 1):
        agent = RawAgent(server)
        body = {
            "node_key": str(PrivateKey(bytes([i]) * 32).public_key()),
            "hostname": f"n{i}",
            "auth_key": secret,
        }
        assert agent.client.call("register", body)["state"] == "approved"
        agents.append(agent)
    return agents


def _body(plaintext: bytes) -> dict[str, Any]:
    return decode_json_object(mapzip.inflate(plaintext) if mapzip.compressed(plaintext) else plaintext)[
        "body"
    ]  # type: ignore[no-any-return]


def test_mapcache_http_old_agents_get_json_and_new_ones_the_same_deflated(server: Server) -> None:
    agents = _join(server, 150)
    viewer = agents[7]
    old = viewer.raw_map({"version": None})  # an agent from before capver
    v3 = viewer.raw_map({"version": None, "capver": 3})
    new = viewer.raw_map({"version": None, "capver": CAPVER})
    assert old.startswith(b'{"body":') and v3.startswith(b'{"body":')
    assert mapzip.compressed(new) and len(new) < len(v3) * 0.75
    full_old, full_v3, full_new = _body(old)["full"], _body(v3)["full"], _body(new)["full"]
    assert "capver" not in full_old and full_v3["capver"] == 3 and full_new["capver"] == CAPVER
    assert {k: v for k, v in full_new.items() if k != "capver"} == {
        k: v for k, v in full_v3.items() if k != "capver"
    }
    assert [p["name"] for p in full_new["peers"]] == [f"n{i}" for i in range(1, 151) if i != 8]
    assert full_new["self"]["name"] == "n8"
    # the agent's own client reads both
    assert len(viewer.client.call("map", {"version": None, "capver": CAPVER})["full"]["peers"]) == 149
    assert len(viewer.client.call("map", {"version": None})["full"]["peers"]) == 149


def test_mapcache_http_private_views_stay_private(server: Server) -> None:
    agents = _join(server, 70)
    hub, router, viewer = agents[0], agents[1], agents[2]
    phone = PrivateKey(bytes([201]) * 32).public_key()
    hub.client.call("device", {"action": "add", "name": "phone", "public_key": str(phone)})
    router.client.call("update", {"advertise_routes": ["192.168.77.0/24", "10.9.0.0/16"],
                                  "advertise_exit_node": True})  # fmt: skip
    nodes = server.admin("GET", "/admin/v1/nodes")
    rid = next(n["id"] for n in nodes if n["name"] == "n2")  # type: ignore[union-attr, index]
    server.admin("POST", f"/admin/v1/nodes/{rid}/routes", {"approved_routes": ["192.168.77.0/24"]})
    # a pending stranger
    stranger = RawAgent(server)
    stranger.client.call(
        "register", {"node_key": str(PrivateKey(bytes([250]) * 32).public_key()), "hostname": "stranger"}
    )
    for agent in (viewer, router, hub, agents[-1]):
        for body in ({"version": None}, {"version": None, "capver": CAPVER}):
            text = json.dumps(_body(agent.raw_map(body))).encode()
            assert str(phone).encode() not in text  # a hosted device's key: only its hub knows it
            assert b"10.9.0.0/16" not in text and b"0.0.0.0/0" not in text  # advertised, never approved
            assert b"stranger" not in text
            full = _body(agent.raw_map(body))["full"]
            assert full["self"]["name"] not in [p["name"] for p in full["peers"]]
            routes = {p["name"]: p["routes"] for p in [*full["peers"], full["self"]]}
            assert routes["n2"] == ["192.168.77.0/24"]


class HostileControl:
    """A control that holds the pinned key and answers every map with `make(plaintext)`."""

    def __init__(self, key: ControlKey, make: Any) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                op = self.path.rsplit("/", 1)[-1]
                data = self.rfile.read(int(self.headers["Content-Length"]))
                opened = open_request(key.nacl(), data, op)
                body: dict[str, Any] = {"session": "s"} if op == "hello" else {"version": 1, "full": {}}
                plaintext = encode_json({"re": b64(opened.nonce), "body": body})
                if op != "hello":
                    plaintext = make(plaintext)
                answer = bytes(opened.box.encrypt(plaintext))
                outer.served += 1  # before the answer leaves: the client may be done at once
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.served = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: mapzip.HEADER.pack(0, 1, 1 << 30) + bomb(1 << 20), "over this agent's limit"),
        (lambda p: mapzip.HEADER.pack(0, 1, len(p)) + bomb(48 << 20), "inflates past the"),
        (lambda p: mapzip.compress(p)[:-8], "truncated"),
        (lambda p: b"\x00\x07" + p, "method 7"),
    ],
    ids=["states-1GiB", "bomb-48MiB", "truncated", "unknown-method"],
)
def test_mapcache_http_agent_refuses_hostile_compressed_answers(make: Any, message: str) -> None:
    key = ControlKey.generate()
    control = HostileControl(key, make)
    try:
        client = ControlClient(control.url, MachineKey.generate(), key.public_key(), timeout=30)
        with pytest.raises(ControlBadResponse, match=message):
            client.call("map", {"version": None, "capver": CAPVER})
        assert control.served == 2  # hello, then the map it refused
    finally:
        control.close()


def test_mapcache_http_full_maps_wait_their_turn_at_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One full map in flight at a time (mapsend.IN_FLIGHT): the others wait, none fails."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance.control import mapsend

    monkeypatch.setattr(mapsend, "IN_FLIGHT", 1)
    with running_server(tmp_path) as server:
        agents = _join(server, 24)
        with ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(lambda a: a.client.call("map", {"version": None, "capver": CAPVER}), agents)
            )
        for i, answer in enumerate(answers):
            assert answer["full"]["self"]["name"] == f"n{i + 1}" and len(answer["full"]["peers"]) == 23


def test_mapcache_http_a_new_agent_against_a_control_from_before_compression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control that knows capver 3 at most answers a capver-4 agent in version 3,
    uncompressed (as it always capped the version), and the agent reads that."""
    from appliance.control import mapcache

    monkeypatch.setattr(mapcache, "CAPVER", 3)
    with running_server(tmp_path) as server:
        agents = _join(server, 3)
        plaintext = agents[0].raw_map({"version": None, "capver": CAPVER})
        assert plaintext.startswith(b'{"body":') and _body(plaintext)["full"]["capver"] == 3
        assert len(agents[0].client.call("map", {"version": None, "capver": CAPVER})["full"]["peers"]) == 2
