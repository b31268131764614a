"""netwatch.py's reading of rtnetlink messages, and what it counts as the host's
change (meshpi's own interface and table never wake the loop)."""

from __future__ import annotations

import socket
import struct

from appliance.agent import netwatch as nw
from appliance.agent.bus import Bus


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def link(index: int, name: str, flags: int, added: bool = True) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, flags, 0) + attr(nw.IFLA_IFNAME, name.encode() + b"\0")
    return message(nw.RTM_NEWLINK if added else nw.RTM_DELLINK, body)


def address(index: int, addr: str, prefix: int, added: bool = True) -> bytes:
    body = struct.pack("=BBBBI", socket.AF_INET, prefix, 0, 0, index)
    body += attr(nw.IFA_LOCAL, socket.inet_aton(addr))
    return message(nw.RTM_NEWADDR if added else nw.RTM_DELADDR, body)


def route(oif: int, dst: str, prefix: int, table: int = 254, flags: int = 0) -> bytes:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, prefix, 0, 0, min(table, 252), 4, 0, 1, flags)
    body += attr(nw.RTA_TABLE, struct.pack("=I", table)) + attr(nw.RTA_OIF, struct.pack("=i", oif))
    body += attr(nw.RTA_DST, socket.inet_aton(dst))
    return message(nw.RTM_NEWROUTE, body)


UP = nw.IFF_UP | nw.IFF_RUNNING | nw.IFF_LOWER_UP


def watcher() -> nw.NetWatch:
    w = nw.NetWatch(Bus(), lambda: ("meshpi0", 51820))
    w.links = {2: ("eth0", UP), 7: ("meshpi0", UP)}
    return w


def changes(w: nw.NetWatch, data: bytes) -> list[str]:
    return [d for d in map(w.describe, nw.parse(data)) if d is not None]


def test_netwatch_names_the_hosts_changes() -> None:
    w = watcher()
    burst = address(2, "10.77.0.2", 24, added=False) + route(2, "10.1.0.0", 16) + link(2, "eth0", nw.IFF_UP)
    assert changes(w, burst) == [
        "address 10.77.0.2/24 removed on eth0",
        "route 10.1.0.0/16 added on eth0",
        "eth0 down",
    ]
    assert changes(w, link(9, "wlan0", UP)) == ["wlan0 appeared"]


def test_netwatch_ignores_meshpis_own_changes() -> None:
    w = watcher()
    own = (
        address(7, "100.64.0.1", 32)
        + route(7, "100.64.0.0", 10)
        + route(2, "10.9.0.0", 24, table=51820)  # meshpi's table, whatever the device
        + route(2, "10.77.0.2", 32, table=nw.RT_TABLE_LOCAL)
        + route(2, "10.77.0.9", 32, flags=nw.RTM_F_CLONED)
        + link(7, "meshpi0", 0)
        + link(2, "eth0", UP)  # a repeat (a Wi-Fi scan): same flags
    )
    assert changes(w, own) == []


def test_netwatch_address_refresh_is_not_a_change() -> None:
    """IPv6 repeats RTM_NEWADDR on every router advertisement (lifetimes)."""
    w = watcher()
    assert changes(w, address(2, "10.77.0.5", 24)) == ["address 10.77.0.5/24 added on eth0"]
    assert changes(w, address(2, "10.77.0.5", 24)) == []
    assert changes(w, address(2, "10.77.0.5", 24, added=False)) == ["address 10.77.0.5/24 removed on eth0"]
    assert changes(w, address(2, "10.77.0.5", 24)) == ["address 10.77.0.5/24 added on eth0"]


def test_netwatch_garbage_is_skipped_not_fatal() -> None:
    w = watcher()
    good = address(2, "10.77.0.3", 24)
    for junk in (
        b"",
        b"\xff" * 7,
        good[:20],
        struct.pack("=IHHII", 8, 20, 0, 0, 0) + good,
        good + b"\x01\x02",
    ):
        changes(w, junk)  # never raises
    truncated_attr = good[:-2]
    assert [e.kind for e in nw.parse(truncated_attr)] in ([], ["address"])


def test_netwatch_summary_counts_the_rest() -> None:
    assert nw.summary(["a", "b", "a"]) == "a, b"
    assert nw.summary([str(i) for i in range(7)]) == "0, 1, 2, 3 and 3 more"
