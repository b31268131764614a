"""What the dashboard reads from the agent, pure parts: the connected list, the
headline, the traffic rings and their snapshot (issue 16)."""

from __future__ import annotations

import json
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from appliance.agent.localapi.connected import HostedRow, connected_rows, exit_sources, peer_state
from appliance.agent.localapi.headline import Facts, headline
from appliance.agent.localapi.status import headline_facts
from appliance.agent.traffic import Traffic
from appliance.base.keys import PrivateKey
from appliance.client.headline import agent_down
from appliance.core.traffic import SLOTS, Ring
from appliance.kernel.base import PeerStats
from appliance.wire.fields import parse_endpoint
from tests.unit.meshes import KEYS, pi_netmap

NOW = 1_800_000_000.0
LAPTOP, PHONE_KEY = KEYS["laptop"].public_key(), PrivateKey(bytes([9]) * 32).public_key()
PHONE = HostedRow("ab12cd34", "Anna's phone", PHONE_KEY, (ip_address("100.64.0.9"),), "all", True)


def _stats(handshake: float | None, rx: int = 0, tx: int = 0, endpoint: str | None = None) -> PeerStats:
    return PeerStats(handshake, rx, tx, parse_endpoint(endpoint) if endpoint else None)


def test_connected_state_online_idle_never() -> None:
    assert peer_state(None, None, NOW) == "never"
    assert peer_state(NOW - 10, None, NOW) == "online"
    assert peer_state(NOW - 150, NOW - 5, NOW) == "online"  # handshake < 180 s, traffic just now
    assert peer_state(NOW - 150, NOW - 130, NOW) == "idle"  # no traffic for over 2 minutes
    assert peer_state(NOW - 200, NOW - 1, NOW) == "idle"  # the handshake is stale
    assert peer_state(NOW - 86400, None, NOW) == "idle"


def test_connected_lists_peers_and_hosted_phones_and_the_sums_are_the_totals() -> None:
    stats = {
        LAPTOP: _stats(NOW - 20, 1000, 2000, "192.0.2.1:51821"),
        PHONE_KEY: _stats(NOW - 5, 300, 400, "198.51.100.7:40000"),
    }
    rows = connected_rows(pi_netmap(peers=("laptop", "office")), [PHONE], stats, NOW,
                          {LAPTOP: "direct 192.0.2.1:51821", KEYS["office"].public_key(): "relayed"},
                          {LAPTOP: NOW - 3}, {ip_address("100.64.0.2")})  # fmt: skip
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == ["laptop", "office", "Anna's phone"]
    laptop, office, phone = by_name["laptop"], by_name["office"], by_name["Anna's phone"]
    assert laptop | {"last_handshake": None} == {
        "id": str(LAPTOP), "name": "laptop", "kind": "computer", "device_id": None,
        "addresses": ["100.64.0.2", "fd7a:6d70:6900::2"], "dns_name": None, "state": "online",
        "last_seen": int(NOW - 3), "last_handshake": None, "path": "direct 192.0.2.1:51821",
        "uses_exit": True, "rx_bytes": 1000, "tx_bytes": 2000, "enabled": True,
    }  # fmt: skip
    # Never answered: no path, even though paths.py would relay it; no traffic, no exit.
    assert office["state"] == "never" and office["path"] is None and office["last_seen"] is None
    assert office["uses_exit"] is False and office["rx_bytes"] == 0
    assert phone["kind"] == "phone" and phone["device_id"] == "ab12cd34" and phone["state"] == "online"
    assert phone["path"] == "direct 198.51.100.7:40000" and phone["uses_exit"] is True
    assert sum(r["rx_bytes"] for r in rows) == 1300 and sum(r["tx_bytes"] for r in rows) == 2400


def test_connected_trying_idle_disabled_and_lan_only_phones() -> None:
    stats = {LAPTOP: _stats(NOW - 600, 5, 5, "192.0.2.1:51821"), PHONE_KEY: _stats(NOW - 5, 1, 1)}
    lan_only = HostedRow("ff", "tablet", PHONE_KEY, (), "lan", True)
    rows = connected_rows(pi_netmap(), [lan_only], stats, NOW, {LAPTOP: "relayed"})
    assert rows[0]["state"] == "idle" and rows[0]["path"] is None  # an old handshake proves no path now
    assert rows[1]["uses_exit"] is False and rows[1]["path"] is None  # no endpoint known
    rows = connected_rows(pi_netmap(), [], stats, NOW, {LAPTOP: "trying"})
    assert rows[0]["path"] == "trying"
    off = HostedRow("ff", "tablet", PHONE_KEY, (), "all", False)
    (row,) = connected_rows(None, [off], stats, NOW)
    assert row["enabled"] is False and row["state"] == "never" and row["rx_bytes"] == 0
    pi = connected_rows(pi_netmap(), [], {}, NOW)  # the pi's own netmap: the laptop is a computer
    assert pi[0]["kind"] == "computer"
    from tests.unit.meshes import laptop_netmap

    assert connected_rows(laptop_netmap(), [], {}, NOW)[0]["kind"] == "pi"  # it routes for the mesh


def test_path_of_a_peer_the_chooser_has_not_decided_is_trying() -> None:
    """In control mode the kernel's endpoint may be the netmap's candidate, written
    before the chooser's first step: unproven, so "trying", not "direct"; in static
    mode (no chooser) WireGuard's endpoint is the path."""
    from appliance.agent.localapi.status import peer_rows

    stats = {LAPTOP: _stats(NOW - 1, 148, 92, "192.0.2.1:51821")}
    assert connected_rows(pi_netmap(), [], stats, NOW, {})[0]["path"] == "trying"
    assert peer_rows(pi_netmap(), stats, NOW, {})[0]["path"] == "trying"
    assert connected_rows(pi_netmap(), [], stats, NOW, None)[0]["path"] == "direct 192.0.2.1:51821"
    assert peer_rows(pi_netmap(), stats, NOW, None)[0]["path"] == "direct 192.0.2.1:51821"


def test_connected_exit_sources_are_mesh_addresses_going_to_the_internet() -> None:
    mesh = (ip_network("100.64.0.0/10"), ip_network("fd7a:6d70:6900::/48"))
    a = ip_address
    flows = [
        (a("100.64.0.2"), a("203.0.113.10")),  # the internet: an exit user
        (a("100.64.0.3"), a("192.168.77.3")),  # the LAN: a subnet route, not exit
        (a("100.64.0.4"), a("100.64.0.1")),  # the mesh
        (a("192.168.77.3"), a("203.0.113.10")),  # not from the mesh
        (a("fd7a:6d70:6900::5"), a("2001:db8:ff00::10")),
        (a("100.64.0.6"), a("224.0.0.251")),
    ]
    assert exit_sources(flows, mesh) == {a("100.64.0.2"), a("fd7a:6d70:6900::5")}


@pytest.mark.parametrize(
    ("facts", "level", "text"),
    [
        (Facts("connected", hub=True, reachable=True, public_endpoint="5.5.5.1:51820",
               exit_users=("laptop", "Anna's phone")), "ok",
         "Everything works · reachable from the internet at 5.5.5.1:51820 · exit node used by laptop, Anna's phone"),
        (Facts("connected"), "ok", "Everything works"),
        (Facts("connected", reachable=False, reach_why="no: x; y"), "ok", "Everything works"),  # not a hub
        (Facts("connected", hub=True, reachable=False,
               reach_why="no: the router granted no port mapping; turn on UPnP on the router"), "warn",
         "Not reachable from outside: the router granted no port mapping; turn on UPnP on the router"),
        (Facts("unreachable", "connection refused"), "error",
         "Control server unreachable (connection refused); the mesh keeps working with the last map"),
        (Facts("needs-login"), "warn", "Not in a mesh yet: create a new mesh or join one"),
        (Facts("pending"), "warn", "Waiting for the mesh's admin to approve this node"),
        (Facts("error", "auth key refused: used"), "error", "Control refused this node: auth key refused: used"),
        (Facts("connected", error="nft: exit 1"), "error", "Data plane error: nft: exit 1"),
        (Facts("connecting"), "warn", "Connecting to the control server"),
        (Facts("static"), "ok", "Everything works"),
    ],
)  # fmt: skip
def test_headline_says_the_worst_fact_in_one_sentence(facts: Facts, level: str, text: str) -> None:
    h = headline(facts)
    assert (h["level"], h["text"]) == (level, text)
    assert h["facts"]["agent"] == "running" and h["facts"]["control"] == facts.control
    if level != "ok":
        assert h["facts"]["why"] or h["facts"]["fix"]


def test_headline_facts_from_status_and_netcheck() -> None:
    status = {"control": {"state": "connected"}, "prefs": {"advertise_endpoints": []}}
    unknown = {"udp": False, "stun_errors": [], "mapped": None, "reachable": False, "why": "no: no STUN"}
    assert headline_facts(status, unknown, True, []).reachable is None  # nothing checked yet
    mapped = unknown | {"udp": True, "mapped": "5.5.5.1:51820", "reachable": True, "why": "yes: mapped"}
    f = headline_facts(status, mapped, True, ["laptop"], "apply failed")
    assert (f.reachable, f.public_endpoint, f.exit_users, f.error) == (True, "5.5.5.1:51820", ("laptop",),
                                                                       "apply failed")  # fmt: skip
    status["prefs"] = {"advertise_endpoints": ["home.example.org:51820"]}
    given = unknown | {"reachable": True, "why": "yes, if the router forwards"}
    assert headline_facts(status, given, True, []).public_endpoint == "home.example.org:51820"


def test_headline_agent_down_is_the_clients() -> None:
    h = agent_down("no agent at /run/meshpi/local.sock")
    assert h["level"] == "error" and h["facts"]["agent"] == "down" and "not running" in h["text"]
    assert set(h["facts"]) == set(headline(Facts("connected"))["facts"])


def test_traffic_ring_counts_by_minute_and_a_gap_reads_as_zero() -> None:
    ring = Ring(100)
    ring.add(100, 10, 1)
    ring.add(100, 5, 0)
    ring.add(102, 7, 7)
    assert ring.series(4, 102) == ([0, 15, 0, 7], [0, 1, 0, 7])
    ring.add(102 + SLOTS, 1, 1)  # a day later: everything before is gone
    rx, _ = ring.series(SLOTS, 102 + SLOTS)
    assert sum(rx) == 1 and rx[-1] == 1
    ring.add(5, 99, 99)  # older than the ring holds: dropped
    assert sum(ring.series(SLOTS, 102 + SLOTS)[0]) == 1
    copy = Ring.from_json(ring.end, json.loads(json.dumps(ring.to_json())))
    assert copy.series(SLOTS, ring.end) == ring.series(SLOTS, ring.end)
    for bad in (None, {"rx": "x", "tx": "y"}, {"rx": Ring(0).to_json()["rx"][:-8], "tx": ""}):
        with pytest.raises(ValueError):
            Ring.from_json(0, bad)


def test_traffic_counts_counter_growth_and_survives_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "traffic.json"
    t = Traffic(path)
    other = KEYS["office"].public_key()
    t.sample(NOW, {LAPTOP: _stats(NOW, 10_000, 20_000)}, {LAPTOP})  # at start: a baseline, not traffic
    t.sample(NOW + 2, {LAPTOP: _stats(NOW, 10_500, 20_100)}, {LAPTOP})
    t.sample(
        NOW + 60, {LAPTOP: _stats(NOW, 10_600, 20_100), other: _stats(NOW, 50, 60)}, {LAPTOP}
    )  # new: all
    t.sample(NOW + 62, {LAPTOP: _stats(NOW, 40, 40), other: _stats(NOW, 50, 60)}, {LAPTOP})  # re-added: reset
    s = t.series(3, NOW + 62)
    assert s["step"] == 60 and s["end"] == (int((NOW + 62) // 60) + 1) * 60
    assert s["peers"][str(LAPTOP)]["rx"][-2:] == [500, 140] and s["peers"][str(other)]["tx"][-1] == 60
    assert s["total"]["rx"][-2:] == [500, 190] and s["total"]["tx"][-2:] == [100, 100]
    assert t.last_active()[LAPTOP] == NOW + 62
    with pytest.raises(ValueError, match="minutes 1441"):
        t.series(1441, NOW)
    t.sample(NOW + 64, {LAPTOP: _stats(NOW, 40, 40)}, {LAPTOP})  # `other` left the mesh and the kernel
    assert str(other) not in t.series(3, NOW + 64)["peers"]
    t.flush()  # not yet: at most every 10 minutes
    assert not path.exists()
    t.flush(force=True)
    assert path.stat().st_size < 4096
    again = Traffic(path)
    again.load()
    assert again.series(3, NOW + 64) == t.series(3, NOW + 64)
    path.write_text("{garbage")
    broken = Traffic(path)
    broken.load()  # logged, starts empty
    assert broken.series(2, NOW)["peers"] == {}


def test_traffic_skips_a_peer_that_never_answered() -> None:
    """An offline peer's counters grow by our handshake initiations alone: no ring
    (11.5 KB each, issue 14's footprint), not active, not in the total."""
    t = Traffic(None)
    offline, answering = KEYS["office"].public_key(), LAPTOP
    t.sample(NOW, {}, {offline, answering})
    for step in range(1, 4):
        t.sample(NOW + 2 * step, {offline: _stats(None, 0, 148 * step), answering: _stats(None, 92 * step, 0)},
                 {offline, answering})  # fmt: skip
    s = t.series(1, NOW + 6)
    assert set(s["peers"]) == {str(answering)} and s["total"]["tx"] == [0] and s["total"]["rx"] == [276]
    assert set(t.last_active()) == {answering}
    t.sample(NOW + 8, {offline: _stats(NOW + 7, 96, 148 * 3 + 128)}, {offline, answering})  # it answered
    s = t.series(1, NOW + 8)
    assert s["peers"][str(offline)] == {"rx": [96], "tx": [128]} and offline in t.last_active()


class _Host:
    """Just enough of the agent for Devices.change: the file and the hand-over."""

    def __init__(self, path: Path) -> None:
        self.devices_file, self.link = path, self
        self.handed: list[tuple[object, ...]] = []
        self.told: list[dict[str, object]] = []

    def device(self, body: dict[str, object]) -> dict[str, object]:  # the control link's op
        self.told.append(body)
        return {}

    def devices_changed(self, devices: tuple[object, ...]) -> None:
        self.handed.append(devices)


def test_devices_rename_disable_enable_and_hostile_input(tmp_path: Path) -> None:
    from appliance.agent.devices.hosted import DeviceEntry, Devices, load_devices
    from appliance.base.errors import MeshpiError

    path = tmp_path / "devices.json"
    entries = [DeviceEntry("a1", "phone", PHONE_KEY, (ip_address("100.64.0.9"),), "all", NOW),
               DeviceEntry("b2", "tablet", LAPTOP, (ip_address("100.64.0.10"),), "lan", NOW)]  # fmt: skip
    path.write_text(json.dumps([e.to_json() | {"enabled": True} for e in entries]))
    host = _Host(path)
    devices = Devices(host)  # type: ignore[arg-type]
    assert devices.change("a1", {"name": "Anna's phone"})["device"]["name"] == "Anna's phone"
    assert host.told == [{"action": "rename", "public_key": str(PHONE_KEY), "name": "Anna's phone"}]
    assert devices.change("a1", {"enabled": False})["device"]["enabled"] is False
    assert [d.name for d in host.handed[-1]] == ["tablet"]  # type: ignore[attr-defined]  # out of the kernel
    assert [d.enabled for d in load_devices(path)] == [False, True]
    devices.change("a1", {"enabled": True})
    assert [d.name for d in host.handed[-1]] == ["Anna's phone", "tablet"]  # type: ignore[attr-defined]
    before = path.read_bytes()
    for body, status, words in [
        ({"name": "tablet"}, 409, "already a device named 'tablet'"),
        ({"name": ""}, 400, "name"),
        ({"name": "x" * 65}, 400, "name"),
        ({"name": "bad\nname"}, 400, "name"),
        ({"enabled": "yes"}, 400, "enabled"),
        ({"enabled": 1}, 400, "enabled"),
        ({}, 400, "nothing to change"),
        ({"name": "ok", "mode": "lan"}, 400, "mode"),
        ([1], 400, "request"),
        (None, 400, "request"),
    ]:
        with pytest.raises(MeshpiError) as refused:
            devices.change("a1", body)
        assert refused.value.status == status and words in refused.value.message, (body, refused.value)
    with pytest.raises(MeshpiError) as refused:
        devices.change("nope", {"name": "x"})
    assert refused.value.status == 404 and "'nope'" in refused.value.message
    assert path.read_bytes() == before  # nothing changed by any refusal
    host.link = None  # control cannot be told: the name stays
    with pytest.raises(MeshpiError) as refused:
        devices.change("a1", {"name": "phone 2"})
    assert refused.value.status == 503 and path.read_bytes() == before
    assert devices.change("a1", {"enabled": False})["device"]["enabled"] is False  # a local matter
