"""The LocalAPI socket's path, claimed before the agent touches the kernel: a
second agent given a live agent's socket refuses at once (exit 1), before its
first apply, and before the LocalAPI's HTTP stack is imported (server.py binds
and serves a moment later). Standard library only.
"""

from __future__ import annotations

import logging
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class SocketError(Exception):
    """The socket cannot be set up (in use by another agent, not a socket, ...)."""


def claim(path: Path) -> None:
    """Make `path`'s directory and take away a stale socket there; SocketError if
    another process answers on it, or it is not a socket."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise SocketError(f"cannot make {path.parent}: {e.strerror or e}") from None
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketError(f"{path} exists and is not a socket; move it away or choose another --local-api")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            log.info("removed the stale socket %s", path)
            return
        except OSError as e:
            raise SocketError(f"{path}: cannot tell whether it is in use: {e.strerror or e}") from None
    raise SocketError(f"another process serves {path}; give this agent its own --local-api")
