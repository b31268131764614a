"""The agent's LocalAPI socket, served by real static-mode agents (the world is
described in localapiworld.py).

These tests cover who may use the socket and how it meets bad requests: a wrong
method, an unknown path or an oversized body is refused and hurts nothing, the
socket's mode and group decide who may connect, a second agent never takes a
live socket, the CLI goes through the socket (and says so when no agent is
there), and 1,500 hostile requests get a clear refusal and change nothing. What
the API reports and changes is in test_localapi.py.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.agent.localapi.server import MAX_BODY
from appliance.client.localapi import AgentNotRunning, LocalAPIError, LocalClient
from tests import unprivileged
from tests.lab.mesh import meshpi_binary
from tests.netns.agents import state_dir
from tests.netns.localapiworld import PI_IF, SOCKET_GROUP, World, localapi_world


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with localapi_world() as w:
        yield w


def _raw(path: Path, request: bytes) -> tuple[int, dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_localapi_refuses_wrong_method_unknown_path_and_oversized_body(world: World) -> None:
    client = world.pi.client()
    for method, path, status, words in (
        ("DELETE", "/v1/status", 405, "/v1/status takes GET, not DELETE"),
        ("PUT", "/v1/prefs", 405, "takes GET, PATCH, not PUT"),
        ("GET", "/v1/nothing", 404, "no such path: /v1/nothing"),
        ("POST", "/v1/devices", 409, "devices need a mesh"),
        ("POST", "/v1/up", 409, "static mode"),
        ("GET", "/v1/control/nodes", 409, "control is not local"),
    ):
        with pytest.raises(LocalAPIError) as refused:
            client.request(method, path, {} if method in ("PUT", "POST") else None)
        assert (refused.value.status, words in refused.value.message) == (status, True), refused.value.message
    big = b"x" * (MAX_BODY + 1)
    status, body = _raw(world.pi.socket, b"PATCH /v1/prefs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(big) + big)  # fmt: skip
    assert status == 413 and str(MAX_BODY) in body["error"]
    status, body = _raw(world.pi.socket, b"PATCH /v1/prefs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        b"Content-Length: 7\r\n\r\n{mtu: 1")  # fmt: skip
    assert status == 400 and "not JSON" in body["error"]
    assert client.get("/v1/status")["agent"] == "running"  # none of it hurt the agent


def _as_nobody(group: str, socket_path: Path) -> subprocess.CompletedProcess[str]:
    code = ("import sys; from appliance.client.localapi import LocalClient, LocalAPIError\n"
            "try: print(LocalClient(sys.argv[1]).get('/v1/status')['agent'])\n"
            "except LocalAPIError as e: sys.exit(e.message)\n")  # fmt: skip
    # A readable copy of the interpreter and packages: the clone may be in a 0700 home.
    cmd = ["setpriv", "--reuid", "nobody", "--regid", group, "--clear-groups",
           str(unprivileged.python()), "-c", code, str(socket_path)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/")


def test_localapi_socket_mode_and_group_decide_who_may_connect(world: World) -> None:
    probe = _as_nobody(SOCKET_GROUP, Path("/nonexistent"))
    assert "not running" in probe.stderr, (
        f"user nobody cannot run {unprivileged.python()}: {probe.stderr[-300:]}"
    )
    st = os.stat(world.pi.socket)
    assert oct(st.st_mode & 0o777) == oct(0o660)
    assert st.st_gid == grp.getgrnam(SOCKET_GROUP).gr_gid
    assert oct(os.stat(world.pi.socket.parent).st_mode & 0o777) == oct(0o755)  # made by the agent
    allowed = _as_nobody(SOCKET_GROUP, world.pi.socket)
    assert allowed.stdout.strip() == "running", allowed.stderr
    refused = _as_nobody("daemon", world.pi.socket)
    assert refused.returncode != 0 and "permission denied" in refused.stderr, refused
    # Without the group (the laptop's agent asks for `meshpi`), the socket is root's only.
    try:
        expected = grp.getgrnam("meshpi").gr_gid
    except KeyError:
        expected = 0
    assert os.stat(world.laptop.socket).st_gid == expected
    assert "removed the stale socket" in world.laptop.log_text()


def test_localapi_a_second_agent_never_takes_a_live_socket(world: World, tmp_path: Path) -> None:
    res = subprocess.run(
        ["ip", "netns", "exec", world.pi.ns, str(meshpi_binary()), "agent",
         "--netmap", str(world.dir / "pi" / "netmap.json"), "--prefs", str(world.prefs_path),
         "--state-dir", str(state_dir(tmp_path / "state", "phone")), "--local-api", str(world.pi.socket)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 1 and "another process serves" in res.stderr, res.stderr
    assert world.pi.client().get("/v1/status")["agent"] == "running"


def test_localapi_cli_status_goes_through_the_socket(world: World, tmp_path: Path) -> None:
    res = world.pi.meshpi("status", "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["self"]["name"] == "pi" and st["interface"] == PI_IF
    text = world.pi.meshpi("status")
    assert text.returncode == 0 and f"this node: pi 100.64.0.1 fd7a:6d70:6900::1 on {PI_IF}" in text.stdout
    assert "laptop" in text.stdout
    # No agent there: say so, exit 1.
    gone = subprocess.run([str(meshpi_binary()), "status", "--local-api", str(tmp_path / "none.sock"),
                           "--state-dir", str(tmp_path / "state")], capture_output=True, text=True)  # fmt: skip
    assert gone.returncode == 1
    assert gone.stderr.startswith(
        f"meshpi: the meshpi agent is not running (no socket at {tmp_path}/none.sock)"
    )
    assert "systemctl start meshpi-agent" in gone.stderr
    with pytest.raises(AgentNotRunning):
        LocalClient(tmp_path / "none.sock").get("/v1/status")
    # `set` without an agent writes prefs.json for the next start.
    offline = subprocess.run([str(meshpi_binary()), "set", "--mtu", "1300", "--led-pins", "17,27",
                              "--local-api", str(tmp_path / "none.sock"), "--state-dir", str(tmp_path / "state")],
                             capture_output=True, text=True)  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    stored = json.loads((tmp_path / "state" / "prefs.json").read_text())
    assert stored["mtu"] == 1300 and stored["led_pins"] == [17, 27]


_ROUTES = ["/v1/status", "/v1/prefs", "/v1/up", "/v1/logout", "/v1/rotate-key", "/v1/mesh/create", "/v1/logs",
           "/v1/netcheck", "/v1/devices", "/v1/devices/x", "/v1/control/admin/v1/nodes", "/metrics"]  # fmt: skip


@st.composite
def _hostile(draw: st.DrawFn) -> bytes:
    """A request nobody should send: known paths with garbage, garbage paths, bad
    bodies (wrong types, bad JSON, lying lengths) — never a change that is valid."""
    method = draw(st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS", "X" * 9]))
    path = draw(st.one_of(st.sampled_from(_ROUTES), st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                                 max_size=60).map(lambda s: "/" + s)))  # fmt: skip
    query = draw(st.sampled_from(["", "?after=x", "?after=-1", "?%00=1", "?" + "a=1&" * 50]))
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                               lambda inner: st.lists(inner, max_size=4), max_leaves=8)  # fmt: skip
    unknown_fields = st.dictionaries(st.text(max_size=10).map(lambda s: "zz" + s), json_values, max_size=4)
    body = draw(st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        unknown_fields.map(lambda v: json.dumps(v).encode()),
    ))  # fmt: skip
    length = draw(st.sampled_from([len(body), len(body), "abc", "-1", str(MAX_BODY * 4)]))
    return (
        f"{method} {path}{query} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def test_localapi_fuzz_hostile_requests_get_a_clear_refusal_and_change_nothing(world: World) -> None:
    """1,500 hostile requests at a real agent's socket: never a 5xx, the agent
    answers after, and its prefs and peers are as they were."""
    path = world.laptop.socket
    client = world.laptop.client()
    prefs_before, peers_before = client.get("/v1/prefs"), client.get("/v1/status")["peers"]
    statuses: list[int] = []

    @settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_hostile())
    def send(request: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)  # a lying Content-Length meets the end of the stream
            data = b""
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                while chunk := s.recv(65536):
                    data += chunk
        if data:
            status = int(data.split()[1])
            statuses.append(status)
            assert status < 500, data[:300]
            assert b"Traceback" not in data

    send()
    assert client.get("/v1/prefs") == prefs_before
    assert [p["public_key"] for p in client.get("/v1/status")["peers"]] == [
        p["public_key"] for p in peers_before
    ]
    assert len(statuses) > 1000 and max(statuses) < 500
