"""What the agent knows (`LedFacts`) -> `LedState` -> `Pattern` (steps of level and
seconds). Pure: the drivers (drivers.py) play the patterns."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class LedState(enum.Enum):
    """The values are the LocalAPI's words (`"led"` in /v1/status)."""

    BOOTING = "booting"
    OFFLINE = "offline"
    READY = "ready"
    EXIT_ACTIVE = "exit_active"
    ERROR = "error"


@dataclass(frozen=True)
class Step:
    level: bool
    seconds: float


@dataclass(frozen=True)
class Pattern:
    """Steps of (level, seconds) played in order and repeated forever.

    A single step is a steady level and its `seconds` is `math.inf`. In a longer
    pattern neighbouring steps (the last wrapping to the first) alternate, so each
    step boundary is a visible edge and a recorded pin history maps one-to-one
    onto the steps."""

    name: str
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"pattern {self.name!r}: no steps")
        if len(self.steps) == 1:
            return
        for step in self.steps:
            if not (0 < step.seconds < math.inf):
                raise ValueError(f"pattern {self.name!r}: step {step} must last 0 < s < inf")
        for a, b in zip(self.steps, self.steps[1:] + self.steps[:1], strict=True):
            if a.level == b.level:
                raise ValueError(f"pattern {self.name!r}: steps {a} and {b} do not alternate")

    @property
    def steady(self) -> bool:
        return len(self.steps) == 1

    @classmethod
    def solid(cls, name: str, level: bool = True) -> Pattern:
        return cls(name, (Step(level, math.inf),))

    @classmethod
    def blink(cls, name: str, *on_off: float) -> Pattern:
        """`blink("x", 0.1, 0.2, 0.3, 0.4)`: on 0.1 s, off 0.2 s, on 0.3 s, off 0.4 s."""
        if len(on_off) % 2:
            raise ValueError(f"pattern {name!r}: on/off times {on_off} are not in pairs")
        return cls(name, tuple(Step(i % 2 == 0, s) for i, s in enumerate(on_off)))


SLOW_BLINK = Pattern.blink("slow blink", 1.0, 1.0)
FAST_BLINK = Pattern.blink("fast blink", 0.1, 0.1)
SOLID = Pattern.solid("solid")
# Mostly on, with a 50 ms dip every 0.5 s: "ready" plus visible activity.
FLICKER = Pattern.blink("solid with flicker", 0.45, 0.05)
# Three short blinks then a pause: unlike any of the even blinks above, so it
# reads as "error" even to someone who has not looked up the table.
ERROR_BLINK = Pattern.blink("error blink", 0.15, 0.15, 0.15, 0.15, 0.15, 1.0)

_PATTERNS: dict[LedState, Pattern] = {
    LedState.BOOTING: SLOW_BLINK,
    LedState.OFFLINE: FAST_BLINK,
    LedState.READY: SOLID,
    LedState.EXIT_ACTIVE: FLICKER,
    LedState.ERROR: ERROR_BLINK,
}


def pattern(state: LedState) -> Pattern:
    return _PATTERNS[state]


@dataclass(frozen=True)
class LedFacts:
    """What the agent knows at one tick."""

    started: bool  # the first apply is done
    online: bool  # control is connected or still being reached (always true in static mode)
    offers_exit: bool = False
    tunnel_bytes: int = 0  # rx + tx through the tunnel since the previous tick
    last_error: str | None = None

    def __post_init__(self) -> None:
        if self.tunnel_bytes < 0:
            raise ValueError(f"tunnel_bytes {self.tunnel_bytes}: must be >= 0")


def derive_state(facts: LedFacts) -> LedState:
    """The first rule that matches wins: ERROR (the last apply failed: the user
    must act), OFFLINE (control says no: needs a login, unreachable, refused; the
    data plane may still run on the last netmap), BOOTING (nothing applied yet),
    EXIT_ACTIVE (this node offers an exit and its tunnel carried bytes since the
    previous tick), READY."""
    if facts.last_error is not None:
        return LedState.ERROR
    if not facts.online:
        return LedState.OFFLINE
    if not facts.started:
        return LedState.BOOTING
    if facts.offers_exit and facts.tunnel_bytes > 0:
        return LedState.EXIT_ACTIVE
    return LedState.READY
