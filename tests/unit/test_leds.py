"""Status LEDs: pure state/pattern rules, gpiozero MockFactory timings, fake sysfs."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero import LED
from gpiozero.exc import GPIOPinInUse
from gpiozero.pins.mock import MockFactory, MockPin

from appliance.leds.drivers import (
    GpioLed,
    LedNotFound,
    LedTriggerError,
    StatusLeds,
    SysfsLed,
    open_status_leds,
    parse_trigger,
)
from appliance.leds.states import (
    ERROR_BLINK,
    FAST_BLINK,
    FLICKER,
    SLOW_BLINK,
    SOLID,
    LedFacts,
    LedState,
    Pattern,
    Step,
    derive_state,
    pattern,
)

# Event.wait never returns early, so an interval is at least its step (less a
# hair of clock granularity). A 2-core CI box under load can wake a thread late,
# so the upper bound is generous; a wrong pattern is off by far more.
EARLY = 0.005
LATE = 0.1
WAIT = 5.0  # seconds to wait for recorded edges before failing


class WatchedPin(MockPin):  # type: ignore[misc]  # gpiozero ships no type hints
    """MockPin that wakes waiters on each state change, so tests await edges
    instead of sleeping."""

    def __init__(self, factory: Any, info: Any) -> None:
        self.changed = threading.Condition()
        super().__init__(factory, info)

    def _change_state(self, value: bool) -> bool:
        with self.changed:
            changed: bool = super()._change_state(value)
            self.changed.notify_all()
        return changed

    def wait_for_states(self, n: int, timeout: float = WAIT) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.states) >= n, timeout)


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    f = MockFactory(pin_class=WatchedPin)
    yield f
    f.reset()


class FakeDriver:
    def __init__(self) -> None:
        self.shown: list[Pattern] = []
        self.closed = 0

    def show(self, pattern: Pattern) -> None:
        self.shown.append(pattern)

    def close(self) -> None:
        self.closed += 1


# --- pure ---------------------------------------------------------------------


def test_pattern_mapping_matches_design() -> None:
    assert pattern(LedState.BOOTING).steps == (Step(True, 1.0), Step(False, 1.0))
    assert pattern(LedState.OFFLINE).steps == (Step(True, 0.1), Step(False, 0.1))
    assert pattern(LedState.READY).steady and pattern(LedState.READY).steps[0].level
    assert pattern(LedState.EXIT_ACTIVE).steps == (Step(True, 0.45), Step(False, 0.05))
    error = pattern(LedState.ERROR).steps
    assert [s.level for s in error] == [True, False] * 3
    assert error[-1].seconds > 3 * error[0].seconds  # three short blinks, then a pause
    assert len({pattern(s) for s in LedState}) == len(LedState)  # each state looks different
    assert [s.value for s in LedState] == ["booting", "offline", "ready", "exit_active", "error"]


@pytest.mark.parametrize(
    ("steps", "why"),
    [
        ((), "no steps"),
        ((Step(True, 0.1), Step(True, 0.1)), "do not alternate"),
        ((Step(True, 0.1), Step(False, 0.1), Step(True, 0.1)), "do not alternate"),
        ((Step(True, 0.0), Step(False, 0.1)), "must last"),
        ((Step(True, math.inf), Step(False, 0.1)), "must last"),
    ],
)
def test_pattern_rejects_bad_steps(steps: tuple[Step, ...], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Pattern("bad", steps)


def test_pattern_blink_needs_pairs() -> None:
    with pytest.raises(ValueError, match="pairs"):
        Pattern.blink("odd", 0.1, 0.2, 0.3)


def facts(**overrides: Any) -> LedFacts:
    healthy: dict[str, Any] = {
        "started": True,
        "online": True,
        "offers_exit": True,
        "tunnel_bytes": 0,
        "last_error": None,
    }
    return LedFacts(**(healthy | overrides))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, LedState.READY),
        ({"tunnel_bytes": 1}, LedState.EXIT_ACTIVE),
        ({"tunnel_bytes": 9, "offers_exit": False}, LedState.READY),  # a client's own traffic
        ({"started": False, "tunnel_bytes": 9}, LedState.BOOTING),
        ({"online": False, "started": False}, LedState.OFFLINE),  # waiting for a login
        ({"online": False, "tunnel_bytes": 9}, LedState.OFFLINE),
        (
            {"last_error": "nft: permission denied", "started": False, "online": False},
            LedState.ERROR,
        ),
        ({"last_error": "x", "tunnel_bytes": 9}, LedState.ERROR),
    ],
)
def test_derive_state_priority(overrides: dict[str, Any], expected: LedState) -> None:
    assert derive_state(facts(**overrides)) is expected


def test_derive_state_rejects_negative_bytes() -> None:
    with pytest.raises(ValueError, match="-5"):
        facts(tunnel_bytes=-5)


# --- GPIO timings ---------------------------------------------------------------

# One run shows every state on its own pin at once, so the slowest pattern
# (2 s for two slow-blink intervals) bounds the whole run.
PINS = {
    LedState.BOOTING: 5,
    LedState.OFFLINE: 6,
    LedState.READY: 13,
    LedState.EXIT_ACTIVE: 19,
    LedState.ERROR: 26,
}


@pytest.fixture(scope="module")
def recorded() -> Iterator[dict[LedState, list[tuple[float, bool]]]]:
    f = MockFactory(pin_class=WatchedPin)
    leds = {state: GpioLed(pin, pin_factory=f) for state, pin in PINS.items()}
    try:
        for state, led in leds.items():
            led.show(pattern(state))
        history: dict[LedState, list[tuple[float, bool]]] = {}
        for state, pin in PINS.items():
            p = pattern(state)
            # Initial entry + first edge + whole cycles of intervals: one for the
            # slow patterns, about a second's worth for the fast ones.
            period = sum(s.seconds for s in p.steps)
            want = 2 if p.steady else 2 + len(p.steps) * max(1, int(1.0 / period))
            watched = f.pin(pin)
            assert watched.wait_for_states(want), f"{state}: only {watched.states}"
            history[state] = [(s.timestamp, s.state) for s in watched.states]
        yield history
    finally:
        for led in leds.values():
            led.close()
        f.reset()


@pytest.mark.parametrize("state", [s for s in PINS if not pattern(s).steady])
def test_gpio_blink_timings(state: LedState, recorded: dict[LedState, list[tuple[float, bool]]]) -> None:
    steps = pattern(state).steps
    history = recorded[state]
    assert history[0] == (0.0, False)  # MockPin's initial entry
    assert history[1][1] is steps[0].level  # the pattern starts at its first step
    # MockPin stores the time since the previous change, so each later entry's
    # "timestamp" is how long the previous step lasted.
    for i, (lasted, new_level) in enumerate(history[2:]):
        step = steps[i % len(steps)]
        assert new_level is steps[(i + 1) % len(steps)].level, f"{state} edge {i}: {history}"
        assert step.seconds - EARLY <= lasted <= step.seconds + LATE, (
            f"{state} step {i} {step}: lasted {lasted:.3f}s"
        )


def test_gpio_solid_has_no_edges(recorded: dict[LedState, list[tuple[float, bool]]]) -> None:
    # READY was recorded while slower patterns ran for ~2 s: a lone rising edge.
    assert [level for _, level in recorded[LedState.READY]] == [False, True]


def test_gpio_state_change_switches_pattern(factory: MockFactory) -> None:
    pin = factory.pin(17)
    with StatusLeds([GpioLed(17, pin_factory=factory)]) as leds:
        leds.set(LedState.READY)
        assert pin.state is True
        leds.set(LedState.OFFLINE)
        assert pin.wait_for_states(len(pin.states) + 4)
        leds.set(LedState.READY)
        assert pin.state is True
        settled = len(pin.states)
        # A fast blink left running would flip the pin within 0.1 s.
        assert not pin.wait_for_states(settled + 1, timeout=0.3)


def test_gpio_close_turns_off_and_releases_pin(factory: MockFactory) -> None:
    led = GpioLed(17, pin_factory=factory)
    with pytest.raises(GPIOPinInUse):
        GpioLed(17, pin_factory=factory)
    led.show(SOLID)
    pin = factory.pin(17)
    assert pin.state is True
    led.close()
    led.close()  # idempotent
    assert pin.state is False
    assert pin.function == "input"
    LED(17, pin_factory=factory).close()  # the pin is free again


def test_gpio_close_stops_multi_step_player(factory: MockFactory) -> None:
    led = GpioLed(17, pin_factory=factory)
    pin = factory.pin(17)
    led.show(ERROR_BLINK)
    assert pin.wait_for_states(4)
    led.close()
    assert pin.state is False
    assert not any(t.name == "led-gpio17" for t in threading.enumerate())


# --- StatusLeds -----------------------------------------------------------------


def test_status_same_state_twice_does_not_restart(caplog: pytest.LogCaptureFixture) -> None:
    driver = FakeDriver()
    leds = StatusLeds([driver])
    with caplog.at_level(logging.INFO, logger="appliance.leds"):
        assert leds.set(LedState.READY) is True
        assert leds.set(LedState.READY) is False
        assert leds.set(LedState.BOOTING) is True
    assert driver.shown == [SOLID, SLOW_BLINK]
    assert [r.getMessage() for r in caplog.records] == [
        "LED: ready (solid)",
        "LED: booting (slow blink)",
    ]


def test_status_failing_driver_does_not_stop_others(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FakeDriver):
        def show(self, pattern: Pattern) -> None:
            raise OSError(5, "Input/output error")

    good = FakeDriver()
    leds = StatusLeds([Broken(), good])
    leds.set(LedState.EXIT_ACTIVE)
    assert good.shown == [FLICKER]
    assert "Input/output error" in caplog.text
    leds.close()
    assert good.closed == 1
    leds.close()  # drivers already handed back
    assert good.closed == 1


# --- sysfs ----------------------------------------------------------------------


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    act = tmp_path / "ACT"
    act.mkdir()
    (act / "trigger").write_text("none rc-feedback kbd-numlock [mmc0] timer heartbeat\n")
    (act / "brightness").write_text("0\n")
    (act / "max_brightness").write_text("255\n")
    return tmp_path


def test_sysfs_writes_trigger_and_brightness_and_restores(sysfs: Path) -> None:
    act = sysfs / "ACT"
    led = SysfsLed("ACT", root=sysfs)
    assert led.original_trigger == "mmc0"
    assert (act / "trigger").read_text() == "none"
    led.show(SOLID)
    assert (act / "brightness").read_text() == "255"
    led.close()
    led.close()  # idempotent
    assert (act / "brightness").read_text() == "0"
    assert (act / "trigger").read_text() == "mmc0"


def test_sysfs_blink_drives_brightness(sysfs: Path) -> None:
    writes: list[str] = []
    seen = threading.Event()

    class Recording(SysfsLed):
        def _write(self, attr: str, value: str) -> None:
            super()._write(attr, value)
            if attr == "brightness":
                writes.append(value)
                if len(writes) >= 4:
                    seen.set()

    led = Recording("ACT", root=sysfs)
    led.show(FAST_BLINK)
    assert seen.wait(WAIT)
    led.close()
    assert writes[:4] == ["255", "0", "255", "0"]
    assert writes[-1] == "0"


def test_sysfs_missing_led_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LedNotFound, match=r"'ACT'.*does not exist") as info:
        SysfsLed("ACT", root=tmp_path)
    assert isinstance(info.value, FileNotFoundError)


def test_open_status_leds_skips_missing_led(
    tmp_path: Path, factory: MockFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="appliance.leds"):
        leds = open_status_leds(gpio_pins=[17, 27], pin_factory=factory, sysfs_root=tmp_path)
    with leds:
        assert "no onboard LED (ACT or led0)" in caplog.text
        leds.set(LedState.READY)
        assert factory.pin(17).state is True and factory.pin(27).state is True
    assert factory.pin(17).state is False and factory.pin(27).state is False


def test_open_status_leds_falls_back_to_led0(sysfs: Path, factory: MockFactory) -> None:
    (sysfs / "ACT").rename(sysfs / "led0")
    with open_status_leds(sysfs_root=sysfs) as leds:
        leds.set(LedState.READY)
        assert (sysfs / "led0" / "brightness").read_text() == "255"
    assert (sysfs / "led0" / "trigger").read_text() == "mmc0"


@pytest.mark.parametrize(
    ("text", "current"),
    [
        ("none rc-feedback [mmc0] timer\n", "mmc0"),
        ("[none] heartbeat", "none"),
        ("none timer [heartbeat]", "heartbeat"),
    ],
)
def test_sysfs_parse_trigger(text: str, current: str) -> None:
    assert parse_trigger(text) == current


def test_sysfs_parse_trigger_without_current_quotes_text() -> None:
    with pytest.raises(LedTriggerError, match="none timer"):
        parse_trigger("none timer")
