"""Reachability of a Pi at home (tests/netns/homeworld.py: miniupnpd on the home
router, no port forward, a laptop away behind its own NAT):

- a phone's config dials the mapped port (or the owner's dynamic DNS name); a stock
  WireGuard client on the internet reaches the pi with it; with no mapping the
  answer says plainly why phones cannot reach the pi, and what fixes it;
- the owner's `public_endpoint` refuses hostile text, naming field and value;
- control on the pi (create-mesh): its port mapped, the laptop logs in at the printed
  public URL; without a mapping netcheck says control must run on a VPS;
- the home router's WAN address changes (the old one gone from the internet): the pi
  notices, re-maps, re-announces within 30 s, and the laptop behind its own NAT is
  back (relay, then direct) within 60 s with no user action.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.client.localapi import LocalAPIError, LocalClient
from tests.lab.host import Host, LabError, wait_for
from tests.lab.phone import stock_client
from tests.lab.portmap_lab import GATEWAY_V4, INET_V4, PI_V4, WAN_V4
from tests.netns.homeworld import CONTROL_PORT, HomeWorld, home_world

pytestmark = pytest.mark.netns
logger = logging.getLogger(__name__)
MAPPED = f"{WAN_V4}:51820"


@pytest.fixture(scope="module")
def away() -> Iterator[HomeWorld]:
    with home_world(away=True) as world:
        yield world


def _phones(world: HomeWorld) -> dict[str, Any]:
    return world.pi.status()["reach"]["phones"]  # type: ignore[no-any-return]


def test_reach_home_a_phone_dials_the_mapped_port_and_reaches_the_pi(away: HomeWorld) -> None:
    pi, api = away.pi, LocalClient(str(away.pi.sock))
    wait_for(lambda: _phones(away)["source"] == "port-mapping", 20, "the pi's mapping")
    phones = _phones(away)
    assert phones["endpoint"] == MAPPED and phones["reachable"] and phones["fix"] is None, phones
    check = api.get("/v1/netcheck")
    assert check["phones"]["endpoint"] == MAPPED, check
    assert f"phones dial: {MAPPED}" in pi.meshpi("netcheck").stdout

    answer = api.post("/v1/devices", {"name": "bob phone", "mode": "lan"}, timeout=20)
    assert f"Endpoint = {MAPPED}" in answer["config"] and answer["phones"]["source"] == "port-mapping"
    # A stock client on the internet (no agent, no punching) reaches the pi through the mapping.
    phone = away.lab.internet
    with stock_client(phone, answer["config"], f"{pi.interface}q", gateway=GATEWAY_V4):
        wait_for(lambda: phone.ping(pi.mesh_v4(), count=1)[1] == 1, 15, "phone -> pi through the mapping")
    api.delete(f"/v1/devices/{answer['device']['id']}")


def test_reach_home_the_owners_name_and_hostile_names(away: HomeWorld) -> None:
    api = LocalClient(str(away.pi.sock))
    before = api.get("/v1/prefs")
    for bad in ["my home.example.org", "x" * 5000, "home.example.org:99999", "[::1", "a..b", 7, ["x"],
                "home.example.org\nPostUp = rm -rf /", "-x.example.org"]:  # fmt: skip
        with pytest.raises(LocalAPIError) as e:
            api.patch("/v1/prefs", {"public_endpoint": bad})
        assert e.value.status == 400 and "public_endpoint" in e.value.message, e.value.message
        assert repr(bad)[:40] in e.value.message, e.value.message
    assert api.get("/v1/prefs") == before  # nothing changed

    assert (
        api.patch("/v1/prefs", {"public_endpoint": "Home.Example.org"})["public_endpoint"]
        == "home.example.org"
    )
    wait_for(lambda: _phones(away)["source"] == "public_endpoint", 10, "the owner's name")
    answer = api.post("/v1/devices", {"name": "carol phone", "mode": "lan"}, timeout=20)
    assert "Endpoint = home.example.org:51820" in answer["config"]  # the mapped port
    api.delete(f"/v1/devices/{answer['device']['id']}")
    # A bad endpoint in the request itself is refused too, before control is asked.
    with pytest.raises(LocalAPIError) as e:
        api.post("/v1/devices", {"name": "dave phone", "endpoint": "home example"}, timeout=20)
    assert e.value.status == 400 and "endpoint: 'home example'" in e.value.message
    assert api.get("/v1/devices")["devices"] == []
    api.patch("/v1/prefs", {"public_endpoint": ""})


def test_reach_home_without_a_mapping_the_answer_says_why_and_what_fixes_it(away: HomeWorld) -> None:
    api = LocalClient(str(away.pi.sock))
    api.patch("/v1/prefs", {"port_mapping": False})
    try:
        wait_for(lambda: not _phones(away)["reachable"], 15, "the verdict without a mapping")
        phones = _phones(away)
        assert phones["endpoint"] is None and "cannot reach this Pi from outside" in phones["why"]
        assert "port mapping is off" in phones["why"] and "port_mapping" in phones["fix"]
        answer = api.post("/v1/devices", {"name": "erin phone", "mode": "lan"}, timeout=20)
        # At home only: the LAN address, and the answer says so plainly.
        assert f"Endpoint = {PI_V4}:51820" in answer["config"]
        said = answer["phones"]
        assert said["source"] == "lan" and not said["reachable"] and "home LAN only" in said["why"], said
        assert "forward UDP 51820" in said["fix"], said
        api.delete(f"/v1/devices/{answer['device']['id']}")
    finally:
        api.patch("/v1/prefs", {"port_mapping": True})
    wait_for(lambda: _phones(away)["source"] == "port-mapping", 20, "the mapping back")


@pytest.fixture
def control_home() -> Iterator[HomeWorld]:
    with home_world(control_here=True) as world:
        yield world


def test_reach_home_control_on_the_pi_is_mapped_and_the_laptop_logs_in_at_the_public_url(
    control_home: HomeWorld,
) -> None:
    world = control_home
    pi, laptop = world.pi, world.laptop
    public = f"http://{WAN_V4}:{CONTROL_PORT}"
    # create-mesh printed the public address of control's mapped port for other nodes.
    assert world.login.startswith(f"{public}/#"), world.login
    assert pi.status()["local_control"]["login_url"] == world.login
    redirects = " ".join(world.upnpd.redirects())
    assert f"{CONTROL_PORT}" in redirects and "3478" in redirects, redirects
    control = LocalClient(str(pi.sock)).get("/v1/netcheck")["control"]
    assert control == {"local": True, "url": public, "reachable": True, "fix": None,
                       "why": f"the home router forwards {WAN_V4}:{CONTROL_PORT} to control here"}  # fmt: skip

    # A laptop on the internet side logs in with the printed URL and reaches the pi.
    laptop.up(world.login, world.auth_key(), 51821)
    wait_for(lambda: laptop.host.ping(pi.mesh_v4(), count=1)[1] == 1, 20, "laptop -> pi")
    # Control's STUN answers through its mapping too: the laptop learns its address.
    wait_for(lambda: ((laptop.status()["reach"]["stun"] or {}).get("ipv4") or "").startswith(INET_V4), 40,
             "the laptop's STUN through the pi's mapping")  # fmt: skip

    # Without a mapping, netcheck says control must run on a reachable host, and how.
    pi.meshpi("set", "--no-port-mapping")
    wait_for(lambda: not world.upnpd.redirects(), 15, "the mappings removed")
    control = LocalClient(str(pi.sock)).get("/v1/netcheck")["control"]
    assert control["local"] and not control["reachable"] and control["url"] is None, control
    assert "VPS" in control["fix"] and "meshpi-control serve" in control["fix"], control
    assert "control on this node: not reachable from outside" in pi.meshpi("netcheck", check=False).stdout
    assert not pi.status()["local_control"]["login_url"].startswith(public)


NEW_WAN_V4 = "5.5.5.77"
ANNOUNCE_WITHIN, RECONNECT_WITHIN = 30.0, 60.0


def _pinged(host: Host, dst: str) -> bool:
    return host.ping_result(dst, count=1, wait=1).received == 1


def test_reach_home_a_new_wan_address_is_remapped_announced_and_the_laptop_reconnects(
    away: HomeWorld,
) -> None:
    """Runs last on the module's world: the home router's address changes for good."""
    pi, laptop = away.pi, away.laptop
    pi_v4 = pi.mesh_v4()
    wait_for(lambda: _phones(away)["endpoint"] == MAPPED, 20, "the pi's mapping")
    wait_for(lambda: _pinged(laptop.host, pi_v4), 30, "laptop (behind its NAT) -> pi")
    wait_for(lambda: (laptop.peer("pi") or {}).get("path") == f"direct {MAPPED}", 30, "a direct path")

    # A ping every 0.2 s from the laptop, timestamped (-D): the first answer after the change is the reconnect.
    stream = subprocess.Popen(
        ["ip", "netns", "exec", laptop.host.ns, "ping", "-n", "-D", "-i", "0.2", "-W", "1", "-w", "120", pi_v4],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    answers: list[float] = []

    def read() -> None:
        assert stream.stdout is not None
        for line in stream.stdout:
            m = re.match(r"\[(\d+\.\d+)\] \d+ bytes from", line)
            if m:
                answers.append(float(m[1]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    new = f"{NEW_WAN_V4}:51820"
    direct: float | None = None
    try:
        wait_for(lambda: answers, 5, "the ping stream to answer before the change")
        changed, changed_wall = time.monotonic(), time.time()
        away.lab.change_wan_address(NEW_WAN_V4)  # miniupnpd and the masquerade follow the router's address

        def announced() -> bool:
            endpoints = pi.status()["reach"]["endpoints"]
            return bool(endpoints) and endpoints[0] == new

        wait_for(announced, ANNOUNCE_WITHIN + 5, "the pi to notice and re-announce its new address",
                 interval=0.2)  # fmt: skip
        noticed = time.monotonic() - changed
        # Not an answer already on its way when the address changed.
        wait_for(lambda: [t for t in answers if t > changed_wall + 0.5], RECONNECT_WITHIN + 10,
                 "pings answered again", interval=0.1)  # fmt: skip
        reconnected = next(t for t in answers if t > changed_wall + 0.5) - changed_wall
        # Direct again is the path chooser's business (a relayed peer tries direct at its slots): measured, shown.
        with contextlib.suppress(LabError):
            wait_for(lambda: (laptop.peer("pi") or {}).get("path") == f"direct {new}", 75 - (time.monotonic() - changed),
                     "the laptop's direct path to the new address", interval=0.5)  # fmt: skip
            direct = time.monotonic() - changed
    finally:
        stream.terminate()
        stream.communicate(timeout=10)
    shown = f"{direct:.1f} s" if direct is not None else "not within 75 s"
    logger.info("WAN %s -> %s: re-announced after %.1f s, first ping answered after %.1f s, direct again: %s",
                WAN_V4, NEW_WAN_V4, noticed, reconnected, shown)  # fmt: skip
    print(f"\nWAN change: re-announced {noticed:.1f} s, reconnected {reconnected:.1f} s, direct {shown}")
    assert noticed <= ANNOUNCE_WITHIN, noticed
    assert reconnected <= RECONNECT_WITHIN, reconnected
    assert any(f"{NEW_WAN_V4}" in line or "51820" in line for line in away.upnpd.redirects()), "re-mapped"
    assert _phones(away)["endpoint"] == new  # a phone's new config dials the new address
    # Pings flow: a short stream loses nothing.
    assert laptop.host.ping(pi_v4, count=5)[1] == 5
