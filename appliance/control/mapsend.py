"""Sending full maps: sealed per node from the shared encoding (mapcache.py), a
bounded number at a time.

Sealing a shared map takes about a millisecond, but sending it takes as long as
the node takes to read it. After a restart 5,000 nodes ask at once: sealed all
at once and handed to aiohttp, every answer (~260 KiB compressed, ~800 KiB for an
old agent) would sit in this process until read — gigabytes. So at most
IN_FLIGHT answers exist at a time; each is written with backpressure (the writer
waits while the socket's buffer is full) and its slot is free again once the kernel
has it. A node that does not read within WRITE_TIMEOUT loses its connection (it
polls again), so a slow or hostile reader holds a slot for a bounded time only.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from nacl import bindings
from nacl.utils import random as random_bytes

from appliance.control.mapcache import FullMap
from appliance.wire.seal import NONCE_LEN, Opened

log = logging.getLogger(__name__)

IN_FLIGHT = 32
WRITE_TIMEOUT = 30.0  # seconds a node has to take its full map
GATE: web.AppKey[asyncio.Semaphore] = web.AppKey("full_map_gate", asyncio.Semaphore)


def seal(full: FullMap, opened: Opened) -> bytes:
    """The sealed answer: the Box's own construction (random nonce, then the
    ciphertext under the precomputed key), without PyNaCl's extra copies of a
    large message."""
    plaintext = full.body(opened.nonce)
    nonce = random_bytes(NONCE_LEN)
    return nonce + bindings.crypto_box_afternm(plaintext, nonce, opened.box.shared_key())


async def send(request: web.Request, opened: Opened, full: FullMap) -> web.StreamResponse:
    gate = request.app[GATE]
    async with gate:
        data = seal(full, opened)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await response.write(data)
                await response.write_eof()
        except TimeoutError:
            log.info(
                "a node did not read its full map (%d bytes) in %.0f s: dropped", len(data), WRITE_TIMEOUT
            )
            if request.transport is not None:
                request.transport.abort()
    return response
