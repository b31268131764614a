"""DNS names in the mesh: labels made from what people call their machines, and
the DNS parts of the netmap (capability version 3).

A node or a hosted device is `<label>.<domain>` (`pi.mesh.internal`). Control makes
the label once, from the hostname or the device's name, and stores it: so a name
stays the same while others come and go, and a collision gets `-2`, `-3`, … in the
order names were taken. A name in another script becomes its IDNA (punycode) label
(`Müller-PC` → `xn--mller-pc-65a`), the form every resolver and browser accepts.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from appliance.base.net import IPAddress
from appliance.wire.fields import Fields, parse_address, parse_str

DEFAULT_DOMAIN = "mesh.internal"  # RFC 9476's .internal TLD is reserved for private use
LABEL_MAX = 63
SUFFIX_ROOM = 6  # "-NNNNN": a taken label can always be made unique
DOMAIN_MAX = 253 - LABEL_MAX - 1  # the domain, with room for a label in front
MAX_LAN_DOMAINS = 8

# fullmatch, never match + `$` (which also matches before a trailing newline).
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# Letters and digits in any script stay (punycode keeps them); everything else is a separator.
_SEPARATORS = re.compile(r"[^\w-]+|_+")


class BadName(ValueError):
    """A name that cannot become a DNS label; the message quotes it."""


def label_from(name: str, what: str = "name") -> str:
    """A DNS label made from a free-form name, or BadName saying why not.

    `My Laptop!` → `my-laptop`; `Müller PC` → `xn--mller-pc-65a`; the result
    leaves room for a `-N` suffix (≤ 57 characters)."""
    text = unicodedata.normalize("NFKC", name).strip().lower().split(".")[0]
    text = _SEPARATORS.sub("-", text).strip("-")
    if not text:
        raise BadName(f"{what} {name!r} has no letter or digit to make a DNS name of")
    if text.isascii():
        label = text[: LABEL_MAX - SUFFIX_ROOM].rstrip("-")
    else:
        try:
            label = text.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise BadName(f"{what} {name!r} cannot be written as a DNS name (IDNA: {e})") from None
        if len(label) > LABEL_MAX - SUFFIX_ROOM:
            raise BadName(
                f"{what} {name!r} is too long as a DNS name ({label!r} has {len(label)} characters, "
                f"at most {LABEL_MAX - SUFFIX_ROOM})"
            )
    if not _LABEL.fullmatch(label):
        raise BadName(f"{what} {name!r} does not make a DNS label ({label!r})")
    return label


def label_or(name: str, fallback: str) -> str:
    """`label_from(name)`, or `fallback` for a name that cannot be one (a hostname
    of emoji only): registration must not fail for the machine's own hostname."""
    try:
        return label_from(name)
    except BadName:
        return fallback


def unique_label(base: str, taken: set[str]) -> str:
    """`base`, or `base-2`, `base-3`, …: the lowest one not in `taken`."""
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def parse_label(value: object) -> str:
    text = parse_str(value)
    if not _LABEL.fullmatch(text):
        raise ValueError("is not a DNS label (1-63 of a-z, 0-9 and -, not starting or ending with -)")
    return text


def parse_domain(value: object) -> str:
    """A lowercase domain of labels (`mesh.internal`, `fritz.box`), no trailing dot."""
    text = parse_str(value).lower().rstrip(".")
    if not text or len(text) > DOMAIN_MAX or not all(_LABEL.fullmatch(p) for p in text.split(".")):
        raise ValueError(f"is not a domain name (labels of a-z, 0-9 and -, at most {DOMAIN_MAX} characters)")
    if text.split(".")[-1].isdigit():
        raise ValueError("is not a domain name (its last label is a number)")
    return text


@dataclass(frozen=True)
class DnsConfig:
    """The mesh's DNS settings, as control sends them (top-level `dns`)."""

    domain: str = DEFAULT_DOMAIN

    def fqdn(self, label: str) -> str:
        return f"{label}.{self.domain}"

    def to_json(self) -> dict[str, object]:
        return {"domain": self.domain}


@dataclass(frozen=True)
class LanDns:
    """What a subnet router offers for split DNS: names under `domains` are asked
    of `resolver`, an address inside one of its subnet routes (reached over the mesh)."""

    domains: tuple[str, ...]
    resolver: IPAddress

    def to_json(self) -> dict[str, object]:
        return {"domains": list(self.domains), "resolver": str(self.resolver)}


@dataclass(frozen=True)
class NamedDevice:
    """A device a node hosts, as peers see it: its label and mesh addresses."""

    dns_name: str
    addresses: tuple[IPv4Address | IPv6Address, ...]

    def to_json(self) -> dict[str, object]:
        return {"dns_name": self.dns_name, "addresses": [str(a) for a in self.addresses]}


def parse_dns_config(f: Fields) -> DnsConfig:
    config = DnsConfig(f.require("domain", parse_domain))
    f.done()
    return config


def parse_lan_dns(f: Fields) -> LanDns:
    domains = f.get_list("domains", parse_domain)
    if not 1 <= len(domains) <= MAX_LAN_DOMAINS:
        raise f.error("domains", len(domains), f"must be 1 to {MAX_LAN_DOMAINS} domains")
    resolver = f.require("resolver", parse_address)
    f.done()
    return LanDns(tuple(dict.fromkeys(domains)), resolver)


def parse_named_device(f: Fields) -> NamedDevice:
    name = f.require("dns_name", parse_label)
    addresses = f.get_list("addresses", parse_address)
    if not addresses:
        raise f.error("addresses", [], "must hold at least one address")
    f.done()
    return NamedDevice(name, addresses)
