"""The agent's status LEDs: which LEDs (prefs `led_pins`, `act_led`), and the
state they show, derived at every tick from what the agent knows (appliance/leds).

Pins follow the prefs live: when `led_pins` or `act_led` change, the old LEDs
are handed back (off, pins released, the ACT trigger restored) and the new ones
take over showing the current state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.leds.drivers import ONBOARD_LEDS, SYSFS_LEDS, StatusLeds, open_status_leds
from appliance.leds.states import LedFacts, LedState, derive_state

if TYPE_CHECKING:
    from gpiozero.pins import Factory  # a type only: gpiozero loads with the first GPIO LED

log = logging.getLogger(__name__)

# Keepalives (32 bytes a peer every 25 s) and handshakes are not traffic: below
# this many bytes between two ticks the exit node counts as idle.
TRAFFIC_BYTES = 1024
LedOpener = Callable[[tuple[int, ...], bool], StatusLeds]  # (gpio pins, onboard LED?) -> LEDs


def led_opener(pin_factory: Factory | None = None, sysfs_root: Path = SYSFS_LEDS) -> LedOpener:
    """How the agent opens its LEDs; tests pass gpiozero's MockFactory and a tmp sysfs."""

    def open_leds(pins: tuple[int, ...], act_led: bool) -> StatusLeds:
        onboard = ONBOARD_LEDS if act_led else ()
        return open_status_leds(
            gpio_pins=pins, pin_factory=pin_factory, onboard=onboard, sysfs_root=sysfs_root
        )

    return open_leds


class AgentLeds:
    def __init__(self, opener: LedOpener | None = None) -> None:
        self._open = opener or led_opener()
        self._config: tuple[tuple[int, ...], bool] | None = None
        self._leds = StatusLeds()
        self._last_total: int | None = None
        self.state = LedState.BOOTING

    def configure(self, pins: tuple[int, ...], act_led: bool) -> None:
        """Use these LEDs from now on (nothing happens when they are the ones in use)."""
        if self._config == (pins, act_led):
            return
        if self._config is not None:
            log.info("LEDs: now GPIO %s, onboard LED %s", list(pins) or "none", "on" if act_led else "off")
        self._leds.close()
        self._config = (pins, act_led)
        self._leds = self._open(pins, act_led)
        self._leds.set(self.state)

    def tunnel_growth(self, total: int | None) -> int:
        """Bytes through the tunnel since the previous reading; 0 the first time,
        when the counters went back (a new interface starts at 0), and when the
        growth is keepalive noise (under TRAFFIC_BYTES)."""
        previous, self._last_total = self._last_total, total
        if total is None or previous is None or total - previous < TRAFFIC_BYTES:
            return 0
        return total - previous

    def show(self, facts: LedFacts) -> LedState:
        self.state = derive_state(facts)
        self._leds.set(self.state)
        return self.state

    def close(self) -> None:
        self._leds.close()
        self._config = None
