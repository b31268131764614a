"""A client of the agent's LocalAPI (HTTP over its unix socket), for the CLI and
the web UI.

    client = LocalClient("/run/meshpi/local.sock")
    client.get("/v1/status")                    # parsed JSON
    client.patch("/v1/prefs", {"mtu": 1380})    # LocalAPIError(400, "prefs: mtu: ...") when refused
    client.text("/metrics")                     # the Prometheus text

`AgentNotRunning` (a LocalAPIError with status 503) when nothing answers on the
socket; any other refusal is a `LocalAPIError(status, message)`.
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
from pathlib import Path
from typing import Any

from appliance.base.errors import MeshpiError

DEFAULT_SOCKET = Path("/run/meshpi/local.sock")
MAX_ANSWER = 16 << 20


class LocalAPIError(MeshpiError):
    """The agent refused (its status and message), or could not be asked."""


class AgentNotRunning(LocalAPIError):
    """Nothing listens on the socket: no agent, or one started without a LocalAPI."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(503, f"the meshpi agent is not running ({why} at {path})")
        self.path = path


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.unix_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class LocalClient:
    def __init__(self, path: Path | str = DEFAULT_SOCKET, timeout: float = 30.0) -> None:
        self.path, self.timeout = Path(path), timeout

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: object = None, timeout: float | None = None) -> Any:
        return self.request("POST", path, {} if body is None else body, timeout)

    def patch(self, path: str, body: object) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def text(self, path: str) -> str:
        status, data = self._exchange("GET", path, None, None)
        if status >= 400:
            raise LocalAPIError(status, _message(data, status))
        return data.decode()

    def request(self, method: str, path: str, body: object = None, timeout: float | None = None) -> Any:
        status, data = self._exchange(method, path, body, timeout)
        if status >= 400:
            raise LocalAPIError(status, _message(data, status))
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise LocalAPIError(
                502, f"{method} {path}: the agent's answer is not JSON: {data[:100]!r}"
            ) from None

    def _exchange(self, method: str, path: str, body: object, timeout: float | None) -> tuple[int, bytes]:
        conn = _UnixConnection(self.path, self.timeout if timeout is None else timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(MAX_ANSWER)
        except FileNotFoundError:
            raise AgentNotRunning(self.path, "no socket") from None
        except ConnectionRefusedError:
            raise AgentNotRunning(self.path, "nothing listens") from None
        except PermissionError:
            raise LocalAPIError(
                403, f"permission denied on {self.path}: it is for root and the group meshpi"
            ) from None
        except TimeoutError:
            raise LocalAPIError(
                504, f"{method} {path}: no answer from the agent within {conn.timeout} s"
            ) from None
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOTSOCK:
                raise AgentNotRunning(self.path, "not a socket") from None
            raise LocalAPIError(502, f"{method} {path}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()


def _message(data: bytes, status: int) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, str):
        return error
    return f"HTTP {status}: {data[:200].decode(errors='replace')}"
