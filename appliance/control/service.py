"""The coordination server's operations, apart from HTTP and sealing (app.py).

Each op takes the caller's machine key (already authenticated by the sealed
transport) and the request body (parsed in service_requests.py), and returns
the response body or raises ApiError. Store calls go to one database thread,
so SQLite's connection stays on its thread and a slow PostgreSQL round trip
never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from appliance.base.keys import PublicKey
from appliance.control import limits, mapper, store_devices
from appliance.control.autoapprove import AUTO_APPROVE, auto_approved
from appliance.control.mapcache import MapCache
from appliance.control.notify import VersionWatch
from appliance.control.service_requests import (
    ApiError,
    fields,
    parse_device,
    parse_map,
    parse_register,
    parse_update,
    registered,
)
from appliance.control.store import Store
from appliance.control.store_records import (
    AuthKeyError,
    Changes,
    DeltaUnavailable,
    MeshFull,
    NameInvalid,
    NodeExists,
    NodeRecord,
    NodeState,
    NotFound,
    TooManyPending,
    utcnow,
)
from appliance.wire.dnsname import DEFAULT_DOMAIN, DnsConfig
from appliance.wire.netmap import EXIT_ROUTES

log = logging.getLogger(__name__)
T = TypeVar("T")

_NO_TAGS: tuple[str, ...] = ()
MAP_TIMEOUT = 50.0  # long-poll; under the usual 60 s proxy idle timeout
SEEN_FLUSH = 10.0  # seconds between batched last_seen writes
MAINTENANCE_EVERY = 300.0  # seconds between rounds of pruning
# Tombstones live this long (seconds): a node away longer gets a full map, so the
# table stays bounded however often keys rotate or nodes leave.
TOMBSTONE_KEEP = 3600.0


class Metrics:
    def __init__(self) -> None:
        self.map_updates_sent = 0
        self.full_maps_sent = 0  # of those, full maps (after a restart: only agents that restarted too)
        self.update_latency_sum = 0.0  # change published -> response written, seconds
        self.update_latency_count = 0
        self.online: dict[int, int] = {}  # node id -> open long-polls


class ControlService:
    def __init__(
        self,
        open_db: Callable[[], Store],
        map_timeout: float = MAP_TIMEOUT,
        batch: float = 0.1,
        now: Callable[[], datetime] = utcnow,
        maintenance_every: float = MAINTENANCE_EVERY,
        tombstone_keep: float = TOMBSTONE_KEEP,
        pending_caps: tuple[int, int] = (limits.PENDING_PER_SOURCE, limits.PENDING_TOTAL),
        dns_domain: str = DEFAULT_DOMAIN,
    ) -> None:
        self.dns = DnsConfig(dns_domain)  # sent in every map (capver 3)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshpi-db")
        self.store: Store = self._executor.submit(open_db).result()
        self.map_timeout, self.now = map_timeout, now
        self.watch = VersionWatch(self.store.mesh_version(), batch)
        self.metrics = Metrics()
        self._published_at: dict[int, float] = {}
        # last_seen changes on every poll: kept here, written in one batch now and
        # then, so thousands of polls cost no fsync each.
        self._seen: dict[int, datetime] = {}
        self._flusher: asyncio.Task[None] | None = None
        # Every node, by machine key, as of `_nodes_version`: a poll needs its own
        # record, and a full map needs all of them. This process makes every change
        # (through `changed`), so it keeps the copy current with one delta query
        # per change instead of thousands of lookups per change.
        self._nodes_version = self.store.mesh_version()
        self._nodes = {r.machine_key.raw: r for r in self.store.list_nodes()}
        # The changes since version v, shared by every poll that held v.
        self._deltas: dict[int, asyncio.Future[Changes]] = {}
        self.maps = MapCache()  # full maps: the peer list encoded once per version (mapcache.py)
        self.maintenance_every, self.tombstone_keep = maintenance_every, tombstone_keep
        self.pending_caps = pending_caps
        # (monotonic time, mesh version) at each maintenance round: tombstones up to
        # the version of TOMBSTONE_KEEP ago go.
        self._version_at: list[tuple[float, int]] = []
        self._maintainer: asyncio.Task[None] | None = None
        self.maintenance_rounds = 0

    async def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kw))

    async def changed(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A store change: run it, then let the long-polls know the new version."""
        result = await self.db(fn, *args, **kw)
        if isinstance(result, NodeRecord) and result.version <= self._nodes_version:
            return result  # nothing new (agents repeat their offers): the copy has it already
        version = await self._refresh()
        if version > self.watch.version:
            self._published_at.setdefault(version, time.monotonic())
        self.watch.bump(version)
        return result

    async def _refresh(self) -> int:
        """Bring the node copy up to the store's version; returns that version."""
        try:
            changes = await self.db(self.store.changes_since, self._nodes_version)
        except DeltaUnavailable:
            version = await self.db(self.store.mesh_version)
            nodes = await self.db(self.store.list_nodes)
            self._nodes = {r.machine_key.raw: r for r in nodes}
        else:
            version = changes.version
            updated = {r.machine_key.raw: r for r in changes.nodes}
            gone = {t.public_key for t in changes.tombstones}
            # O(mesh), so only when a key went: agents repeat their offers on every
            # reconnect, and 5,000 of those (no change each) must not cost 5,000^2.
            for machine, record in list(self._nodes.items()) if gone else ():
                if machine not in updated and record.node_key in gone:
                    del self._nodes[machine]  # removed (a rotation comes back in `updated`)
            self._nodes.update(updated)
        if version != self._nodes_version:
            self._nodes_version = version
            self._deltas.clear()
        return version

    def start(self) -> None:
        """Start the scheduled pruning (from a running event loop)."""
        if self._maintainer is None:
            self._maintainer = asyncio.get_running_loop().create_task(self._maintain_forever())

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self.maintenance_every)
            try:
                await self.maintain()
            except Exception:  # a failed round must not end the schedule; the next one retries
                log.exception("pruning failed")

    async def maintain(self) -> None:
        """One round: forget pending registrations nobody approved within PENDING_TTL,
        and tombstones older than `tombstone_keep` (their nodes get full maps)."""
        dropped = await self.db(self.store.prune_pending, self.now() - limits.PENDING_TTL)
        if dropped:
            log.info("forgot %d registrations nobody approved within %s", dropped, limits.PENDING_TTL)
        now = time.monotonic()
        self._version_at.append((now, self.watch.version))
        old = [v for t, v in self._version_at if now - t >= self.tombstone_keep]
        if old:
            pruned = await self.db(self.store.prune_tombstones, old[-1])
            self._version_at = [(t, v) for t, v in self._version_at if v > old[-1]]
            if pruned:
                log.info("pruned %d tombstones up to version %d", pruned, old[-1])
        self.maintenance_rounds += 1

    def close(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
        if self._flusher is not None:
            self._flusher.cancel()
        seen, self._seen = self._seen, {}
        self._executor.submit(self.store.touch_last_seen_many, seen).result()
        self._executor.submit(self.store.close).result()
        self._executor.shutdown()

    async def _flush_seen(self) -> None:
        while True:
            await asyncio.sleep(SEEN_FLUSH)
            seen, self._seen = self._seen, {}
            await self.db(self.store.touch_last_seen_many, seen)

    def is_approved(self, machine_raw: bytes) -> bool:
        """Is this machine key an approved node's (the in-memory copy; no query)?"""
        node = self._nodes.get(machine_raw)
        return node is not None and node.state is NodeState.APPROVED

    async def _node(self, machine: PublicKey) -> NodeRecord:
        node = self._nodes.get(machine.raw)
        if node is None:
            # Pending registrations are not in the copy (no version carried them).
            node = await self.db(self.store.get_node_by_machine_key, machine)
            if node is None:
                raise ApiError(403, "this machine is not registered: register first")
        return node

    async def _approved(self, machine: PublicKey, what: str) -> NodeRecord:
        node = await self._node(machine)
        if node.state is not NodeState.APPROVED:
            raise ApiError(403, f"waiting for an admin to approve this node: a pending node cannot {what}")
        return node

    # --- ops ------------------------------------------------------------------------

    async def register(self, machine: PublicKey, body: object, source: str | None = None) -> dict[str, Any]:
        node_key, hostname, auth_key = parse_register(body)
        node = await self.db(self.store.get_node_by_machine_key, machine)
        if node is not None:
            if node.node_key != node_key and node.state is not NodeState.APPROVED:
                raise ApiError(403, "waiting for an admin to approve this node: "
                                    "a pending node cannot change its node key")  # fmt: skip
            if node.node_key != node_key:
                # Announced by the machine key, so it is the node's own doing.
                try:
                    node = await self.changed(self.store.rotate_node_key, node.id, node_key)
                except NodeExists as e:  # another node's key: refused, not a 500
                    raise ApiError(409, str(e)) from None
                log.info("node %s rotated its node key to %s", node.name, node_key.short)
            return registered(node, self.now())
        state, tags = NodeState.PENDING, _NO_TAGS
        if auth_key is not None:
            try:
                key = await self.db(self.store.use_preauth_key, auth_key, self.now())
            except AuthKeyError as e:
                raise ApiError(403, f"auth key refused: {e}") from None
            state, tags = NodeState.APPROVED, key.tags
        try:
            if state is NodeState.APPROVED:
                node = await self.changed(
                    self.store.register_node, machine, node_key, hostname, state, tags, now=self.now()
                )
            else:
                # No address, no version, nobody woken: that waits for approval.
                node = await self.db(
                    self.store.register_node, machine, node_key, hostname, state, tags, now=self.now(),
                    source=limits.source_key(source), pending_caps=self.pending_caps,
                )  # fmt: skip
        except TooManyPending as e:
            raise ApiError(429, f"{e}: try again later, or register with a pre-auth key") from None
        except (NodeExists, MeshFull) as e:
            raise ApiError(409, str(e)) from None
        log.info("registered %s %s as %s", node.name, node.addresses or "(no address yet)", node.state.value)
        return registered(node, self.now())

    async def update(self, machine: PublicKey, body: object) -> dict[str, Any]:
        # Who first, then the counts, then parsing: a refused request costs no
        # parsing of 40,000 routes.
        node = await self._approved(machine, "update its endpoints or routes")
        offer = parse_update(body, self.store.mesh)
        routes = list(offer.routes)
        if offer.exit_node:
            routes += [r for r in EXIT_ROUTES if r not in routes]
        approved = auto_approved(node.tags, node.approved_routes, routes)
        if approved is not None:  # approved first: peers get the routes with the advertisement
            await self.changed(self.store.approve_routes, node.id, approved)
            log.info("node %s: routes %s approved by its key's tag %s", node.name,
                     ", ".join(map(str, approved)), AUTO_APPROVE)  # fmt: skip
        await self.changed(self.store.set_endpoints, node.id, offer.endpoints)
        await self.changed(self.store.set_advertised_routes, node.id, routes)
        if offer.lan_dns != node.advertised_dns:
            await self.changed(self.store.set_advertised_dns, node.id, offer.lan_dns)
        return {}

    async def map(self, machine: PublicKey, body: object) -> dict[str, Any]:
        version, capver = parse_map(body)
        node = await self._approved(machine, "get a map")
        if node.key_expired(self.now()):
            raise ApiError(403, "this node's key has expired: log in again")
        online = self.metrics.online
        online[node.id] = online.get(node.id, 0) + 1
        try:
            self._seen[node.id] = self.now()
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_seen())
            return await self._map(node, version, capver)
        finally:
            online[node.id] -= 1
            if not online[node.id]:
                del online[node.id]

    async def _map(self, node: NodeRecord, version: int | None, capver: int) -> dict[str, Any]:
        if version is not None and version > max(self._nodes_version, self.watch.version):
            # A version this control never reached (its database restored from an older
            # copy, or a new control at the old address): nothing to hold or patch; a full map.
            log.info("node %s asked from version %d, ahead of the mesh's %d: a full map",
                     node.id, version, self._nodes_version)  # fmt: skip
            version = None
        if version is not None:
            current = await self.watch.wait(version, self.map_timeout)
            if current <= version:
                return {"version": version, "keepalive": True}
            shared = self._deltas.get(version)
            if shared is None:
                loop = asyncio.get_running_loop()
                shared = self._deltas[version] = loop.create_task(self.db(self.store.changes_since, version))
            try:
                changes = await asyncio.shield(shared)
            except DeltaUnavailable:
                pass
            else:
                self._sent(changes.version)
                return {
                    "version": changes.version,
                    "delta": mapper.delta(node, changes, self.now(), capver, self.dns),
                }
        current, records = self._nodes_version, list(self._nodes.values())
        me = next((r for r in records if r.id == node.id), None)
        if me is None:
            raise ApiError(403, "this node was removed")
        self._sent(current)
        self.metrics.full_maps_sent += 1
        full = self.maps.full(self.store.mesh, me, current, records, self.now(), capver, self.dns)
        return {"version": current, "full": full}

    def _sent(self, version: int) -> None:
        self.metrics.map_updates_sent += 1
        published = self._published_at.get(version)
        if published is not None:
            self.metrics.update_latency_sum += time.monotonic() - published
            self.metrics.update_latency_count += 1
        if len(self._published_at) > 1024:  # forget old versions
            for v in sorted(self._published_at)[:512]:
                del self._published_at[v]

    async def device(self, machine: PublicKey, body: object) -> dict[str, Any]:
        """Host a stock WireGuard client (`add`), rename it, or stop hosting it (`remove`)."""
        action, public_key, name = parse_device(body)
        node = await self._approved(machine, "host devices")
        try:
            if action == "add":
                if name is None:
                    raise ApiError(400, "request: body.name: a device needs a name")
                node = await self.changed(self.store.add_device, node.id, name, public_key)
                device = store_devices.find(node, public_key)
                log.info("node %s hosts device %s (%s, %s)", node.name, name, device.ipv4, device.ipv6)
                return {"addresses": [str(device.ipv4), str(device.ipv6)], "dns_name": device.dns_name}
            if action == "rename" and name is not None:
                await self.changed(self.store.rename_device, node.id, public_key, name)
                log.info("node %s renamed device %s to %s", node.name, public_key.short, name)
                return {}
            if action == "remove":
                await self.changed(self.store.remove_device, node.id, public_key)
                log.info("node %s no longer hosts device %s", node.name, public_key.short)
                return {}
        except (NodeExists, MeshFull) as e:
            raise ApiError(409, str(e)) from None
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except NameInvalid as e:
            raise ApiError(400, f"request: body.name: {e}") from None
        raise ApiError(400, f"request: body.action: {action!r} is not add, rename (with a name) or remove")

    async def logout(self, machine: PublicKey, body: object) -> dict[str, Any]:
        fields(body).done()
        node = await self._node(machine)
        await self.changed(self.store.remove_node, node.id)
        log.info("node %s logged out and was removed", node.name)
        return {}
