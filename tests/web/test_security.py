"""Who may do what in the web UI: first run, sessions, CSRF, the login throttle,
the password file, and errors that show a message and never a traceback."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from tests.web.conftest import PASSWORD, csrf_of, log_in, make_app, set_password_and_log_in, setup_code_of
from tests.web.node import AgentNode
from webui.passwords import PasswordFile, verify_password

# Every page and API call the app has, with a method that reaches its view.
PROTECTED_PAGES = [
    "/",
    "/logs",
    "/reach",
    "/settings",
    "/devices",
    "/setup/mesh",
    "/setup/share",
    "/part/live",
    "/update",
]
PROTECTED_POSTS = ["/share", "/nodes/1/approve", "/nodes/1/routes", "/settings", "/settings/password",
                   "/settings/leave", "/devices", "/devices/7/revoke", "/devices/7/rename", "/devices/7/enable", "/devices/laptop", "/setup/mesh",
                   "/setup/share", "/logout", "/update", "/update/url"]  # fmt: skip
PROTECTED_API = [
    ("GET", "/api/status"),
    ("GET", "/api/logs"),
    ("GET", "/api/traffic"),
    ("POST", "/api/share"),
    ("PATCH", "/api/prefs"),
]


def test_web_every_route_is_known_to_the_security_tests(app: Flask) -> None:
    """A new route must be added to the lists above (and so be tested)."""
    listed = {*PROTECTED_PAGES, *PROTECTED_POSTS, *(p for _, p in PROTECTED_API), "/login", "/setup"}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<int:\w+>", "1", rule.rule)
        path = re.sub(r"<\w+>", "7", path)
        assert path in listed, f"{rule.rule} ({rule.endpoint}) is not in the security tests"


def test_web_first_run_leads_every_page_to_setup(client: FlaskClient) -> None:
    for path in [*PROTECTED_PAGES, "/login"]:
        res = client.get(path)
        assert res.status_code == 302, path
        assert res.headers["Location"] == "/setup", path
    for method, path in PROTECTED_API:
        res = client.open(path, method=method, json={})
        assert res.status_code == 401, path
        assert "password" in res.get_json()["error"]
    page = client.get("/setup")
    assert page.status_code == 200 and b"Choose the admin password" in page.data


def test_web_setup_password_rules(app: Flask, client: FlaskClient) -> None:
    token = csrf_of(client.get("/setup").get_data(as_text=True))
    code = setup_code_of(app)
    short = client.post(
        "/setup", data={"csrf_token": token, "setup_code": code, "password": "short", "confirm": "short"}
    )
    assert short.status_code == 400 and b"at least 8 characters" in short.data
    differ = client.post("/setup", data={"csrf_token": token, "setup_code": code,
                                         "password": "long enough 1", "confirm": "long enough 2"})  # fmt: skip
    assert differ.status_code == 400 and b"differ" in differ.data
    assert client.get("/").headers["Location"] == "/setup"  # still nothing set


def test_web_setup_closes_once_a_password_exists(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)
    # A logged-in owner is sent on to the next step ...
    assert client.get("/setup").headers["Location"] == "/setup/mesh"
    # ... and a stranger cannot set the password again, with or without a session.
    stranger = app.test_client()
    assert stranger.get("/setup").headers["Location"] == "/login"
    token = csrf_of(stranger.get("/login").get_data(as_text=True))
    res = stranger.post("/setup", data={"csrf_token": token, "setup_code": "", "password": "taken over!",
                                        "confirm": "taken over!"})  # fmt: skip
    # Refused and told (a first-run form that came late), the stored password unchanged.
    assert res.status_code == 409 and "Log in with it" in res.get_data(as_text=True)
    assert PasswordFile(Path(app.config["STATE_DIR"])).check(PASSWORD)


def test_web_protected_routes_need_a_session(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)
    stranger = app.test_client()
    token = csrf_of(stranger.get("/login").get_data(as_text=True))  # even with a CSRF token
    for path in PROTECTED_PAGES:
        res = stranger.get(path)
        assert res.status_code == 302 and res.headers["Location"].startswith("/login"), path
    for path in PROTECTED_POSTS:
        if path == "/logout":
            continue
        res = stranger.post(path, data={"csrf_token": token, "name": "x", "field": "exit_node", "on": "1"})
        assert res.status_code == 302 and res.headers["Location"].startswith("/login"), path
    for method, path in PROTECTED_API:
        res = stranger.open(path, method=method, json={"mtu": 1400}, headers={"X-CSRF-Token": token})
        assert res.status_code == 401, path
        assert res.get_json() == {"error": "Log in first."}


def test_web_state_changes_need_the_csrf_token(client: FlaskClient, node: AgentNode) -> None:
    token = set_password_and_log_in(client)
    before = node.client.get("/v1/prefs")["mtu"]
    for bad in ({}, {"csrf_token": "x" * len(token)}):
        res = client.post("/settings", data={**bad, "mtu": "1400", "listen_port": "51820", "hostname": ""})
        assert res.status_code == 403
        assert b"Reload the page" in res.data
    res = client.patch("/api/prefs", json={"mtu": 1400})
    assert res.status_code == 403 and "Reload the page" in res.get_json()["error"]
    res = client.patch("/api/prefs", json={"mtu": 1400}, headers={"X-CSRF-Token": "wrong"})
    assert res.status_code == 403
    assert client.post("/logout").status_code == 403  # logging someone out is a change too
    assert node.client.get("/v1/prefs")["mtu"] == before
    # With the token, the same change goes through to the agent.
    res = client.patch("/api/prefs", json={"mtu": 1400}, headers={"X-CSRF-Token": token})
    assert res.status_code == 200 and res.get_json()["mtu"] == 1400
    assert node.client.get("/v1/prefs")["mtu"] == 1400
    node.client.patch("/v1/prefs", {"mtu": before})


def _try(client: FlaskClient, password: str, address: str) -> tuple[int, str | None]:
    token = csrf_of(client.get("/login", environ_base={"REMOTE_ADDR": address}).get_data(as_text=True))
    res = client.post("/login", data={"csrf_token": token, "password": password},
                      environ_base={"REMOTE_ADDR": address})  # fmt: skip
    return res.status_code, res.headers.get("Retry-After")


def test_web_login_brute_force_is_throttled(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)
    attacker = app.test_client()
    for i in range(5):
        assert _try(attacker, f"guess {i}", "192.0.2.66") == (401, None)
    status, retry = _try(attacker, "guess 6", "192.0.2.66")
    assert status == 429 and retry is not None and 0 < int(retry) <= 300
    # While throttled, even the right password is not checked.
    assert _try(attacker, PASSWORD, "192.0.2.66")[0] == 429
    # Another address is not blocked by this one ...
    assert _try(app.test_client(), PASSWORD, "192.0.2.7")[0] == 302


def test_web_login_throttle_has_a_global_limit(node: AgentNode, tmp_path: Path) -> None:
    app = make_app(node.socket, tmp_path / "web", LOGIN_FAILURES_OVERALL=8)
    set_password_and_log_in(app.test_client())
    # A botnet: many addresses, two guesses each.
    for i in range(8):
        assert _try(app.test_client(), "guess", f"198.51.100.{i // 2 + 1}")[0] == 401
    assert _try(app.test_client(), "guess", "198.51.100.200")[0] == 429


def test_web_wrong_password_then_right_one(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)
    other = app.test_client()
    token = csrf_of(other.get("/login").get_data(as_text=True))
    res = other.post("/login", data={"csrf_token": token, "password": "not it"})
    assert res.status_code == 401 and b"Wrong password." in res.data
    log_in(other)
    assert other.get("/").status_code == 200


def test_web_login_next_stays_on_this_site(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)
    other = app.test_client()
    assert other.get("/settings").headers["Location"] == "/login?next=/settings"
    for target, expected in (
        ("/settings", "/settings"),
        ("//evil.example/x", "/"),
        ("https://evil.example", "/"),
    ):
        token = csrf_of(other.get("/login").get_data(as_text=True))
        res = other.post("/login", data={"csrf_token": token, "password": PASSWORD, "next": target})
        assert res.headers["Location"] == expected


def test_web_password_file_is_scrypt_0600(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)
    path = Path(app.config["STATE_DIR"]) / "password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = path.read_text().strip()
    assert re.fullmatch(r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=", stored), stored
    assert verify_password(PASSWORD, stored) and not verify_password(PASSWORD + "x", stored)
    assert stat.S_IMODE((Path(app.config["STATE_DIR"]) / "secret_key").stat().st_mode) == 0o600


def test_web_session_cookie_is_httponly_and_samesite_strict(app: Flask, client: FlaskClient) -> None:
    token = csrf_of(client.get("/setup").get_data(as_text=True))
    res = client.post("/setup", data={"csrf_token": token, "setup_code": setup_code_of(app),
                                      "password": PASSWORD, "confirm": PASSWORD})  # fmt: skip
    cookies = res.headers.getlist("Set-Cookie")
    cookie = next(c for c in cookies if c.startswith("meshpi_session="))
    device = next(c for c in cookies if c.startswith("meshpi_device="))
    assert "HttpOnly" in device and "SameSite=Strict" in device
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Expires=" in cookie
    page = client.get("/")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Cache-Control"] == "no-store"


def test_web_new_password_ends_other_sessions(app: Flask, client: FlaskClient) -> None:
    token = set_password_and_log_in(client)
    other = app.test_client()
    log_in(other)
    res = client.post("/settings/password", data={"csrf_token": token, "current": PASSWORD,
                                                  "password": "a new passphrase", "confirm": "a new passphrase"})  # fmt: skip
    assert res.status_code == 302
    assert client.get("/").status_code == 200  # the one who changed it stays in
    assert other.get("/").headers["Location"].startswith("/login")
    # The console's reset (meshpi-web passwd) writes the same file: every session ends.
    PasswordFile(Path(app.config["STATE_DIR"])).set("reset on the console")
    assert client.get("/").headers["Location"].startswith("/login")


def test_web_errors_show_a_message_and_no_traceback(app: Flask, client: FlaskClient, tmp_path: Path) -> None:
    token = set_password_and_log_in(client)
    # The agent refuses a value: its own words, as a 400.
    res = client.patch("/api/prefs", json={"mtu": 99999}, headers={"X-CSRF-Token": token})
    assert res.status_code == 400
    assert res.get_json() == {"error": "prefs: mtu: 99999 is out of range (1280-9000)"}
    res = client.post("/settings", data={"csrf_token": token, "mtu": "99999", "listen_port": "51820"},
                      follow_redirects=True)  # fmt: skip
    assert b"prefs: mtu: 99999 is out of range (1280-9000)" in res.data
    res = client.post("/settings", data={"csrf_token": token, "mtu": "big", "listen_port": "51820"},
                      follow_redirects=True)  # fmt: skip
    assert b"mtu: &#39;big&#39; is not a number" in res.data
    assert client.get("/no/such/page").status_code == 404
    for res in (client.get("/no/such/page"), client.get("/api/logs?after=x")):
        assert b"Traceback" not in res.data and b'File "' not in res.data
    # A password file someone broke: a clear message, not a crash.
    (Path(app.config["STATE_DIR"]) / "password").write_text("garbage\n")
    other = app.test_client()
    tok = csrf_of(other.get("/login").get_data(as_text=True))
    res = other.post("/login", data={"csrf_token": tok, "password": "whatever"})
    assert res.status_code == 500 and b"meshpi-web passwd" in res.data and b"Traceback" not in res.data


def test_web_agent_not_running_page(tmp_path: Path) -> None:
    app = make_app(tmp_path / "no-agent.sock", tmp_path / "web")
    client = app.test_client()
    set_password_and_log_in(client)
    res = client.get("/")
    assert res.status_code == 503
    assert b"The meshpi agent is not running" in res.data and b"Traceback" not in res.data
    api = client.get("/api/status")
    assert api.status_code == 503 and api.get_json() == {"error": "The meshpi agent is not running."}
