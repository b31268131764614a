"""The LocalAPI's routes (the contract: LOCALAPI.md), on top of the agent.

Every verb is the agent's own: `up`, `set` and `logout` are commands.py's single
implementation, status is computed in the agent (status.py), and kernel reads
hold the agent's lock. `/v1/devices` plugs in at `add_device_routes`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode

from appliance.agent import commands
from appliance.agent.control.client import ControlError
from appliance.agent.control.local import LocalControl, check_url
from appliance.agent.devices.hosted import DeviceHost, Devices
from appliance.agent.localapi.server import HTTPError, Request, Response, Router
from appliance.agent.localapi.status import StatusView, agent_status, lan_of, metrics_text
from appliance.core.planner import exit_node_unavailable
from appliance.core.prefs import parse_prefs
from appliance.core.traffic import SLOTS
from appliance.wire.fields import Fields, int_range, parse_str
from appliance.wire.loginurl import LoginUrlError

if TYPE_CHECKING:
    from appliance.agent.control.link import ControlLink
    from appliance.agent.logring import LogRing
    from appliance.agent.statedir import StateDir
    from appliance.agent.traffic import Traffic
    from appliance.core.prefs import Prefs


class AgentApi(StatusView, DeviceHost, Protocol):
    """What the LocalAPI may do with the agent: reads, and the owner's verbs."""

    control: bool
    changes_applied: int
    logs: LogRing
    state: StateDir
    traffic: Traffic

    def set_prefs(self, changes: dict[str, Any]) -> Prefs: ...
    def wait_applied(self, timeout: float) -> bool: ...
    def netcheck(self) -> dict[str, Any] | None: ...
    def logout(self) -> str: ...


log = logging.getLogger(__name__)

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
PUBLIC_WAIT = 3.0  # seconds create-mesh gives the router to map control's port


def build_router(agent: AgentApi, local: LocalControl) -> Router:
    routes = _Routes(agent, local)
    r = Router()
    r.add("GET", "/v1/status", routes.status)
    r.add("GET", "/v1/prefs", routes.get_prefs)
    r.add("PATCH", "/v1/prefs", routes.patch_prefs)
    r.add("POST", "/v1/up", routes.up)
    r.add("POST", "/v1/logout", routes.logout)
    r.add("POST", "/v1/rotate-key", routes.rotate_key)
    r.add("POST", "/v1/mesh/create", routes.create_mesh)
    r.add("GET", "/v1/logs", routes.logs)
    r.add("GET", "/v1/netcheck", routes.netcheck)
    r.add("GET", "/v1/traffic", routes.traffic)
    for method in ("GET", "POST", "DELETE"):
        r.add(method, "/v1/control/(?P<path>[A-Za-z0-9_./-]+)", routes.control)
    r.add("GET", "/metrics", routes.metrics)
    add_device_routes(r, agent)
    return r


def add_device_routes(router: Router, agent: DeviceHost) -> None:
    """/v1/devices: stock WireGuard clients (phones) this node hosts (devices.py)."""
    devices = Devices(agent)

    # DeviceError and ConfigError are MeshpiErrors: the server answers their status.
    router.add("GET", "/v1/devices", lambda _r: Response({"devices": devices.listing()}))
    router.add("POST", "/v1/devices", lambda r: Response(devices.add(r.body)))
    router.add("DELETE", "/v1/devices/(?P<id>[^/]+)", lambda r: Response(devices.remove(r.params["id"])))
    router.add(
        "PATCH", "/v1/devices/(?P<id>[^/]+)", lambda r: Response(devices.change(r.params["id"], r.body))
    )


class _Routes:
    def __init__(self, agent: AgentApi, local: LocalControl) -> None:
        self.agent, self.local = agent, local
        # One login change at a time: two `up`s at once would wait on each other's answer.
        self._verbs = threading.Lock()

    def status(self, _request: Request) -> Response:
        return Response(agent_status(self.agent, self.local))

    def metrics(self, _request: Request) -> Response:
        text = metrics_text(agent_status(self.agent, self.local), self.agent.changes_applied)
        return Response(text, content_type=PROMETHEUS_TEXT)

    def get_prefs(self, _request: Request) -> Response:
        return Response(self.agent.stored_prefs().to_json())

    def patch_prefs(self, request: Request) -> Response:
        changes = _object(request.body, "the body")
        inputs = self.agent.applied()
        chosen = changes.get("exit_node")
        if isinstance(chosen, str) and inputs is not None:
            # A typo would block all internet traffic (an exit node that is not
            # there fails closed): refuse a name no peer offering an exit has.
            unavailable = exit_node_unavailable(inputs.netmap, chosen)
            if unavailable is not None:
                raise HTTPError(400, f"prefs: exit_node: {unavailable}")
        return Response(self.agent.set_prefs(changes).to_json())

    def up(self, request: Request) -> Response:
        self._need_control()
        f = _fields(request.body)
        login_server = f.require("login_server", parse_str)
        auth_key = f.get("auth_key", _optional_str, None)
        changes: dict[str, Any] = f.get("prefs", _dict, {})
        wait = f.get("timeout", int_range(1, 120), int(commands.UP_WAIT))
        f.done()
        with self._verbs:
            try:  # the URL's error is a ValueError, not a refusal of ours
                answer = commands.up(
                    self.agent.state,
                    self._link(),
                    self.agent.set_prefs,
                    login_server,
                    auth_key,
                    changes,
                    wait,
                )
            except LoginUrlError as e:
                raise HTTPError(400, str(e)) from None
        return Response(self._once_applied(answer, wait))

    def logout(self, request: Request) -> Response:
        self._need_control()
        _fields(request.body or {}).done()
        with self._verbs:
            try:
                detail = self.agent.logout()
            except ControlError as e:
                raise HTTPError(502, f"could not tell control; still logged in: {e}") from None
        return Response({"detail": detail})

    def rotate_key(self, request: Request) -> Response:
        self._need_control()
        _fields(request.body or {}).done()
        with self._verbs:
            try:
                public_key = self._link().rotate_key()
            except ControlError as e:
                raise HTTPError(503, f"the key was not rotated: {e}") from None
        return Response({"public_key": str(public_key)})

    def create_mesh(self, request: Request) -> Response:
        self._need_control()
        f = _fields(request.body or {})
        public_url = f.get("public_url", _optional_url, None)
        changes: dict[str, Any] = f.get("prefs", _dict, {})
        wait = f.get("timeout", int_range(1, 120), int(commands.UP_WAIT))
        f.done()
        # Bad prefs are refused before control is started, not after.
        parse_prefs(self.agent.stored_prefs().to_json() | changes, "prefs")
        with self._verbs:
            self.local.start()  # a LocalControlError is answered with its status
            self.local.remember(public_url)
            auth_key = self.local.new_auth_key()
            login = self.local.own_login_url()
            log.info("created a mesh on the local control; logging in to %s", login)
            answer = commands.up(
                self.agent.state, self._link(), self.agent.set_prefs, login, auth_key, changes, wait
            )
        answer = self._once_applied(answer, wait)
        if public_url is None:
            self.local.wait_public(PUBLIC_WAIT)  # nodes away from home get the mapped address
        return Response(answer | {"login_url": self.local.status(lan_of(self.agent))["login_url"]})

    def netcheck(self, _request: Request) -> Response:
        self._need_control()
        report = self.agent.netcheck()
        if report is None:
            raise HTTPError(503, "reachability is not running yet (the agent is starting)")
        return Response(report)

    def traffic(self, request: Request) -> Response:
        text = request.query.get("minutes", "60")
        if re.fullmatch(r"[0-9]{1,4}", text) is None or not 1 <= int(text) <= SLOTS:
            raise HTTPError(400, f"minutes={text[:40]!r}: expected a whole number of minutes, 1-{SLOTS}")
        return Response(self.agent.traffic.series(int(text), time.time()))

    def logs(self, request: Request) -> Response:
        after = request.query.get("after", "0")
        if not after.lstrip("-").isdigit():
            raise HTTPError(400, f"after={after!r}: expected a sequence number")
        return Response({"lines": self.agent.logs.after(int(after))})

    def control(self, request: Request) -> Response:
        query = urlencode(request.query)
        status, answer = self.local.admin(request.method, request.params["path"], request.body, query)
        return Response(answer, status)

    def _once_applied(self, answer: dict[str, Any], wait: float) -> dict[str, Any]:
        """`connected` means the data plane is up too: wait for the first netmap's apply."""
        if answer.get("state") == "connected" and not self.agent.wait_applied(wait):
            return answer | {"detail": f"{answer.get('detail', '')}; no netmap applied within {wait:g} s"}
        return answer

    def _link(self) -> ControlLink:
        link = self.agent.link
        if link is None:
            raise HTTPError(503, "the control link is starting; try again in a moment")
        return link

    def _need_control(self) -> None:
        if not self.agent.control:
            raise HTTPError(
                409, "this agent runs in static mode (--netmap): there is no control to log in to"
            )


def _fields(body: Any) -> Fields:
    return Fields("request", "", _object(body, "the body"))


def _object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPError(400, f"{what} must be a JSON object, not {type(body).__name__}")
    return body


def _dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be an object of prefs fields")
    return value


def _optional_str(value: object) -> str | None:
    return None if value is None else parse_str(value) or None


def _optional_url(value: object) -> str | None:
    text = _optional_str(value)
    return None if text is None else check_url(text, "public_url", path=True)
