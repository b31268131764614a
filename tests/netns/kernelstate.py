"""Everything meshpi could touch in a namespace, as the standard tools show it."""

from __future__ import annotations

import subprocess


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def snapshot(ns: str | None = None) -> dict[str, str]:
    """Links, addresses, rules, routes, nft ruleset and the sysctls meshpi changes."""
    prefix = ("ip", "netns", "exec", ns) if ns else ()
    return {
        name: sh(*prefix, *cmd)
        for name, cmd in {
            "links": ("ip", "-o", "link", "show"),
            "addrs": ("ip", "-o", "addr", "show"),
            "rules4": ("ip", "-4", "rule", "show"),
            "rules6": ("ip", "-6", "rule", "show"),
            "routes": ("ip", "route", "show", "table", "all"),
            "nft": ("nft", "list", "ruleset"),
            "sysctl": (
                "sysctl",
                "net.ipv4.ip_forward",
                "net.ipv6.conf.all.forwarding",
                "net.ipv4.conf.all.src_valid_mark",
            ),  # fmt: skip
        }.items()
    }
