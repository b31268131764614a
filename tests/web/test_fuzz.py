"""Hypothesis against the whole web UI, through Flask's test client and a real agent:
random methods, paths (known routes and garbage, percent-escapes, queries), headers
(Host, Content-Type, CSRF, cookies), forms, JSON and raw bodies, with and without a
valid session. Every answer must be below 500 and carry no traceback.

Two runs of 2,500 cases: the first-run state (no password) and an owner's session.
Values are random; the names of form fields are drawn from the app's own, so that
requests reach the views (the agent refuses what is wrong, with a 4xx).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder

from tests.web.conftest import csrf_of, log_in, make_app, set_password_and_log_in
from tests.web.node import AgentNode

CASES = 2500
ROUTES = ["/", "/login", "/logout", "/setup", "/setup/mesh", "/setup/share", "/settings", "/settings/password",
          "/settings/leave", "/logs", "/devices", "/devices/laptop", "/devices/7/revoke", "/devices/x/revoke",
          "/share", "/nodes/1/approve", "/nodes/1/routes", "/nodes/99999999999999999999/approve", "/api/status",
          "/api/logs", "/api/share", "/api/prefs", "/static/style.css", "/static/app.js", "/static/../secret_key",
          "/static/%2e%2e/secret_key", "/favicon.ico", "/api/", "/setup/", "//", "/%00", "/%ff%fe"]  # fmt: skip
FIELDS = ["csrf_token", "password", "confirm", "current", "setup_code", "next", "action", "login_server",
          "auth_key", "public_url", "exit_node", "route", "field", "on", "name", "mode", "endpoint", "mtu",
          "listen_port", "hostname", "led_pins", "routes", "after"]  # fmt: skip
HOSTS = ["localhost", "localhost:80", "127.0.0.1", "[::1]:8000", "meshpi.local"]
CONTENT_TYPES = ["application/x-www-form-urlencoded", "multipart/form-data", "application/json", "text/plain",
                 "application/json; charset=utf-16", "multipart/form-data; boundary=", "garbage/;;;", ""]  # fmt: skip
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND"]

header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
token_text = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=20)
any_text = st.text(max_size=80)
path_chars = string.ascii_letters + string.digits + "/-._~%!$&'()*+,;=:@?"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def paths(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(ROUTES) | st.text(alphabet=path_chars, max_size=40).map(lambda p: "/" + p))
    if draw(st.booleans()):
        query = draw(st.dictionaries(st.sampled_from(FIELDS) | token_text, any_text, max_size=3))
        from urllib.parse import urlencode

        base += ("&" if "?" in base else "?") + urlencode(query)
    return base


@st.composite
def requests(draw: st.DrawFn, csrf_now: Callable[[], str | None]) -> dict[str, Any]:
    csrf = csrf_now()
    headers: dict[str, str] = draw(st.dictionaries(token_text, header_text, max_size=3))
    headers["Host"] = draw(st.sampled_from(HOSTS) if draw(st.integers(0, 9)) else header_text)
    if csrf and draw(st.booleans()):
        headers["X-CSRF-Token"] = csrf
    if draw(st.booleans()):
        headers["Cookie"] = draw(header_text)
    kind = draw(st.sampled_from(["none", "form", "json", "raw"]))
    body: dict[str, Any] = {}
    if kind == "form":
        form = draw(st.dictionaries(st.sampled_from(FIELDS) | token_text, any_text, max_size=6))
        if csrf and draw(st.booleans()):
            form["csrf_token"] = csrf
        body["data"] = form
    elif kind == "json":
        body["json"] = draw(json_values)
    elif kind == "raw":
        body["data"] = draw(st.binary(max_size=300))
        body["content_type"] = draw(st.sampled_from(CONTENT_TYPES))
    return {"method": draw(st.sampled_from(METHODS)), "path": draw(paths()), "headers": headers, **body}


def _check_all(
    client: FlaskClient, csrf: list[str | None], owner: bool, count: list[int]
) -> Callable[[dict[str, Any]], None]:
    def one(req: dict[str, Any]) -> None:
        try:
            builder = EnvironBuilder(
                req["path"], method=req["method"], headers=req["headers"],
                data=req.get("data"), json=req.get("json"), content_type=req.get("content_type"),
            )  # fmt: skip
            builder.get_environ()
        except (ValueError, TypeError, UnicodeError):
            return  # the test client cannot even build it: no server would see it
        res = client.open(builder)
        count[0] += 1
        body = res.get_data()
        assert res.status_code < 500, (req, res.status_code, body[:400])
        assert b"Traceback" not in body and b'File "' not in body, (req, body[:400])
        if owner and res.status_code == 302 and req["path"].startswith("/logout"):
            csrf[0] = log_in(client)  # stay the owner for the next cases

    return one


def _run(client: FlaskClient, token: str, owner: bool) -> int:
    count, csrf = [0], [token]
    one = _check_all(client, csrf, owner, count)

    @settings(max_examples=CASES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])  # fmt: skip
    @given(requests(lambda: csrf[0]))
    def fuzz(req: dict[str, Any]) -> None:
        one(req)

    fuzz()
    return count[0]


@pytest.fixture
def fuzz_app(node: AgentNode, tmp_path: Path) -> Flask:
    # Random wrong passwords would throttle this client, and the owner's run logs in again
    # after each random logout: the throttle is not what is fuzzed here (test_hardening).
    return make_app(node.socket, tmp_path / "web", LOGIN_FAILURES_PER_ADDRESS=1 << 30)


def test_web_fuzz_first_run_never_5xx(fuzz_app: Flask) -> None:
    client = fuzz_app.test_client()
    csrf = csrf_of(client.get("/setup").get_data(as_text=True))
    assert _run(client, csrf, owner=False) >= CASES * 0.95


def test_web_fuzz_logged_in_never_5xx(fuzz_app: Flask, node: AgentNode) -> None:
    client = fuzz_app.test_client()
    csrf = set_password_and_log_in(client)
    assert _run(client, csrf, owner=True) >= CASES * 0.95
    assert node.status()["agent"] == "running"
