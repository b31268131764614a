"""The status headline when the agent does not answer: the one case the agent
cannot say itself (its own headline: agent/localapi/headline.py, the same shape).
Pure, for the web UI and the CLI.
"""

from __future__ import annotations

from typing import Any

FIX_AGENT_DOWN = (
    "restart it: sudo systemctl restart meshpi-agent (or reboot the Pi); its log: journalctl -u meshpi-agent"
)


def agent_down(why: str) -> dict[str, Any]:
    """`why`: what the client saw (AgentNotRunning's message)."""
    return {
        "level": "error",
        "text": "The meshpi agent is not running: the mesh is not managed until it is back",
        "facts": {
            "agent": "down",
            "control": None,
            "reachable": None,
            "public_endpoint": None,
            "exit_users": [],
            "why": why,
            "fix": FIX_AGENT_DOWN,
        },
    }
