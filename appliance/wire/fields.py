"""Tiny validators, one per kind of field, each quoting the bad value.

In the manner of wireguard-tools' config.c: every parser says exactly what was
wrong with which value in which field of which file.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_network
from pathlib import Path
from typing import Any, TypeVar

from appliance.base.errors import MeshpiError
from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPAddress, IPNetwork

T = TypeVar("T")


class ConfigError(MeshpiError, ValueError):
    """Bad input: names the file, the field and the value (status 400)."""

    def __init__(self, source: str, field: str, value: object, reason: str) -> None:
        self.source, self.field, self.value, self.reason = source, field, value, reason
        super().__init__(400, f"{source}: {field}: {value!r} {reason}")


def load_json(path: Path) -> Any:
    """Read a JSON file, turning every failure into a ConfigError naming it."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), "(file)", str(path), f"cannot be read: {e.strerror}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            str(path),
            f"line {e.lineno} column {e.colno}",
            text[e.pos : e.pos + 20],
            f"is not valid JSON: {e.msg}",
        ) from e


class Fields:
    """Reads one JSON object, field by field, and rejects fields nobody asked for."""

    def __init__(self, source: str, path: str, obj: object, optional: frozenset[str] = frozenset()) -> None:
        """`optional`: fields the sender marked as safe to ignore (a newer
        protocol version's additions); unknown ones outside it are refused."""
        self.source, self.path, self.optional = source, path, optional
        if not isinstance(obj, Mapping):
            raise ConfigError(source, path or "(top level)", obj, "must be an object")
        self.obj = obj
        self._seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, value: object, reason: str) -> ConfigError:
        return ConfigError(self.source, self.where(key), value, reason)

    def get(self, key: str, parse: Callable[[object], T], default: T) -> T:
        self._seen.add(key)
        if key not in self.obj:
            return default
        return self.parse(key, self.obj[key], parse)

    def require(self, key: str, parse: Callable[[object], T]) -> T:
        self._seen.add(key)
        if key not in self.obj:
            raise ConfigError(self.source, self.where(key), None, "is required")
        return self.parse(key, self.obj[key], parse)

    def parse(self, key: str, value: object, parse: Callable[[object], T]) -> T:
        try:
            return parse(value)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise self.error(key, value, str(e)) from None

    def get_list(self, key: str, parse: Callable[[object], T], default: tuple[T, ...] = ()) -> tuple[T, ...]:
        self._seen.add(key)
        if key not in self.obj or self.obj[key] is None:
            return default
        value = self.obj[key]
        if not isinstance(value, list):
            raise self.error(key, value, "must be a list")
        return tuple(self.parse(f"{key}[{i}]", item, parse) for i, item in enumerate(value))

    def sub(self, key: str) -> Fields:
        self._seen.add(key)
        return Fields(self.source, self.where(key), self.obj.get(key), self.optional)

    def done(self, hint: str = "") -> None:
        """Refuse fields nobody asked for; `hint` says what to do about one."""
        unknown = sorted(set(self.obj) - self._seen - self.optional)
        if unknown:
            known = ", ".join(sorted(self._seen))
            reason = f"is an unknown field (known: {known}){hint}"
            raise self.error(unknown[0], self.obj[unknown[0]], reason)


# -- one parser per kind of value. Each raises ValueError with the reason only;
#    Fields adds the file, the field and the value.


def parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def int_range(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
        if not low <= value <= high:
            raise ValueError(f"is out of range ({low}-{high})")
        return value

    return parse


_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def parse_name(value: object) -> str:
    """A node name: a DNS label, because nodes are known as <name>.<mesh-domain>."""
    text = parse_str(value)
    if not _NAME.match(text):
        raise ValueError("is not a valid name (lowercase letters, digits and '-', up to 63)")
    return text


_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def parse_ifname(value: object) -> str:
    text = parse_str(value)
    if not _IFNAME.match(text) or text in (".", ".."):
        raise ValueError("is not a valid interface name (1-15 of letters, digits, '_.-')")
    return text


def parse_public_key(value: object) -> PublicKey:
    return PublicKey.from_base64(parse_str(value))


def _ip(text: str) -> IPAddress:
    # The C parser, several times faster than ipaddress's own: a netmap holds
    # thousands of addresses. It is as strict (no leading zeros, no scope ids).
    try:
        if ":" in text:
            return IPv6Address(int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big"))
        return IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"))
    except OSError:
        raise ValueError(f"{text!r} is not an IP address") from None


def parse_address(value: object) -> IPAddress:
    text = parse_str(value)
    try:
        return _ip(text)
    except ValueError:
        raise ValueError("is not an IP address") from None


def parse_network(value: object) -> IPNetwork:
    text = parse_str(value)
    try:
        return ip_network(text, strict=True)
    except ValueError as e:
        if "host bits set" in str(e):
            raise ValueError(f"has host bits set (did you mean {ip_network(text, strict=False)}?)") from None
        raise ValueError("is not a network in CIDR form (like 192.168.1.0/24)") from None


def parse_endpoint(value: object) -> Endpoint:
    text = parse_str(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError("is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = _ip(host)
    except ValueError:
        raise ValueError("has no IP address before the port (v6 goes in brackets)") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("has no valid port (1-65535)")
    return Endpoint(address, int(port))
