"""The admin HTTP API (for `meshpi-control` and the web UI), and /metrics.

Admin calls carry `Authorization: Bearer <token>`; the token lives in the
server's state directory (mode 0600), so whoever can read it is the admin.
Every change goes through ControlService.changed, so long-polls hear of it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from aiohttp import web

from appliance.control.service import ControlService
from appliance.control.store_records import NodeRecord, NotFound, PreauthKey, StoreError
from appliance.wire.fields import (
    ConfigError,
    Fields,
    int_range,
    parse_bool,
    parse_network,
    parse_str,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE: web.AppKey[ControlService] = web.AppKey("service", ControlService)
TOKEN: web.AppKey[str] = web.AppKey("admin_token", str)
# More /metrics lines, from parts of the server that keep their own counters (the relay).
METRIC_SOURCES: web.AppKey[list[Callable[[], list[str]]]] = web.AppKey("metric_sources", list)


def node_json(node: NodeRecord, online: bool) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name,
        "state": node.state.value,
        "addresses": [str(a) for a in node.addresses],
        "node_key": str(node.node_key),
        "machine_key": str(node.machine_key),
        "tags": list(node.tags),
        "advertised_routes": [str(r) for r in node.advertised_routes],
        "approved_routes": [str(r) for r in node.approved_routes],
        "endpoints": [str(e) for e in node.endpoints],
        "online": online,
        "last_seen": node.last_seen.isoformat() if node.last_seen else None,
        "key_expiry": node.key_expiry.isoformat() if node.key_expiry else None,
        "expiry_exempt": node.expiry_exempt,
        "devices": [d.to_json() for d in node.devices],
        "dns_name": node.dns_name,
        "advertised_dns": None if node.advertised_dns is None else node.advertised_dns.to_json(),
    }


def key_json(key: PreauthKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "reusable": key.reusable,
        "expires_at": key.expires_at.isoformat(),
        "tags": list(key.tags),
        "used": key.used,
        "revoked": key.revoked,
    }


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/admin/"):
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {request.app[TOKEN]}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return web.json_response({"error": "admin token required"}, status=401)
        try:
            return await handler(request)
        except (ConfigError, ValueError) as e:
            return web.json_response({"error": str(e)}, status=400)
        except NotFound as e:
            return web.json_response({"error": str(e)}, status=404)
        except StoreError as e:
            return web.json_response({"error": str(e)}, status=409)
    return await handler(request)


def _id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit():
        raise web.HTTPBadRequest(text=f"{text!r} is not a node id")
    return int(text)


async def _body(request: web.Request) -> Fields:
    try:
        return Fields("request", "", await request.json())
    except ValueError as e:
        raise web.HTTPBadRequest(text=f"body is not JSON: {e}") from None


async def list_nodes(request: web.Request) -> web.Response:
    s = request.app[SERVICE]
    nodes = await s.db(s.store.list_nodes)
    return web.json_response([node_json(n, n.id in s.metrics.online) for n in nodes])


def _node_change(change: str) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        s = request.app[SERVICE]
        fn = {
            "approve": s.store.approve_node,
            "expire": s.store.expire_node_key,
        }[change]
        node = await s.changed(fn, _id(request))
        return web.json_response(node_json(node, node.id in s.metrics.online))

    return handle


async def set_exempt(request: web.Request) -> web.Response:
    s = request.app[SERVICE]
    f = await _body(request)
    exempt = f.require("exempt", parse_bool)
    f.done()
    node = await s.changed(s.store.set_expiry_exempt, _id(request), exempt)
    return web.json_response(node_json(node, node.id in s.metrics.online))


async def rename_node(request: web.Request) -> web.Response:
    """`{"name": str}`: the node's name and DNS label follow; peers hear it like any change."""
    s = request.app[SERVICE]
    f = await _body(request)
    name = f.require("name", parse_str)
    f.done()
    node = await s.changed(s.store.rename_node, _id(request), name)
    return web.json_response(node_json(node, node.id in s.metrics.online))


async def remove_node(request: web.Request) -> web.Response:
    s = request.app[SERVICE]
    await s.changed(s.store.remove_node, _id(request))
    return web.json_response({})


async def approve_routes(request: web.Request) -> web.Response:
    s = request.app[SERVICE]
    f = await _body(request)
    routes = f.get_list("approved_routes", parse_network)
    f.done()
    node = await s.changed(s.store.approve_routes, _id(request), routes)
    return web.json_response(node_json(node, node.id in s.metrics.online))


async def list_keys(request: web.Request) -> web.Response:
    s = request.app[SERVICE]
    return web.json_response([key_json(k) for k in await s.db(s.store.list_preauth_keys)])


async def create_key(request: web.Request) -> web.Response:
    s = request.app[SERVICE]
    f = await _body(request)
    reusable = f.get("reusable", parse_bool, False)
    seconds = f.get("expires_in", int_range(60, 10 * 365 * 86400), 3600)
    tags = f.get_list("tags", parse_str)
    f.done()
    key, secret = await s.db(s.store.create_preauth_key, reusable, s.now() + timedelta(seconds=seconds), tags)
    # The only time the secret is ever shown.
    return web.json_response({**key_json(key), "key": secret}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    s = request.app[SERVICE]
    return web.json_response(key_json(await s.db(s.store.revoke_preauth_key, _id(request))))


async def metrics(request: web.Request) -> web.Response:
    s = request.app[SERVICE]
    nodes = await s.db(s.store.list_nodes)
    m = s.metrics
    lines = [
        "# HELP meshpi_nodes Registered nodes, by state.",
        "# TYPE meshpi_nodes gauge",
        *(
            f'meshpi_nodes{{state="{state}"}} {sum(1 for n in nodes if n.state.value == state)}'
            for state in ("approved", "pending")
        ),
        "# HELP meshpi_nodes_online Nodes with a map long-poll open.",
        "# TYPE meshpi_nodes_online gauge",
        f"meshpi_nodes_online {len(m.online)}",
        "# HELP meshpi_map_updates_sent_total Map responses carrying a full map or a delta.",
        "# TYPE meshpi_map_updates_sent_total counter",
        f"meshpi_map_updates_sent_total {m.map_updates_sent}",
        "# HELP meshpi_full_maps_sent_total Map responses carrying a full map.",
        "# TYPE meshpi_full_maps_sent_total counter",
        f"meshpi_full_maps_sent_total {m.full_maps_sent}",
        "# HELP meshpi_map_update_latency_seconds From a change to a node being sent it.",
        "# TYPE meshpi_map_update_latency_seconds summary",
        f"meshpi_map_update_latency_seconds_sum {m.update_latency_sum:.6f}",
        f"meshpi_map_update_latency_seconds_count {m.update_latency_count}",
        "# HELP meshpi_mesh_version The mesh's change counter.",
        "# TYPE meshpi_mesh_version gauge",
        f"meshpi_mesh_version {s.watch.version}",
        *(line for source in request.app.get(METRIC_SOURCES, ()) for line in source()),
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/v1/nodes", list_nodes)
    app.router.add_post("/admin/v1/nodes/{id}/approve", _node_change("approve"))
    app.router.add_post("/admin/v1/nodes/{id}/expire", _node_change("expire"))
    app.router.add_post("/admin/v1/nodes/{id}/exempt", set_exempt)
    app.router.add_post("/admin/v1/nodes/{id}/routes", approve_routes)
    app.router.add_delete("/admin/v1/nodes/{id}", remove_node)
    app.router.add_post("/admin/v1/nodes/{id}/rename", rename_node)
    app.router.add_get("/admin/v1/keys", list_keys)
    app.router.add_post("/admin/v1/keys", create_key)
    app.router.add_delete("/admin/v1/keys/{id}", revoke_key)
    app.router.add_get("/metrics", metrics)
