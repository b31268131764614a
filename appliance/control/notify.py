"""Where long-polls wait for the mesh to change.

Every map request waits here until the mesh version passes the one it has. A
burst of changes (a node joining touches several rows) wakes the waiters once:
the first bump opens a short batch window, and the waiters wake when it closes.
One asyncio.Event per generation, so a wake costs O(waiters) once, not per change.
"""

from __future__ import annotations

import asyncio
import contextlib


class VersionWatch:
    def __init__(self, version: int, batch: float = 0.1) -> None:
        self.version = version  # the version waiters may see
        self._pending = version  # the newest version, not yet published
        self.batch = batch
        self._event = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def bump(self, version: int) -> None:
        """The store reached `version`; publish it after the batch window."""
        if version <= self._pending:
            return
        self._pending = version
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.batch, self._publish)

    def _publish(self) -> None:
        self._timer = None
        self.version = self._pending
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, after: int, timeout: float) -> int:
        """The published version once it passes `after`, or the current one at timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.version <= after:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # asyncio.timeout, not wait_for: no task per waiter (thousands of them).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._event.wait()
        return self.version
