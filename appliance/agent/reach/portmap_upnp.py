"""UPnP-IGD through miniupnpc (miniupnp's own client: SSDP discovery, the device
description, SOAP calls to WANIPConnection).

Only an IGD whose control URL is on the default gateway is used: an SSDP answer from
any other host on the LAN (a spoofer, a second router) is not trusted with the
node's inbound port. miniupnpc raises a bare Exception carrying the UPnP error text
for every failure, so that is what is caught here, and only around its calls.
"""

from __future__ import annotations

import logging
import threading
from ipaddress import IPv4Address, ip_address
from typing import Any
from urllib.parse import urlsplit

import miniupnpc

from appliance.agent.reach.portmap_base import Lease, NotSpoken, PortMapError, Refused, Seen
from appliance.base.net import Endpoint

logger = logging.getLogger(__name__)

DISCOVER_MS = 1000
DESCRIPTION = "meshpi"
_ONLY_PERMANENT = "OnlyPermanentLeasesSupported"


class UpnpClient:
    name = "upnp"

    def __init__(self, gateway: IPv4Address, local: IPv4Address, cancel: threading.Event) -> None:
        self.gateway, self.local, self.cancel = gateway, local, cancel
        self._igd: Any = None  # a miniupnpc.UPnP with an IGD selected

    def _discover(self) -> Any:
        igd = miniupnpc.UPnP()
        igd.discoverdelay = DISCOVER_MS
        try:
            found = igd.discover()
            control_url = igd.selectigd()
        except Exception as exc:  # miniupnpc: "No UPnP device discovered" and the like
            raise NotSpoken(f"UPnP: no Internet Gateway Device answered: {exc}") from exc
        host = urlsplit(str(control_url)).hostname
        try:
            on_gateway = host is not None and ip_address(host) == self.gateway
        except ValueError:
            on_gateway = False
        if not on_gateway:
            raise NotSpoken(f"UPnP: the IGD found ({control_url!r}, of {found} devices) is not on "
                            f"the gateway {self.gateway}; not trusted")  # fmt: skip
        return igd

    def _call(self, what: str, call: Any, *args: Any) -> Any:
        """One SOAP action; a failed call drops the IGD, so the next action rediscovers it
        (a restarted router may serve its description on another port)."""
        if self._igd is None:
            self._igd = self._discover()
        try:
            return getattr(self._igd, call)(*args)
        except Exception as exc:  # miniupnpc raises Exception("<UPnP error text>")
            if str(exc) not in ("ConflictInMappingEntry", _ONLY_PERMANENT, "NoSuchEntryInArray"):
                self._igd = None
            raise PortMapError(f"UPnP: {what}: {exc}") from exc

    def _external_address(self) -> IPv4Address:
        text = self._call("GetExternalIPAddress", "externalipaddress")
        try:
            return IPv4Address(str(text))
        except ValueError as exc:
            raise PortMapError(f"UPnP: the gateway's external address {text!r} is not IPv4") from exc

    def _add(self, transport: str, external_port: int, internal_port: int, lifetime: int) -> int:
        args = (transport.upper(), str(self.local), internal_port, DESCRIPTION, "")
        try:
            self._call("AddPortMapping", "addportmapping", external_port, *args, lifetime)
            return lifetime
        except PortMapError as exc:
            if _ONLY_PERMANENT in str(exc) and lifetime:
                self._call("AddPortMapping", "addportmapping", external_port, *args, 0)
                return 0
            raise

    def map(self, transport: str, internal_port: int, external_port: int, lifetime: int) -> Lease:
        address = self._external_address()
        want = external_port or internal_port
        try:
            granted = self._add(transport, want, internal_port, lifetime)
        except PortMapError as exc:
            if "ConflictInMappingEntry" not in str(exc):
                raise Refused(str(exc)) from exc
            # Taken by another host: IGDv2 lets the router pick a free port. miniupnpc's
            # binding asks for no lease duration here (the lease is permanent): renewals
            # then re-add it on the port given, with the lifetime asked for.
            args = (transport.upper(), str(self.local), internal_port, DESCRIPTION, "")
            want = int(self._call("AddAnyPortMapping", "addanyportmapping", want, *args))
            granted = 0
        internal = Endpoint(self.local, internal_port)
        return Lease("upnp", transport, internal, Endpoint(address, want), granted, None)

    def probe(self, lease: Lease) -> Seen:
        address = self._external_address()
        try:
            entry = self._call("GetSpecificPortMappingEntry", "getspecificportmapping",
                               lease.external.port, lease.transport.upper())  # fmt: skip
        except PortMapError as exc:
            if "NoSuchEntryInArray" not in str(exc):
                raise
            entry = None
        # (internal host, internal port, description, enabled, lease left)
        present = entry is not None and (entry[0], entry[1]) == (str(self.local), lease.internal.port)
        return Seen(None, address, present)

    def unmap(self, lease: Lease) -> None:
        self._call("DeletePortMapping", "deleteportmapping", lease.external.port, lease.transport.upper())

    def close(self) -> None:
        self._igd = None
