"""The agent drives its status LEDs: a real Agent (static mode, userspace
WireGuard) in a throwaway namespace, with gpiozero's MockFactory for the GPIO
pins and a fake /sys/class/leds holding an ACT LED.

    booting (before the first apply) -> ready -> error (an apply fails) -> ready,
    and pins moved through prefs (led_pins, act_led) take over at once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from appliance.agent.bus import PrefsChanged
from appliance.agent.leds import led_opener
from appliance.agent.loop import Agent
from appliance.agent.statedir import StateDir
from appliance.core.prefs import load_prefs
from appliance.kernel.real import real_system
from appliance.leds.states import LedState
from tests.netns.kernelstate import sh
from tests.unit.meshes import KEYS, netmap_json, node

IFACE = f"mpl{os.getpid() % 10000}"


class WatchedPin(MockPin):  # type: ignore[misc]  # gpiozero ships no type hints
    """A MockPin that wakes waiters on every change (no sleeps in the test)."""

    def __init__(self, factory: Any, info: Any) -> None:
        self.changed = threading.Condition()
        super().__init__(factory, info)

    def _change_state(self, value: bool) -> bool:
        with self.changed:
            changed: bool = super()._change_state(value)
            self.changed.notify_all()
        return changed

    def edges_within(self, n: int, timeout: float) -> bool:
        """Does the pin change n more times within `timeout` seconds?"""
        with self.changed:
            start = len(self.states)
            return self.changed.wait_for(lambda: len(self.states) >= start + n, timeout)


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    act = tmp_path / "leds" / "ACT"
    act.mkdir(parents=True)
    (act / "trigger").write_text("none [mmc0] timer heartbeat\n")
    (act / "brightness").write_text("0\n")
    (act / "max_brightness").write_text("1\n")
    return tmp_path / "leds"


@pytest.fixture
def agent(inside: str, tmp_path: Path, sysfs: Path) -> Iterator[tuple[Agent, MockFactory]]:
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    sh("ip", "addr", "add", "192.168.77.2/24", "dev", "eth0")
    sh("ip", "link", "set", "eth0", "up")
    state = StateDir(tmp_path / "state")
    state.ensure()
    (state.path / "node.key").write_text(KEYS["pi"].secret_base64() + "\n")
    (state.path / "node.key").chmod(0o600)
    (tmp_path / "netmap.json").write_text(
        json.dumps(netmap_json("pi", [node("laptop")], ["0.0.0.0/0", "::/0"]))
    )
    _prefs(tmp_path, led_pins=[17])
    factory = MockFactory(pin_class=WatchedPin)
    a = Agent(tmp_path / "netmap.json", tmp_path / "prefs.json", state,
              lambda backend: real_system(backend, state.path), leds=led_opener(factory, sysfs))  # fmt: skip
    try:
        yield a, factory
    finally:
        with a.lock:
            a.take_down()
        a.leds.close()
        factory.reset()
        subprocess.run(["ip", "link", "del", IFACE], capture_output=True)


def _prefs(tmp_path: Path, **changes: Any) -> None:
    prefs = {"interface": IFACE, "backend": "userspace", "advertise_exit_node": True} | changes
    tmp = tmp_path / ".prefs.tmp"
    tmp.write_text(json.dumps(prefs))
    os.replace(tmp, tmp_path / "prefs.json")


def _hand_over(a: Agent, tmp_path: Path) -> None:
    """What the LocalAPI does with new prefs: hand them to the loop, which applies."""
    a.receive([PrefsChanged(load_prefs(tmp_path / "prefs.json"))])
    a.refresh(reread=False)


def _steady(pin: WatchedPin) -> bool:
    return not pin.edges_within(1, 0.4)  # the fastest blink would flip it within 0.15 s


def test_agent_leds_follow_the_agent(agent: tuple[Agent, MockFactory], tmp_path: Path, sysfs: Path) -> None:
    a, factory = agent
    pin = factory.pin(17)
    act = sysfs / "ACT"

    a.wanted = a.load()  # as run() does first
    a.tick()  # the agent's first tick comes before its first apply
    assert a.leds.state is LedState.BOOTING
    assert pin.edges_within(2, 2.5)  # slow blink: an edge a second
    assert (act / "trigger").read_text() == "none"

    a.refresh(reread=True)
    a.tick()
    assert a.leds.state is LedState.READY
    assert pin.state is True and _steady(pin)
    assert (act / "brightness").read_text() == "1"

    # An apply that fails: the prefs move WireGuard to a port something else holds.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        _prefs(tmp_path, led_pins=[17], listen_port=taken.getsockname()[1])
        _hand_over(a, tmp_path)
    assert a.last_error is not None and "in use" in a.last_error, a.last_error
    a.tick()
    assert a.leds.state is LedState.ERROR
    assert pin.edges_within(6, 2.5)  # three short blinks, then a pause

    _prefs(tmp_path, led_pins=[17])
    _hand_over(a, tmp_path)
    assert a.last_error is None, a.last_error
    a.tick()
    assert a.leds.state is LedState.READY and pin.state is True and _steady(pin)

    # Pins move live: 17 is handed back, 27 takes over; the ACT LED is let go.
    _prefs(tmp_path, led_pins=[27], act_led=False)
    _hand_over(a, tmp_path)
    a.tick()
    assert pin.state is False and pin.function == "input"
    assert factory.pin(27).state is True
    assert (act / "trigger").read_text() == "mmc0"  # the kernel drives ACT again
