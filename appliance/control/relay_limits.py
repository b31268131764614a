"""The relay's bookkeeping: per-node token buckets, its counters, and logging that
says a thing once a minute instead of once a frame.

Pure: the clock is passed in, so the tests drive it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds between two log lines about the same key and reason
LOG_KEYS = 4096  # remembered (key, reason) pairs; past that the oldest are forgotten


@dataclass(frozen=True)
class RelayLimits:
    """Per node, what it may send through the relay.

    WireGuard sends at most one datagram per packet, so frames bound packet rate
    and bytes bound bandwidth; the burst lets a TCP window through at once. The
    defaults carry a video call with room to spare and stop one node from taking
    a Pi's uplink (a relayed byte crosses it twice)."""

    frames_per_s: float = 4000.0
    frame_burst: float = 8000.0
    bytes_per_s: float = 4_000_000.0  # 32 Mbit/s
    byte_burst: float = 1_000_000.0
    queue: int = 512  # frames waiting for a slow receiver before the next is dropped
    # Nodes on the relay at once (and, as many again, connections still proving who
    # they are): past that a new one is refused with 1013 "try again later".
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for name in ("frames_per_s", "frame_burst", "bytes_per_s", "byte_burst"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"relay limit {name}: {value!r} is not a positive number")
        for name in ("queue", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"relay limit {name}: {value!r} is not a positive whole number")


_UNITS = {"k": 1000, "m": 1000**2, "g": 1000**3, "": 1}


def parse_amount(text: str, whole: bool = False) -> float:
    """A positive number, with an optional k/M/G suffix (powers of 1000): `4M`, `250k`,
    `4000000`. ValueError quoting the text otherwise."""
    raw = text.lower()
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    try:
        if len(text) > 32 or not raw.isprintable() or any(c.isspace() for c in raw):
            raise ValueError(text)
        value = float(raw[: len(raw) - len(unit)]) * _UNITS[unit]
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e15 or (whole and value != int(value)):
        kind = "whole number (e.g. 1024 or 10k)" if whole else "number (e.g. 4000000, 4M or 250k)"
        raise ValueError(f"{text[:40]!r} is not a positive {kind}")
    return int(value) if whole else value


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; starts full."""

    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, amount: float, now: float) -> bool:
        if self.tokens < 0:  # first use: full
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


@dataclass
class RelayMetrics:
    frames: int = 0  # forwarded
    bytes: int = 0  # forwarded WireGuard bytes (without the 32-byte key)
    drops: Counter[str] = field(default_factory=Counter)  # frames, by reason
    refused: Counter[str] = field(default_factory=Counter)  # connections, by reason
    connections: int = 0  # authenticated and live

    def lines(self) -> list[str]:
        """Prometheus text format, for control's /metrics."""
        lines = [
            "# HELP meshpi_relay_connections Nodes connected to the relay.",
            "# TYPE meshpi_relay_connections gauge",
            f"meshpi_relay_connections {self.connections}",
            "# HELP meshpi_relay_frames_total Frames forwarded by the relay.",
            "# TYPE meshpi_relay_frames_total counter",
            f"meshpi_relay_frames_total {self.frames}",
            "# HELP meshpi_relay_bytes_total WireGuard bytes forwarded by the relay.",
            "# TYPE meshpi_relay_bytes_total counter",
            f"meshpi_relay_bytes_total {self.bytes}",
            "# HELP meshpi_relay_drops_total Frames the relay dropped, by reason.",
            "# TYPE meshpi_relay_drops_total counter",
        ]
        for reason in ("unknown", "self", "malformed", "rate", "bytes", "queue"):
            lines.append(f'meshpi_relay_drops_total{{reason="{reason}"}} {self.drops[reason]}')
        lines += [
            "# HELP meshpi_relay_refused_total Relay connections refused or closed, by reason.",
            "# TYPE meshpi_relay_refused_total counter",
        ]
        for reason in ("auth", "replay", "timeout", "unknown", "pending", "expired", "oversize", "replaced",
                       "full"):  # fmt: skip
            lines.append(f'meshpi_relay_refused_total{{reason="{reason}"}} {self.refused[reason]}')
        return lines


class LogOnce:
    """Log a warning about (key, reason) at most once per `every` seconds.

    A flood of frames to an unknown key is one line a minute, not one per frame;
    the table is bounded, so a flood of *different* keys cannot grow it."""

    def __init__(self, every: float = LOG_EVERY, size: int = LOG_KEYS) -> None:
        self.every, self.size = every, size
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, key: str, reason: str, now: float, message: str, *args: object) -> bool:
        last = self._last.get((key, reason))
        if last is not None and now - last < self.every:
            return False
        self._last.pop((key, reason), None)  # re-inserted last: dict order is age
        self._last[(key, reason)] = now
        while len(self._last) > self.size:
            del self._last[next(iter(self._last))]
        log.warning(message, *args)
        return True
