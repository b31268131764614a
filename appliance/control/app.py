"""The coordination server over HTTP: sealed node ops under /v1/ on the public
listener; the admin API under /admin/v1/ and /metrics on a second, loopback-only
listener (admin.py); and `serve()` for `meshpi-control serve`.

Two applications, not one with a check: the public listener has no admin route at
all (a 404 for /admin/ and /metrics), so no bug in a check can expose it.

aiohttp, because thousands of nodes each hold a map long-poll open: one asyncio
process carries them all, with the database on its own thread (service.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from aiohttp import web
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey
from nacl.public import PublicKey as NaclPublicKey

from appliance.base.files import atomic_write
from appliance.base.keys import PublicKey
from appliance.control import admin, mapsend, stun
from appliance.control.keys import load_admin_token, load_control_key
from appliance.control.mapcache import FullMap
from appliance.control.relay import Relay, add_relay
from appliance.control.relay_limits import RelayLimits
from appliance.control.service import ControlService
from appliance.control.service_requests import ApiError
from appliance.control.sessions import SessionError, Sessions
from appliance.control.store import open_store
from appliance.wire.dnsname import DEFAULT_DOMAIN
from appliance.wire.fields import ConfigError
from appliance.wire.loginurl import login_url
from appliance.wire.seal import Boxes, SealError, open_request

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
ADMIN_URL_FILE = "admin.url"
# Ops only an approved node can make succeed (service._approved).
TRUSTING_OPS = frozenset({"map", "update", "device"})
CONTROL_KEY: web.AppKey[NaclPrivateKey] = web.AppKey("control_key", NaclPrivateKey)
SESSIONS: web.AppKey[Sessions] = web.AppKey("sessions", Sessions)
BOXES: web.AppKey[Boxes] = web.AppKey("boxes", Boxes)


async def node_op(request: web.Request) -> web.StreamResponse:
    op = request.match_info["op"]
    service, key = request.app[admin.SERVICE], request.app[CONTROL_KEY]
    sessions = request.app[SESSIONS]
    if (request.content_length or 0) > MAX_BODY:
        # Refused before a byte of it is read (aiohttp would buffer up to its limit).
        return web.Response(status=413, text=f"request of {request.content_length} bytes is over the "
                                             f"{MAX_BODY}-byte limit")  # fmt: skip
    try:
        opened = open_request(key, await request.read(), op, request.app[BOXES])
    except SealError as e:
        return web.Response(status=e.status, text=e.message)
    if op == "hello":
        session = sessions.hello(opened.machine, service.is_approved(bytes(opened.machine)))
        return _sealed(opened.reply({"session": session}))
    try:
        sessions.check(opened.plaintext.get("session"), opened.machine, opened.nonce)
    except SessionError as e:
        return web.Response(status=e.status, text=e.message)
    handlers: dict[str, Callable[[PublicKey, object], Awaitable[dict[str, Any]]]] = {
        "register": partial(service.register, source=request.remote),
        "update": service.update,
        "map": service.map,
        "device": service.device,
        "logout": service.logout,
    }
    handler = handlers.get(op)
    if handler is None:
        return web.Response(status=404, text=f"no op {op!r}")
    machine = PublicKey(bytes(opened.machine))
    try:
        body = await handler(machine, opened.plaintext.get("body"))
    except ApiError as e:
        return web.Response(status=e.status, text=e.message)
    except ConfigError as e:
        return web.Response(status=400, text=str(e))
    if op in TRUSTING_OPS or (op == "register" and body.get("state") == "approved"):
        # Only an approved node gets here with these: its session outlives hello floods.
        sessions.trust(opened.plaintext.get("session"))
    full = body.get("full")
    if isinstance(full, FullMap):  # shared encoding, sealed without a JSON round trip
        return await mapsend.send(request, opened, full)
    return _sealed(opened.reply(body))


class TrustedBoxes(Boxes):
    """Boxes kept only for machines the session table trusts (approved nodes). A
    flood of fresh machine keys pays its own X25519 per request and leaves nothing
    cached behind; the mesh's nodes keep theirs."""

    def __init__(self, control_key: NaclPrivateKey, sessions: Sessions) -> None:
        super().__init__(control_key)
        cached = self.get

        def get(raw: bytes) -> Box:
            return cached(raw) if sessions.trusts(raw) else Box(control_key, NaclPublicKey(raw))

        self.get = get  # type: ignore[assignment]  # a plain function where the base keeps its cache


def _sealed(data: bytes) -> web.Response:
    return web.Response(body=data, content_type="application/octet-stream")


async def index(request: web.Request) -> web.Response:
    key = request.app[CONTROL_KEY].public_key
    return web.Response(text=f"meshpi control\nlogin URL: {login_url(str(request.url.origin()), key)}\n")


def create_app(
    service: ControlService, control_key: NaclPrivateKey, relay_limits: RelayLimits | None = None
) -> web.Application:
    """The public listener's application: the node API only. It owns the service
    (starts its pruning, closes it on cleanup)."""
    app = web.Application(client_max_size=MAX_BODY + 4096)
    app[admin.SERVICE] = service
    app[CONTROL_KEY] = control_key
    app[SESSIONS] = Sessions()
    app[BOXES] = TrustedBoxes(control_key, app[SESSIONS])
    app[mapsend.GATE] = asyncio.Semaphore(mapsend.IN_FLIGHT)  # full maps being sent
    app.router.add_get("/", index)
    app.router.add_post("/v1/{op}", node_op)
    add_relay(app, Relay(service, control_key, app[BOXES], relay_limits))

    async def start(_app: web.Application) -> None:
        service.start()

    async def close(_app: web.Application) -> None:
        service.close()

    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


def create_admin_app(
    service: ControlService, admin_token: str, public: web.Application | None = None
) -> web.Application:
    """The admin listener's application: admin API and /metrics (loopback only), with
    the counters that parts of the `public` app keep (the relay's)."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[admin.admin_auth])
    app[admin.SERVICE] = service
    app[admin.TOKEN] = admin_token
    if public is not None:
        app[admin.METRIC_SOURCES] = public.setdefault(admin.METRIC_SOURCES, [])
    admin.add_routes(app)
    return app


def parse_listen(option: str, value: str, loopback: bool = False) -> tuple[str, int]:
    """HOST:PORT (HOST may be [v6]); with `loopback`, HOST must be a loopback address."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{option} {value!r}: expected HOST:PORT")
    if loopback:
        try:
            ok = host == "localhost" or ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{option} {value!r}: the admin API listens on loopback only (127.0.0.1, ::1)")
    return host, int(port)


def serve(
    state_dir: Path,
    listen: str,
    db: str | None,
    public_url: str | None,
    admin_listen: str,
    stun_listen: str | None = "off",
    relay_limits: RelayLimits | None = None,
    dns_domain: str = DEFAULT_DOMAIN,
) -> None:
    """stun_listen None: the default address, and a busy port there is a warning, not an end."""
    host, port = parse_listen("--listen", listen)
    admin_host, admin_port = parse_listen("--admin-listen", admin_listen, loopback=True)
    stun_at = stun.parse_listen(stun_listen or stun.DEFAULT_LISTEN)
    key = load_control_key(state_dir)
    token = load_admin_token(state_dir)
    url = db or str(state_dir / "control.db")
    service = ControlService(lambda: open_store(url), dns_domain=dns_domain)
    limits = relay_limits or RelayLimits()
    app = create_app(service, key, limits)
    log.info("relay limits per node: %g frames/s (burst %g), %g bytes/s (burst %g); at most %d nodes",
             limits.frames_per_s, limits.frame_burst, limits.bytes_per_s, limits.byte_burst,
             limits.max_connections)  # fmt: skip
    if stun_at is not None:
        app.cleanup_ctx.append(_stun_ctx(*stun_at, required=stun_listen is not None))
    shown = public_url or f"http://{host if host not in ('', '0.0.0.0', '::') else '<this host>'}:{port}"
    log.info("meshpi control on %s; nodes log in with: %s", listen, login_url(shown, key.public_key))
    admin_app = create_admin_app(service, token, app)
    asyncio.run(_serve(state_dir, app, (host, port), admin_app, (admin_host, admin_port)))


async def _serve(
    state_dir: Path,
    public: web.Application,
    public_at: tuple[str, int],
    admin_app: web.Application,
    admin_at: tuple[str, int],
) -> None:
    # Long-polls end at once on shutdown: agents simply poll again when it is back.
    runners = [web.AppRunner(public, access_log=None, shutdown_timeout=2),
               web.AppRunner(admin_app, access_log=None, shutdown_timeout=2)]  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for runner, (host, port) in zip(runners, (public_at, admin_at), strict=True):
            await runner.setup()
            # After a restart every node connects at once: aiohttp's default backlog
            # (128) would drop their SYNs, and each dropped one waits 1 s, 3 s, 7 s.
            await web.TCPSite(runner, host or None, port, backlog=LISTEN_BACKLOG).start()
        admin_host, admin_port = runners[1].addresses[0][:2]
        shown = f"[{admin_host}]" if ":" in admin_host else admin_host
        # Where the admin API is, beside the token: `meshpi-control nodes …` and the
        # agent's proxy read it, so a non-default --admin-listen needs no flag there.
        atomic_write(state_dir / ADMIN_URL_FILE, f"http://{shown}:{admin_port}\n", mode=0o644)
        log.info("admin API and /metrics on http://%s:%d (loopback only)", shown, admin_port)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


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
