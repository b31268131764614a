"""The dashboard, devices, settings and logs against a real agent that created its
own mesh (its control runs beside it: "control is local")."""

from __future__ import annotations

import base64
import html
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.web.conftest import make_app, set_password_and_log_in
from tests.web.node import AgentNode, second_agent


@pytest.fixture
def app(meshed: AgentNode, tmp_path: Path) -> Flask:
    return make_app(meshed.socket, tmp_path / "web")


@pytest.fixture
def token(client: FlaskClient) -> str:
    return set_password_and_log_in(client)


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def _nft(node: AgentNode) -> str:
    return node.run("nft", "list", "table", "inet", "meshpi").stdout


def _control_node(node: AgentNode, name: str) -> dict[str, object]:
    return next(n for n in node.client.get("/v1/control/nodes") if n["name"] == name)


def test_web_dashboard_shows_this_node(client: FlaskClient, token: str, meshed: AgentNode) -> None:
    me = meshed.status()["self"]
    page = client.get("/").get_data(as_text=True)
    assert f'id="node-name">{me["name"]}<' in page
    assert ", ".join(me["addresses"]) in page
    assert 'id="headline" class="headline ' in page


def test_web_status_api_feeds_the_graph(client: FlaskClient, token: str) -> None:
    doc = client.get("/api/status").get_json()
    assert isinstance(doc["rx_bytes"], int) and isinstance(doc["tx_bytes"], int)
    assert isinstance(doc["peers"], list) and doc["control"]["state"] == "connected"
    assert abs(doc["time"] - time.time()) < 5
    assert set(doc["share"]) == {"exit_node", "lan", "routes", "detected"}
    assert "prefs" not in doc  # only what the page redraws


def test_web_exit_toggle_takes_effect_in_the_kernel(
    client: FlaskClient, token: str, meshed: AgentNode
) -> None:
    on = client.post("/api/share", json={"field": "exit_node", "on": True}, headers={"X-CSRF-Token": token})
    assert on.status_code == 200 and on.get_json()["prefs"]["advertise_exit_node"] is True
    # Its control runs here: what its owner turns on is approved with it, no second step.
    name = meshed.status()["self"]["name"]
    assert _control_node(meshed, name)["approved_routes"] == ["0.0.0.0/0", "::/0"]
    wait_until(lambda: "masquerade" in _nft(meshed), 10, "the agent's nft table with masquerade")
    wait_until(
        lambda: meshed.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1", 10, "forwarding"
    )
    # The form the page posts without JavaScript does the same.
    off = client.post("/share", data={"csrf_token": token, "field": "exit_node", "on": "0"})
    assert off.status_code == 302
    # The table stays for the input policy (the resolver's port 53 is the mesh's only);
    # what made it an exit node goes.
    wait_until(lambda: "masquerade" not in _nft(meshed), 10, "the masquerade to go")
    assert meshed.client.get("/v1/prefs")["advertise_exit_node"] is False
    # This namespace has no LAN: sharing it is refused with the reason.
    lan = client.post("/api/share", json={"field": "lan", "on": True}, headers={"X-CSRF-Token": token})
    assert lan.status_code == 400 and "no home LAN was detected" in lan.get_json()["error"]


def test_web_dashboard_approves_this_nodes_exit_routes(
    client: FlaskClient, token: str, meshed: AgentNode
) -> None:
    """This node made the mesh: its exit needs no approval (issue 16, control/autoapprove.py).
    A node that joined with a plain key waits for the Approve button."""
    me = meshed.status()["self"]["name"]
    meshed.client.patch("/v1/prefs", {"advertise_exit_node": True})
    try:
        wait_until(lambda: _control_node(meshed, me)["approved_routes"] == ["0.0.0.0/0", "::/0"], 10,
                   "this node's exit approved without asking")  # fmt: skip
        assert "offers:" not in client.get("/").get_data(as_text=True)
    finally:
        meshed.client.patch("/v1/prefs", {"advertise_exit_node": False})
    login_url = meshed.status()["local_control"]["login_url"]
    key = meshed.client.post("/v1/control/keys", {"reusable": False, "expires_in": 300})["key"]
    with second_agent(meshed, "router") as other:
        answer = other.client.post("/v1/up", {"login_server": login_url, "auth_key": key,
                                              "prefs": {"advertise_exit_node": True}}, timeout=60)  # fmt: skip
        assert answer["state"] == "connected", answer
        name = "router"
        wait_until(lambda: "0.0.0.0/0" in _control_node(meshed, name)["advertised_routes"], 10,
                   "control to hear the advertised exit")  # fmt: skip
        page = client.get("/").get_data(as_text=True)
        assert f"<b>{name}</b> offers:" in page and 'value="exit node"' in page
        node_id = _control_node(meshed, name)["id"]
        res = client.post(f"/nodes/{node_id}/routes", data={"csrf_token": token, "route": "exit node"},
                          follow_redirects=True)  # fmt: skip
        assert f"Approved exit node for {name}." in res.get_data(as_text=True)
        assert _control_node(meshed, name)["approved_routes"] == ["0.0.0.0/0", "::/0"]
        assert "offers:" not in client.get("/").get_data(as_text=True)


def test_web_dashboard_approves_a_waiting_node(client: FlaskClient, token: str, meshed: AgentNode) -> None:
    login_url = meshed.status()["local_control"]["login_url"]
    with second_agent(meshed, "waiter") as other:
        answer = other.client.post("/v1/up", {"login_server": login_url, "auth_key": None}, timeout=60)
        assert answer["state"] == "pending", answer
        page = client.get("/").get_data(as_text=True)
        assert "<b>waiter</b>" in page and "wants to join" in page
        node_id = _control_node(meshed, "waiter")["id"]
        res = client.post(f"/nodes/{node_id}/approve", data={"csrf_token": token}, follow_redirects=True)
        assert "Approved waiter." in res.get_data(as_text=True)
        assert _control_node(meshed, "waiter")["state"] == "approved"  # the node hears it on its next try
        assert "wants to join" not in client.get("/").get_data(as_text=True)


def test_web_laptop_gets_a_join_command_with_a_fresh_key(
    client: FlaskClient, token: str, meshed: AgentNode
) -> None:
    res = client.post("/devices/laptop", data={"csrf_token": token})
    assert res.status_code == 200
    page = res.get_data(as_text=True)
    found = re.search(r'<pre id="up-command" class="command">([^<]+)</pre>', page)
    assert found, page
    argv = shlex.split(html.unescape(found.group(1)))
    assert argv[:5] == [
        "sudo",
        "meshpi",
        "up",
        "--login-server",
        meshed.status()["local_control"]["login_url"],
    ]
    assert argv[5] == "--auth-key" and argv[6].startswith("mpk-") and len(argv) == 7
    # The command works: a new node joins with it, no admin needed.
    with second_agent(meshed, "laptop") as laptop:
        answer = laptop.client.post("/v1/up", {"login_server": argv[4], "auth_key": argv[6]}, timeout=60)
        assert answer["state"] == "connected", answer
    assert res.headers["Cache-Control"] == "no-store"


def test_web_settings_reach_the_agent(client: FlaskClient, token: str, meshed: AgentNode) -> None:
    page = client.get("/settings").get_data(as_text=True)
    assert 'id="led_pins"' in page and 'id="act_led"' in page  # the agent's prefs have LED fields
    before = meshed.client.get("/v1/prefs")
    form = {
        "csrf_token": token,
        "hostname": "attic-pi",
        "mtu": "1380",
        "listen_port": str(before["listen_port"]),
        "led_pins": "17, 27",
    }  # act_led left unchecked
    res = client.post("/settings", data=form, follow_redirects=True)
    assert "Saved: act_led, hostname, led_pins, mtu." in res.get_data(as_text=True)
    prefs = meshed.client.get("/v1/prefs")
    assert (prefs["hostname"], prefs["mtu"], prefs["led_pins"], prefs["act_led"]) == (
        "attic-pi",
        1380,
        [17, 27],
        False,
    )
    again = client.post("/settings", data=form, follow_redirects=True)
    assert "Nothing changed." in again.get_data(as_text=True)
    bad = client.post("/settings", data={**form, "led_pins": "17, 99"}, follow_redirects=True)
    assert "led_pins[1]: 99" in bad.get_data(as_text=True)
    meshed.client.patch("/v1/prefs", {k: before[k] for k in ("hostname", "mtu", "led_pins", "act_led")})


def test_web_logs_page_and_its_updates(client: FlaskClient, token: str, meshed: AgentNode) -> None:
    page = client.get("/logs").get_data(as_text=True)
    assert "LocalAPI on" in page
    last = int(re.search(r'data-after="(\d+)"', page).group(1))  # type: ignore[union-attr]
    assert client.get(f"/api/logs?after={last}").get_json() == {"lines": []}
    meshed.client.patch("/v1/prefs", {"mtu": 1400})
    meshed.client.patch("/v1/prefs", {"mtu": 1280})
    wait_until(lambda: client.get(f"/api/logs?after={last}").get_json()["lines"], 10, "new log lines")
    assert all(ln["seq"] > last for ln in client.get(f"/api/logs?after={last}").get_json()["lines"])


def _device(node: AgentNode, name: str) -> dict[str, Any] | None:
    return next((d for d in node.client.get("/v1/devices")["devices"] if d["name"] == name), None)


def test_web_phone_device_config_shown_once_then_revoked(
    client: FlaskClient, token: str, meshed: AgentNode
) -> None:
    port = meshed.client.get("/v1/prefs")["listen_port"]
    res = client.post("/devices", data={"csrf_token": token, "name": "phone", "mode": "all",
                                        "endpoint": "home.example.net"})  # fmt: skip
    page = res.get_data(as_text=True)
    assert res.status_code == 200 and res.headers["Cache-Control"] == "no-store", page
    found = re.search(r'<pre id="config">([^<]+)</pre>', page)
    assert found, page
    config = html.unescape(found.group(1))
    assert config.startswith("[Interface]\nPrivateKey = ")
    assert f"Endpoint = home.example.net:{port}\n" in config  # the port defaults to the node's
    download = re.search(r'href="data:text/plain;charset=utf-8;base64,([^"]+)" download="phone.conf"', page)
    assert download and base64.b64decode(download.group(1)).decode() == config
    assert 'id="qr" src="data:image/svg+xml' in page
    device = _device(meshed, "phone")
    assert device is not None and device["mode"] == "all"
    revoke = f'action="/devices/{device["id"]}/revoke"'
    listing = client.get("/devices").get_data(as_text=True)
    assert "PrivateKey" not in listing and revoke in listing

    res = client.post(f"/devices/{device['id']}/revoke", data={"csrf_token": token}, follow_redirects=True)
    listing = res.get_data(as_text=True)
    assert "Device revoked: its key no longer works." in listing and revoke not in listing
    assert _device(meshed, "phone") is None


def test_web_phone_device_endpoint_is_asked_for_or_prefilled(
    client: FlaskClient, token: str, meshed: AgentNode
) -> None:
    page = client.get("/devices").get_data(as_text=True)
    # No mapping, no forward, no name in the lab: the agent says phones cannot reach it.
    assert re.search(r'id="device-endpoint" value=""\s', page)
    assert 'id="phones-unreachable"' in page and "cannot reach this Pi from outside" in page
    # Posted without one, the agent would dial the LAN address; this lab node has no
    # LAN either, so the agent's reason and fix are shown and nothing is made.
    res = client.post("/devices", data={"csrf_token": token, "name": "tablet", "mode": "lan"},
                      follow_redirects=True)  # fmt: skip
    assert "give the endpoint (host[:port]) the phone should dial" in res.get_data(as_text=True)
    assert _device(meshed, "tablet") is None
    meshed.client.patch("/v1/prefs", {"advertise_endpoints": ["198.51.100.7:41641"]})
    try:
        page = client.get("/devices").get_data(as_text=True)
        assert re.search(r'id="device-endpoint" value="198.51.100.7:41641"\s', page), page
    finally:
        meshed.client.patch("/v1/prefs", {"advertise_endpoints": []})


def test_web_reach_page_says_whether_the_internet_reaches_this_pi(
    client: FlaskClient, token: str, meshed: AgentNode
) -> None:
    """netcheck for a person: the lab node has no STUN server and no router, so
    the verdict is no, with the reason; the headline links here."""
    assert 'id="reach-link"' in client.get("/").get_data(as_text=True)
    page = client.get("/reach").get_data(as_text=True)
    assert 'id="reach-verdict"' in page and "Not directly:" in page, page
    assert re.search(r'id="reach-udp">(works|no answer from a STUN server)</dd>', page), page
    assert "Port mapping on the router" in page and "meshpi netcheck" in page
