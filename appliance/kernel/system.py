"""The system as meshpi sees it: one WireGuard backend, links, firewall, sysctls.

`read()` reports the current State of everything in a Scope; `apply()` carries out
a list of changes, logging each one once. The parts are Protocols (base.py), so the
same System runs on the real kernel and on the in-memory fake (fake.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby

from appliance.core.changes import (
    AddAddress,
    AddPeer,
    AddRoute,
    AddRule,
    Change,
    ConfigureDevice,
    CreateInterface,
    DeleteInterface,
    DeleteNft,
    RemoveAddress,
    RemovePeer,
    RemoveRoute,
    RemoveRule,
    ReplaceNft,
    RestoreSysctl,
    SetMtu,
    SetSysctl,
    UpdatePeer,
)
from appliance.core.model import Device, HostFacts, NftRuleset, Scope, State
from appliance.kernel.base import Firewall, KernelError, Links, WgUpdate, WireGuardBackend
from appliance.kernel.offload import NoOffloads, Offloads
from appliance.kernel.sysctl import Sysctls

log = logging.getLogger(__name__)

_WG_CHANGES = (ConfigureDevice, AddPeer, UpdatePeer, RemovePeer)
FORWARDING_KEYS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


class ApplyError(KernelError):
    """Some changes failed; the others were applied. `.applied` lists the ones that took."""

    def __init__(self, failures: ExceptionGroup[Exception], applied: list[Change]) -> None:
        self.failures, self.applied = failures, applied
        lines = "; ".join(str(e) for e in failures.exceptions)
        super().__init__(f"{len(failures.exceptions)} change(s) failed: {lines}")


@dataclass
class System:
    wireguard: WireGuardBackend
    links: Links
    firewall: Firewall
    sysctls: Sysctls
    offloads: Offloads = field(default_factory=NoOffloads)

    # -- reading -------------------------------------------------------------

    def read(self, scope: Scope) -> State:
        wg = self.wireguard.read(scope.interface)
        device = None
        if wg is not None:
            mtu = self.links.mtu(scope.interface) or 0
            device = Device(scope.interface, wg.private_key, wg.listen_port, wg.fwmark, mtu)
        digest = self.firewall.digest()
        return State(
            device=device,
            peers=wg.peers if wg is not None else {},
            addresses=self.links.addresses(scope.interface) if wg is not None else frozenset(),
            routes=self.links.routes(scope),
            rules=self.links.rules(scope),
            sysctls=self.sysctls.managed(),
            nft=None if digest is None else NftRuleset(digest),
        )

    def facts(self, scope: Scope) -> HostFacts:
        uplinks = self.offloads.uplinks(exclude=scope.interface)
        return HostFacts(
            connected=self.links.connected(exclude=scope.interface),
            forwarding_preexisting=any(self.sysctls.before_meshpi(k) == "1" for k in FORWARDING_KEYS),
            uplinks=uplinks,
            flowtable=self.offloads.flowtable(),
            udp_gro=tuple(dev for dev in uplinks if self.offloads.udp_gro_capable(dev)),
        )

    # -- applying ------------------------------------------------------------

    def apply(self, changes: Sequence[Change]) -> list[Change]:
        """Apply in order, keep going past failures, and log each applied change once.

        Consecutive WireGuard changes go to the device as one transaction (one
        round trip for a thousand peers). Raises ApplyError listing every failure."""
        applied: list[Change] = []
        failures: list[Exception] = []
        for batch in _batches(changes):
            try:
                self._apply_batch(batch)
            except KernelError as e:
                failures.append(e)
                log.error("failed: %s: %s", "; ".join(map(str, batch)), e)
                continue
            for change in batch:
                log.info("[#] %s", change)
            applied += batch
        if failures:
            raise ApplyError(ExceptionGroup("applying changes", failures), applied)
        return applied

    def _apply_batch(self, batch: list[Change]) -> None:
        first = batch[0]
        if isinstance(first, _WG_CHANGES):
            self._configure_wireguard(batch)
            return
        (change,) = batch
        match change:
            case CreateInterface(name, mtu):
                self.wireguard.create(name)
                self.links.set_mtu_up(name, mtu)
            case SetMtu(name, mtu):
                self.links.set_mtu_up(name, mtu)
            case DeleteInterface(name):
                self.links.delete_link(name)
            case AddAddress(dev, address):
                self.links.add_address(dev, address)
            case RemoveAddress(dev, address):
                self.links.remove_address(dev, address)
            case AddRoute(route):
                self.links.add_route(route)
            case RemoveRoute(route):
                self.links.remove_route(route)
            case AddRule(rule):
                self.links.add_rule(rule)
            case RemoveRule(rule):
                self.links.remove_rule(rule)
            case SetSysctl(key, value):
                self.sysctls.set(key, value)
            case RestoreSysctl(key):
                self.sysctls.restore(key)
            case ReplaceNft(ruleset):
                self.firewall.replace(ruleset)
            case DeleteNft():
                self.firewall.delete()
            case _:
                raise TypeError(f"unknown change {change!r}")

    def _configure_wireguard(self, batch: list[Change]) -> None:
        device: ConfigureDevice | None = None
        upsert, remove = [], []
        for change in batch:
            match change:
                case ConfigureDevice():
                    device = change
                case AddPeer(_, peer) | UpdatePeer(_, peer):
                    upsert.append(peer)
                case RemovePeer(_, key):
                    remove.append(key)
        update = WgUpdate(
            private_key=device.private_key if device else None,
            listen_port=device.listen_port if device else None,
            fwmark=device.fwmark if device else None,
            upsert=tuple(upsert),
            remove=tuple(remove),
        )
        self.wireguard.configure(batch[0].dev if not device else device.name, update)  # type: ignore[union-attr]


def _batches(changes: Sequence[Change]) -> Iterator[list[Change]]:
    """Runs of WireGuard changes on one device stay together; everything else is alone."""

    def key(indexed: tuple[int, Change]) -> object:
        i, change = indexed
        if isinstance(change, _WG_CHANGES):
            return ("wg", change.name if isinstance(change, ConfigureDevice) else change.dev)
        return i

    for _, group in groupby(enumerate(changes), key=key):
        yield [change for _, change in group]
