"""Errors the owner can read, and nothing more: no tracebacks, no internals.

- the agent is down (its socket is absent or refuses): a page saying so, 503;
- the agent refused a request: its own message (it is written for people), with its
  status when that is a 4xx, else 502;
- anything unexpected: logged here with its traceback, shown as a plain 500.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, render_template
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from appliance.client.headline import agent_down as down_headline
from webui.agent import AgentNotRunning, LocalAPIError
from webui.connected import headline
from webui.security import wants_json

log = logging.getLogger(__name__)

AGENT_DOWN = "The meshpi agent is not running."


def _page(
    status: int, title: str, message: str, template: str = "error.html", **more: object
) -> tuple[Response | str, int]:
    if wants_json():
        return jsonify(error=message), status
    return render_template(template, title=title, message=message, status=status, **more), status


def agent_down(e: AgentNotRunning) -> tuple[Response | str, int]:
    said = headline(down_headline(e.message))
    return _page(503, "Agent not running", AGENT_DOWN, "agent_down.html", headline=said)


def agent_refused(e: LocalAPIError) -> tuple[Response | str, int]:
    status = e.status if 400 <= e.status < 500 else 502
    return _page(status, "The agent said no", e.message)


def http_error(e: HTTPException) -> tuple[Response | str, int]:
    status = e.code or 500
    message = e.description if status < 500 else "Something went wrong on this device."
    return _page(status, f"{status} {e.name}", message or e.name)


def unexpected(e: Exception) -> tuple[Response | str, int]:
    log.exception("unexpected error: %s", e)
    return _page(
        500, "Internal error", "Something went wrong on this device; the web service's log says what."
    )


def init_app(app: Flask) -> None:
    app.register_error_handler(AgentNotRunning, agent_down)
    app.register_error_handler(LocalAPIError, agent_refused)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
