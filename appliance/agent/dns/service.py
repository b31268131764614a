"""The node's resolver, run by the agent beside its loop: it serves what the netmap
names and sends the rest where core/dns.py says.

It subscribes to the loop's `Applied` (bus.py): once the kernel holds this node's
mesh addresses the resolver listens on them, port 53, UDP and TCP; each later apply
hands it the new zone and upstreams (an atomic swap in the server: a rename is
served from the next query); a logout (no netmap) stops it, and so does the agent's
end. A netmap without names (a control from before capver 3, static mode) runs no
resolver.

The host's own resolvers, where names go while no exit node is used, are those
of the system before meshpi touched it: `host_resolvers` is given by the agent
(the host integration keeps the original), read afresh at each apply so a new
DHCP lease is followed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from appliance.agent.bus import Applied
from appliance.agent.dns.server import DnsServer
from appliance.agent.dns.zone import Upstreams, Zone
from appliance.base.net import Endpoint, IPAddress
from appliance.core.dns import DNS_PORT, DnsPlan, nameservers, plan_dns

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
# systemd-resolved's list of the real upstreams: its stub (127.0.0.53) in
# /etc/resolv.conf would send a query back to whatever resolved routes it to.
RESOLVED_UPSTREAMS = Path("/run/systemd/resolve/resolv.conf")
RESOLVED_STUB = Endpoint(ip_address("127.0.0.53"), DNS_PORT)

ServerFactory = Callable[[Sequence[Endpoint], Zone, Upstreams], DnsServer]


def read_host_resolvers(
    resolv_conf: Path = RESOLV_CONF, resolved: Path = RESOLVED_UPSTREAMS
) -> tuple[Endpoint, ...]:
    """The `nameserver`s of resolv.conf; resolved's upstreams instead of its stub."""
    found = _nameservers(resolv_conf)
    if found == (RESOLVED_STUB,):
        return _nameservers(resolved)
    return found


def _nameservers(path: Path) -> tuple[Endpoint, ...]:
    try:
        return nameservers(path.read_text(errors="replace"))
    except OSError:
        return ()


def host_resolvers(original: Callable[[], Sequence[IPAddress]]) -> Callable[[], tuple[Endpoint, ...]]:
    """The host's resolvers from the host integration's saved original (agent/dns/host.py),
    port 53; when it has none to say, the files as they are now."""

    def read() -> tuple[Endpoint, ...]:
        servers = original()
        if not servers:
            return read_host_resolvers()
        return tuple(dict.fromkeys(Endpoint(a, DNS_PORT) for a in servers))

    return read


class DnsService:
    def __init__(
        self,
        host_resolvers: Callable[[], tuple[Endpoint, ...]] = read_host_resolvers,
        server: ServerFactory = DnsServer,
    ) -> None:
        self._host_resolvers, self._make_server = host_resolvers, server
        self._lock = threading.Lock()
        self._server: DnsServer | None = None
        self._plan: DnsPlan | None = None
        self._error: str | None = None

    def on_applied(self, event: Applied) -> None:
        """Subscriber of the bus: serve what the kernel now holds (on the loop's thread)."""
        planned = None
        if event.netmap is not None:
            planned = plan_dns(event.netmap, event.prefs, self._host_resolvers())
        with self._lock:
            try:
                self._apply(planned)
                self._error = None
            except OSError as e:  # a bind refused: told in status, tried again at the next apply
                if self._error != str(e):
                    log.error("mesh DNS: cannot serve on %s: %s",
                              ", ".join(map(str, planned.binds if planned else ())), e)  # fmt: skip
                self._error = str(e)

    def _apply(self, planned: DnsPlan | None) -> None:
        if planned is None:
            self._stop("no netmap with names" if self._plan is not None else None)
            return
        zone = Zone(planned.domain, dict(planned.records))
        upstreams = Upstreams(planned.default, dict(planned.split))
        before, server = self._plan, self._server
        if server is None:
            server = self._make_server(planned.binds, zone, upstreams)
            server.start()
            self._server = server
            log.info("mesh DNS: serving %s on %s; other names: %s", planned.domain,
                     ", ".join(map(str, planned.binds)), _where(planned))  # fmt: skip
        else:
            if before is None or before.binds != planned.binds:
                server.rebind(planned.binds)
                log.info("mesh DNS: now on %s", ", ".join(map(str, planned.binds)))
            if before is None or _served(before) != _served(planned):
                server.update(zone, upstreams)
            if before is not None and before.via != planned.via:
                log.info("mesh DNS: other names now go %s", _where(planned))
        self._plan = planned

    def _stop(self, why: str | None) -> None:
        server, self._server, self._plan = self._server, None, None
        if server is not None:
            server.stop()
            log.info("mesh DNS: stopped (%s)", why or "the agent stops")

    def close(self) -> None:
        with self._lock:
            self._stop(None)

    def status(self) -> dict[str, Any] | None:
        """`dns` of the LocalAPI's status: None while no netmap with names holds."""
        with self._lock:
            plan, server, error = self._plan, self._server, self._error
        if plan is None:
            return None if error is None else {"serving": [], "error": error}
        return {
            "domain": plan.domain,
            "serving": [str(e) for e in server.bound] if server is not None else [],
            "upstreams": [str(e) for e in plan.default],
            "upstreams_via": plan.via,
            "split": {d: [str(e) for e in r] for d, r in sorted(plan.split.items())},
            "error": error,
        }


def _served(plan: DnsPlan) -> tuple[object, ...]:
    return (plan.domain, plan.records, plan.default, plan.split)


def _where(plan: DnsPlan) -> str:
    if not plan.default:
        return f"nowhere ({plan.via.removeprefix('nowhere: ')}): SERVFAIL"
    return f"to {', '.join(map(str, plan.default))} ({plan.via})"
