"""First run through the web: password, a new mesh on this node's own control, then
the exit node. Every step goes through the real agent and control."""

from __future__ import annotations

import time

from flask.testing import FlaskClient

from tests.web.conftest import set_password_and_log_in
from tests.web.node import AgentNode


def test_web_setup_join_with_a_bad_login_url_says_why(client: FlaskClient, node: AgentNode) -> None:
    token = set_password_and_log_in(client)
    res = client.post("/setup/mesh", data={"csrf_token": token, "action": "join",
                                           "login_server": "http://nowhere.example", "auth_key": ""})  # fmt: skip
    page = res.get_data(as_text=True)
    assert res.status_code == 400 and 'id="mesh-result"' in page
    assert "Not connected (error)" in page and "nowhere.example" in page
    assert node.status()["control"]["state"] != "connected"


def test_web_setup_creates_a_mesh_and_offers_the_exit(client: FlaskClient, node: AgentNode) -> None:
    token = set_password_and_log_in(client)
    page = client.get("/setup/mesh").get_data(as_text=True)
    assert 'id="create-mesh"' in page and 'id="join-mesh"' in page
    started = time.monotonic()
    res = client.post("/setup/mesh", data={"csrf_token": token, "action": "create", "public_url": ""})
    assert res.status_code == 302 and res.headers["Location"] == "/setup/share", res.get_data(as_text=True)
    assert time.monotonic() - started < 30
    st = node.status()
    assert st["control"]["state"] == "connected" and st["self"]["addresses"]
    # Already in a mesh: the step says so instead of offering to make another.
    assert "already in a mesh" in client.get("/setup/mesh").get_data(as_text=True)
    share = client.get("/setup/share").get_data(as_text=True)
    assert 'id="offer-exit"' in share and "No home LAN was detected" in share  # a namespace with only lo
    res = client.post("/setup/share", data={"csrf_token": token, "exit_node": "on"})
    assert res.status_code == 302 and res.headers["Location"] == "/"
    prefs = node.client.get("/v1/prefs")
    assert prefs["advertise_exit_node"] is True and prefs["advertise_routes"] == []
    page = client.get("/").get_data(as_text=True)
    # Control runs here: the owner's choice is approved with it, nothing waits.
    assert "Saved. This Pi offers them to your mesh now." in page and 'id="approvals"' not in page
    (me,) = node.client.get("/v1/control/nodes")
    assert me["approved_routes"] == ["0.0.0.0/0", "::/0"]
