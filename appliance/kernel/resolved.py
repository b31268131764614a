"""systemd-resolved's per-link DNS, through `resolvectl` (which speaks its D-Bus
API, org.freedesktop.resolve1 SetLinkDNS/SetLinkDomains/SetLinkDefaultRoute).

resolvectl rather than a D-Bus library: it ships with resolved (so it is there
exactly when this backend is used), adds no dependency, and its errors are
readable. Settings made this way live as long as the link (or until `revert`):
resolved drops them when the interface goes, so a crash leaves nothing stale.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
from pathlib import Path

from appliance.base.net import IPAddress
from appliance.core.hostdns import HostDnsConfig, parse_nameservers, resolvectl_domains
from appliance.kernel.base import KernelError

log = logging.getLogger(__name__)

RESOLVED_STUB_DIR = Path("/run/systemd/resolve")
# resolved's varlink socket: there while the daemon runs (and only then).
RESOLVED_SOCKET = RESOLVED_STUB_DIR / "io.systemd.Resolve"
# Every upstream server resolved knows (global and per link), no stub.
RESOLVED_UPSTREAMS = RESOLVED_STUB_DIR / "resolv.conf"
TIMEOUT = 10.0


class Resolved:
    def __init__(self, stub_dir: Path = RESOLVED_STUB_DIR) -> None:
        self.socket, self.upstreams_file = stub_dir / RESOLVED_SOCKET.name, stub_dir / RESOLVED_UPSTREAMS.name

    def running(self) -> bool:
        return self.socket.is_socket() and shutil.which("resolvectl") is not None

    def upstreams(self) -> tuple[IPAddress, ...]:
        try:
            return parse_nameservers(self.upstreams_file.read_bytes())
        except OSError:
            return ()

    def link_index(self, interface: str) -> int | None:
        try:
            return socket.if_nametoindex(interface)
        except OSError:
            return None

    def set_link(self, cfg: HostDnsConfig) -> None:
        self._run("dns", cfg.interface, *map(str, cfg.servers))
        self._run("domain", cfg.interface, *resolvectl_domains(cfg))
        self._run("default-route", cfg.interface, "yes" if cfg.default_route else "no")

    def revert(self, interface: str) -> bool:
        """Forget the link's settings; False when the link is gone (resolved forgot them)."""
        if self.link_index(interface) is None:
            return False
        self._run("revert", interface)
        return True

    def _run(self, *args: str) -> None:
        try:
            proc = subprocess.run(["resolvectl", *args], capture_output=True, text=True, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelError(f"resolvectl {' '.join(args)}: {e}") from None
        if proc.returncode != 0:
            raise KernelError(f"resolvectl {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
