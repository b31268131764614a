"""The dashboard's live parts against a real agent that created its own mesh: the
live region (/part/live), the traffic history (/api/traffic), and a device managed
from the one list (rename, disable, enable), with their refusals."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.web.conftest import make_app, set_password_and_log_in
from tests.web.node import AgentNode


@pytest.fixture
def app(meshed: AgentNode, tmp_path: Path) -> Flask:
    return make_app(meshed.socket, tmp_path / "web")


@pytest.fixture
def token(client: FlaskClient) -> str:
    return set_password_and_log_in(client)


@pytest.fixture
def device(meshed: AgentNode) -> Any:
    answer = meshed.client.post("/v1/devices", {"name": "tablet", "mode": "lan", "endpoint": "198.51.100.7"})
    yield answer["device"]
    for d in meshed.client.get("/v1/devices")["devices"]:
        meshed.client.delete(f"/v1/devices/{d['id']}")


def _rows(page: str) -> dict[str, str]:
    """data-name -> the row's opening tag."""
    return {
        m.group(1): m.group(0) for m in re.finditer(r'<tr data-id="[^"]*" data-name="([^"]*)"[^>]*>', page)
    }


def test_web_live_region_has_the_headline_rows_and_totals(
    client: FlaskClient, token: str, device: dict[str, Any]
) -> None:
    res = client.get("/part/live?back=devices")
    page = res.get_data(as_text=True)
    assert res.status_code == 200 and res.headers["Cache-Control"] == "no-store"
    assert re.search(r'id="headline" class="headline (ok|warn|error)"', page)
    row = _rows(page)["tablet"]
    assert 'data-state="never"' in row and 'data-exit="no"' in row
    assert 'id="totals"' in page and 'name="back" value="devices"' in page
    assert "<script" not in page  # swapped in as HTML: never anything that runs


def test_web_live_region_says_the_agent_is_down(tmp_path: Path) -> None:
    app = make_app(tmp_path / "no-agent.sock", tmp_path / "web")
    client = app.test_client()
    set_password_and_log_in(client)
    res = client.get("/part/live")
    page = res.get_data(as_text=True)
    assert res.status_code == 503 and 'data-level="error"' in page
    assert "The meshpi agent is not running" in page and "connected-rows" not in page
    assert "The meshpi agent is not running" in client.get("/").get_data(as_text=True)


def test_web_traffic_history_is_the_agents(client: FlaskClient, token: str) -> None:
    doc = client.get("/api/traffic?minutes=30").get_json()
    assert doc["step"] == 60 and len(doc["total"]["rx"]) == 30 and len(doc["total"]["tx"]) == 30
    for bad in ("0", "1441", "abc", "-5", "1e3", ""):
        res = client.get(f"/api/traffic?minutes={bad}")
        assert res.status_code == 400 and "minutes" in res.get_json()["error"], bad


def test_web_device_rename_disable_enable(
    client: FlaskClient, token: str, meshed: AgentNode, device: dict[str, Any]
) -> None:
    base = f"/devices/{device['id']}"
    res = client.post(
        f"{base}/rename", data={"csrf_token": token, "name": "Anna's tablet", "back": "dashboard"}
    )
    assert res.status_code == 302 and res.headers["Location"] == "/"
    (found,) = meshed.client.get("/v1/devices")["devices"]
    assert found["name"] == "Anna's tablet"
    res = client.post(f"{base}/enable", data={"csrf_token": token, "enabled": "0"}, follow_redirects=True)
    assert "Disabled" in res.get_data(as_text=True)
    assert meshed.client.get("/v1/devices")["devices"][0]["enabled"] is False
    row = _rows(client.get("/").get_data(as_text=True))["Anna&#39;s tablet"]
    assert 'class="disabled"' in row
    client.post(f"{base}/enable", data={"csrf_token": token, "enabled": "1"})
    assert meshed.client.get("/v1/devices")["devices"][0]["enabled"] is True


def test_web_device_actions_refused_with_the_reason(
    client: FlaskClient, token: str, meshed: AgentNode, device: dict[str, Any]
) -> None:
    base = f"/devices/{device['id']}"
    empty = client.post(f"{base}/rename", data={"csrf_token": token, "name": "  "}, follow_redirects=True)
    assert "Give the device a name." in empty.get_data(as_text=True)
    long = client.post(
        f"{base}/rename", data={"csrf_token": token, "name": "x" * 5000}, follow_redirects=True
    )
    assert long.status_code == 200 and "name" in long.get_data(as_text=True)
    unknown = client.post("/devices/no-such-device/enable", data={"csrf_token": token, "enabled": "0"},
                          follow_redirects=True)  # fmt: skip
    assert unknown.status_code == 200 and 'class="banner error"' in unknown.get_data(as_text=True)
    # Nothing changed by any of them; and without the CSRF token nothing is even asked.
    forged = client.post(f"{base}/rename", data={"name": "forged"})
    assert forged.status_code == 403
    (found,) = meshed.client.get("/v1/devices")["devices"]
    assert found["name"] == "tablet" and found["enabled"] is True
