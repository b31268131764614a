"""`host[:port]` as an owner types it for the world to dial: an IPv4 address, a
bracketed IPv6 address or a DNS name (dynamic DNS), and maybe a port.

Pure. `parse_host_port` raises ValueError with the reason only (Fields adds the
field and quotes the value); it refuses anything a WireGuard config's `Endpoint =`
line could not hold: spaces, control characters, '#', labels that are not DNS labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

MAX_TEXT = 260  # a 253-character name, ':' and a 5-digit port, with room for brackets
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class HostPort:
    host: str  # an address (v6 without brackets) or a lowercase DNS name
    port: int | None  # None: the caller's default (the listen port, or the mapped one)

    def with_port(self, default: int) -> str:
        """The text for a WireGuard `Endpoint =` line."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port if self.port is not None else default}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_host_port(value: object) -> HostPort:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) > MAX_TEXT:
        raise ValueError(f"is longer than {MAX_TEXT} characters")
    if not value or not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError("must be host[:port] with no spaces, e.g. home.example.org:51820 or 203.0.113.7")
    host, port = _split(value)
    if port is not None and (not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535):
        raise ValueError(f"has a port {port!r} that is not 1-65535")
    return HostPort(_host(host), int(port) if port is not None else None)


def _split(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("has a '[' with no ']' (IPv6 goes in brackets: [2001:db8::1]:51820)")
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("has something after ']' that is not :port")
        return text[1:end], rest[1:] if rest else None
    if text.count(":") > 1:
        raise ValueError("looks like an IPv6 address: put it in brackets, e.g. [2001:db8::1]:51820")
    host, sep, port = text.partition(":")
    return host, port if sep else None


def _host(host: str) -> str:
    try:
        address = ip_address(host)
    except ValueError:
        address = None
    if isinstance(address, IPv4Address | IPv6Address):
        if address.is_unspecified or address.is_multicast or address.is_loopback:
            raise ValueError(f"has an address {host} that nobody outside can dial")
        return str(address)
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"has a host {host!r} that is neither an IP address nor a DNS name")
    if name.replace(".", "").isdigit():
        raise ValueError(f"has a host {host!r} that is not a valid IPv4 address")
    return name.lower()
