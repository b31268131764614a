"""What the dashboard reads from the agent, on a real first run (issue 16).

The pi creates its mesh from the LocalAPI (`/v1/mesh/create`: control runs on the
pi itself), a computer on the home LAN joins with a key made through the pi and
uses the pi as exit node, and a phone (a stock WireGuard client, tests/lab/phone.py)
added on the pi goes out through home from behind the laptop router's NAT:

    inet   203.0.113.10 (whoami)
     |-- home  198.51.100.1 (udp 51820 forwarded to the pi) -- br0 192.168.77.0/24
     |      pi        192.168.77.2  agent + meshpi-control :PORT, exit node
     |      lanhost   192.168.77.3  agent "laptop", exit node: pi
     |-- lrouter (NAT) -- laptop 10.77.0.2: the phone (wireguard-go + wg setconf)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.client.localapi import LocalAPIError
from tests.lab.host import REPO_ROOT, Host, wait_for
from tests.lab.phone import stock_client
from tests.lab.topology import HOME_WAN_V4, PI_V4, SERVER_V4, Lab
from tests.netns.agents import RunningAgent, start_agent, state_dir, wait_status

PORT = 18090
TAG = f"mpd{os.getpid() % 10000}"
PI_IF, LAPTOP_IF, PHONE_IF = f"{TAG}p", f"{TAG}l", f"{TAG}f"
BIN = REPO_ROOT / ".venv" / "bin"
EXIT = ["0.0.0.0/0", "::/0"]


@dataclass
class World:
    lab: Lab
    pi: RunningAgent
    laptop: RunningAgent
    control: subprocess.Popen[bytes]
    base: Path
    login_url: str


def _pi_agent(lab: Lab, base: Path) -> RunningAgent:
    return start_agent(lab.pi.ns, state_dir(base / "pi", "pi"), base / "pi.sock",
                       "--control-state-dir", str(base / "control"),
                       "--control-url", f"http://127.0.0.1:{PORT}", "--control-start", "true")  # fmt: skip


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab(keep=bool(os.environ.get("MESHPI_KEEP_LAB"))) as lab:
        base = lab.scratch
        control = lab.pi.popen([str(BIN / "meshpi-control"), "--state-dir", str(base / "control"),
                                "serve", "--listen", f"0.0.0.0:{PORT}"], log=base / "control.log")  # fmt: skip
        world: World | None = None
        agents: list[RunningAgent] = []
        try:
            pi = _pi_agent(lab, base)
            agents.append(pi)
            laptop = start_agent(lab.lanhost.ns, state_dir(base / "laptop", "laptop"), base / "laptop.sock")
            agents.append(laptop)
            # The setup page: exit node on, the public address the router forwards.
            pi.client().patch("/v1/prefs", {"hostname": "pi", "backend": "userspace", "interface": PI_IF,
                                            "advertise_exit_node": True,
                                            "advertise_endpoints": [f"{HOME_WAN_V4}:51820"]})  # fmt: skip
            wait_for(lambda: pi.client().get("/v1/status")["local_control"]["running"], 15, "control")
            answer = pi.client(timeout=90).post("/v1/mesh/create", {"public_url": f"http://{PI_V4}:{PORT}"})
            assert answer["state"] == "connected", answer
            world = World(lab, pi, laptop, control, base, answer["login_url"])
            yield world
        finally:
            if world is not None:
                agents.append(world.pi)  # restarted by a test: a process of its own
            for agent in agents:
                agent.stop()
            control.terminate()
            control.wait(timeout=10)


def _row(status: dict[str, Any], name: str) -> dict[str, Any]:
    rows = [r for r in status["connected"] if r["name"] == name]
    assert len(rows) == 1, status["connected"]
    return rows[0]


def _sums_are_totals(status: dict[str, Any]) -> bool:
    rows = status["connected"]
    return bool(status["rx_bytes"] == sum(r["rx_bytes"] for r in rows)
                and status["tx_bytes"] == sum(r["tx_bytes"] for r in rows))  # fmt: skip


def test_dashboard_first_run_waits_for_nothing_and_the_exit_node_works(world: World) -> None:
    pi, laptop = world.pi.client(), world.laptop
    (me,) = pi.get("/v1/control/nodes")
    assert me["advertised_routes"] == EXIT and me["approved_routes"] == EXIT  # nobody had to approve
    # A computer joins with a key made on the pi (the dashboard's "add a computer").
    key = pi.post("/v1/control/keys", {"reusable": False, "expires_in": 300})["key"]
    res = laptop.meshpi("up", "--login-server", world.login_url, "--auth-key", key, "--hostname", "laptop",
                        "--backend", "userspace", "--interface", LAPTOP_IF)  # fmt: skip
    assert res.stdout.startswith("connected"), res.stdout + res.stderr
    assert [n["name"] for n in pi.get("/v1/control/nodes") if n["state"] != "approved"] == []
    # The pi's exit is in the laptop's netmap at once: choosing it is accepted.
    wait_status(laptop, lambda s: any(p["exit_node"] for p in s["peers"]), what="the pi's exit")
    chose = laptop.meshpi("set", "--exit-node", "pi")
    assert chose.returncode == 0, chose.stdout + chose.stderr
    world.lab.internet.whoami_server()
    wait_for(lambda: world.lab.lanhost.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 15, "the laptop out via pi")
    st = wait_status(world.pi, lambda s: _row(s, "laptop")["uses_exit"], 10, "the laptop to use the exit")
    st = wait_status(world.pi, lambda s: (_row(s, "laptop")["path"] or "").startswith("direct "), 30,
                     "paths.py to settle on a direct path")  # fmt: skip
    row = _row(st, "laptop")
    assert row["kind"] == "computer" and row["state"] == "online" and row["path"].startswith("direct ")
    assert st["headline"]["level"] == "ok" and "exit node used by laptop" in st["headline"]["text"], st[
        "headline"
    ]


def test_dashboard_lists_a_hosted_phone_online_with_traffic_and_totals_match(world: World) -> None:
    pi = world.pi.client()
    answer = pi.post("/v1/devices", {"name": "Anna's phone", "mode": "all"}, timeout=20)
    device, config = answer["device"], answer["config"]
    phone = world.lab.laptop
    with stock_client(phone, config, PHONE_IF, gateway="10.77.0.1"):
        wait_for(lambda: phone.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 15, "the phone out through home")
        for _ in range(5):
            phone.fetch(SERVER_V4)
        st = wait_status(world.pi, lambda s: _row(s, "Anna's phone")["state"] == "online"
                         and _row(s, "Anna's phone")["rx_bytes"] > 0, 10, "the phone online")  # fmt: skip
        row = _row(st, "Anna's phone")
        assert row["kind"] == "phone" and row["device_id"] == device["id"] and row["enabled"] is True
        assert row["id"] == device["public_key"] and row["addresses"] == device["addresses"]
        assert (
            row["uses_exit"] is True
            and row["path"].startswith("direct ")
            and row["last_seen"] > time.time() - 60
        )
        assert [r["name"] for r in st["connected"]] == ["laptop", "Anna's phone"]
        assert _sums_are_totals(st) and st["rx_bytes"] > row["rx_bytes"] > 0
        assert st["update"]["current"] == st["version"] and st["update"]["installing"] is None
        # The reach of a hub: the advertised endpoint, as netcheck would say.
        facts = st["headline"]["facts"]
        assert facts["reachable"] is True and facts["public_endpoint"] == f"{HOME_WAN_V4}:51820"
        assert st["headline"]["text"] == (f"Everything works · reachable from the internet at {HOME_WAN_V4}:51820"
                                          " · exit node used by laptop, Anna's phone")  # fmt: skip
        # History by the minute, kept by the agent.
        traffic = wait_for(lambda: _traffic_of(pi.get("/v1/traffic?minutes=5"), device["public_key"]), 10,
                           "the phone's minute to count")  # fmt: skip
        assert traffic["step"] == 60 and len(traffic["total"]["rx"]) == 5 and traffic["end"] > time.time()
        assert sum(traffic["total"]["rx"]) >= sum(traffic["peers"][device["public_key"]]["rx"]) > 0

        # Rename, disable (out of the kernel: no more traffic), enable (the same config works again).
        url = f"/v1/devices/{device['id']}"
        assert pi.patch(url, {"name": "Anna's old phone"})["device"]["name"] == "Anna's old phone"
        for bad in ({"name": ""}, {"enabled": "no"}, {"color": "red"}, {}):
            with pytest.raises(LocalAPIError) as refused:
                pi.patch(url, bad)
            assert refused.value.status == 400, bad
        assert pi.patch(url, {"enabled": False})["device"]["enabled"] is False
        wait_for(
            lambda: device["public_key"] not in _kernel_peers(world.lab.pi), 5, "the pi to drop the phone"
        )
        assert phone.fetch_or_none(SERVER_V4) is None
        st = pi.get("/v1/status")
        row = _row(st, "Anna's old phone")
        assert row["enabled"] is False and row["rx_bytes"] == 0 and row["uses_exit"] is False
        assert _sums_are_totals(st)
        assert pi.patch(url, {"enabled": True})["device"]["enabled"] is True
        # The phone still holds its old session, which the Pi forgot with the peer: its
        # WireGuard starts a new handshake after 15 s unanswered (keepalive 10 s + rekey 5 s).
        wait_for(lambda: phone.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 30, "the phone back out through home")
        assert _row(pi.get("/v1/status"), "Anna's old phone")["enabled"] is True


def _kernel_peers(host: Host) -> str:
    return host.run(["wg", "show", PI_IF, "peers"]).stdout


def _traffic_of(traffic: dict[str, Any], key: str) -> dict[str, Any] | None:
    return traffic if sum(traffic["peers"].get(key, {}).get("rx", [])) > 0 else None


def test_dashboard_traffic_refuses_bad_minutes(world: World) -> None:
    pi = world.pi.client()
    for bad in ("0", "1441", "abc", "-1", "1e3", "%D9%A3", "99999999999999999999"):
        with pytest.raises(LocalAPIError) as refused:
            pi.get(f"/v1/traffic?minutes={bad}")
        assert refused.value.status == 400 and "minutes=" in refused.value.message, bad
    assert len(pi.get("/v1/traffic?minutes=1440")["total"]["tx"]) == 1440


def test_dashboard_traffic_history_survives_an_agent_restart(world: World) -> None:
    pi = world.pi.client()
    before = pi.get("/v1/traffic?minutes=60")
    assert sum(before["total"]["rx"]) > 0
    world.pi.proc.send_signal(signal.SIGTERM)  # a clean stop writes the snapshot; the data plane stays
    world.pi.proc.wait(timeout=15)
    size = (world.pi.state / "traffic.json").stat().st_size
    print(f"traffic.json: {size} bytes")
    assert size < 16384
    world.pi = _pi_agent(world.lab, world.base)
    after = world.pi.client().get("/v1/traffic?minutes=60")
    shift = (after["end"] - before["end"]) // 60
    assert sum(after["total"]["rx"]) >= sum(before["total"]["rx"][shift:]) > 0
    for key, series in before["peers"].items():
        if sum(series["rx"][shift:]):
            kept, restored = series["rx"][shift:], after["peers"][key]["rx"][: 60 - shift]
            # Past minutes come back as they were; the minute `before` was read in may
            # still have counted a keepalive or two before the agent stopped.
            assert restored[:-1] == kept[:-1] and restored[-1] >= kept[-1], key


def test_dashboard_headline_says_control_is_unreachable(world: World) -> None:
    world.control.send_signal(signal.SIGTERM)
    world.control.wait(timeout=10)
    st = wait_status(world.pi, lambda s: s["headline"]["level"] == "error", 30, "the headline to turn red")
    assert st["headline"]["text"].startswith("Control server unreachable"), st["headline"]
    assert st["headline"]["facts"]["control"] == "unreachable" and st["headline"]["facts"]["fix"]
