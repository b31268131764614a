"""The System over the real kernel: the one place the concrete parts are chosen."""

from __future__ import annotations

from pathlib import Path

from appliance.kernel.netlink import NetlinkLinks
from appliance.kernel.nft import NftFirewall
from appliance.kernel.offload import KernelOffloads, WithFeatures
from appliance.kernel.sysctl import ProcFs, Sysctls
from appliance.kernel.system import System
from appliance.kernel.wireguard import choose_backend

SYSCTL_ORIGINALS = "sysctl-originals.json"


def real_system(backend: str, state_dir: Path) -> System:
    """backend: "kernel", "userspace" or "auto"; sysctl originals live in state_dir."""
    return System(
        wireguard=choose_backend(backend),
        links=NetlinkLinks(),
        firewall=NftFirewall(),
        # Netdev features (UDP GRO forwarding) are saved and restored as sysctls are.
        sysctls=Sysctls(WithFeatures(ProcFs()), state_dir / SYSCTL_ORIGINALS),
        offloads=KernelOffloads(),
    )
