"""A minimal HTTP/1.1 client connection for the control benchmark's long-polls.

The benchmark simulates thousands of nodes in one process on the same 2-core
machine as the server. With aiohttp's client, parsing the 5,000 answers that one
change sets off took the simulator longer than the server took to send them, so
the figure measured the simulator. This connection does only what a long-poll
needs (one request at a time, keep-alive, Content-Length bodies) and stamps each
answer the moment its last byte arrives, before anything else happens to it.
"""

from __future__ import annotations

import asyncio
import time


class LeanError(Exception):
    pass


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, float]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(LeanError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        arrived = time.monotonic()
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        status = int(head[0].split()[1])
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((status, body, arrived))


class LeanConnection:
    """One keep-alive connection; `post` sends one request and waits for its answer."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._proto: _Protocol | None = None

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes, float]:
        """(status, body, arrival time) of the answer."""
        proto = self._proto
        if proto is None or proto.closed:
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(_Protocol, self.host, self.port)
            self._proto = proto
        assert proto.transport is not None
        proto.waiter = asyncio.get_running_loop().create_future()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        proto.transport.write(head.encode() + body)
        try:
            async with asyncio.timeout(timeout):
                return await proto.waiter
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
