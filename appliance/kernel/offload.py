"""The host's forwarding fast paths: what the kernel offers, and netdev features.

- `KernelOffloads` answers the planner's questions (HostFacts): does nft have
  flowtables here (nf_flow_table: Debian's arm64 kernel yes, many VM and
  container kernels no), which interfaces hold a default route, and which of
  them let `rx-udp-gro-forwarding` be changed.
- `WithFeatures` is a ProcSys that also reads and writes netdev features under
  keys `ethtool.<dev>.<feature>` (core/offload.py), so that Sysctls records a
  feature's value before meshpi changes it and restores it on `down`, exactly as
  it does for ip_forward.

Features go through the ethtool ioctl (pyroute2's IoctlEthtool, SIOCETHTOOL):
no ethtool binary is needed on the image. pyroute2.ethtool is imported when
first used, so an agent that never forwards does not load it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from appliance.core.model import MAIN_TABLE
from appliance.core.offload import FLOWTABLE, OFF, ON, parse_feature_key
from appliance.kernel.base import InterfaceNotFound, KernelError, ProcSys

if TYPE_CHECKING:
    from pyroute2.ethtool.ioctl import EthtoolFeaturesList

log = logging.getLogger(__name__)

# Checked (nft -c), never applied: the kernel validates the flowtable, loading
# nf_flow_table_inet if it can, then drops the whole transaction.
_PROBE = (
    f"table inet meshpi_probe {{\n"
    f"\tflowtable {FLOWTABLE} {{ hook ingress priority filter; devices = {{ lo }}; }}\n}}\n"
)


class Offloads(Protocol):
    def flowtable(self) -> bool:
        """Can table inet meshpi hold a flowtable on this kernel?"""

    def uplinks(self, exclude: str) -> tuple[str, ...]:
        """Interfaces (not `exclude`) holding a default route in main, v4 or v6."""

    def udp_gro_capable(self, ifname: str) -> bool:
        """Can rx-udp-gro-forwarding be changed on `ifname`?"""


class NoOffloads:
    """A host (or a fake) with no fast paths to offer."""

    def flowtable(self) -> bool:
        return False

    def uplinks(self, exclude: str) -> tuple[str, ...]:
        return ()

    def udp_gro_capable(self, ifname: str) -> bool:
        return False


class KernelOffloads:
    def __init__(self, nft: str = "nft", timeout: float = 30.0) -> None:
        self._nft, self._timeout = nft, timeout
        self._flowtable: bool | None = None  # a kernel's modules do not come and go: asked once

    def flowtable(self) -> bool:
        if self._flowtable is None:
            try:
                proc = subprocess.run([self._nft, "-c", "-f", "-"], input=_PROBE, capture_output=True,
                                      text=True, timeout=self._timeout, check=False,
                                      env={**os.environ, "LC_ALL": "C"})  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("cannot ask nft whether this kernel has flowtables: %s", exc)
                return False
            self._flowtable = proc.returncode == 0
            why = next(iter(proc.stderr.strip().splitlines()), "")
            log.info("nft flowtables (nf_flow_table): %s",
                     "available" if self._flowtable else f"not in this kernel: {why}")  # fmt: skip
        return self._flowtable

    def uplinks(self, exclude: str) -> tuple[str, ...]:
        from appliance.kernel.netlink_msgs import RTN_UNICAST
        from appliance.kernel.rtnl import Rtnl

        found: set[int] = set()
        try:
            with Rtnl() as rtnl:
                names = {link.index: link.name for link in rtnl.links()}
                for family in (socket.AF_INET, socket.AF_INET6):
                    for route in rtnl.routes(family):
                        if route.dst_len != 0 or route.type != RTN_UNICAST or route.table != MAIN_TABLE:
                            continue  # unicast default routes of the main table only
                        if route.oif is not None:
                            found.add(route.oif)
                        found.update(route.hops)
        except OSError as exc:
            raise KernelError(f"read default routes: {exc}") from exc
        return tuple(sorted(n for i in found if (n := names.get(i)) and n not in (exclude, "lo")))

    def udp_gro_capable(self, ifname: str) -> bool:
        from appliance.core.offload import UDP_GRO_FORWARDING

        try:
            features = _features(ifname)
        except KernelError as exc:
            log.debug("%s: no ethtool features: %s", ifname, exc)
            return False
        return UDP_GRO_FORWARDING in features and bool(features.is_available(UDP_GRO_FORWARDING))


def _ethtool(ifname: str) -> Any:
    from pyroute2.ethtool.ioctl import IoctlEthtool

    return IoctlEthtool(ifname)


@contextlib.contextmanager
def _opened(ifname: str, what: str) -> Iterator[Any]:
    """An ethtool handle on `ifname`, closed after; its errors as KernelErrors naming `what`."""
    from pyroute2.ethtool.ioctl import NoSuchDevice

    ethtool = _ethtool(ifname)
    try:
        yield ethtool
    except NoSuchDevice:
        raise InterfaceNotFound(f"ethtool {ifname}: no such interface") from None
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise InterfaceNotFound(f"ethtool {ifname}: no such interface") from None
        raise KernelError(f"{what}: {exc.strerror or exc}") from None
    finally:
        ethtool.close()


def _features(ifname: str) -> EthtoolFeaturesList:
    with _opened(ifname, f"ethtool {ifname}: cannot read features") as ethtool:
        features: EthtoolFeaturesList = ethtool.get_features()
        return features


class FeatureNotFound(KernelError, LookupError):
    """The device has no such feature (an older kernel)."""


class WithFeatures:
    """`inner` for sysctls, the ethtool ioctl for `ethtool.<dev>.<feature>` keys."""

    def __init__(self, inner: ProcSys) -> None:
        self._inner = inner

    def read(self, key: str) -> str:
        parsed = parse_feature_key(key)
        if parsed is None:
            return self._inner.read(key)
        dev, feature = parsed
        features = _features(dev)
        if feature not in features:
            raise FeatureNotFound(f"ethtool {dev}: no feature {feature!r} in this kernel")
        return ON if features[feature] else OFF

    def write(self, key: str, value: str) -> None:
        parsed = parse_feature_key(key)
        if parsed is None:
            self._inner.write(key, value)
            return
        dev, feature = parsed
        if value not in (ON, OFF):
            raise KernelError(f"ethtool {dev} {feature}: value {value!r} is not on or off")
        from pyroute2.ethtool.ioctl import EthtoolError

        with _opened(dev, f"ethtool {dev} {feature} {value}") as ethtool:
            features = ethtool.get_features()
            if feature not in features:
                raise FeatureNotFound(f"ethtool {dev}: no feature {feature!r} in this kernel")
            features[feature] = value == ON
            # The ioctl answers 1 (ETHTOOL_F_WISH) when the driver kept another value:
            # pyroute2 raises then, and the read below says what holds.
            with contextlib.suppress(EthtoolError):
                ethtool.set_features(features)
        now = self.read(key)
        if now != value:
            raise KernelError(f"ethtool {dev} {feature} {value}: the driver keeps it {now}")
