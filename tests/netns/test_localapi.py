"""The agent's LocalAPI on a real unix socket, served by real static-mode agents
(the world is described in localapiworld.py).

These tests cover what the API reports and changes: the status of the applied
netmap, prefs patched live (a bad value changes nothing, a new interface name
takes the mesh along), the numbered log lines and the metrics as traffic flows.
Who may use the socket and how it meets bad requests is in
test_localapi_socket.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.agent.logring import RING_SIZE
from appliance.client.localapi import LocalAPIError, LocalClient
from tests.netns.agents import link_mtu, wait_status
from tests.netns.localapiworld import LAPTOP_IF, PI_IF, World, localapi_world
from tests.unit.meshes import KEYS


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with localapi_world() as w:
        yield w


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
