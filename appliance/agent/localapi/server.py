"""The LocalAPI's transport: HTTP/1.1 with JSON bodies on a unix socket.

    /run/meshpi/local.sock   mode 0660, group `meshpi` when it exists (else root's)

Standard library only (socketserver + http.server): a thread per connection,
a route table of (method, path pattern) -> handler, and one error shape:
`{"error": "<what went wrong, for a person>"}` with 400 (bad input), 404 (no
such path), 405 (not with that method), 413 (body over 64 KiB) and so on. The
routes themselves are in localapi_routes.py; the contract is LOCALAPI.md.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import re
import socketserver
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from appliance.agent.localapi.socketpath import SocketError, claim
from appliance.base.defaults import SOCKET_GROUP
from appliance.base.errors import MeshpiError

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
DRAIN_MAX = 16 * MAX_BODY  # a refused body up to this size is read away, not cut off
IDLE_TIMEOUT = 60.0  # seconds a kept-alive connection may sit idle


class HTTPError(MeshpiError):
    """Answer `status` with `{"error": message}` (any MeshpiError is answered so)."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]  # the route pattern's named groups
    body: Any  # parsed JSON, or None without a body


@dataclass(frozen=True)
class Response:
    body: Any
    status: int = 200
    content_type: str = "application/json"


Handler = Callable[[Request], Response]


@dataclass
class Router:
    routes: list[tuple[str, re.Pattern[str], Handler]] = field(default_factory=list)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """`pattern` matches the whole path; its named groups become `params`."""
        self.routes.append((method, re.compile(pattern), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        allowed = []
        for m, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if m == method:
                return handler, match.groupdict()
            allowed.append(m)
        if allowed:
            raise HTTPError(405, f"{path} takes {', '.join(sorted(set(allowed)))}, not {method}")
        raise HTTPError(404, f"no such path: {path}")


class _RequestHandler(BaseHTTPRequestHandler):
    server: LocalAPIServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve()

    do_POST = do_PATCH = do_DELETE = do_PUT = do_HEAD = do_GET  # noqa: N815

    def __getattr__(self, name: str) -> Any:
        # Any other method (OPTIONS, or garbage) goes to the router too, which
        # answers 405/404 in JSON, instead of http.server's HTML 501 (found by the fuzzer).
        if name.startswith("do_"):
            return self.do_GET
        raise AttributeError(name)

    def _serve(self) -> None:
        try:
            request = self._request()
            handler, params = self.server.router.resolve(request.method, request.path)
            response = handler(Request(request.method, request.path, request.query, params, request.body))
        except MeshpiError as e:  # a refusal from anywhere below: bad input, control, devices …
            response = Response({"error": e.message}, e.status)
        except Exception as e:  # a bug must not kill the thread silently or show a traceback
            log.exception("LocalAPI %s %s failed", self.command, self.path)
            response = Response({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
        self._send(response)

    def _request(self) -> Request:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HTTPError(411, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise HTTPError(400, "Content-Length is not a number") from None
        if length > MAX_BODY or length < 0:
            self.close_connection = True
            if length <= DRAIN_MAX:
                # Read it away, or closing with unread bytes resets the connection
                # and the client never sees this answer.
                for offset in range(0, length, MAX_BODY):
                    self.rfile.read(min(MAX_BODY, length - offset))
            raise HTTPError(413, f"the body is {length} bytes; the most is {MAX_BODY}")
        body = None
        if length:
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise HTTPError(400, f"the body is not JSON: {e}") from None
        return Request(self.command, url.path, query, {}, body)

    def _send(self, response: Response) -> None:
        if response.content_type == "application/json":
            data = (json.dumps(response.body, indent=1) + "\n").encode()
        else:
            data = str(response.body).encode()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        log.debug("LocalAPI: " + format, *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = code.value if isinstance(code, HTTPStatus) else code
        log.debug("LocalAPI: %s %s -> %s", self.command, self.path, status)


class LocalAPIServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # a client holding a connection must not keep the agent alive

    def __init__(self, path: Path, router: Router) -> None:
        self.path, self.router = path, router
        super().__init__(str(path), _RequestHandler)
        self._inode = os.stat(path).st_ino
        self._thread = threading.Thread(target=self.serve_forever, name="meshpi-localapi", daemon=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up before its answer (`meshpi status` gives up after
        30 s) is no error of ours: one line, not socketserver's traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, BrokenPipeError | ConnectionResetError):
            log.info("LocalAPI: the client left before its answer (%s)", error.strerror)
            return
        super().handle_error(request, client_address)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        # Only our own socket: another agent may have been given this path since.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()


def serve(path: Path, router: Router, group: str = SOCKET_GROUP) -> LocalAPIServer:
    """Bind a fresh socket at `path` (mode 0660, `group` if it exists) and serve."""
    claim(path)  # again: the agent claimed it before its first apply; a stale one may have come since
    old = os.umask(0o117)  # no moment at which others may connect
    try:
        server = LocalAPIServer(path, router)
    except OSError as e:
        raise SocketError(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    try:
        gid: int | None = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = None
    if gid is not None:
        os.chown(path, -1, gid)
    server.start()
    log.info("LocalAPI on %s (group %s)", path, group if gid is not None else "root: no group " + repr(group))
    return server
