"""The lab's pure parts: ping parsing, demo lines, netmaps built by Mesh (no root)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import demo
from tests.lab.mesh import Mesh, write_json_atomic
from tests.lab.topology import HOME_WAN_V4, Lab, LabError, PingResult, parse_ping

PI_KEY, LAPTOP_KEY = "A" * 43 + "=", "B" * 43 + "="

PING_OK = """PING 203.0.113.10 (203.0.113.10) 56(84) bytes of data.

--- 203.0.113.10 ping statistics ---
3 packets transmitted, 3 received, 0% packet loss, time 102ms
rtt min/avg/max/mdev = 0.041/0.063/0.089/0.019 ms
"""
PING_LOST = """--- 203.0.113.99 ping statistics ---
2 packets transmitted, 0 received, +2 errors, 100% packet loss, time 51ms
"""


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    lab = Lab()  # not entered: no namespaces, only the scratch dir
    try:
        mesh = Mesh.standard(lab)
        mesh["pi"].public_key, mesh["laptop"].public_key = PI_KEY, LAPTOP_KEY
        yield mesh
    finally:
        lab.close()


def test_lab_parse_ping_reads_counts_and_rtt() -> None:
    assert parse_ping(PING_OK) == PingResult(3, 3, 0.063)
    lost = parse_ping(PING_LOST)
    assert (lost.sent, lost.received, lost.rtt_avg_ms) == (2, 0, None)


def test_lab_parse_ping_rejects_output_without_summary() -> None:
    with pytest.raises(LabError, match="no ping summary"):
        parse_ping("ping: connect: Network is unreachable\n")


def test_lab_demo_line_names_the_path() -> None:
    line = demo.format_sample(demo.Sample(HOME_WAN_V4, 1.234, (2048, 10), {"pi": True}), "12:00")
    assert line == (
        "12:00  server sees laptop as 198.51.100.1 (via the pi (exit node))  ping=1.23ms"
        "  pi tunnel rx=2.0KiB tx=10B  agents: pi=up"
    )
    assert "unreachable" in demo.format_sample(demo.Sample(None, None, None), "12:00")


def test_lab_mesh_netmap_for_laptop_lists_pi_with_endpoint_and_exit_routes(mesh: Mesh) -> None:
    netmap = mesh.netmap(mesh["laptop"])
    assert netmap["mesh"] == {"ipv4": "100.64.0.0/10", "ipv6": "fd7a:6d70:6900::/48"}
    assert netmap["self"] == {
        "name": "laptop",
        "public_key": LAPTOP_KEY,
        "addresses": ["100.64.0.2", "fd7a:6d70:6900::2"],
        "routes": [],
    }
    assert netmap["peers"] == [
        {
            "name": "pi",
            "public_key": PI_KEY,
            "addresses": ["100.64.0.1", "fd7a:6d70:6900::1"],
            "routes": ["0.0.0.0/0", "::/0", "192.168.77.0/24"],
            "endpoint": "198.51.100.1:51820",
        }
    ]


def test_lab_mesh_netmap_for_pi_has_laptop_without_endpoint(mesh: Mesh) -> None:
    netmap = mesh.netmap(mesh["pi"])
    assert netmap["self"]["routes"] == ["0.0.0.0/0", "::/0", "192.168.77.0/24"]
    assert [(p["name"], p["endpoint"]) for p in netmap["peers"]] == [("laptop", None)]


def test_lab_mesh_approved_routes_override_advertised(mesh: Mesh) -> None:
    mesh["pi"].approved_routes = ["192.168.77.0/24"]
    assert mesh.netmap(mesh["laptop"])["peers"][0]["routes"] == ["192.168.77.0/24"]


def test_lab_mesh_nodes_get_distinct_interfaces_and_prefs(mesh: Mesh) -> None:
    pi, laptop = mesh["pi"], mesh["laptop"]
    assert (pi.interface, laptop.interface) == ("meshpi0", "meshpi1")
    laptop.write_prefs(exit_node_allow_lan_access=True)
    prefs = json.loads(laptop.prefs_path.read_text())
    assert prefs["interface"] == "meshpi1"
    assert prefs["exit_node"] == "pi"
    assert prefs["exit_node_allow_lan_access"] is True
    assert prefs["backend"] == "userspace"
    assert not list(laptop.dir.glob(".*.tmp"))


def test_lab_mesh_netmap_requires_keys(mesh: Mesh) -> None:
    mesh["pi"].public_key = None
    with pytest.raises(LabError, match="pi: no public key"):
        mesh.netmap(mesh["laptop"])


def test_lab_write_json_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
