"""meshpi-control over real HTTP on loopback: the agent's client against the
aiohttp app, the admin API (on its own listener), and hostile requests (always
4xx, never 5xx, and nothing changes)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.agent.control.client import ControlClient, ControlRefused
from appliance.base.keys import PrivateKey
from appliance.control.cli import AdminError, admin_call
from appliance.wire.seal import ControlPublicKey, MachineKey, seal_request
from tests.control.httpserver import Server, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path) as s:
        yield s


def _register(client: ControlClient, i: int, auth: str | None) -> dict[str, object]:
    body = {"node_key": str(PrivateKey(bytes([i]) * 32).public_key()), "hostname": f"n{i}", "auth_key": auth}
    return client.call("register", body)


def test_app_join_map_and_admin_over_http(server: Server) -> None:
    key = server.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 600})
    secret = key["key"]  # type: ignore[index]
    pi, laptop = server.client(), server.client()
    assert _register(pi, 1, secret)["state"] == "approved"
    assert _register(laptop, 2, secret)["state"] == "approved"
    pi.call("update", {"advertise_routes": ["192.168.77.0/24"], "advertise_exit_node": True,
                       "endpoints": ["198.51.100.1:51820"]})  # fmt: skip
    full = laptop.call("map", {"version": None})
    assert [p["name"] for p in full["full"]["peers"]] == ["n1"]
    assert full["full"]["peers"][0]["routes"] == []  # advertised, not yet approved
    nodes = server.admin("GET", "/admin/v1/nodes")
    pi_id = next(n["id"] for n in nodes if n["name"] == "n1")  # type: ignore[union-attr, index]
    server.admin("POST", f"/admin/v1/nodes/{pi_id}/routes", {"approved_routes": ["0.0.0.0/0", "::/0"]})
    delta = laptop.call("map", {"version": full["version"]})
    assert delta["delta"]["changed"][0]["routes"] == ["0.0.0.0/0", "::/0"]
    metrics = urllib.request.urlopen(server.admin_url + "/metrics").read().decode()
    assert 'meshpi_nodes{state="approved"} 2' in metrics and "meshpi_map_updates_sent_total 2" in metrics


def test_app_pending_node_is_refused_a_map_until_approved(server: Server) -> None:
    client = server.client()
    assert _register(client, 3, None)["state"] == "pending"
    with pytest.raises(ControlRefused) as e:
        client.call("map", {"version": None})
    assert e.value.status == 403
    with pytest.raises(ControlRefused) as e:
        _register(server.client(), 4, "mpk-1-notakey")
    assert e.value.status == 403


def test_app_admin_needs_the_token(server: Server) -> None:
    with pytest.raises(AdminError, match="401"):
        admin_call(server.admin_url, "wrong", "GET", "/admin/v1/nodes")
    with pytest.raises(AdminError, match="400"):
        server.admin("POST", "/admin/v1/keys", {"expires_in": "soon"})


def test_app_replayed_and_wrong_key_requests_are_4xx(server: Server) -> None:
    machine = MachineKey.generate()
    client = server.client(machine)
    client.call("register", {"node_key": str(PrivateKey(bytes([5]) * 32).public_key()), "hostname": "x"})
    stranger = ControlPublicKey(bytes(MachineKey.generate().public_key()))
    body, _ = seal_request(machine, stranger, {"op": "hello"})
    assert server.post("/v1/hello", body) == 400
    assert server.post("/v1/hello", b"") == 400
    assert server.post("/v1/map", b"\x01" + b"x" * (2 << 20)) == 413


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(["hello", "register", "map", "update", "logout", "nope"]), data=st.binary(max_size=600)
)
def test_app_garbage_never_gets_a_5xx_nor_changes_state(server: Server, op: str, data: bytes) -> None:
    before = server.admin("GET", "/admin/v1/nodes")
    status = server.post(f"/v1/{op}", data)
    assert 400 <= status < 500
    assert server.admin("GET", "/admin/v1/nodes") == before


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from(
    ["node_key", "hostname", "auth_key", "version", "endpoints", "advertise_routes", "advertise_exit_node"]
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(["register", "map", "update", "logout"]),
    body=st.dictionaries(_fields | st.text(max_size=8), _json, max_size=5),
)
def test_app_authenticated_nonsense_is_4xx_never_5xx(
    server: Server, op: str, body: dict[str, object]
) -> None:
    client = server.client()
    try:
        client.call(op, body, timeout=5)
    except ControlRefused as e:
        assert 400 <= e.status < 500, e


def test_app_admin_rename_over_http_and_a_name_without_a_label_is_400(server: Server) -> None:
    key = server.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 600})
    client = server.client()
    assert _register(client, 4, key["key"])["dns_name"] == "n4"  # type: ignore[index]
    (node,) = server.admin("GET", "/admin/v1/nodes")  # type: ignore[misc]
    renamed = server.admin("POST", f"/admin/v1/nodes/{node['id']}/rename", {"name": "Wohnzimmer Pi"})
    assert renamed["name"] == renamed["dns_name"] == "wohnzimmer-pi"  # type: ignore[index]
    for bad in ({"name": "😀"}, {"name": 5}, {"nom": "x"}):
        with pytest.raises(AdminError, match="400"):
            server.admin("POST", f"/admin/v1/nodes/{node['id']}/rename", bad)
    assert server.admin("GET", "/admin/v1/nodes")[0]["dns_name"] == "wohnzimmer-pi"  # type: ignore[index]
    with pytest.raises(ControlRefused) as e:  # a flood of split-DNS domains is refused before parsing
        client.call("update", {"advertise_dns": {"domains": ["x"] * 10_000, "resolver": "10.0.0.1"}})
    assert e.value.status == 400 and "advertise_dns.domains: 10000 entries" in e.value.message


def test_app_cli_removes_several_nodes_in_one_command(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`meshpi-control nodes remove ID...`: each in order, one line each; the first id
    the server refuses stops the rest, named in the error (exit 1)."""
    from appliance.control.cli import main

    key: Any = server.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 600})
    secret = key["key"]
    for i in (11, 12, 13, 14):
        _register(server.client(), i, secret)
    nodes: Any = server.admin("GET", "/admin/v1/nodes")
    ids = {n["name"]: n["id"] for n in nodes}
    cli = ["--state-dir", str(tmp_path), "nodes", "remove", "--server", server.admin_url]
    assert main([*cli, str(ids["n11"]), str(ids["n12"])]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"node {ids['n11']} removed",
        f"node {ids['n12']} removed",
    ]
    assert main([*cli, str(ids["n13"]), "9999", str(ids["n14"])]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"node {ids['n13']} removed"] and "/admin/v1/nodes/9999: 404" in err
    nodes = server.admin("GET", "/admin/v1/nodes")
    assert sorted(n["name"] for n in nodes) == ["n14"]
