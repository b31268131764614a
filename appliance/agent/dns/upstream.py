"""Asking the upstream resolvers: each in order over UDP, over TCP again when the UDP
answer is truncated, a timeout per try, and one upstream query for any number of
clients asking the same question at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode

from appliance.agent.dns.answer import PARSE_ERRORS
from appliance.base.net import Endpoint

log = logging.getLogger(__name__)

# Answers worth keeping and passing on; anything else (SERVFAIL, REFUSED, ...) means
# "try the next upstream".
_GOOD = (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
_FAILURES = (*PARSE_ERRORS, OSError, EOFError, asyncio.TimeoutError)


class Overloaded(Exception):
    """Too many different questions in flight upstream: the new one is not sent."""


class Forwarder:
    def __init__(self, timeout: float = 1.5, max_inflight: int = 256) -> None:
        self.timeout = timeout
        self.max_inflight = max_inflight
        self._inflight: dict[Hashable, asyncio.Future[dns.message.Message | None]] = {}

    async def ask(
        self, key: Hashable, query: dns.message.Message, endpoints: tuple[Endpoint, ...]
    ) -> dns.message.Message | None:
        """The first good answer from endpoints, or None if none gave one. Callers asking
        the same key while a query is out share its answer."""
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        if len(self._inflight) >= self.max_inflight:
            raise Overloaded(f"{len(self._inflight)} questions in flight upstream")
        future: asyncio.Future[dns.message.Message | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answer = await self._ask_each(query, endpoints)
        except BaseException:
            future.set_result(None)
            raise
        finally:
            del self._inflight[key]
        future.set_result(answer)
        return answer

    async def _ask_each(
        self, query: dns.message.Message, endpoints: tuple[Endpoint, ...]
    ) -> dns.message.Message | None:
        for endpoint in endpoints:
            answer = await self._ask_one(query, endpoint)
            if answer is not None and answer.rcode() in _GOOD:
                return answer
        return None

    async def _ask_one(self, query: dns.message.Message, endpoint: Endpoint) -> dns.message.Message | None:
        host = str(endpoint.host)
        try:
            answer = await dns.asyncquery.udp(
                query, host, timeout=self.timeout, port=endpoint.port, ignore_unexpected=True
            )
            if answer.flags & dns.flags.TC:
                answer = await dns.asyncquery.tcp(query, host, timeout=self.timeout, port=endpoint.port)
        except _FAILURES as e:
            log.debug("dns: upstream %s: %s", endpoint, e or type(e).__name__)
            return None
        return answer
