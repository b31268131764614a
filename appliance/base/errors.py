"""The one root of refusals: an error that carries the status to answer with and
a message that is safe to show, from the validator that found it to the HTTP
answer or the CLI's exit code, without a new wrapper at each hop.

Subclasses say where a refusal comes from (ConfigError: bad input; ControlRefused:
control said no; DeviceError: hosting a phone failed …); the LocalAPI, control's
HTTP server and the CLI turn any of them into (status, message) in one place.
"""

from __future__ import annotations


class MeshpiError(Exception):
    status: int = 400

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message
