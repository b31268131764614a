"""Pick a WireGuard backend, and the checks both backends share.

The backends are imported lazily, so a host that only ever uses wireguard-go
never imports pyroute2's generic netlink code, and the backends can import
`check_update` from here without an import cycle.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from appliance.kernel.base import WgUpdate, WireGuardBackend

log = logging.getLogger(__name__)

IFNAMSIZ = 16  # the kernel's limit, including the terminating NUL
_MODULE_DIR = Path("/sys/module/wireguard")


def check_ifname(ifname: str) -> None:
    if not ifname or len(ifname) >= IFNAMSIZ or "/" in ifname or any(c.isspace() for c in ifname):
        raise ValueError(f"{ifname!r} is not a valid interface name (1-15 characters, no / or spaces)")


def check_update(update: WgUpdate) -> None:
    """Reject updates whose meaning depends on the order a backend applies them."""
    counts = Counter(peer.public_key for peer in update.upsert)
    twice = [key for key, n in counts.items() if n > 1]
    if twice:
        raise ValueError(f"peer {min(twice)} is upserted twice in one update")
    both = counts.keys() & set(update.remove)
    if both:
        raise ValueError(f"peer {min(both)} is both upserted and removed in one update")


def summary(update: WgUpdate) -> str:
    """An update in words, for the one log line per change. Never the private key."""
    parts = []
    if update.private_key is not None:
        parts.append(f"private key (public {update.private_key.public_key().short})")
    if update.listen_port is not None:
        parts.append(f"listen port {update.listen_port}")
    if update.fwmark is not None:
        parts.append(f"fwmark {update.fwmark:#x}")
    if update.upsert:
        parts.append(f"{len(update.upsert)} peer(s) set: " + _labels(p.label for p in update.upsert))
    if update.remove:
        parts.append(f"{len(update.remove)} peer(s) removed: " + _labels(k.short for k in update.remove))
    return "; ".join(parts) or "nothing"


def _labels(labels: Iterable[str], limit: int = 5) -> str:
    items = list(labels)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def kernel_module_available() -> bool:
    """Can the kernel make WireGuard devices? Cheap, and creates nothing.

    /sys/module/wireguard exists once the module is loaded (or built in). If it is
    not there yet, resolving the "wireguard" generic netlink family makes the
    kernel modprobe it (MODULE_ALIAS_GENL_FAMILY), and fails if there is none."""
    if _MODULE_DIR.exists():
        return True
    from appliance.kernel.wireguard_netlink import genl_family_available

    return genl_family_available()


def choose_backend(preference: str) -> WireGuardBackend:
    """ "kernel", "userspace", or "auto" (the kernel module when there is one)."""
    if preference not in ("kernel", "userspace", "auto"):
        raise ValueError(f"WireGuard backend {preference!r} is not one of kernel, userspace, auto")
    use_kernel = preference == "kernel" or (preference == "auto" and kernel_module_available())
    if use_kernel:
        from appliance.kernel.wireguard_netlink import NetlinkWireGuard

        backend: WireGuardBackend = NetlinkWireGuard()
    else:
        from appliance.kernel.wireguard_uapi import UapiWireGuard

        backend = UapiWireGuard()
    if preference == "auto":
        log.info("WireGuard backend: %s (auto)", backend.name)
    return backend
