"""The control link after roaming: a laptop away from home moves to another address
(another Wi-Fi behind the same NAT); its long-poll to control rode on the old one
and would hear nothing until it times out (70 s). The agent notices its own networks
changed (netwatch) and polls again on a new connection at once: a netmap change made
right after the move reaches it within seconds.

    pi (home, miniupnpd) -- router -- inet (meshpi-control) -- away NAT -- laptop
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from tests.lab.host import wait_for
from tests.netns.homeworld import BIN, HomeWorld, home_world

pytestmark = pytest.mark.netns
logger = logging.getLogger(__name__)
HEARD_WITHIN = 10.0
ROUTE = "10.55.0.0/24"


@pytest.fixture
def away() -> Iterator[HomeWorld]:
    with home_world(away=True) as world:
        yield world


def _pi_routes(world: HomeWorld) -> list[str]:
    peer = world.laptop.peer("pi")
    return list(peer["routes"]) if peer is not None else []


def test_reach_roam_the_laptop_hears_control_at_once_after_its_address_changes(away: HomeWorld) -> None:
    pi, laptop = away.pi, away.laptop
    pi.meshpi("set", "--advertise-routes", ROUTE)
    node_id = next(
        line.split()[0] for line in _admin(away, "nodes", "list").splitlines()[1:] if " pi " in line
    )
    wait_for(lambda: laptop.status()["control"]["state"] == "connected", 10, "the laptop connected")
    time.sleep(2)  # the laptop's long-poll is in flight on its current address

    moved = time.monotonic()
    host = laptop.host
    host.run(["ip", "addr", "del", "192.168.88.2/24", "dev", "eth0"])  # the default route goes with it
    host.run(["ip", "addr", "add", "192.168.88.3/24", "dev", "eth0"])
    host.run(["ip", "route", "replace", "default", "via", "192.168.88.1"])
    _admin(away, "routes", "approve", node_id, ROUTE)  # a netmap change, right after the move
    wait_for(lambda: ROUTE in _pi_routes(away), 80, "the laptop to hear the change", interval=0.1)
    heard = time.monotonic() - moved
    logger.info("after the laptop's move, control's change reached it in %.1f s", heard)
    print(f"\nroaming: the laptop heard control {heard:.1f} s after its address changed")
    assert heard <= HEARD_WITHIN, heard


def _admin(world: HomeWorld, *args: str) -> str:
    cmd = [str(BIN / "meshpi-control"), "--state-dir", str(world.control_state), *args]
    return world.control_host.run(cmd).stdout
