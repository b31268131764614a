"""Fixtures for the web tier: the Flask app and its test client, against a real agent.

`node` is a module's agent (with its own local control, not yet in a mesh);
`meshed` is one that created its mesh. `app` is a fresh web app (new state
directory: no password yet) talking to that agent's LocalAPI socket.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.web.node import AgentNode, agent_node
from webui import create_app

_REQUIRED_TOOLS = ("ip", "nft", "wireguard-go", "wg")
PASSWORD = "correct horse battery"


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the agent runs in a network namespace"
    absent = [tool for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]
    if absent:
        return f"needs {', '.join(absent)} on PATH (./scripts/test installs them)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = missing()
    for item in items:
        if "tests/web/" in str(item.fspath).replace(os.sep, "/") and reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def node() -> Iterator[AgentNode]:
    with agent_node() as n:
        yield n


@pytest.fixture(scope="module")
def meshed() -> Iterator[AgentNode]:
    with agent_node() as n:
        n.create_mesh()
        yield n


def make_app(socket: Path, state_dir: Path, **extra: object) -> Flask:
    return create_app({"LOCALAPI_SOCKET": str(socket), "STATE_DIR": str(state_dir), **extra})


@pytest.fixture
def app(node: AgentNode, tmp_path: Path) -> Flask:
    return make_app(node.socket, tmp_path / "web")


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def setup_code_of(app: Flask) -> str:
    """What the owner reads off the console or the boot partition."""
    code = app.extensions["meshpi_setup_code"].read()
    assert code, "no setup code"
    return str(code)


def set_password_and_log_in(client: FlaskClient, password: str = PASSWORD) -> str:
    """First run through the setup page (with the setup code); returns the session's CSRF token."""
    token = csrf_of(client.get("/setup").get_data(as_text=True))
    code = setup_code_of(client.application)
    res = client.post(
        "/setup", data={"csrf_token": token, "setup_code": code, "password": password, "confirm": password}
    )
    assert res.status_code == 302 and res.headers["Location"].endswith("/setup/mesh"), res.get_data(
        as_text=True
    )
    return csrf_of(client.get("/settings").get_data(as_text=True))


def log_in(client: FlaskClient, password: str = PASSWORD) -> str:
    token = csrf_of(client.get("/login").get_data(as_text=True))
    res = client.post("/login", data={"csrf_token": token, "password": password})
    assert res.status_code == 302, res.get_data(as_text=True)
    return csrf_of(client.get("/settings").get_data(as_text=True))
