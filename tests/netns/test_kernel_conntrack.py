"""kernel/conntrack.py against the real conntrack table of a throwaway namespace,
with pyroute2's full decoder of the same dump as the reference."""

from __future__ import annotations

import socket
import subprocess
import time
from ipaddress import ip_address

from appliance.kernel import conntrack
from appliance.kernel.nlattrs import attr

V4, V6 = 1500, 500
TRACK_NEW = (
    "table inet t {\n chain out {\n  type filter hook output priority 0;\n  ct state new counter\n }\n}\n"
)


def sh(*cmd: str, stdin: str | None = None) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, input=stdin)


def _tracked_namespace() -> None:
    """An uplink with routes to both test ranges, and an nft hook that makes the
    namespace's conntrack track what this host sends."""
    sh("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p")
    sh("ip", "link", "set", "up0", "up")
    sh("ip", "link", "set", "up0p", "up")
    sh("ip", "addr", "add", "10.7.0.1/24", "dev", "up0")
    sh("ip", "addr", "add", "fd7a:7::1/64", "dev", "up0", "nodad")
    # Through one gateway with a fixed neighbour entry: no neighbour lookup per destination.
    sh("ip", "neigh", "add", "10.7.0.2", "lladdr", "02:00:00:00:00:02", "dev", "up0")
    sh("ip", "neigh", "add", "fd7a:7::2", "lladdr", "02:00:00:00:00:02", "dev", "up0")
    sh("ip", "route", "add", "198.18.0.0/15", "via", "10.7.0.2")
    sh("ip", "route", "add", "2001:db8:7::/48", "via", "fd7a:7::2")
    sh("nft", "-f", "-", stdin=TRACK_NEW)


def _send(family: int, source: str, destinations: list[str]) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for dst in destinations:
            sock.sendto(b"x", (dst, 9))


def _reference() -> set[tuple[object, object]]:
    from pyroute2.conntrack import Conntrack

    seen: set[tuple[object, object]] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        with Conntrack(nfgen_family=family) as ct:
            for entry in ct.dump_entries():
                seen.add((ip_address(entry.tuple_orig.saddr), ip_address(entry.tuple_orig.daddr)))
    return seen


def test_conntrack_flows_match_pyroute2_decoder_on_2000_flows(inside: str) -> None:
    assert conntrack.flows() == []  # nothing tracked yet (or no conntrack at all): no error
    _tracked_namespace()
    v4 = [f"198.18.{i // 250}.{1 + i % 250}" for i in range(V4)]
    v6 = [f"2001:db8:7::{i + 1:x}" for i in range(V6)]
    _send(socket.AF_INET, "10.7.0.1", v4)
    _send(socket.AF_INET6, "fd7a:7::1", v6)
    started = time.perf_counter()
    found = conntrack.flows()
    took = time.perf_counter() - started
    assert len(found) == V4 + V6, len(found)
    started = time.perf_counter()
    reference = _reference()
    took_reference = time.perf_counter() - started
    assert set(found) == reference
    assert {str(dst) for _src, dst in found} == set(v4) | {str(ip_address(a)) for a in v6}
    assert {str(src) for src, _dst in found} == {"10.7.0.1", "fd7a:7::1"}
    print(f"conntrack: {len(found)} flows in {took * 1000:.1f} ms (pyroute2: {took_reference * 1000:.0f} ms)")


def test_conntrack_flows_stop_at_the_bound(inside: str, monkeypatch: object) -> None:
    _tracked_namespace()
    _send(socket.AF_INET, "10.7.0.1", [f"198.18.0.{i}" for i in range(1, 201)])
    monkeypatch.setattr(conntrack, "MAX_FLOWS", 50)  # type: ignore[attr-defined]
    assert len(conntrack.flows()) == 50


def test_conntrack_parse_flow_refuses_garbage() -> None:
    """Attributes that are cut short, nested wrongly or of the wrong size give no flow,
    not an exception: a flow without addresses is skipped."""
    good = attr(1 | 0x8000, attr(1 | 0x8000, attr(1, bytes([10, 0, 0, 1])) + attr(2, bytes([1, 1, 1, 1]))))
    assert conntrack.parse_flow(good) == (ip_address("10.0.0.1"), ip_address("1.1.1.1"))
    short = attr(1, attr(1, attr(1, b"\x0a\x00") + attr(2, b"\x01\x01\x01\x01")))
    assert conntrack.parse_flow(short) is None
    assert conntrack.parse_flow(b"") is None
    assert conntrack.parse_flow(b"\x02\x00\x01\x00") is None  # length below the header
    for cut in range(len(good)):
        conntrack.parse_flow(good[:cut])
