"""The agent's LocalAPI on a real unix socket, served by real static-mode agents.

    ns pi      eth0 10.99.0.1/24 ==veth== eth0 10.99.0.2/24   ns laptop
    agent: exit node, mesh 100.64.0.1                         agent: peer pi at 10.99.0.1:51820
    socket <public dir>/pi/local.sock (group nogroup)         socket <public dir>/laptop/local.sock

The socket directory is world-traversable (0755) so that a process of another
user can try the socket: its mode and group decide, as on the appliance.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from appliance.agent.localapi.server import MAX_BODY
from appliance.agent.logring import RING_SIZE
from appliance.client.localapi import AgentNotRunning, LocalAPIError, LocalClient
from tests import unprivileged
from tests.lab import netns as ns
from tests.lab.mesh import meshpi_binary
from tests.netns.agents import RunningAgent, link_mtu, start_agent, state_dir, veth_pair, wait_status
from tests.unit.meshes import KEYS, netmap_json, node

TAG = f"mpa{os.getpid() % 10000}"
PI_IF, LAPTOP_IF = f"{TAG}p", f"{TAG}l"
SOCKET_GROUP = "nogroup"  # exists on Debian; the pi's agent is started with --local-api-group nogroup


@dataclass
class World:
    pi: RunningAgent
    laptop: RunningAgent
    dir: Path
    prefs_path: Path


def _write(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="meshpi-localapi-", dir="/tmp"))
    base.chmod(0o755)
    names = {"pi": f"{TAG}pi", "laptop": f"{TAG}lap"}
    agents: list[RunningAgent] = []
    try:
        for name in names.values():
            ns.create(name)
        veth_pair(names["pi"], names["laptop"], "10.99.0.1/24", "10.99.0.2/24")
        files = {}
        for who, ifname, doc in (
            ("pi", PI_IF, netmap_json("pi", [node("laptop")], ["0.0.0.0/0", "::/0"])),
            (
                "laptop",
                LAPTOP_IF,
                netmap_json("laptop", [node("pi", ["0.0.0.0/0", "::/0"], "10.99.0.1:51820")]),
            ),
        ):
            (base / who).mkdir()
            _write(base / who / "netmap.json", doc)
            prefs = {"interface": ifname, "backend": "userspace", "advertise_exit_node": who == "pi"}
            _write(base / who / "prefs.json", prefs)
            files[who] = [
                "--netmap",
                str(base / who / "netmap.json"),
                "--prefs",
                str(base / who / "prefs.json"),
            ]
        # A stale socket (its agent died) is replaced by the next agent.
        stale = base / "laptop" / "run" / "local.sock"
        stale.parent.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(stale))
        agents.append(start_agent(names["pi"], state_dir(base / "pi" / "state", "pi"), base / "pi" / "run" / "local.sock",
                                  *files["pi"], "--local-api-group", SOCKET_GROUP,
                                  "--control-state-dir", str(base / "no-control")))  # fmt: skip
        agents.append(start_agent(names["laptop"], state_dir(base / "laptop" / "state", "laptop"), stale,
                                  *files["laptop"]))  # fmt: skip
        yield World(agents[0], agents[1], base, base / "pi" / "prefs.json")
    finally:
        for agent in agents:
            agent.stop()
        for name in names.values():
            ns.delete(name)
        shutil.rmtree(base, ignore_errors=True)


def test_localapi_status_reports_the_applied_netmap(world: World) -> None:
    st = wait_status(world.pi, lambda s: s["led"] == "ready", what="the LED to show ready")
    assert st["agent"] == "running" and st["version"] == "0.1.0"
    assert st["control"]["state"] == "static"
    assert st["self"] == {"name": "pi", "addresses": ["100.64.0.1", "fd7a:6d70:6900::1"],
                          "public_key": str(KEYS["pi"].public_key()),
                          "dns_name": None}  # fmt: skip
    assert st["dns"] is None  # a static netmap without names: no resolver
    assert st["interface"] == PI_IF
    assert st["prefs"]["interface"] == PI_IF and st["prefs"]["led_pins"] == []
    (laptop,) = st["peers"]
    assert laptop["name"] == "laptop" and laptop["public_key"] == str(KEYS["laptop"].public_key())
    assert laptop["exit_node"] is False and laptop["routes"] == []
    assert st["lan"] == {"interface": "eth0", "prefixes": ["10.99.0.0/24"], "address": "10.99.0.1"}
    assert st["local_control"] == {"running": False, "login_url": None}
    assert "firstboot" not in st
    # The exit node's fast paths as the agent found them (test_offload.py checks the kernel side).
    dataplane = st["dataplane"]
    assert set(dataplane) == {
        "uplinks",
        "flowtable",
        "flowtable_supported",
        "udp_gro_forwarding",
        "udp_gro_capable",
    }
    assert dataplane["flowtable"] is dataplane["flowtable_supported"]
    # The laptop sees the pi as an exit node with a known endpoint.
    (pi,) = world.laptop.client().get("/v1/status")["peers"]
    assert pi["exit_node"] is True and pi["direct"] is True and pi["endpoint"] == "10.99.0.1:51820"


def test_localapi_prefs_patch_applies_live_and_a_bad_value_changes_nothing(world: World) -> None:
    client = world.pi.client()
    before_file = world.prefs_path.read_bytes()
    before = client.get("/v1/prefs")
    for body, words in (
        ({"mtu": 99999}, "prefs: mtu: 99999 is out of range (1280-9000)"),
        ({"colour": "blue"}, "prefs: colour: 'blue' is an unknown field"),
        ({"led_pins": [17, 17]}, "prefs: led_pins[1]: 17 is listed twice"),
        ([1, 2], "the body must be a JSON object"),
    ):
        with pytest.raises(LocalAPIError) as refused:
            client.patch("/v1/prefs", body)
        assert refused.value.status == 400 and words in refused.value.message, refused.value.message
    assert world.prefs_path.read_bytes() == before_file
    assert client.get("/v1/prefs") == before
    assert link_mtu(world.pi.ns, PI_IF) == 1280

    try:
        assert client.patch("/v1/prefs", {"mtu": 1380})["mtu"] == 1380
        assert json.loads(world.prefs_path.read_text())["mtu"] == 1380  # stored ...
        deadline = time.monotonic() + 5
        while link_mtu(world.pi.ns, PI_IF) != 1380:  # ... and applied by the agent
            assert time.monotonic() < deadline, world.pi.log_text()
            time.sleep(0.05)
    finally:
        client.patch("/v1/prefs", {"mtu": 1280})


def test_localapi_logs_are_numbered_and_follow_after(world: World) -> None:
    client = world.pi.client()
    lines = client.get("/v1/logs")["lines"]
    seqs = [line["seq"] for line in lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    messages = [line["message"] for line in lines]
    assert any(m.startswith(f"[#] create WireGuard interface {PI_IF}") for m in messages), messages
    assert all(line["level"] in ("INFO", "WARNING", "ERROR") and line["time"] > 0 for line in lines)
    last = seqs[-1]
    assert all(line["seq"] > last for line in client.get(f"/v1/logs?after={last}")["lines"])
    assert client.get("/v1/logs?after=1000000000")["lines"] == []
    try:
        client.patch("/v1/prefs", {"mtu": 1300})
        wanted = f"[#] set mtu of {PI_IF} to 1300"
        deadline = time.monotonic() + 5
        while True:
            new = client.get(f"/v1/logs?after={last}")["lines"]
            assert all(line["seq"] > last for line in new)
            if any(line["message"] == wanted for line in new):
                break
            assert time.monotonic() < deadline, new
            time.sleep(0.05)
    finally:
        client.patch("/v1/prefs", {"mtu": 1280})
    # Nothing the agent logged names its private key.
    secret = KEYS["pi"].secret_base64()
    assert not any(secret in line["message"] for line in client.get("/v1/logs")["lines"])
    assert len(client.get("/v1/logs?after=-1")["lines"]) <= RING_SIZE
    with pytest.raises(LocalAPIError, match="expected a sequence number") as refused:
        client.get("/v1/logs?after=x")
    assert refused.value.status == 400


def _metrics(client: LocalClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = list(text_string_to_metric_families(client.text("/metrics")))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_localapi_metrics_parse_and_move_with_traffic_and_led_shows_exit_activity(world: World) -> None:
    client = world.pi.client()
    before = _metrics(client)
    assert before[("meshpi_peers", ())] == 1
    assert before[("meshpi_control_connected", ())] == 0
    assert before[("meshpi_changes_applied_total", ())] >= 9  # the first apply
    assert before[("meshpi_led_state", (("state", "ready"),))] == 1
    assert sum(v for (name, _), v in before.items() if name == "meshpi_led_state") == 1
    rx = ("meshpi_rx_bytes_total", (("peer", "laptop"),))
    # The laptop pings the pi through the tunnel: its counters move, and the pi,
    # an exit node whose tunnel carries traffic, flickers.
    ping = subprocess.Popen(["ip", "netns", "exec", world.laptop.ns, "ping", "-q", "-c", "100", "-i", "0.05",
                             "-s", "400", "100.64.0.1"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_status(world.pi, lambda s: s["led"] == "exit_active", 8, "the LED to show exit activity")
    finally:
        out, _ = ping.communicate(timeout=30)
    assert " 0% packet loss" in out, out
    after = _metrics(client)
    assert after[rx] > before[rx] + 100 * 400
    assert after[("meshpi_peers_online", ())] == 1
    assert after[("meshpi_led_state", (("state", "exit_active"),))] in (0, 1)
    st = client.get("/v1/status")
    assert st["rx_bytes"] == sum(p["rx_bytes"] for p in st["peers"]) >= after[rx]
    assert st["peers"][0]["online"] is True and st["peers"][0]["last_handshake"] > time.time() - 60
    # Traffic over: back to ready within two ticks.
    wait_status(world.pi, lambda s: s["led"] == "ready", 8, "the LED to go back to ready")


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


def test_localapi_moving_to_another_interface_name_takes_the_mesh_along(world: World) -> None:
    """The old interface still holds the mesh prefix while the new one is planned:
    it is meshpi's own, not a host network the mesh would collide with."""
    client, moved = world.laptop.client(), f"{LAPTOP_IF}m"

    def pings() -> bool:
        res = subprocess.run(["ip", "netns", "exec", world.laptop.ns, "ping", "-c", "1", "-W", "1", "100.64.0.1"],
                             capture_output=True)  # fmt: skip
        return res.returncode == 0

    try:
        client.patch("/v1/prefs", {"interface": moved})
        st = wait_status(world.laptop, lambda s: s["interface"] == moved and link_mtu(world.laptop.ns, LAPTOP_IF) is None,
                         what="the laptop to move to its new interface")  # fmt: skip
        assert "error" not in st and st["led"] != "error", world.laptop.log_text()
        deadline = time.monotonic() + 10
        while not pings():
            assert time.monotonic() < deadline, world.laptop.log_text()
    finally:
        client.patch("/v1/prefs", {"interface": LAPTOP_IF})
        wait_status(
            world.laptop, lambda s: s["interface"] == LAPTOP_IF, what="the laptop back on its interface"
        )


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
