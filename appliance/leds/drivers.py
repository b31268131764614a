"""LED drivers: GPIO pins (gpiozero) and kernel LEDs (sysfs), and StatusLeds, which
shows a state's pattern on all of them and carries on past a driver's failure."""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Sequence
from itertools import cycle
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from appliance.leds.states import LedState, Pattern, pattern

if TYPE_CHECKING:
    from gpiozero.pins import Factory

log = logging.getLogger(__name__)

SYSFS_LEDS = Path("/sys/class/leds")

# Steps wait on the stop Event, so a player stops within microseconds; this only
# bounds the wait for a write stuck in the kernel.
_STOP_TIMEOUT = 2.0


def _driver_errors() -> tuple[type[Exception], ...]:
    """What a driver may raise: ours, the OS's, and gpiozero's error root once gpiozero
    is loaded. gpiozero (about 8 MB of RSS) is imported only when a GPIO LED is opened;
    until then none of its errors can occur."""
    exc = sys.modules.get("gpiozero.exc")
    return (LedError, OSError) if exc is None else (LedError, OSError, exc.GPIOZeroError)


class LedError(Exception):
    """Root of the LED errors."""


class LedNotFound(LedError, FileNotFoundError):
    """The LED named in the configuration does not exist on this machine."""


class LedTriggerError(LedError, ValueError):
    """A sysfs `trigger` file whose current trigger cannot be read."""


class LedDriver(Protocol):
    def show(self, pattern: Pattern) -> None:
        """Start showing `pattern`, replacing whatever was shown; returns at once."""

    def close(self) -> None:
        """Turn the LED off and give it back (pin, kernel trigger). Idempotent."""


class _PatternPlayer:
    """Plays a pattern on a background thread, from when it is made until stopped.

    Each step waits on the stop Event rather than sleeping, so `stop()` is prompt
    and nothing spins."""

    def __init__(self, pattern: Pattern, write: Callable[[bool], None], name: str) -> None:
        self._pattern = pattern
        self._write = write
        self._stop = threading.Event()
        # Daemon: a write hung in the kernel must not keep the agent from exiting.
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(_STOP_TIMEOUT)
        if self._thread.is_alive():
            log.warning("LED player %s did not stop within %ss", self._thread.name, _STOP_TIMEOUT)

    def _run(self) -> None:
        for step in cycle(self._pattern.steps):
            try:
                self._write(step.level)
            except OSError as e:
                # One line, not one per step: the LED is gone or unwritable.
                log.warning("LED %s: write failed, stopping pattern: %s", self._thread.name, e)
                return
            if self._stop.wait(step.seconds):
                return


class GpioLed:
    """An LED on a BCM GPIO pin, through gpiozero.

    `pin_factory=None` lets gpiozero pick a factory (GPIOZERO_PIN_FACTORY or its
    fallback order); tests pass `gpiozero.pins.mock.MockFactory()`."""

    def __init__(self, pin: int, *, pin_factory: Factory | None = None, active_high: bool = True) -> None:
        from gpiozero import LED  # here, not at the top: see _driver_errors

        self.pin = pin
        self._led = LED(pin, active_high=active_high, initial_value=False, pin_factory=pin_factory)
        self._player: _PatternPlayer | None = None

    def __repr__(self) -> str:
        return f"GpioLed(pin={self.pin})"

    def show(self, pattern: Pattern) -> None:
        self._stop_player()
        first = pattern.steps[0]
        if pattern.steady:
            self._set(first.level)
        elif len(pattern.steps) == 2 and first.level:
            self._led.blink(on_time=first.seconds, off_time=pattern.steps[1].seconds)
        else:
            self._led.off()  # stops a gpiozero blink before our thread takes over
            self._player = _PatternPlayer(pattern, self._set, f"led-gpio{self.pin}")

    def close(self) -> None:
        if self._led.closed:
            return
        self._stop_player()
        # gpiozero's close() only makes the pin an input again and leaves its
        # last level in place (MockPin still reads lit); say "off" explicitly.
        self._led.off()
        self._led.close()

    def _set(self, level: bool) -> None:
        self._led.value = level  # like on()/off(), also stops a gpiozero blink

    def _stop_player(self) -> None:
        if self._player is not None:
            self._player.stop()
            self._player = None


_CURRENT_TRIGGER = re.compile(r"\[([^\]\s]+)\]")


def parse_trigger(text: str) -> str:
    """The current trigger in a sysfs `trigger` file: `none rc-feedback [mmc0] timer` -> `mmc0`."""
    match = _CURRENT_TRIGGER.search(text)
    if match is None:
        raise LedTriggerError(f"trigger file {text.strip()[:200]!r}: no [current] trigger")
    return match.group(1)


class SysfsLed:
    """A kernel LED under /sys/class/leds/<name>/, such as the Pi's ACT LED.

    Built: saves the current trigger (usually `mmc0` or `heartbeat`) and sets it
    to `none`, so the kernel stops driving the LED. Closed: LED off, trigger back."""

    def __init__(self, name: str = "ACT", *, root: Path = SYSFS_LEDS) -> None:
        self.name = name
        self._dir = root / name
        if not self._dir.is_dir():
            # Older kernels and some boards call the ACT LED `led0`; qemu has none.
            raise LedNotFound(f"LED {name!r}: {self._dir} does not exist")
        raw = self._read("max_brightness")
        try:
            self._max_brightness = int(raw)
        except ValueError:
            raise LedError(f"LED {name!r}: max_brightness {raw!r} is not a number") from None
        self.original_trigger = parse_trigger(self._read("trigger"))
        self._player: _PatternPlayer | None = None
        self._closed = False
        self._write("trigger", "none")
        log.debug("LED %s: trigger %s -> none", name, self.original_trigger)

    def __repr__(self) -> str:
        return f"SysfsLed({self.name!r})"

    def show(self, pattern: Pattern) -> None:
        self._stop_player()
        if pattern.steady:
            self._set(pattern.steps[0].level)
        else:
            # The kernel's `timer` trigger could do even blinks, but it is a
            # module that may be absent and cannot do the error pattern, so one
            # player drives every pattern the same way.
            self._player = _PatternPlayer(pattern, self._set, f"led-{self.name}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_player()
        self._set(False)
        self._write("trigger", self.original_trigger)
        log.debug("LED %s: trigger restored to %s", self.name, self.original_trigger)

    def _set(self, level: bool) -> None:
        self._write("brightness", str(self._max_brightness if level else 0))

    def _read(self, attr: str) -> str:
        return (self._dir / attr).read_text(encoding="ascii").strip()

    def _write(self, attr: str, value: str) -> None:
        # One write() per value: sysfs attributes take the whole value at once.
        (self._dir / attr).write_text(value, encoding="ascii")

    def _stop_player(self) -> None:
        if self._player is not None:
            self._player.stop()
            self._player = None


class StatusLeds:
    """Shows the current `LedState` on zero or more drivers.

    `set()` is idempotent and thread-safe. A driver that fails is logged and the
    others carry on: an LED must never take down the agent's loop."""

    def __init__(self, drivers: Sequence[LedDriver] = ()) -> None:
        self._drivers = list(drivers)
        self._state: LedState | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> LedState | None:
        return self._state

    def set(self, state: LedState) -> bool:
        """Show `state`. Returns False, and touches nothing, if already shown."""
        with self._lock:
            if state is self._state:
                return False
            self._state = state
            new = pattern(state)
            log.info("LED: %s (%s)", state.value, new.name)
            for driver in self._drivers:
                try:
                    driver.show(new)
                except _driver_errors() as e:
                    log.warning("LED: %r cannot show %s: %s", driver, new.name, e)
            return True

    def close(self) -> None:
        with self._lock:
            for driver in self._drivers:
                try:
                    driver.close()
                except _driver_errors() as e:
                    log.warning("LED: closing %r failed: %s", driver, e)
            self._drivers.clear()
            self._state = None

    def __enter__(self) -> StatusLeds:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


ONBOARD_LEDS = ("ACT", "led0")  # newer kernels, older kernels and some boards


def open_status_leds(
    *,
    gpio_pins: Sequence[int] = (),
    pin_factory: Factory | None = None,
    onboard: Sequence[str] = ONBOARD_LEDS,
    sysfs_root: Path = SYSFS_LEDS,
) -> StatusLeds:
    """`StatusLeds` over whichever of the configured LEDs exist: the first of the
    `onboard` sysfs names that exists, and an LED on each GPIO pin.

    A missing or unusable LED (no ACT in qemu, no GPIO pin factory on a PC, not
    root) is one log line, and the agent runs on without it."""
    drivers: list[LedDriver] = []
    for name in onboard:
        if not (sysfs_root / name).is_dir():
            continue
        try:
            drivers.append(SysfsLed(name, root=sysfs_root))
        except (LedError, OSError) as e:
            log.warning("LED: sysfs LED %r unusable, running without it: %s", name, e)
        break
    else:
        if onboard:
            log.info("LED: no onboard LED (%s) under %s", " or ".join(onboard), sysfs_root)
    for pin in gpio_pins:
        from gpiozero.exc import GPIOZeroError  # only with GPIO LEDs: see _driver_errors

        try:
            drivers.append(GpioLed(pin, pin_factory=pin_factory))
        except GPIOZeroError as e:
            log.warning("LED: no GPIO LED on BCM %d, running without it: %s", pin, e)
    return StatusLeds(drivers)
