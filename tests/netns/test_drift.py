"""Drift: what meshpi owns, deleted by hand, comes back at the next resync (a
reconcile that re-reads the kernel), one log line per repair.

Inside one throwaway namespace, as in test_system_real.py:

    eth0 <==veth==> eth0p      eth0 192.168.77.2/24 (the pi's LAN) or 10.77.0.2/24 (a laptop's)
    mpd<pid>                    made by the agent code (wireguard-go)
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest

from appliance.agent.reconcile import Reconciler
from appliance.core.changes import AddRoute, AddRule, Change, ReplaceNft
from appliance.core.model import Scope, State
from appliance.core.planner import plan
from appliance.core.prefs import Prefs
from appliance.kernel.real import real_system
from appliance.kernel.system import System
from tests.netns.kernelstate import sh
from tests.unit.meshes import KEYS, laptop_netmap, pi_netmap

IFACE = f"mpd{os.getpid() % 100000}"


@pytest.fixture
def system(inside: str, tmp_path: Path) -> Iterator[System]:
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    sh("ip", "link", "set", "eth0p", "up")
    sh("ip", "link", "set", "eth0", "up")
    yield real_system("userspace", tmp_path)
    subprocess.run(["ip", "link", "del", IFACE], capture_output=True)


def _up(system: System, lan: str, me: str) -> tuple[Scope, State]:
    sh("ip", "addr", "add", lan, "dev", "eth0")
    if me == "pi":
        prefs = Prefs(interface=IFACE, backend="userspace", advertise_exit_node=True,
                      advertise_routes=(ip_network("192.168.77.0/24"),))  # fmt: skip
        netmap = pi_netmap()
    else:
        prefs = Prefs(interface=IFACE, backend="userspace", exit_node="pi")
        netmap = laptop_netmap()
    scope = Scope(IFACE, prefs.table, prefs.fwmark)
    desired = plan(netmap, prefs, KEYS[me], system.facts(scope))
    Reconciler(system, scope).sync(desired)
    return scope, desired


def _resync(
    system: System, scope: Scope, desired: State, caplog: pytest.LogCaptureFixture
) -> tuple[list[Change], list[str]]:
    """What the agent does every resync: re-read the kernel, apply the difference."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        applied = Reconciler(system, scope).sync(desired, reread=True)
    return applied, [r.getMessage() for r in caplog.records if r.getMessage().startswith("[#]")]


def _handle(chain: str, comment: str) -> str:
    for line in sh("nft", "-a", "list", "chain", "inet", "meshpi", chain).splitlines():
        if f'comment "{comment}"' in line:
            return line.rsplit("# handle ", 1)[1].strip()
    raise AssertionError(f"no rule {comment!r} in chain {chain}")


def test_drift_a_rule_deleted_under_an_intact_digest_is_repaired(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    scope, desired = _up(system, "192.168.77.2/24", "pi")
    before = sh("nft", "list", "table", "inet", "meshpi")
    sh(
        "nft",
        "delete",
        "rule",
        "inet",
        "meshpi",
        "from_mesh",
        "handle",
        _handle("from_mesh", "shared subnet route"),
    )
    assert "shared subnet route" not in sh("nft", "list", "table", "inet", "meshpi")

    applied, lines = _resync(system, scope, desired, caplog)
    assert applied == [ReplaceNft(desired.nft)] and len(lines) == 1  # type: ignore[arg-type]
    assert "chain from_mesh: 4 rules, 5 applied" in caplog.text
    assert sh("nft", "list", "table", "inet", "meshpi") == before
    assert _resync(system, scope, desired, caplog)[0] == []  # repaired for good


def test_drift_a_chain_deleted_is_repaired_even_by_a_new_agent(
    system: System, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    scope, desired = _up(system, "192.168.77.2/24", "pi")
    sh("nft", "flush", "chain", "inet", "meshpi", "mss_clamp")
    sh("nft", "delete", "chain", "inet", "meshpi", "mss_clamp")
    # A new agent (nothing in memory) sees it from the shape kept in the table's comment.
    fresh = real_system("userspace", tmp_path)
    applied, lines = _resync(fresh, scope, desired, caplog)
    assert applied == [ReplaceNft(desired.nft)] and len(lines) == 1  # type: ignore[arg-type]
    assert "chain mss_clamp" in sh("nft", "list", "table", "inet", "meshpi")
    # And a new agent that finds the table whole changes nothing.
    assert _resync(real_system("userspace", tmp_path), scope, desired, caplog)[0] == []


def test_drift_a_set_element_deleted_is_repaired(system: System, caplog: pytest.LogCaptureFixture) -> None:
    scope, desired = _up(system, "192.168.77.2/24", "pi")
    sh("nft", "delete", "element", "inet", "meshpi", "shared_v4", "{ 192.168.77.0/24 }")
    applied, lines = _resync(system, scope, desired, caplog)
    assert applied == [ReplaceNft(desired.nft)] and len(lines) == 1  # type: ignore[arg-type]
    assert "192.168.77.0/24" in sh("nft", "list", "set", "inet", "meshpi", "shared_v4")


def test_drift_rules_and_routes_deleted_by_hand_are_put_back(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    scope, desired = _up(system, "10.77.0.2/24", "laptop")
    rules, routes = sh("ip", "-4", "rule", "show"), sh("ip", "route", "show", "table", "51820")
    sh("ip", "-4", "rule", "del", "priority", "5270")
    sh("ip", "-6", "rule", "del", "priority", "5210")
    sh("ip", "route", "del", "192.168.77.0/24", "table", "51820")
    sh("ip", "route", "del", "default", "table", "51820")

    applied, lines = _resync(system, scope, desired, caplog)
    assert sorted(map(str, applied)) == sorted(
        [
            f"add route 0.0.0.0/0 dev {IFACE} table 51820",
            f"add route 192.168.77.0/24 dev {IFACE} table 51820",
            "add rule 5210: -6 fwmark 0xca6c lookup main",
            "add rule 5270: -4 not fwmark 0xca6c lookup 51820",
        ]
    )
    assert all(isinstance(c, AddRoute | AddRule) for c in applied)
    assert lines == [f"[#] {c}" for c in applied]
    assert sh("ip", "-4", "rule", "show") == rules
    assert sh("ip", "route", "show", "table", "51820") == routes
    assert _resync(system, scope, desired, caplog)[0] == []
