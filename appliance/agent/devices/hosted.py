"""Devices this node hosts: stock WireGuard clients (a phone with the WireGuard app)
that import a config from a QR code, run no agent and have no machine key.

This node is their hub: each is a WireGuard peer of this node only. Control gives
it mesh addresses (op `device`) and serves them to every peer as a route through
this node; NAT and the forward chain let it reach the home LAN and, with "all
traffic through home", the internet. Its private key is made here, put in the
config shown once, and forgotten: `devices.json` keeps the public half only.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from appliance.agent.control.client import ControlError, ControlRefused
from appliance.agent.localapi.status import detect_lan
from appliance.base.errors import MeshpiError
from appliance.base.files import atomic_write
from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import IPAddress, IPNetwork
from appliance.core.model import HostedDevice
from appliance.core.wgquick import ClientConfig, allowed_ips
from appliance.wire.fields import ConfigError, Fields, load_json, parse_address, parse_public_key, parse_str

if TYPE_CHECKING:
    from appliance.agent.control.link import ControlLink
    from appliance.agent.inputs import Inputs
    from appliance.core.model import Connected


class DeviceHost(Protocol):
    """What hosting devices needs of the agent (the agent is one)."""

    @property
    def link(self) -> ControlLink | None: ...
    @property
    def devices_file(self) -> Path: ...
    def applied(self) -> Inputs | None: ...
    def connected(self) -> tuple[Connected, ...]: ...
    def devices_changed(self, devices: tuple[HostedDevice, ...]) -> None: ...


log = logging.getLogger(__name__)

MODES = ("all", "lan")
_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253})(?::(\d{1,5}))?$")


class DeviceError(MeshpiError):
    """A refusal the caller may see, with the HTTP status that fits it."""


@dataclass(frozen=True)
class DeviceEntry:
    id: str
    name: str
    public_key: PublicKey
    addresses: tuple[IPAddress, ...]
    mode: str
    created: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "public_key": str(self.public_key),
            "addresses": [str(a) for a in self.addresses],
            "mode": self.mode,
            "created": self.created,
        }

    def hosted(self) -> HostedDevice:
        return HostedDevice(self.name, self.public_key, self.addresses)


def load_devices(path: Path) -> tuple[DeviceEntry, ...]:
    if not path.exists():
        return ()
    doc = load_json(path)
    if not isinstance(doc, list):
        raise ConfigError(str(path), "(top level)", doc, "must be a list")
    entries = []
    for i, item in enumerate(doc):
        f = Fields(str(path), f"[{i}]", item)
        entries.append(
            DeviceEntry(
                id=f.require("id", parse_str),
                name=f.require("name", parse_str),
                public_key=f.require("public_key", parse_public_key),
                addresses=f.get_list("addresses", parse_address),
                mode=f.require("mode", _mode),
                created=f.require("created", _seconds),
            )
        )
        f.done()
    return tuple(entries)


def _mode(value: object) -> str:
    if value not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}")
    return str(value)


def endpoint_text(value: str, default_port: int) -> str:
    """host[:port], [v6][:port] or a name: what the phone dials. The port defaults
    to this node's listen port (the router forwards the same port)."""
    m = _HOST.match(value.strip())
    if m is None:
        raise ValueError("must be host[:port], e.g. home.example.org:51820 or 203.0.113.7")
    host, port = m.group(1), int(m.group(2) or default_port)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (1-65535)")
    return f"{host}:{port}"


class Devices:
    """The LocalAPI's /v1/devices, on top of the agent and its control link."""

    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self.path = agent.devices_file
        self._lock = threading.Lock()

    def listing(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in load_devices(self.path)]

    def add(self, body: object) -> dict[str, Any]:
        agent, link = self.agent, self.agent.link
        inputs = agent.applied()
        if link is None or inputs is None:
            raise DeviceError(409, "devices need a mesh: log in to control first (meshpi up or create-mesh)")
        f = Fields("request", "", body)
        name = f.require("name", _device_name)
        mode = f.get("mode", _mode, "all")
        endpoint = f.get("endpoint", parse_str, None)
        dns = f.get_list("dns", lambda v: str(parse_address(v)))
        f.done()
        netmap = inputs.netmap
        if "dns" not in f.obj and netmap.dns is not None:
            # This node's resolver, through the tunnel: mesh names, split DNS, and
            # no query to whatever network the phone is on ("dns": [] for none).
            dns = tuple(str(a) for a in netmap.self_node.addresses)
        prefs = inputs.prefs
        if endpoint is None:
            if not prefs.advertise_endpoints:
                raise DeviceError(400, "request: endpoint: is required: the public address or name of this "
                                       "node (and the port the router forwards to it)")  # fmt: skip
            endpoint = str(prefs.advertise_endpoints[0])
        try:
            endpoint = endpoint_text(endpoint, prefs.listen_port)
        except ValueError as e:
            raise DeviceError(400, f"request: endpoint: {endpoint!r} {e}") from None
        lan = _lan_prefixes(agent) if mode == "lan" else []
        key = PrivateKey.generate()
        with self._lock:
            entries = load_devices(self.path)
            if any(d.name == name for d in entries):
                raise DeviceError(409, f"there is already a device named {name!r}")
            answer = self._control(link, {"action": "add", "name": name, "public_key": str(key.public_key())})
            addresses = tuple(parse_address(a) for a in answer["addresses"])
            entry = DeviceEntry(secrets.token_hex(4), name, key.public_key(), addresses, mode, time.time())
            self._save([*entries, entry])
        log.info("hosting device %s (%s, %s), %s traffic", name, *map(str, addresses),
                 "all" if mode == "all" else "mesh and LAN")  # fmt: skip
        config = ClientConfig(
            private_key=key,
            prefixes=entry.hosted().prefixes,
            hub_key=netmap.self_node.public_key,
            endpoint=endpoint,
            allowed_ips=allowed_ips(mode, netmap.mesh, lan),
            mtu=prefs.mtu,
            dns=dns,
        )
        shown = entry.to_json()
        if answer.get("dns_name") and netmap.dns is not None:
            shown["dns_name"] = netmap.dns.fqdn(str(answer["dns_name"]))
        return {"device": shown, "config": config.render()}

    def remove(self, device_id: str) -> dict[str, Any]:
        link = self.agent.link
        with self._lock:
            entries = load_devices(self.path)
            entry = next((d for d in entries if d.id == device_id), None)
            if entry is None:
                raise DeviceError(404, f"no device with id {device_id!r}")
            if link is not None:
                try:
                    self._control(link, {"action": "remove", "public_key": str(entry.public_key)})
                except DeviceError as e:
                    if e.status != 404:  # control has already forgotten it: fine
                        raise
            self._save([d for d in entries if d.id != device_id])
        log.info("no longer hosting device %s (%s)", entry.name, entry.public_key.short)
        return {"detail": f"device {entry.name} removed; its key no longer works"}

    def _save(self, entries: list[DeviceEntry]) -> None:
        """Stored for the next start, and handed to the loop: the kernel follows."""
        atomic_write(self.path, json.dumps([d.to_json() for d in entries], indent=1) + "\n")
        self.agent.devices_changed(tuple(d.hosted() for d in entries))

    @staticmethod
    def _control(link: Any, body: dict[str, Any]) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = link.device(body)
        except ControlRefused as e:
            raise DeviceError(e.status if 400 <= e.status < 500 else 502, f"control: {e.message}") from None
        except ControlError as e:
            raise DeviceError(503, f"control is not reachable: {e}") from None
        return answer


def _device_name(value: object) -> str:
    name = parse_str(value).strip()
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise ValueError("must be a name of 1-64 printable characters")
    return name


def _lan_prefixes(agent: DeviceHost) -> list[IPNetwork]:
    lan = detect_lan(agent.connected())
    return [ip_network(p) for p in lan["prefixes"]] if lan else []


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number of seconds")
    return float(value)
