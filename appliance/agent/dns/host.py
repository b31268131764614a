"""The host's DNS follows the mesh (issue 13, host integration): after each apply
the host is pointed at this node's resolver (kernel/hostdns.py), and put back as
it was when the owner turns `accept_dns` off, on logout, at a clean stop and on
`meshpi down`.

Which names go to the mesh's resolver: all of them, whether or not an exit node
is chosen, on a resolv.conf host (glibc cannot route by domain; the resolver
forwards what is not the mesh's to the host's original resolvers, as Tailscale's
100.100.100.100 does). On systemd-resolved only the mesh's and the split domains
go there, unless an exit node is chosen: then the link is also the default route
(`~.`), so that no name is asked of the local network, and while the chosen exit
node is away names fail rather than fall back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from appliance.agent.bus import Applied
from appliance.base.net import IPAddress
from appliance.core.hostdns import HostDnsConfig, host_dns_config
from appliance.core.prefs import Prefs
from appliance.kernel.base import KernelError
from appliance.kernel.hostdns import RESOLV_CONF, HostDns
from appliance.wire.netmap import Netmap

log = logging.getLogger(__name__)

RECHECK = 30.0  # seconds between looks at the host's DNS while the plan stays the same


def mesh_domains(netmap: Netmap, prefs: Prefs) -> tuple[str | None, tuple[str, ...]]:
    """The mesh domain, and the split-DNS domains of the subnet routers whose
    routes this node accepts (their LAN's names go to their LAN's resolver)."""
    domain = netmap.dns.domain if netmap.dns is not None else None
    split: list[str] = []
    if prefs.accept_routes:
        for peer in netmap.peers:
            if peer.lan_dns is not None and peer.subnet_routes:
                split += [d for d in peer.lan_dns.domains if d not in split]
    return domain, tuple(split)


def planned(event: Applied) -> HostDnsConfig | None:
    """What the host's DNS should be after this apply; None: as it was before meshpi.
    A netmap without names (a control from before capver 3) runs no resolver
    (service.py), so the host keeps its own DNS then too."""
    if event.netmap is None or event.netmap.dns is None or not event.prefs.accept_dns:
        return None
    mesh_domain, split = mesh_domains(event.netmap, event.prefs)
    return host_dns_config(
        event.prefs.interface,
        event.netmap.self_node.addresses,
        mesh_domain,
        split,
        exit_node_chosen=event.prefs.exit_node is not None,
    )


class HostDnsLink:
    """Subscribes to the bus's Applied. A netmap delta that changes nothing here
    costs a comparison: the host is looked at again only when the plan changes, or
    RECHECK seconds later (a DHCP client may have rewritten resolv.conf)."""

    def __init__(self, saved: Path, resolv_conf: Path | None = None) -> None:
        self.host = HostDns(saved, resolv_conf or RESOLV_CONF)
        self._last_error: str | None = None
        self._done: tuple[HostDnsConfig | None, float] | None = None  # the plan last made so, and when

    def on_applied(self, event: Applied) -> None:
        cfg = planned(event)
        now = time.monotonic()
        if self._done is not None and self._done[0] == cfg and now - self._done[1] < RECHECK:
            return
        done = self._guard(lambda: self.host.restore() if cfg is None else self.host.apply(cfg))
        self._done = (cfg, now) if done else None

    def restore(self) -> None:
        """Logout, a clean stop: the host's DNS as before (the resolver stops with us)."""
        self._guard(self.host.restore)
        self._done = None

    def original_servers(self) -> tuple[IPAddress, ...]:
        """Where the resolver forwards when no exit node is chosen."""
        try:
            return self.host.original_servers()
        except KernelError as e:
            log.warning("host DNS: %s", e)
            return ()

    def _guard(self, action: Callable[[], None]) -> bool:
        try:
            action()
        except (KernelError, OSError) as e:
            if str(e) != self._last_error:  # once, not at every apply
                log.error("host DNS: %s; will retry at the next apply", e)
            self._last_error = str(e)
            return False
        self._last_error = None
        return True


def restore_after_down(saved: Path) -> None:
    """`meshpi down` (no agent runs): put back what the record in the state directory says."""
    try:
        HostDns(saved).restore()
    except KernelError as e:
        log.error("host DNS: %s", e)
