"""The agent's last log records, kept in memory for the LocalAPI (`/v1/logs`).

A logging handler on the root logger: every INFO-or-worse record the agent logs
lands here too, numbered, so a client polls with `after=<last seq it saw>` and
gets only what is new. Debug records stay out: pyroute2's netlink dumps (which
hold private keys) are debug, and nothing at INFO ever names a private key.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

RING_SIZE = 500


class LogRing(logging.Handler):
    def __init__(self, size: int = RING_SIZE) -> None:
        super().__init__(level=logging.INFO)
        self._lines: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = 0
        self._ring_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        with self._ring_lock:
            self._seq += 1
            self._lines.append(
                {"seq": self._seq, "time": record.created, "level": record.levelname, "message": message}
            )

    def after(self, seq: int) -> list[dict[str, Any]]:
        """The kept lines numbered above `seq`, oldest first."""
        with self._ring_lock:
            return [line for line in self._lines if line["seq"] > seq]
