"""Issue 11's findings against the dashboard, each as an attacker would try it: DNS
rebinding (a foreign Host), first-run takeover (no setup code, two setups at once), an
open redirect after login, a session that outlives logout or lasts for ever, and a
botnet locking the owner out. None needs the agent: the app talks to no socket.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.web.conftest import PASSWORD, csrf_of, log_in, make_app, set_password_and_log_in, setup_code_of
from webui.passwords import PasswordFile
from webui.sessions import LIFETIME

FOREIGN = ["rebind.attacker.example", "rebind.attacker.example:80", "meshpi.local.attacker.example",
           "127.0.0.2", "[::2]:80", "10.11.12.13", "", "localhost:http", "[::1", "a:b:c", "meshpi.locals",
           "evil-2.local", "meshpi-x.local", "meshpi-2", "meshpi-2.local.evil.example", "meshpi-1234.local"]  # fmt: skip
PATHS = ["/", "/setup", "/login", "/static/style.css", "/static/app.js", "/api/status", "/no/such/page",
         "/setup/mesh", "/settings"]  # fmt: skip


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    """A web app with no agent behind it (these tests never reach it)."""
    return make_app(tmp_path / "no-agent.sock", tmp_path / "web")


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


# -- High 2: DNS rebinding ------------------------------------------------------------------


def test_web_host_foreign_names_are_refused_on_every_route(app: Flask, client: FlaskClient) -> None:
    for host in FOREIGN:
        for path in PATHS:
            for method in ("GET", "POST"):
                res = client.open(path, method=method, headers={"Host": host})
                assert res.status_code == 421, (host, path, method, res.status_code)
                assert res.content_type.startswith("text/plain")
                assert b"Misdirected" in res.data and b"Set-Cookie" not in res.data
                assert "Set-Cookie" not in res.headers
    # No Host header at all (HTTP/1.0) is refused too.
    res = client.get("/", environ_overrides={"HTTP_HOST": ""})
    assert res.status_code == 421


def test_web_host_rebinding_cannot_run_first_setup(app: Flask, client: FlaskClient) -> None:
    """What the review did: the whole first run through `Host: rebind.attacker.example`."""
    evil = {"Host": "rebind.attacker.example"}
    token = csrf_of(client.get("/setup").get_data(as_text=True))  # (a same-origin page read is refused too)
    assert client.get("/setup", headers=evil).status_code == 421
    res = client.post("/setup", headers=evil, data={"csrf_token": token, "setup_code": setup_code_of(app),
                                                    "password": "attacker pw", "confirm": "attacker pw"})  # fmt: skip
    assert res.status_code == 421
    assert not PasswordFile(Path(app.config["STATE_DIR"])).is_set()
    for path in ("/setup/mesh", "/setup/share"):
        assert (
            client.post(path, headers=evil, data={"csrf_token": token, "action": "create"}).status_code == 421
        )


def test_web_host_own_names_and_addresses_are_served(tmp_path: Path) -> None:
    app = make_app(tmp_path / "none.sock", tmp_path / "web", ALLOWED_HOSTS=["pi.home.arpa"])
    client = app.test_client()
    name = socket.gethostname().split(".")[0].lower()
    for host in ["localhost", "localhost:8080", "meshpi.local", "MESHPI.LOCAL.", "meshpi.local:80", name,
                 f"{name}.local", f"{name.upper()}.local:8000", "127.0.0.1", "127.0.0.1:80", "[::1]", "[::1]:8000",
                 "pi.home.arpa", "pi.home.arpa:80", "meshpi-2.local", f"{name}-12.local:80"]:  # fmt: skip
        res = client.get("/setup", headers={"Host": host})
        assert res.status_code == 200, (host, res.status_code)


def test_web_host_addresses_of_the_interfaces_are_ours(tmp_path: Path) -> None:
    """In a namespace of its own with real addresses, v4 and v6: those are accepted,
    neighbours on the same subnet are not."""
    import subprocess

    from tests.lab import netns as ns
    from tests.web.node import BIN

    name = f"mpwh{__import__('os').getpid()}"
    ns.create(name)
    try:
        for cmd in (["ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1"],
                    ["ip", "link", "set", "lan1", "up"], ["ip", "link", "set", "lan0", "up"],
                    ["ip", "addr", "add", "192.168.77.2/24", "dev", "lan0"],
                    ["ip", "addr", "add", "192.168.77.9/24", "dev", "lan0"],  # a second address
                    ["ip", "-6", "addr", "add", "2001:db8:77::2/64", "dev", "lan0", "nodad"]):  # fmt: skip
            ns.run(name, cmd)
        probe = (
            "import sys; from webui.hosts import HostCheck\n"
            "check = HostCheck()\n"
            "for h in sys.argv[1:]: print(h, check.allows(h))\n"
        )
        hosts = ["192.168.77.2", "192.168.77.2:80", "192.168.77.9", "[2001:db8:77::2]", "[2001:db8:77::2]:80",
                 "192.168.77.3", "[2001:db8:77::3]", "[::ffff:192.168.77.2]"]  # fmt: skip
        out = subprocess.run(["ip", "netns", "exec", name, str(BIN / "python"), "-c", probe, *hosts],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        verdicts = dict(line.split() for line in out.splitlines())
        assert verdicts == {"192.168.77.2": "True", "192.168.77.2:80": "True", "192.168.77.9": "True",
                            "[2001:db8:77::2]": "True", "[2001:db8:77::2]:80": "True", "192.168.77.3": "False",
                            "[2001:db8:77::3]": "False", "[::ffff:192.168.77.2]": "True"}, out  # fmt: skip
        # An address that appears later (a new DHCP lease) is picked up without a restart.
        later = (
            "import time; from webui.hosts import HostCheck\n"
            "import subprocess\n"
            "check = HostCheck()\n"
            "assert not check.allows('192.168.77.50')\n"
            "subprocess.run(['ip', 'addr', 'add', '192.168.77.50/24', 'dev', 'lan0'], check=True)\n"
            "time.sleep(1.1)\n"  # the re-read is rate-limited to once a second
            "print(check.allows('192.168.77.50'))\n"
        )
        out = subprocess.run(["ip", "netns", "exec", name, str(BIN / "python"), "-c", later],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert out.strip() == "True"
    finally:
        ns.delete(name)


# -- High 2: first-run setup needs the setup code; one setter wins ---------------------------


def _setup(client: FlaskClient, code: str, password: str = PASSWORD) -> tuple[int, str]:
    token = csrf_of(client.get("/setup").get_data(as_text=True))
    res = client.post("/setup", data={"csrf_token": token, "setup_code": code, "password": password,
                                      "confirm": password})  # fmt: skip
    return res.status_code, res.headers.get("Location", "")


def test_web_setup_needs_the_setup_code(app: Flask, client: FlaskClient) -> None:
    code = setup_code_of(app)
    state = Path(app.config["STATE_DIR"])
    for wrong in ("", "AAAA-AAAA-AAAA", code[:-1], code + "X", code + "\n2", "' or 1=1 --"):
        status, _ = _setup(client, wrong)
        assert status == 403, wrong
    assert not PasswordFile(state).is_set()
    # As typed off a screen: lower case, spaces, dashes.
    typed = " ".join(code[i : i + 4] for i in range(0, 12, 4)).lower()
    assert _setup(client, typed) == (302, "/setup/mesh")
    assert PasswordFile(state).check(PASSWORD)
    assert not (state / "setup-code").exists()  # one time only
    assert client.get("/").status_code != 302 or client.get("/").headers["Location"] != "/setup"


def test_web_setup_code_guesses_are_throttled_per_address(app: Flask) -> None:
    client = app.test_client()
    for i in range(10):
        status, _ = _setup(client, f"WRONG{i}")
        assert status == 403
    assert _setup(client, setup_code_of(app))[0] == 429  # even the right code, from that address
    other = app.test_client()
    token = csrf_of(other.get("/setup").get_data(as_text=True))
    res = other.post("/setup", data={"csrf_token": token, "setup_code": setup_code_of(app), "password": PASSWORD,
                                     "confirm": PASSWORD}, environ_base={"REMOTE_ADDR": "192.0.2.8"})  # fmt: skip
    assert res.status_code == 302  # the owner at another address is not locked out


def test_web_setup_code_command_as_the_image_runs_it(tmp_path: Path) -> None:
    """meshpi-setup-code.service: `meshpi-web setup-code --boot-dir /boot/firmware` as root
    makes the code before the dashboard starts; the dashboard uses that one."""
    import subprocess

    from tests.web.node import BIN

    state, boot = tmp_path / "web", tmp_path / "firmware"
    boot.mkdir()
    cmd = [str(BIN / "meshpi-web"), "setup-code", "--state-dir", str(state), "--boot-dir", str(boot)]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert first.stdout == again.stdout and "first-run setup code: " in first.stdout  # stable across boots
    shown = first.stdout.split("code: ")[1].split()[0]
    assert (
        (boot / "meshpi-setup-code.txt")
        .read_bytes()
        .startswith(f"meshpi first-run setup code: {shown}\r\n".encode())
    )
    app = make_app(tmp_path / "none.sock", state)
    assert setup_code_of(app) == shown.replace("-", "")
    assert _setup(app.test_client(), shown) == (302, "/setup/mesh")
    # The next boot: setup is done, the code leaves the boot partition.
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "setup is done" in done.stdout and not (boot / "meshpi-setup-code.txt").exists()
    assert not (state / "setup-code").exists()


class _Server:
    """The app on loopback, in this process: real HTTP, a thread per request (werkzeug's
    threaded server, because it stops cleanly; waitress runs it the same way, in threads)."""

    def __init__(self, app: Flask) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def served() -> Iterator[list[_Server]]:
    servers: list[_Server] = []
    yield servers
    for s in servers:
        s.close()


def _browser() -> urllib.request.OpenerDirector:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), NoRedirect)


def _race(url: str, code: str, browsers: list[urllib.request.OpenerDirector]) -> list[tuple[int, int, str]]:
    """Each browser loads /setup, then all submit their own password at the same moment."""
    forms = []
    for i, b in enumerate(browsers):
        token = csrf_of(b.open(f"{url}/setup", timeout=10).read().decode())
        forms.append(urllib.parse.urlencode({"csrf_token": token, "setup_code": code,
                                             "password": f"password {i}", "confirm": f"password {i}"}).encode())  # fmt: skip
    start = threading.Barrier(len(browsers))
    results: list[tuple[int, int, str]] = []

    def submit(i: int) -> None:
        start.wait()
        try:
            with browsers[i].open(f"{url}/setup", data=forms[i], timeout=30) as r:
                results.append((i, r.status, r.headers.get("Location", "")))
        except urllib.error.HTTPError as e:  # 302 (not followed) and 409
            results.append((i, e.code, e.headers.get("Location", "") or e.read().decode()))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(browsers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_web_setup_two_at_once_one_wins(tmp_path: Path, served: list[_Server]) -> None:
    """Four browsers submit the first password at the same moment, ten times over: each
    time exactly one is in (302 to the mesh step) and the others are told (409)."""
    for trial in range(10):
        app = make_app(tmp_path / "none.sock", tmp_path / f"web{trial}")
        server = _Server(app)
        served.append(server)
        browsers = [_browser() for _ in range(4)]
        results = _race(server.url, setup_code_of(app), browsers)
        winners = [r for r in results if r[1] == 302]
        losers = [r for r in results if r[1] == 409]
        assert len(winners) == 1 and len(losers) == len(browsers) - 1, (trial, results)
        assert winners[0][2].endswith("/setup/mesh")
        assert all("Someone set the admin password a moment ago" in r[2] for r in losers)
        # The stored password is the winner's, and only the winner is logged in.
        assert PasswordFile(tmp_path / f"web{trial}").check(f"password {winners[0][0]}")
        for i, b in enumerate(browsers):
            try:
                status = b.open(f"{server.url}/settings", timeout=10).status
            except urllib.error.HTTPError as e:
                status = e.code
            assert status == (503 if i == winners[0][0] else 302), (i, status)  # 503: in, no agent here
        server.close()
        served.remove(server)


# -- Medium 3: open redirect after login ------------------------------------------------------

BAD_NEXT = ["/%09/evil.example", "//evil", "/\\evil", "/%0a/x", "/\t/evil.example", "/\n/x", "https://evil.example",
            "//evil.example/x", "/\\\\evil", "/%2F%2Fevil", "/..//evil", "/login", "/logout", "/static/app.js",
            "/no/such/page", "javascript:alert(1)", "/%0d%0aSet-Cookie:x=1", "\u2215\u2215evil", "/settings\r\n",
            " //evil", "/?next=//evil/", "/.//evil"]  # fmt: skip


def test_web_login_next_accepts_only_pages_of_the_app(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)
    other = app.test_client()
    for target in BAD_NEXT:
        token = csrf_of(other.get("/login").get_data(as_text=True))
        res = other.post("/login", data={"csrf_token": token, "password": PASSWORD, "next": target})
        assert (res.status_code, res.headers.get("Location")) == (302, "/"), repr(target)
        # The same in the query (decoded and raw), as a link would carry it: never a 500.
        page = other.get(f"/login?next={urllib.parse.quote(target, safe='')}")
        assert page.status_code == 200 and b'name="next" value="/"' in page.data, repr(target)
        raw = other.get(f"/login?next={target.replace(chr(10), '').replace(chr(13), '')}")
        assert raw.status_code == 200, repr(target)
    for target in ("/settings", "/logs", "/devices", "/setup/share", "/"):
        token = csrf_of(other.get("/login").get_data(as_text=True))
        res = other.post("/login", data={"csrf_token": token, "password": PASSWORD, "next": target})
        assert res.headers["Location"] == target


# -- Medium 4: server-side sessions -----------------------------------------------------------


def test_web_logout_ends_the_session_for_a_copied_cookie(app: Flask, client: FlaskClient) -> None:
    token = set_password_and_log_in(client)
    stolen = client.get_cookie("meshpi_session")
    assert stolen is not None
    thief = app.test_client()
    thief.set_cookie("meshpi_session", stolen.value)
    assert thief.get("/settings").status_code == 503  # in (the page then needs the agent)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert thief.get("/settings").headers["Location"].startswith("/login")
    assert thief.get("/api/logs").status_code == 401
    # The file holds digests only: a copy of it opens nothing.
    stored = (Path(app.config["STATE_DIR"]) / "sessions.json").read_text()
    assert stolen.value not in stored


def test_web_session_ends_12h_after_login_however_used(app: Flask, client: FlaskClient) -> None:
    now = [1_800_000_000.0]
    store = app.extensions["meshpi_sessions"]
    store._clock = lambda: now[0]
    set_password_and_log_in(client)
    for _ in range(11):  # used every hour: each answer refreshes the cookie
        now[0] += 3600
        assert client.get("/settings").status_code == 503
    now[0] += LIFETIME - 11 * 3600 - 1
    assert client.get("/settings").status_code == 503
    now[0] += 2
    assert client.get("/settings").headers["Location"].startswith("/login")
    # A clock set back a day (no RTC, a wrong NTP answer): not a session from the future.
    log_in(client)
    now[0] -= 86400
    assert client.get("/settings").headers["Location"].startswith("/login")


def test_web_sessions_survive_a_restart_of_the_service(
    app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    set_password_and_log_in(client)
    cookie = client.get_cookie("meshpi_session")
    assert cookie is not None
    again = make_app(tmp_path / "no-agent.sock", tmp_path / "web")
    browser = again.test_client()
    browser.set_cookie("meshpi_session", cookie.value)
    assert browser.get("/settings").status_code == 503
    (tmp_path / "web" / "sessions.json").write_text("{not json")  # broken: everyone logs in again
    browser = make_app(tmp_path / "no-agent.sock", tmp_path / "web").test_client()
    browser.set_cookie("meshpi_session", cookie.value)
    assert browser.get("/settings").headers["Location"].startswith("/login")


# -- Low 8: the lockout ------------------------------------------------------------------------


def _try(client: FlaskClient, password: str, address: str) -> int:
    token = csrf_of(client.get("/login", environ_base={"REMOTE_ADDR": address}).get_data(as_text=True))
    res = client.post("/login", data={"csrf_token": token, "password": password},
                      environ_base={"REMOTE_ADDR": address})  # fmt: skip
    return res.status_code


def test_web_botnet_cannot_lock_the_owner_out(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)  # the owner's browser: a session and a remembered device
    for i in range(50):
        assert _try(app.test_client(), "guess", f"198.51.100.{i + 1}") == 401
    assert _try(app.test_client(), PASSWORD, "203.0.113.5") == 429  # a stranger: the global limit holds
    # The owner, with a session, logs in again (e.g. to renew it) ...
    assert _try(client, PASSWORD, "192.168.1.20") == 302
    token = csrf_of(client.get("/login").get_data(as_text=True))  # the new session's
    # ... and after logging out, the remembered device still gets in.
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert client.get("/settings").headers["Location"].startswith("/login")
    assert _try(client, PASSWORD, "192.168.1.20") == 302
    # A made-up device cookie is worth nothing.
    forger = app.test_client()
    forger.set_cookie("meshpi_device", "x" * 43)
    assert _try(forger, PASSWORD, "203.0.113.6") == 429


def test_web_login_throttle_counts_ipv6_per_64(app: Flask, client: FlaskClient) -> None:
    set_password_and_log_in(client)
    for i in range(5):  # five addresses of one /64: one client
        assert _try(app.test_client(), "guess", f"2001:db8:1:2::{i + 1:x}") == 401
    assert _try(app.test_client(), PASSWORD, "2001:db8:1:2:ffff::99") == 429
    assert _try(app.test_client(), PASSWORD, "2001:db8:1:3::1") == 302  # the next /64 is someone else
    for i in range(5):  # a v4-mapped address counts as the v4 one
        _try(app.test_client(), "guess", "::ffff:192.0.2.44" if i % 2 else "192.0.2.44")
    assert _try(app.test_client(), PASSWORD, "192.0.2.44") == 429
