"""The Host check: the dashboard answers only to the Pi's own names and addresses.

A web page on the internet can point a name it owns at the Pi's LAN address (DNS
rebinding); the browser then sends that page's requests to the Pi, as same-origin,
with `Host: rebind.attacker.example`. Refusing every Host that is not one of ours
(`<hostname>.local`, `meshpi.local`, `<hostname>`, `localhost`, an address of this
machine, with or without a port; avahi's `<name>-2.local` after a name conflict) takes
that away. It wraps the whole WSGI app, so it
holds for every route, static files and 404s included, before Flask sees anything.

The addresses come from /proc/self/net (fib_trie's local /32s, if_inet6): the
service is sandboxed without netlink (RestrictAddressFamilies), and these files are
what the kernel says without it. They are re-read when an unknown address shows up
(at most once a second), so a new DHCP lease needs no restart.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FIXED_NAMES = ("meshpi.local", "localhost")
PROC_NET = Path("/proc/self/net")
REFRESH_EVERY = 1.0
_PORT = re.compile(r"[0-9]{1,5}")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def local_addresses(proc_net: Path = PROC_NET) -> set[IPAddress]:
    """Every address assigned to this network namespace's interfaces, v4 and v6."""
    found: set[IPAddress] = set()
    try:
        lines = (proc_net / "fib_trie").read_text().splitlines()
    except OSError as e:
        log.warning("cannot read %s: %s (IPv4 addresses other than 127.0.0.1 are refused)", proc_net, e)
        lines = []
    # "|-- 192.0.2.2" then "/32 host LOCAL": an address of an interface.
    for previous, line in zip(lines, lines[1:], strict=False):
        if line.strip() == "/32 host LOCAL" and "|--" in previous:
            found.add(ipaddress.IPv4Address(previous.split("|--")[1].strip()))
    try:
        for row in (proc_net / "if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(int(row.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass  # no IPv6 in this kernel
    found.add(ipaddress.IPv4Address("127.0.0.1"))
    return found


def split_host(header: str) -> tuple[str, str | None] | None:
    """`name`, `name:port`, `1.2.3.4:80`, `[fe80::1]:80` -> (host, port); None if malformed."""
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        host, rest = header[1:end], header[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else None
    elif header.count(":") == 1:
        host, port = header.split(":")
    elif ":" in header:
        return None  # a bare IPv6 address must be in brackets
    else:
        host, port = header, None
    if port is not None and not _PORT.fullmatch(port):
        return None
    return host, port


class HostCheck:
    """Which Host headers are ours. `extra` is for installs and tests (config key ALLOWED_HOSTS)."""

    def __init__(
        self,
        extra: Iterable[str] = (),
        hostname: Callable[[], str] = socket.gethostname,
        addresses: Callable[[], set[IPAddress]] = local_addresses,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._extra = {e.lower().rstrip(".") for e in extra}
        self._hostname = hostname
        self._addresses = addresses
        self._clock = clock
        self._lock = threading.Lock()
        self._known: set[IPAddress] = addresses()
        self._read_at = clock()

    def names(self) -> set[str]:
        short = self._hostname().lower().split(".")[0]
        return {*FIXED_NAMES, short, f"{short}.local", *self._extra}

    def _is_our_name(self, host: str) -> bool:
        if host in self.names():
            return True
        # avahi renames on a conflict (a second meshpi on the LAN): meshpi-2.local.
        base, dash, number = host.removesuffix(".local").rpartition("-")
        short = self._hostname().lower().split(".")[0]
        return (
            host.endswith(".local") and bool(dash) and number.isdigit() and len(number) <= 3
            and base in (short, "meshpi")
        )  # fmt: skip

    def _is_ours(self, address: IPAddress) -> bool:
        with self._lock:
            if address in self._known:
                return True
            if self._clock() - self._read_at < REFRESH_EVERY:
                return False
            self._known, self._read_at = self._addresses(), self._clock()
            return address in self._known

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        parts = split_host(header.strip())
        if parts is None:
            return False
        host = parts[0].lower()
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            host = host[:-1] if host.endswith(".") else host
            return bool(_NAME.fullmatch(host)) and self._is_our_name(host)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return self._is_ours(address)


REFUSAL = (
    "421 Misdirected Request\n\n"
    "This is a meshpi dashboard. It answers only to its own names and addresses\n"
    "(http://{name}.local/, http://meshpi.local/, or its IP address), so that no\n"
    "other web site can reach it through your browser (DNS rebinding).\n"
)


class HostGuard:
    """WSGI middleware: refuse a foreign Host with a plain 421 before the app runs."""

    def __init__(self, app: WsgiApp, check: HostCheck) -> None:
        self.app, self.check = app, check
        self._warned: set[str] = set()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_HOST")
        if self.check.allows(header):
            return self.app(environ, start_response)
        shown = repr(header)[:80]
        if len(self._warned) < 100 and shown not in self._warned:  # once per name, bounded
            self._warned.add(shown)
            log.warning("refused a request for Host %s from %s", shown, environ.get("REMOTE_ADDR"))
        name = self.check._hostname().lower().split(".")[0]
        body = REFUSAL.format(name=name if _NAME.fullmatch(name) else "meshpi").encode()
        start_response("421 Misdirected Request", [
            ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), ("Connection", "close"),
        ])  # fmt: skip
        return _once(body)


def _once(body: bytes) -> Iterator[bytes]:
    yield body
