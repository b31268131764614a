"""The web UI's one way to the agent: its LocalAPI, a unix socket in the file system.

Pages call `agent()`; an `AgentNotRunning` or `LocalAPIError` they do not catch
becomes a clear page (or JSON error) in `webui.errors`. Form actions use
`form_action`, which shows the agent's refusal on the page the form came from.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from flask import current_app, flash, redirect, url_for
from werkzeug.wrappers import Response

from appliance.client.localapi import AgentNotRunning, LocalAPIError, LocalClient

__all__ = [
    "AgentNotRunning",
    "LocalAPIError",
    "agent",
    "status_and_control_nodes",
    "form_action",
    "local_control",
    "status",
]

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="meshpi-web-localapi")
P = ParamSpec("P")
R = TypeVar("R", bound=Response | str)


def agent() -> LocalClient:
    return LocalClient(current_app.config["LOCALAPI_SOCKET"])


class Coalescer:
    """One /v1/status call in flight at a time: requests that arrive while it runs
    share its answer (never an older one). Every open dashboard polls status every
    2 s; the agent, the one privileged process, computes it once per wave."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: Future[Any] | None = None

    def get(self, fetch: Callable[[], Any]) -> Any:
        with self._lock:
            future, leader = self._inflight, False
            if future is None:
                future, leader = Future(), True
                self._inflight = future
        if leader:
            try:
                future.set_result(fetch())
            except BaseException as e:  # handed to every waiter, raised below
                future.set_exception(e)
            finally:
                with self._lock:
                    self._inflight = None
        return future.result()


def status() -> dict[str, Any]:
    """The agent's status; shared between concurrent requests, so read it, never change it."""
    client = agent()
    doc = current_app.extensions["meshpi_status"].get(lambda: client.get("/v1/status"))
    return doc if isinstance(doc, dict) else {}


def local_control(st: dict[str, Any]) -> bool:
    lc = st.get("local_control")
    return isinstance(lc, dict) and bool(lc.get("running"))


def _control_nodes(client: LocalClient) -> tuple[list[dict[str, Any]] | None, str | None]:
    try:
        nodes = client.get("/v1/control/nodes")
    except AgentNotRunning:
        raise
    except LocalAPIError as e:
        return None, None if e.status == 409 else e.message  # 409: control is not local
    return ([n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []), None


def status_and_control_nodes() -> tuple[dict[str, Any], list[dict[str, Any]] | None, str | None]:
    """The status, and the local control's nodes (None when control is not local) with
    what went wrong getting them; both asked at once, so the page waits for the slower."""
    nodes = _POOL.submit(_control_nodes, agent())
    st = status()
    found, error = nodes.result()
    if not local_control(st):
        return st, None, None
    return st, found, error


def form_action(back: str) -> Callable[[Callable[P, R]], Callable[P, R | Response]]:
    """A POST view whose LocalAPI refusal is flashed on the `back` page (a down agent
    still gets its own page)."""

    def wrap(view: Callable[P, R]) -> Callable[P, R | Response]:
        @functools.wraps(view)
        def run(*args: P.args, **kwargs: P.kwargs) -> R | Response:
            try:
                return view(*args, **kwargs)
            except AgentNotRunning:
                raise
            except LocalAPIError as e:
                flash(e.message, "error")
                return redirect(url_for(back))

        return run

    return wrap
