"""No DNS leak through the exit node (issue 13), with real resolvers and the
system's own resolver (`getent hosts`, glibc reading resolv.conf) on the laptop.

    laptop ──tunnel── pi ── home router: dnsmasq 192.168.77.1 (the home's resolver, split DNS)
      │
      └── café router: dnsmasq 10.77.0.1 (what the café's DHCP handed the laptop)

The laptop uses the pi as its exit node *with* LAN access, so the café's resolver
is reachable directly: a leak would really reach it, and be counted in its log.
Each lab node's resolv.conf is its namespace's own (/etc/netns/<ns>/resolv.conf,
which `ip netns exec` mounts), managed by its agent (--resolv-conf).

1. exit node in use: 100 lookups; the café's resolver logs zero, the home's logs them;
   a home LAN name (nas.home.arpa) resolves through the mesh (split DNS);
2. the pi's agent stopped (its resolver gone): lookups fail, still zero at the café;
   the pi gone from the netmap too: still failing, still zero;
3. exit node unset (prefs): lookups go to the café's resolver again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from appliance.core.hostdns import is_ours
from tests.lab.dns_lab import (
    CAFE_ANSWER,
    CAFE_RESOLVER,
    HOME_ANSWER,
    HOME_LAN_DOMAINS,
    HOME_LAN_NAMES,
    HOME_RESOLVER,
    LEAK_DOMAIN,
    Dnsmasq,
    lab_resolvers,
    lookup,
    netns_resolv_conf,
)
from tests.lab.mesh import Mesh, MeshNode, write_json_atomic
from tests.lab.topology import Lab

MESH_DOMAIN = "mesh.internal"
LOOKUPS = 100


class DnsMesh(Mesh):
    """The lab's mesh with control's DNS parts (netmap capver 3): the mesh domain,
    each node's name, and the pi's home LAN resolver for split DNS."""

    def netmap(self, node: MeshNode) -> dict[str, Any]:
        out = super().netmap(node)
        out["capver"] = 3
        out["dns"] = {"domain": MESH_DOMAIN}
        for entry in (out["self"], *out["peers"]):
            entry["dns_name"] = entry["name"]
            if entry["name"] == "pi":
                entry["lan_dns"] = {"domains": list(HOME_LAN_DOMAINS), "resolver": HOME_RESOLVER}
        return out


@dataclass
class World:
    lab: Lab
    mesh: DnsMesh
    cafe: Dnsmasq
    home: Dnsmasq


@pytest.fixture
def world() -> Iterator[World]:
    with (
        Lab() as lab,
        lab_resolvers(lab) as (cafe, home),
        netns_resolv_conf(lab.laptop, CAFE_RESOLVER) as laptop_conf,
        netns_resolv_conf(lab.pi, HOME_RESOLVER) as pi_conf,
    ):
        mesh = DnsMesh.standard(lab)
        mesh["laptop"].prefs["exit_node_allow_lan_access"] = True  # the café's resolver is reachable
        mesh["laptop"].resolv_conf, mesh["pi"].resolv_conf = laptop_conf, pi_conf
        with mesh:
            mesh.start()
            yield World(lab, mesh, cafe, home)


def lookups(world: World, names: list[str]) -> list[str | None]:
    """`getent hosts` for each name on the laptop, a few at a time."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda name: lookup(world.lab.laptop, name, timeout=60), names))


def test_dns_leak_none_through_the_exit_node_and_none_when_it_is_gone(world: World) -> None:
    mesh, cafe, home, laptop = world.mesh, world.cafe, world.home, world.mesh["laptop"]
    conf = laptop.resolv_conf
    assert conf is not None
    mesh.wait_until(lambda: is_ours(conf.read_bytes()), 30, "the laptop's resolv.conf managed")
    mesh.wait_until(lambda: lookup(world.lab.laptop, f"probe.{LEAK_DOMAIN}") == HOME_ANSWER, 60,
                    "a first lookup answered by the home's resolver, through the pi")  # fmt: skip

    # 1. Through the exit node: every name asked at home, none at the café.
    names = [f"n{i}.{LEAK_DOMAIN}" for i in range(LOOKUPS)]
    started = time.monotonic()
    answers = lookups(world, names)
    took = time.monotonic() - started
    assert answers == [HOME_ANSWER] * LOOKUPS, answers
    assert cafe.queries() == 0, cafe.all_queries()
    assert set(names) <= home.names(LEAK_DOMAIN)
    # Split DNS: the home LAN's own name, from its own resolver, over the mesh.
    assert lookup(world.lab.laptop, "nas.home.arpa") == HOME_LAN_NAMES["nas.home.arpa"]
    # A mesh name, from the laptop's own resolver (getent prefers the IPv6 answer).
    assert lookup(world.lab.laptop, f"pi.{MESH_DOMAIN}") in set(mesh["pi"].addresses)
    assert cafe.queries() == 0, cafe.all_queries()

    # 2. The exit node goes away: names fail (closed), never fall back to the café.
    world.lab.stop_process(mesh["pi"].agent)  # type: ignore[arg-type]
    gone = [f"gone{i}.{LEAK_DOMAIN}" for i in range(5)]
    started = time.monotonic()
    assert lookups(world, gone) == [None] * len(gone)
    failed = time.monotonic() - started
    assert cafe.queries() == 0, cafe.all_queries()
    without_pi = mesh.netmap(laptop)  # and control removes it from the netmap
    without_pi["peers"] = [p for p in without_pi["peers"] if p["name"] != "pi"]
    write_json_atomic(laptop.netmap_path, without_pi)
    removed = [f"removed{i}.{LEAK_DOMAIN}" for i in range(5)]
    mesh.wait_until(lambda: all(a is None for a in lookups(world, removed)), 30, "lookups failing")
    assert cafe.queries() == 0, cafe.all_queries()

    # 3. The owner unsets the exit node: the café's resolver answers again.
    laptop.write_prefs(exit_node=None)
    mesh.wait_until(lambda: lookup(world.lab.laptop, f"back.{LEAK_DOMAIN}") == CAFE_ANSWER, 30,
                    "lookups through the café's resolver")  # fmt: skip
    assert f"back.{LEAK_DOMAIN}" in cafe.names(LEAK_DOMAIN)
    assert not (set(gone) | set(removed) | set(names)) & cafe.names(LEAK_DOMAIN)
    print(
        f"dns leak: {LOOKUPS} lookups through the exit node in {took:.2f} s; home resolver saw "
        f"{home.queries(LEAK_DOMAIN)} queries, the café 0 until the exit node was unset; "
        f"{len(gone)} lookups failed closed in {failed:.2f} s"
    )
