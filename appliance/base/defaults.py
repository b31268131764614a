"""Where meshpi lives on a node: the defaults the agent and the `meshpi` command line
share. Here, with no imports, so that a client verb (`meshpi status`) builds its
parser without loading the agent's modules."""

from __future__ import annotations

from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/meshpi")
SOCKET_GROUP = "meshpi"  # the LocalAPI socket's group (the dashboard's user is in it)
DEFAULT_CONTROL_STATE = Path("/var/lib/meshpi-control")
DEFAULT_CONTROL_START = "systemctl enable --now meshpi-control.service"
DEFAULT_CONTROL_URL = "http://127.0.0.1:8080"
