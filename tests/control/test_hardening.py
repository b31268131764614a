"""Issue 11, control's share, over real HTTP on SQLite and PostgreSQL: an anonymous
caller cannot use up the mesh's addresses, wake the mesh, grow a node without
bound, or take a node's address with a route; tombstones are pruned on a schedule;
the public listener has no admin API and no metrics.

Each test here failed on the tree before the fix (pending rows took addresses and
bumped the version; update, rotation and route counts were open to pending nodes;
`prune_tombstones` had no caller; /admin/ and /metrics shared the public port)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.agent.control.client import ControlClient, ControlRefused
from appliance.base.keys import PrivateKey
from appliance.control.limits import MAX_ENDPOINTS, MAX_ROUTES, PENDING_PER_SOURCE
from tests.control.httpserver import Server, running_server

BIN = Path(__file__).parents[2] / ".venv" / "bin"


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[Server]:
    with running_server(tmp_path, db_url) as s:
        yield s


def _key(i: int) -> str:
    return str(PrivateKey(i.to_bytes(4, "big") * 8).public_key())


def _register(client: ControlClient, i: int, auth: str | None = None) -> dict[str, Any]:
    return client.call("register", {"node_key": _key(i), "hostname": f"n{i}", "auth_key": auth})


def _approved_pair(server: Server) -> tuple[ControlClient, ControlClient, str]:
    key = server.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 600})
    secret = str(key["key"])  # type: ignore[index]
    a, b = server.client(), server.client()
    assert _register(a, 1, secret)["state"] == _register(b, 2, secret)["state"] == "approved"
    return a, b, secret


def _refused(call: Callable[[], object]) -> ControlRefused:
    with pytest.raises(ControlRefused) as e:
        call()
    return e.value


def _nodes(server: Server) -> list[dict[str, Any]]:
    return server.admin("GET", "/admin/v1/nodes")  # type: ignore[return-value]


def test_hardening_anonymous_registrations_take_no_address_and_wake_nobody(server: Server) -> None:
    a, _b, _ = _approved_pair(server)
    first = a.call("map", {"version": None})
    version = first["version"]
    strangers = [server.client() for _ in range(PENDING_PER_SOURCE)]
    for i, stranger in enumerate(strangers, start=100):
        reg = _register(stranger, i)
        assert reg["state"] == "pending" and reg["addresses"] == []
    # Nobody was woken: the approved node's long-poll runs out with no change.
    assert a.call("map", {"version": version}) == {"version": version, "keepalive": True}
    assert server.service.watch.version == version
    pending = [n for n in _nodes(server) if n["state"] == "pending"]
    assert len(pending) == PENDING_PER_SOURCE and all(n["addresses"] == [] for n in pending)

    # Approval hands out the next address (none was used up), and the mesh hears of it.
    server.admin("POST", f"/admin/v1/nodes/{pending[0]['id']}/approve")
    again = _register(strangers[0], 100)
    assert again["state"] == "approved" and again["addresses"][0] == "100.64.0.3"
    delta = a.call("map", {"version": version})
    assert [p["name"] for p in delta["delta"]["changed"]] == ["n100"]
    assert "full" in strangers[0].call("map", {"version": None})


def test_hardening_pending_registrations_are_capped_per_source_and_in_all(
    tmp_path: Path, db_url: str
) -> None:
    with running_server(tmp_path, db_url, pending_caps=(3, 5)) as server:
        for i in range(3):
            _register(server.client(), 200 + i)
        e = _refused(lambda: _register(server.client(), 203))
        assert e.status == 429 and "3 registrations from 127.0.0.1 already wait" in e.message
        # A pre-auth key is never capped: a flood cannot keep a real node out.
        key = server.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 600})
        assert _register(server.client(), 204, str(key["key"]))["state"] == "approved"  # type: ignore[index]
    with running_server(tmp_path, db_url, pending_caps=(100, 5)) as server:
        for i in range(2):
            _register(server.client(), 210 + i)
        e = _refused(lambda: _register(server.client(), 212))
        assert e.status == 429 and "5 registrations already wait for approval (at most 5)" in e.message


def test_hardening_pending_node_cannot_update_rotate_or_host(server: Server) -> None:
    stranger = server.client()
    _register(stranger, 300)
    before = _nodes(server)
    e = _refused(lambda: stranger.call("update", {"advertise_routes": ["10.0.0.0/8"]}))
    assert e.status == 403 and "a pending node cannot update" in e.message
    e = _refused(lambda: _register(stranger, 301))
    assert e.status == 403 and "a pending node cannot change its node key" in e.message
    e = _refused(lambda: stranger.call("device", {"action": "add", "public_key": _key(302), "name": "phone"}))
    assert e.status == 403 and "pending" in e.message
    assert _nodes(server) == before
    # Logging out is allowed, and wakes nobody either.
    version = server.service.watch.version
    stranger.call("logout", {})
    assert server.service.watch.version == version and _nodes(server) == []


def test_hardening_routes_and_endpoints_per_node_are_capped(server: Server) -> None:
    a, _b, _ = _approved_pair(server)
    routes = [f"10.{i}.0.0/16" for i in range(MAX_ROUTES + 1)]
    e = _refused(lambda: a.call("update", {"advertise_routes": routes}))
    assert (
        e.status == 400
        and f"body.advertise_routes: {MAX_ROUTES + 1} entries, at most {MAX_ROUTES}" in e.message
    )
    endpoints = [f"198.51.100.1:{1000 + i}" for i in range(MAX_ENDPOINTS + 1)]
    e = _refused(lambda: a.call("update", {"endpoints": endpoints}))
    assert e.status == 400 and f"body.endpoints: {MAX_ENDPOINTS + 1} entries" in e.message
    a.call("update", {"advertise_routes": routes[:MAX_ROUTES], "endpoints": endpoints[:MAX_ENDPOINTS]})
    (me,) = [n for n in _nodes(server) if n["name"] == "n1"]
    assert len(me["advertised_routes"]) == MAX_ROUTES and len(me["endpoints"]) == MAX_ENDPOINTS


def test_hardening_routes_inside_the_mesh_ranges_are_refused(server: Server) -> None:
    a, _b, _ = _approved_pair(server)
    ula = server.service.store.mesh.ipv6
    for route in ("100.64.0.2/32", "100.64.0.0/10", "100.100.0.0/16", f"{ula.network_address}/64", str(ula)):
        e = _refused(lambda r=route: a.call("update", {"advertise_routes": [r]}))  # type: ignore[misc]
        assert e.status == 400 and route in e.message and "overlaps the mesh's own range" in e.message
    # Routes that contain a mesh range are fine: each node's /32 and /128 stay more specific.
    a.call("update", {"advertise_routes": ["100.0.0.0/8", "fd00::/8"], "advertise_exit_node": True})


def test_hardening_tombstones_are_pruned_on_a_schedule(tmp_path: Path, db_url: str) -> None:
    with running_server(tmp_path, db_url, maintenance_every=0.05, tombstone_keep=0.0) as server:
        a, b, secret = _approved_pair(server)
        stale = b.call("map", {"version": None})["version"]
        for i in range(10, 20):  # an approved node rotating its key lays a tombstone each time
            _register(a, i, secret)

        def tombstones() -> int:
            store = server.service.store
            return int(store.db.run(lambda tx: tx.one("SELECT COUNT(*) FROM tombstones")[0], write=False))

        rounds = server.service.maintenance_rounds
        deadline = time.monotonic() + 10
        while (
            server.service.maintenance_rounds < rounds + 2 or tombstones()
        ) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tombstones() == 0
        # A node whose version is older than what was pruned gets a full map, not a delta.
        answer = b.call("map", {"version": stale})
        assert "full" in answer and [p["public_key"] for p in answer["full"]["peers"]] == [_key(19)]


ADMIN_PATHS = ["/admin/v1/nodes", "/admin/v1/keys", "/admin/v1/nodes/1/approve", "/admin/v1/nodes/1",
               "/admin/v1/keys/1", "/admin/", "/metrics", "/metrics/"]  # fmt: skip


def _status(url: str, method: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = b"{}" if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_hardening_public_listener_has_no_admin_api_nor_metrics(server: Server) -> None:
    for path in ADMIN_PATHS:
        for method in ("GET", "POST", "DELETE"):
            for token in (None, server.token):
                assert _status(server.url + path, method, token) == 404, (method, path, token)
    assert _status(server.admin_url + "/metrics", "GET", None) == 200
    assert _status(server.admin_url + "/admin/v1/nodes", "GET", None) == 401


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_hardening_serve_puts_admin_on_loopback_and_the_cli_finds_it(tmp_path: Path) -> None:
    """The real `meshpi-control serve`: public port scanned, admin verbs through the CLI."""
    state, port = tmp_path / "control", _free_port()
    refused = subprocess.run([str(BIN / "meshpi-control"), "--state-dir", str(state), "serve",
                              "--admin-listen", "0.0.0.0:8081"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert refused.returncode == 1 and "--admin-listen '0.0.0.0:8081'" in refused.stderr, refused.stderr
    with (tmp_path / "control.log").open("wb") as log:
        proc = subprocess.Popen([str(BIN / "meshpi-control"), "--state-dir", str(state), "serve",
                                 "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0"],
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not (state / "admin.url").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        admin_url = (state / "admin.url").read_text().strip()
        assert admin_url.startswith("http://127.0.0.1:") and not admin_url.endswith(f":{port}")
        token = (state / "admin.token").read_text().strip()
        for path in ADMIN_PATHS:
            assert _status(f"http://127.0.0.1:{port}{path}", "GET", token) == 404, path
        cli = subprocess.run([str(BIN / "meshpi-control"), "--state-dir", str(state), "keys", "create"],
                             capture_output=True, text=True, timeout=30, env={**os.environ})  # fmt: skip
        assert cli.returncode == 0 and cli.stdout.startswith("mpk-1-"), cli.stderr
        assert "meshpi_nodes" in urllib.request.urlopen(admin_url + "/metrics", timeout=10).read().decode()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0, (tmp_path / "control.log").read_text()


def test_hardening_taking_another_nodes_key_is_409_not_500(server: Server) -> None:
    """Node keys are public (every peer has them): registering or rotating to one
    that another node holds is refused, and was a 500 before."""
    a, _b, secret = _approved_pair(server)
    e = _refused(lambda: _register(a, 2, secret))  # b's key
    assert e.status == 409 and "already has key" in e.message
    e = _refused(lambda: _register(server.client(), 1))  # a's key, anonymously
    assert e.status == 409 and "already has this machine key or node key" in e.message
