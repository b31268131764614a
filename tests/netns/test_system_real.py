"""The whole System (userspace WireGuard, netlink, nft, sysctls) on the real
kernel: what the planner wants is what the kernel then reports, and tearing
down leaves the namespace exactly as it was found.

Inside one throwaway namespace:

    eth0 <==veth==> eth0p      eth0 192.168.77.2/24 + 2001:db8:1::2/64 (the "LAN")
    meshpi-t<pid>               made by the agent code (wireguard-go)
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest

from appliance.agent.reconcile import Reconciler
from appliance.core.model import Scope, State
from appliance.core.planner import plan
from appliance.core.prefs import Prefs
from appliance.kernel.real import real_system
from appliance.kernel.system import System
from tests.netns.kernelstate import sh, snapshot
from tests.unit.meshes import KEYS, laptop_netmap, pi_netmap

IFACE = f"mpt{os.getpid() % 100000}"


@pytest.fixture
def system(inside: str, tmp_path: Path) -> Iterator[System]:
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    sh("ip", "link", "set", "eth0p", "up")
    sh("ip", "link", "set", "eth0", "up")
    sh("ip", "addr", "add", "192.168.77.2/24", "dev", "eth0")
    sh("ip", "addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad")
    yield real_system("userspace", tmp_path)
    subprocess.run(["ip", "link", "del", IFACE], capture_output=True)


def _converge(system: System, desired: State, scope: Scope) -> None:
    Reconciler(system, scope).sync(desired)
    # A fresh reader sees exactly what was wanted: nothing left to do.
    assert Reconciler(system, scope).sync(desired, reread=True) == []


def test_system_exit_node_round_trips_and_tears_down(system: System) -> None:
    before = snapshot()
    prefs = Prefs(
        interface=IFACE,
        backend="userspace",
        advertise_exit_node=True,
        advertise_routes=(ip_network("192.168.77.0/24"),),
    )
    scope = Scope(IFACE, prefs.table, prefs.fwmark)
    facts = system.facts(scope)
    assert {str(c.network) for c in facts.connected} == {"192.168.77.0/24", "2001:db8:1::/64"}
    assert facts.forwarding_preexisting is False
    _converge(system, plan(pi_netmap(), prefs, KEYS["pi"], facts), scope)

    assert sh("sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
    ruleset = sh("nft", "list", "table", "inet", "meshpi")
    assert "masquerade" in ruleset and "maxseg size set rt mtu" in ruleset
    assert "mtu 1280" in sh("ip", "link", "show", IFACE)

    # Facts after meshpi turned forwarding on still say it was off before.
    assert system.facts(scope).forwarding_preexisting is False

    Reconciler(system, scope).sync(State(), reread=True)
    assert snapshot() == before


def test_system_exit_client_round_trips_and_tears_down(system: System) -> None:
    # A laptop away from home: its LAN is not the pi's.
    sh("ip", "addr", "del", "192.168.77.2/24", "dev", "eth0")
    sh("ip", "addr", "add", "10.77.0.2/24", "dev", "eth0")
    before = snapshot()
    prefs = Prefs(interface=IFACE, backend="userspace", exit_node="pi")
    scope = Scope(IFACE, prefs.table, prefs.fwmark)
    desired = plan(laptop_netmap(), prefs, KEYS["laptop"], system.facts(scope))
    _converge(system, desired, scope)
    rules = sh("ip", "-4", "rule", "show")
    assert "5270:\tnot from all fwmark 0xca6c lookup 51820" in rules
    assert "5250:\tfrom all lookup main suppress_prefixlength 0" in rules
    assert "5230:\tfrom all to 10.77.0.0/24 lookup 51820" in rules
    assert f"default dev {IFACE}" in sh("ip", "route", "show", "table", "51820")
    # The pi's subnet route lives in meshpi's table too, behind the fwmark rules.
    assert f"192.168.77.0/24 dev {IFACE} proto static" in sh("ip", "route", "show", "table", "51820")
    assert f"192.168.77.0/24 dev {IFACE}" not in sh("ip", "route", "show")

    # Allowing LAN access drops only the LAN rules.
    allow = prefs.with_changes(exit_node_allow_lan_access=True)
    _converge(system, plan(laptop_netmap(), allow, KEYS["laptop"], system.facts(scope)), scope)
    assert "5230:" not in sh("ip", "-4", "rule", "show")

    Reconciler(system, scope).sync(State(), reread=True)
    assert snapshot() == before
