"""The LocalAPI in control mode: create a mesh on this node, log out, log in again.

One namespace holds both: the test starts a real `meshpi-control serve` (the
agent's --control-start is a harmless `touch`, so the test sees that it ran),
and a control-mode agent that finds control's key and token in its state dir.

    ns node   eth0 10.98.0.1/24 (the LAN, a veth to nowhere)
              meshpi-control on 0.0.0.0:<port>, state <dir>/control
              meshpi agent --control-state-dir <dir>/control --control-url http://127.0.0.1:<port>
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.client.localapi import LocalAPIError
from tests.lab import netns as ns
from tests.lab.host import REPO_ROOT, wait_for
from tests.netns.agents import RunningAgent, start_agent, state_dir, wait_status
from tests.netns.kernelstate import sh

PORT = 18080
IFACE = f"mpc{os.getpid() % 10000}"
BIN = REPO_ROOT / ".venv" / "bin"
RESOLV_CONF = b"# the LAN's DHCP\nnameserver 10.98.0.254\n"  # the agent's host DNS: managed, then restored


@dataclass
class World:
    agent: RunningAgent
    control: subprocess.Popen[bytes]
    dir: Path


def _has_link(ns_name: str, ifname: str) -> bool:
    return subprocess.run(["ip", "-n", ns_name, "link", "show", ifname], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("localapi-control")
    name = f"mpc{os.getpid() % 10000}n"
    ns.create(name)
    (Path("/etc/netns") / name).mkdir(parents=True, exist_ok=True)
    (Path("/etc/netns") / name / "resolv.conf").write_bytes(RESOLV_CONF)
    agent = None
    control = None
    try:
        sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        sh("ip", "-n", name, "link", "set", "eth0p", "up")
        sh("ip", "-n", name, "addr", "add", "10.98.0.1/24", "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        with open(base / "control.log", "ab") as out:
            control = subprocess.Popen(
                ["ip", "netns", "exec", name, str(BIN / "meshpi-control"), "--state-dir", str(base / "control"),
                 "serve", "--listen", f"0.0.0.0:{PORT}"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        agent = start_agent(name, state_dir(base / "state", "pi"), base / "local.sock",
                            "--control-state-dir", str(base / "control"),
                            "--control-url", f"http://127.0.0.1:{PORT}",
                            "--control-start", f"touch {base / 'control-started'}",
                            "--resolv-conf", f"/etc/netns/{name}/resolv.conf")  # fmt: skip
        yield World(agent, control, base)
    finally:
        if agent is not None:
            agent.stop()
        if control is not None:
            control.terminate()
            control.wait(timeout=10)
        ns.delete(name)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def _connected(status: dict[str, Any]) -> bool:
    return bool(status["control"]["state"] == "connected")


def test_localapi_control_create_mesh_logout_and_up_again(world: World) -> None:
    agent, client = world.agent, world.agent.client(timeout=90)
    # Fresh agent, nobody logged in: control wants a login and the LEDs say offline.
    st = wait_status(agent, lambda s: s["control"]["state"] == "needs-login" and s["led"] == "offline",
                     what="needs-login")  # fmt: skip
    assert "self" not in st and st["interface"] is None
    with pytest.raises(LocalAPIError) as refused:
        client.post("/v1/mesh/create", {"public_url": "ftp://x"})
    assert refused.value.status == 400 and "public_url 'ftp://x'" in refused.value.message
    with pytest.raises(LocalAPIError) as refused:
        client.post("/v1/mesh/create", {"prefs": {"mtu": 1}})
    assert refused.value.status == 400 and "mtu: 1 is out of range" in refused.value.message
    assert not (world.dir / "control-started").exists()  # refused before anything started

    # Prefs can be set before the first login.
    client.patch("/v1/prefs", {"hostname": "pi", "backend": "userspace", "interface": IFACE,
                               "advertise_exit_node": True})  # fmt: skip
    wait_for(lambda: agent.client().get("/v1/status")["local_control"]["running"], 15, "control to listen")
    res = agent.meshpi("create-mesh", "--public-url", f"http://10.98.0.1:{PORT}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("connected: logged in as pi"), res.stdout
    assert (world.dir / "control-started").exists()
    st = wait_status(agent, lambda s: _connected(s) and s.get("interface") == IFACE, what="the mesh up")
    assert st["self"]["name"] == "pi" and st["self"]["addresses"][0] == "100.64.0.1"
    login_url = st["local_control"]["login_url"]
    assert login_url.startswith(f"http://10.98.0.1:{PORT}/#") and login_url in res.stdout
    assert _has_link(agent.ns, IFACE)
    wait_status(agent, lambda s: s["led"] == "ready", what="the LED to show ready")
    resolv_conf = Path("/etc/netns") / agent.ns / "resolv.conf"
    wait_for(
        lambda: b"nameserver 100.64.0.1" in resolv_conf.read_bytes(), 10, "the host's DNS pointed at the mesh"
    )

    # The control's admin API, through the agent (with the token only root can read).
    # The mesh is the owner's own: the Pi's exit node is approved without asking (issue 16).
    (me,) = client.get("/v1/control/nodes")
    assert me["name"] == "pi" and me["advertised_routes"] == ["0.0.0.0/0", "::/0"]
    assert me["approved_routes"] == ["0.0.0.0/0", "::/0"] and me["tags"] == ["meshpi:auto-approve-routes"]
    st = wait_status(agent, lambda s: s["headline"]["facts"]["control"] == "connected", what="the headline")
    assert "approv" not in st["headline"]["text"]
    with pytest.raises(LocalAPIError) as refused:
        client.post("/v1/control/nodes/x/approve", {})
    assert refused.value.status == 400 and "not a node id" in refused.value.message
    (used,) = client.get("/v1/control/keys")
    assert used["used"] == 1 and used["reusable"] is False  # the single-use key create-mesh made

    # Logout: control forgets the node, the data plane goes, the agent stays.
    logout = agent.meshpi("logout")
    assert logout.returncode == 0 and logout.stdout.strip() == f"logged out of http://127.0.0.1:{PORT}", (
        logout
    )
    assert not _has_link(agent.ns, IFACE)
    assert resolv_conf.read_bytes() == RESOLV_CONF  # the host's DNS as it was
    assert client.get("/v1/control/nodes") == []
    st = wait_status(agent, lambda s: s["control"]["state"] == "needs-login" and s["led"] == "offline",
                     what="the link to notice the logout")  # fmt: skip
    assert st["agent"] == "running" and st["interface"] is None and "self" not in st
    assert not (agent.state / "netmap.json").exists() and not (agent.state / "owned.json").exists()

    # And in again, with /v1/up and a key made through the proxy.
    key = client.post("/v1/control/keys", {"reusable": False, "expires_in": 300})["key"]
    with pytest.raises(LocalAPIError) as refused:
        client.post("/v1/up", {"login_server": "http://10.98.0.1/no-key", "auth_key": key})
    assert refused.value.status == 400 and "no control key" in refused.value.message
    answer = client.post("/v1/up", {"login_server": login_url, "auth_key": key, "prefs": {"mtu": 1380}})
    assert answer["state"] == "connected", answer
    st = wait_status(agent, lambda s: _connected(s) and s.get("interface") == IFACE, what="the mesh up again")
    assert st["prefs"]["mtu"] == 1380
    assert _has_link(agent.ns, IFACE)
    assert "logged out" in " ".join(line["message"] for line in client.get("/v1/logs")["lines"])
