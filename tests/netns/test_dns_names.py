"""Mesh names through control and the node's resolver, asked with real `dig`
(Debian's bind9-dnsutils) at a node's mesh address (the world: meshworld.py,
control mode, names from control, netmap capver 3).

    laptop ──tunnel── pi ── home router: dnsmasq 192.168.77.1 (the pi's upstream)
      │
      └── café router: dnsmasq 10.77.0.1 (the laptop's own resolver)

- names of nodes and of a device the pi hosts, A and AAAA, PTR, NXDOMAIN, over
  UDP and TCP; a rename by the admin is served within 2 s;
- with the pi as exit node, a name outside the mesh goes to the pi's resolver (and
  from there to the home's dnsmasq), never to the café's; the exit node withdrawn:
  SERVFAIL, still nothing at the café; exit node unset: the café again;
- port 53 of a mesh address answers the mesh only (nft input).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from tests.lab.dns_lab import (
    CAFE_ANSWER,
    CAFE_RESOLVER,
    HOME_ANSWER,
    HOME_RESOLVER,
    LEAK_DOMAIN,
    Dnsmasq,
    lab_resolvers,
    netns_resolv_conf,
)
from tests.lab.host import Host, wait_for
from tests.lab.topology import PI_V4, Lab
from tests.netns.meshworld import World, mesh_world

DOMAIN = "mesh.internal"


@pytest.fixture(scope="module")
def resolvers() -> dict[str, Dnsmasq]:
    return {}


@pytest.fixture(scope="module")
def world(resolvers: dict[str, Dnsmasq]) -> Iterator[World]:
    def prepare(lab: Lab, stack: contextlib.ExitStack[None]) -> None:
        resolvers["cafe"], resolvers["home"] = stack.enter_context(lab_resolvers(lab))
        # What each node's DHCP would have written: read by its agent for its upstreams.
        stack.enter_context(netns_resolv_conf(lab.pi, HOME_RESOLVER))
        stack.enter_context(netns_resolv_conf(lab.laptop, CAFE_RESOLVER))

    with mesh_world(prepare) as w:
        for node in w.nodes.values():
            wait_for(
                lambda n=node: (n.status().get("dns") or {}).get("serving"), 10, f"{node.name}'s resolver"
            )
        pi_v4 = w.nodes["pi"].mesh_v4()
        for node in (w.nodes["laptop"], w.nodes["laptop2"]):  # the tunnels up (a first handshake)
            wait_for(lambda n=node: n.host.ping(pi_v4, count=1)[1] == 1, 20, f"{node.name} -> pi")
        yield w


def dig(host: Host, server: str, *query: str, tcp: bool = False) -> tuple[str, list[str]]:
    """(status, answer lines) of `dig @server query`."""
    args = ["dig", f"@{server}", "+time=2", "+tries=1", "+noall", "+answer", "+comments", *query]
    if tcp:
        args.append("+tcp")
    out = host.run(args, check=False, timeout=15).stdout
    status = next((line.split("status: ")[1].split(",")[0] for line in out.splitlines() if "status: " in line),
                  "no answer")  # fmt: skip
    answers = [line.split()[-1] for line in out.splitlines() if line and not line.startswith(";")]
    return status, answers


def addresses(world: World, name: str) -> list[str]:
    return [str(a) for a in world.nodes[name].status()["self"]["addresses"]]  # type: ignore[index]


def test_dns_names_nodes_devices_ptr_and_nxdomain(world: World) -> None:
    laptop, pi = world.nodes["laptop"], world.nodes["pi"]
    me = laptop.mesh_v4()
    pi_v4, pi_v6 = addresses(world, "pi")
    assert dig(laptop.host, me, f"pi.{DOMAIN}", "A") == ("NOERROR", [pi_v4])
    assert dig(laptop.host, me, f"pi.{DOMAIN}", "AAAA", tcp=True) == ("NOERROR", [pi_v6])
    assert dig(laptop.host, me, f"laptop2.{DOMAIN}", "A")[1] == addresses(world, "laptop2")[:1]
    assert dig(laptop.host, me, "-x", pi_v4) == ("NOERROR", [f"pi.{DOMAIN}."])
    assert dig(laptop.host, me, f"nosuch.{DOMAIN}", "A")[0] == "NXDOMAIN"
    # the pi's own resolver answers for the laptop too, over the tunnel
    assert dig(laptop.host, pi_v4, f"laptop.{DOMAIN}", "A") == ("NOERROR", [me])
    # a phone the pi hosts: named by control, known to every node within moments
    answer = pi.api().post("/v1/devices", {"name": "Alice Phone", "mode": "all", "endpoint": "198.51.100.1"},
                           timeout=20)  # fmt: skip
    try:
        assert answer["device"]["dns_name"] == f"alice-phone.{DOMAIN}"
        assert f"DNS = {pi_v4}, {pi_v6}" in answer["config"]  # phones ask the hub
        phone_v4 = answer["device"]["addresses"][0]
        wait_for(lambda: dig(laptop.host, me, f"alice-phone.{DOMAIN}", "A")[1] == [phone_v4], 5,
                 "the phone's name on the laptop")  # fmt: skip
        assert dig(laptop.host, me, "-x", phone_v4)[1] == [f"alice-phone.{DOMAIN}."]
        status = pi.status()
        assert status["self"]["dns_name"] == f"pi.{DOMAIN}"  # type: ignore[index]
        assert [d["dns_name"] for d in status["devices"]] == [f"alice-phone.{DOMAIN}"]  # type: ignore[attr-defined]
        peers = {p["name"]: p["dns_name"] for p in laptop.status()["peers"]}  # type: ignore[attr-defined]
        assert peers == {"pi": f"pi.{DOMAIN}", "laptop2": f"laptop2.{DOMAIN}"}
    finally:
        pi.api().delete(f"/v1/devices/{answer['device']['id']}")


def test_dns_names_rename_is_served_within_2s(world: World) -> None:
    laptop = world.nodes["laptop"]
    me, pi_id = laptop.mesh_v4(), str(world.node_id("pi"))
    pi_v4 = addresses(world, "pi")[0]
    try:
        start = time.monotonic()
        world.admin("nodes", "rename", pi_id, "Home Pi")
        wait_for(lambda: dig(laptop.host, me, f"home-pi.{DOMAIN}", "A")[1] == [pi_v4], 2.0,
                 "the new name", interval=0.05)  # fmt: skip
        took = time.monotonic() - start
        assert dig(laptop.host, me, f"pi.{DOMAIN}", "A")[0] == "NXDOMAIN"
        assert dig(laptop.host, me, "-x", pi_v4)[1] == [f"home-pi.{DOMAIN}."]
        print(f"rename served after {took * 1000:.0f} ms")
    finally:
        world.admin("nodes", "rename", pi_id, "pi")
        wait_for(lambda: dig(laptop.host, me, f"pi.{DOMAIN}", "A")[1] == [pi_v4], 5, "the old name back")


def test_dns_names_through_the_exit_node_and_fail_closed(world: World, resolvers: dict[str, Dnsmasq]) -> None:
    laptop, pi_id = world.nodes["laptop"], str(world.node_id("pi"))
    cafe, home = resolvers["cafe"], resolvers["home"]
    me = laptop.mesh_v4()
    # no exit node: the laptop's own resolver (the café's)
    assert dig(laptop.host, me, f"before.{LEAK_DOMAIN}", "A") == ("NOERROR", [CAFE_ANSWER])
    world.admin("routes", "approve", pi_id, "192.168.77.0/24", "0.0.0.0/0", "::/0")
    # The approval reaches the laptop as a delta; choosing the exit before it has would be
    # refused (a loaded host once took longer than the CLI's next call).
    wait_for(lambda: any(p["exit_node"] for p in laptop.status()["peers"]), 15, "the pi's approved exit")  # type: ignore[union-attr,index]
    laptop.meshpi("set", "--exit-node", "pi")
    try:
        asked_at_cafe = cafe.queries(LEAK_DOMAIN)
        wait_for(lambda: dig(laptop.host, me, f"probe.{LEAK_DOMAIN}", "A")[1] == [HOME_ANSWER], 10,
                 "a name answered by the home's resolver through the pi")  # fmt: skip
        for i in range(20):
            assert dig(laptop.host, me, f"n{i}.{LEAK_DOMAIN}", "A") == ("NOERROR", [HOME_ANSWER])
        assert {f"n{i}.{LEAK_DOMAIN}" for i in range(20)} <= home.names(LEAK_DOMAIN)
        # asked by the pi's resolver (from the pi's LAN address), not by the laptop
        asked_by = {
            q.client for q in home.all_queries() if q.name.startswith("n") and q.name.endswith(LEAK_DOMAIN)
        }
        assert asked_by == {PI_V4}
        assert cafe.queries(LEAK_DOMAIN) == asked_at_cafe  # not one more
        dns = laptop.status()["dns"]
        assert dns["upstreams"] == [f"{a}:53" if ":" not in a else f"[{a}]:53"  # type: ignore[index]
                                    for a in addresses(world, "pi")]  # fmt: skip
        # the exit node withdrawn: fail closed, still nothing at the café
        world.admin("routes", "approve", pi_id, "192.168.77.0/24")
        wait_for(lambda: dig(laptop.host, me, f"gone.{LEAK_DOMAIN}", "A")[0] == "SERVFAIL", 5, "SERVFAIL")
        assert cafe.queries(LEAK_DOMAIN) == asked_at_cafe
        assert dig(laptop.host, me, f"pi.{DOMAIN}", "A")[0] == "NOERROR"  # mesh names still answer
    finally:
        world.admin("routes", "approve", pi_id, "192.168.77.0/24", "0.0.0.0/0", "::/0")
        laptop.meshpi("set", "--exit-node", "")
    wait_for(
        lambda: dig(laptop.host, me, f"after.{LEAK_DOMAIN}", "A")[1] == [CAFE_ANSWER], 5, "the café again"
    )


def test_dns_names_mesh_port_53_refused_from_the_lan(world: World) -> None:
    """The lanhost routes the pi's mesh address to the pi over the home LAN: the
    nft input policy drops the query (the resolver listens on that address)."""
    lab, laptop = world.lab, world.nodes["laptop"]
    pi_v4 = addresses(world, "pi")[0]
    lab.lanhost.run(["ip", "route", "replace", f"{pi_v4}/32", "via", "192.168.77.2"])
    try:
        assert dig(lab.lanhost, pi_v4, f"pi.{DOMAIN}", "A")[0] == "no answer"
        assert dig(lab.lanhost, pi_v4, f"pi.{DOMAIN}", "A", tcp=True)[0] == "no answer"
        assert dig(laptop.host, pi_v4, f"pi.{DOMAIN}", "A")[0] == "NOERROR"  # from the mesh: yes
    finally:
        lab.lanhost.run(["ip", "route", "del", f"{pi_v4}/32"], check=False)


def test_dns_names_logout_stops_the_resolver(world: World) -> None:
    """Last in the module: laptop2 leaves the mesh."""
    laptop2 = world.nodes["laptop2"]
    address = laptop2.mesh_v4()
    assert dig(laptop2.host, address, f"pi.{DOMAIN}", "A")[0] == "NOERROR"
    laptop2.meshpi("logout")
    assert laptop2.status()["dns"] is None
    listening = laptop2.host.run(["ss", "-Hlnu", f"src {address}"], check=False).stdout
    assert listening.strip() == "", listening
