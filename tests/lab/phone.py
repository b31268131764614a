"""A phone in the lab: a wg-quick config (what meshpi hands out for the WireGuard app)
brought up with the stock client tools, wireguard-go and `wg setconf`, in a lab host
that runs no meshpi.

`wg setconf` takes only the keys `wg` knows; Address, MTU and DNS belong to wg-quick
(`wg-quick strip` removes them), so they are applied here with `ip`, as wg-quick does.
DNS is left out: the lab has no resolver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from tests.lab.host import Host

_WG_QUICK_ONLY = ("Address", "MTU", "DNS", "Table", "PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig")


@dataclass(frozen=True)
class QuickConfig:
    setconf: str  # the part `wg setconf` takes (the private key included)
    addresses: tuple[str, ...]
    mtu: int
    allowed_ips: tuple[str, ...]
    endpoint: str  # host:port

    @property
    def endpoint_host(self) -> str:
        return self.endpoint.rpartition(":")[0].strip("[]")


def parse_quick(config: str) -> QuickConfig:
    keep: list[str] = []
    values: dict[str, str] = {}
    for line in config.splitlines():
        key, _, value = (part.strip() for part in line.partition("="))
        values.setdefault(key, value)
        if key not in _WG_QUICK_ONLY:
            keep.append(line)

    def listed(key: str) -> tuple[str, ...]:
        return tuple(a.strip() for a in values.get(key, "").split(",") if a.strip())

    return QuickConfig("\n".join(keep) + "\n", listed("Address"), int(values.get("MTU", "1420")),
                       listed("AllowedIPs"), values["Endpoint"])  # fmt: skip


@contextlib.contextmanager
def stock_client(host: Host, config: str, ifname: str, gateway: str) -> Iterator[QuickConfig]:
    """The config up on `host` as `ifname`, with routes for its AllowedIPs; with 0.0.0.0/0
    the default route goes through the tunnel, and the tunnel's own packets to the
    endpoint through `gateway` (wg-quick does the same with a routing table). Removed
    on exit, the host's default route restored."""
    quick = parse_quick(config)
    host.run(["wireguard-go", ifname])
    try:
        host.run(["wg", "setconf", ifname, "/dev/stdin"], input=quick.setconf)  # never on disk
        for address in quick.addresses:
            host.run(["ip", "address", "add", address, "dev", ifname])
        host.run(["ip", "link", "set", ifname, "mtu", str(quick.mtu), "up"])
        for prefix in quick.allowed_ips:
            if prefix == "0.0.0.0/0":
                host.run(["ip", "route", "add", f"{quick.endpoint_host}/32", "via", gateway])
                host.run(["ip", "route", "replace", "default", "dev", ifname])
            else:
                host.run(["ip", "route", "replace", prefix, "dev", ifname])
        yield quick
    finally:
        host.run(["ip", "link", "del", ifname], check=False)
        host.run(["ip", "route", "del", f"{quick.endpoint_host}/32"], check=False)
        host.run(["ip", "route", "replace", "default", "via", gateway], check=False)
