"""A mesh that forms itself: meshpi-control in the lab's "internet" namespace,
agents in control mode on the pi and two laptops, joined with `meshpi up`
(the world: meshworld.py).

    control 203.0.113.10:8443 (in inet)
    pi       home LAN, port forward 198.51.100.1:51820, offers exit + 192.168.77.0/24
    laptop   behind its router's NAT, uses the pi as exit node
    laptop2  behind the same NAT; removed by the admin in one test

One mesh serves the module; tests that change it put it back.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.lab.host import Host, LabError, wait_for
from tests.lab.topology import HOME_WAN_V4, LANHOST_V4, PI_V4, SERVER_V4
from tests.netns.meshworld import BIN, Node, World, mesh_world, start_control


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with mesh_world() as w:
        yield w


def _within(seconds: float, what: str, check: Callable[[], bool]) -> float:
    start = time.monotonic()
    wait_for(check, seconds, what, interval=0.05)
    return time.monotonic() - start


def _reaches(host: Host, dst: str) -> bool:
    try:
        host.fetch(dst, timeout=1)
    except LabError:
        return False
    return True


def test_mesh_nodes_join_and_ping_each_other(world: World) -> None:
    pi, laptop, laptop2 = (world.nodes[n] for n in ("pi", "laptop", "laptop2"))
    assert {laptop.mesh_v4(), laptop2.mesh_v4(), pi.mesh_v4()} == {"100.64.0.1", "100.64.0.2", "100.64.0.3"}
    # The laptops are behind one NAT and reach each other through nothing yet: both
    # reach the pi, whose endpoint (a port forward) is known.
    for node in (laptop, laptop2):
        wait_for(lambda n=node: n.host.ping(pi.mesh_v4(), count=1)[1] == 1, 10, f"{node.name} -> pi")
        sent, received = node.host.ping(pi.mesh_v4(), count=3, interval=0.2)
        assert received == sent
        sent, received = pi.host.ping(node.mesh_v4(), count=3, interval=0.2)
        assert received == sent


def test_mesh_route_approval_takes_effect_within_2s_and_exit_works(world: World) -> None:
    lab, laptop = world.lab, world.nodes["laptop"]
    lab.lanhost.whoami_server()
    assert not _reaches(lab.laptop, LANHOST_V4)  # advertised, not approved: no route
    pi_id = world.node_id("pi")
    world.admin("routes", "approve", str(pi_id), "192.168.77.0/24", "0.0.0.0/0", "::/0")
    took = _within(2.0, "the approved LAN route", lambda: _reaches(lab.laptop, LANHOST_V4))
    assert took <= 2.0
    assert lab.laptop.fetch(LANHOST_V4) == PI_V4
    # Now the pi offers an approved exit: the laptop chooses it.
    lab.internet.whoami_server()
    laptop.meshpi("set", "--exit-node", "pi")
    wait_for(lambda: lab.laptop.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 5, "exit via the pi")
    laptop.meshpi("set", "--exit-node", "")
    wait_for(lambda: lab.laptop.fetch_or_none(SERVER_V4) == "192.0.2.1", 5, "direct again")


def test_mesh_exit_node_withdrawn_fails_closed(world: World) -> None:
    lab, laptop, pi_id = world.lab, world.nodes["laptop"], str(world.node_id("pi"))
    lab.internet.whoami_server()
    # A name no peer offering an exit has is refused at once (it would block everything).
    typo = laptop.meshpi("set", "--exit-node", "pie", check=False)
    assert typo.returncode == 2 and "'pie' is not a peer offering an approved exit node" in typo.stderr
    assert laptop.status()["prefs"]["exit_node"] is None  # type: ignore[index]
    laptop.meshpi("set", "--exit-node", "pi")
    try:
        wait_for(lambda: lab.laptop.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 5, "exit via the pi")
        world.admin("routes", "approve", pi_id, "192.168.77.0/24")  # the exit is withdrawn
        wait_for(lambda: lab.laptop.fetch_or_none(SERVER_V4) is None, 5, "internet traffic to stop")
        # Blocked, not leaking out of the laptop's own uplink (192.0.2.1).
        seen = {lab.laptop.fetch_or_none(SERVER_V4) for _ in range(3)}
        assert seen == {None}
        assert _reaches(lab.laptop, LANHOST_V4)  # the rest of the mesh still works
        world.admin("routes", "approve", pi_id, "192.168.77.0/24", "0.0.0.0/0", "::/0")
        wait_for(lambda: lab.laptop.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 5, "the exit back")
    finally:
        world.admin("routes", "approve", pi_id, "192.168.77.0/24", "0.0.0.0/0", "::/0")
        laptop.meshpi("set", "--exit-node", "")


def test_mesh_control_outage_loses_nothing_and_reconnects(world: World) -> None:
    lab, pi = world.lab, world.nodes["pi"]
    lab.stop_process(world.control)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", lab.laptop.ns, "ping", "-n", "-q", "-c", "300", "-i", "0.2", pi.mesh_v4()],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, _ = ping.communicate(timeout=90)  # control stays down for the 60 s of pings
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+)", out).groups())  # type: ignore[union-attr]
    assert sent == 300 and received == 300, out
    world.control = start_control(lab, world.control_state)
    restarted = time.monotonic()
    for node in world.nodes.values():
        # The link's status lives in memory: during the outage it said unreachable.
        wait_for(lambda n=node: n.api().get("/v1/status")["control"]["state"] == "connected",
                 5, f"{node.name} to reconnect")  # fmt: skip
    assert time.monotonic() - restarted <= 5
    # Each agent polled the new control from the map version it holds: no full map
    # for anyone (5,000 agents after a restart would each want one).
    for node in world.nodes.values():
        wait_for(lambda n=node: "polling control from the map version this agent holds" in n.log(), 5,
                 f"{node.name} to poll from its version")  # fmt: skip
    assert _metric(world, "meshpi_full_maps_sent_total") == 0
    assert _metric(world, "meshpi_nodes_online") == len(world.nodes)


def _metric(world: World, name: str) -> float:
    fetch = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8081/metrics', timeout=5).read().decode())"
    text = world.lab.internet.run([sys.executable, "-c", fetch]).stdout
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, text
    return float(found[1])


def _node_key(node: Node) -> str:
    return node.host.run([str(BIN / "meshpi"), "key", "--state-dir", str(node.state)]).stdout.strip()


def test_mesh_expired_key_is_dropped_then_rotated_by_the_node(world: World) -> None:
    pi, laptop2 = world.nodes["pi"], world.nodes["laptop2"]
    old, address = _node_key(laptop2), laptop2.mesh_v4()
    assert old in pi.peers_in_kernel()
    world.admin("nodes", "expire", str(world.node_id("laptop2")))
    _within(2.0, "the pi to drop the expired key", lambda: old not in pi.peers_in_kernel())
    # The node hears it (its map is refused), makes a new key and announces it with
    # its machine key: no login, no admin.
    _within(15.0, "laptop2 to rotate", lambda: _node_key(laptop2) != old)
    new = _node_key(laptop2)
    _within(3.0, "the pi to get the new key", lambda: new in pi.peers_in_kernel())
    assert not (laptop2.state / "node.key.next").exists()
    wait_for(lambda: laptop2.host.ping(pi.mesh_v4(), count=1)[1] == 1, 10, "laptop2 -> pi again")
    assert laptop2.mesh_v4() == address  # a new key, the same node


def test_mesh_removed_node_is_dropped_by_peers_within_2s(world: World) -> None:
    pi, laptop2 = world.nodes["pi"], world.nodes["laptop2"]
    key = _node_key(laptop2)
    assert key in pi.peers_in_kernel()
    world.admin("nodes", "remove", str(world.node_id("laptop2")))
    took = _within(2.0, "the pi to drop laptop2", lambda: key not in pi.peers_in_kernel())
    assert took <= 2.0


def test_mesh_node_without_auth_key_waits_with_no_address_then_joins_when_approved(world: World) -> None:
    """Runs after laptop2 was removed: its agent registers again, with no pre-auth key
    left (it was used once), and waits pending: no mesh address taken, nobody woken.
    Once the admin approves it, it gets the next address and joins."""
    pi, laptop2 = world.nodes["pi"], world.nodes["laptop2"]
    wait_for(lambda: laptop2.status()["control"]["state"] == "pending", 20, "laptop2 to wait for approval")  # type: ignore[index]
    listed = [line.split() for line in world.admin("nodes", "list").splitlines()[1:]]
    (row,) = [fields for fields in listed if fields[1] == "laptop2"]
    assert row[2] == "pending" and len(row) == 4  # id, name, state, online: no addresses yet
    world.admin("nodes", "approve", row[0])
    wait_for(lambda: laptop2.status()["control"]["state"] == "connected", 20, "laptop2 to connect")  # type: ignore[index]
    # The next address of the counter: 100.64.0.1-3 went to the first three registrations.
    assert laptop2.mesh_v4() == "100.64.0.4"
    wait_for(lambda: "100.64.0.4/32" in pi.peers_in_kernel(), 5, "the pi to take laptop2's new address")
    # Over IPv6: the agent moves its running interface from .3/10 to .4/10 by adding the
    # new address and then removing the old one, and Linux drops a secondary IPv4 address
    # with its primary (unless promote_secondaries) - the agent's matter, not control's.
    # Up to ~20 s: the pi dropped laptop2's session with the peer, while laptop2 still
    # holds its half; WireGuard starts a new handshake only when its own packets go
    # unanswered for KEEPALIVE + REKEY_TIMEOUT (15 s).
    pi_v6 = str(pi.status()["self"]["addresses"][1])  # type: ignore[index]
    wait_for(lambda: laptop2.host.ping(pi_v6, count=1)[1] == 1, 40, "laptop2 -> pi over the mesh")
