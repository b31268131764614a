"""The coordination server over HTTP: sealed node ops under /v1/, the admin API
under /admin/v1/, /metrics, and `serve()` for `meshpi-control serve`.

aiohttp, because thousands of nodes each hold a map long-poll open: one asyncio
process carries them all, with the database on its own thread (service.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web
from nacl.public import PrivateKey as NaclPrivateKey

from appliance.base.keys import PublicKey
from appliance.control import admin, stun
from appliance.control.keys import load_admin_token, load_control_key
from appliance.control.relay import Relay, add_relay
from appliance.control.service import ApiError, ControlService
from appliance.control.sessions import SessionError, Sessions
from appliance.control.store import open_store
from appliance.wire.fields import ConfigError
from appliance.wire.seal import Boxes, SealError, login_url, open_request

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
CONTROL_KEY: web.AppKey[NaclPrivateKey] = web.AppKey("control_key", NaclPrivateKey)
SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)
BOXES: web.AppKey[Boxes] = web.AppKey("boxes", Boxes)


async def node_op(request: web.Request) -> web.Response:
    op = request.match_info["op"]
    service, key = request.app[admin.SERVICE], request.app[CONTROL_KEY]
    sessions = request.app[SESSIONS]
    try:
        opened = open_request(key, await request.read(), op, request.app[BOXES])
    except SealError as e:
        return web.Response(status=e.status, text=e.message)
    if op == "hello":
        session = sessions.hello(opened.machine)
        return _sealed(opened.reply({"session": session}))
    try:
        sessions.check(opened.plaintext.get("session"), opened.machine, opened.nonce)
    except SessionError as e:
        return web.Response(status=e.status, text=e.message)
    handler = {
        "register": service.register,
        "update": service.update,
        "map": service.map,
        "device": service.device,
        "logout": service.logout,
    }.get(op)
    if handler is None:
        return web.Response(status=404, text=f"no op {op!r}")
    machine = PublicKey(bytes(opened.machine))
    try:
        body = await handler(machine, opened.plaintext.get("body"))
    except ApiError as e:
        return web.Response(status=e.status, text=e.message)
    except ConfigError as e:
        return web.Response(status=400, text=str(e))
    return _sealed(opened.reply(body))


def _sealed(data: bytes) -> web.Response:
    return web.Response(body=data, content_type="application/octet-stream")


async def index(request: web.Request) -> web.Response:
    key = request.app[CONTROL_KEY].public_key
    return web.Response(text=f"meshpi control\nlogin URL: {login_url(str(request.url.origin()), key)}\n")


def create_app(service: ControlService, control_key: NaclPrivateKey, admin_token: str) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY + 4096, middlewares=[admin.admin_auth])
    app[admin.SERVICE] = service
    app[admin.TOKEN] = admin_token
    app[CONTROL_KEY] = control_key
    app[SESSIONS] = Sessions()
    app[BOXES] = Boxes(control_key)
    app.router.add_get("/", index)
    app.router.add_post("/v1/{op}", node_op)
    admin.add_routes(app)
    add_relay(app, Relay(service, control_key, app[BOXES]))

    async def close(_app: web.Application) -> None:
        service.close()

    app.on_cleanup.append(close)
    return app


def serve(
    state_dir: Path, listen: str, db: str | None, public_url: str | None, stun_listen: str | None = "off"
) -> None:
    """stun_listen None: the default address, and a busy port there is a warning, not an end."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    stun_at = stun.parse_listen(stun_listen or stun.DEFAULT_LISTEN)
    key = load_control_key(state_dir)
    token = load_admin_token(state_dir)
    url = db or str(state_dir / "control.db")
    service = ControlService(lambda: open_store(url))
    app = create_app(service, key, token)
    if stun_at is not None:
        app.cleanup_ctx.append(_stun_ctx(*stun_at, required=stun_listen is not None))
    shown = public_url or f"http://{host if host not in ('', '0.0.0.0', '::') else '<this host>'}:{port}"
    log.info("meshpi control on %s; nodes log in with: %s", listen, login_url(shown, key.public_key))
    # Long-polls end at once on shutdown: agents simply poll again when it is back.
    web.run_app(app, host=host or None, port=int(port), print=None, access_log=None, shutdown_timeout=2)


def _stun_ctx(host: str, port: int, required: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """The STUN server lives as long as the HTTP server, on the same event loop."""

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        try:
            server = await stun.start(host, port)
        except OSError as e:
            if required:
                raise
            # A second control on one host (tests, a bench) must not fail for want of STUN.
            log.warning("%s; serving without STUN (--stun-listen chooses another address)", e.strerror)
            yield
            return
        yield
        server.close()

    return ctx
