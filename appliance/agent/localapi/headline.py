"""`/v1/status`'s `headline`: one plain sentence and a colour that answer "does
it work?", made from the facts status already has. Pure.

Worst first: the data plane's error, then control (needs a login, waits for
approval, refused, unreachable, connecting), then reachability from the
internet (only for a hub: a node that offers an exit or hosts phones; a laptop
behind NAT is fine unreachable), else "Everything works" with where the
internet reaches this node and who uses it as exit node. "The agent is down"
is the web UI's to say: appliance/client/headline.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FIX_ERROR = "see Logs for the cause; the agent tries again at the next change and every 30 s"
FIX_LOGIN = "create a new mesh, or join one with its login URL and auth key"


@dataclass(frozen=True)
class Facts:
    control: str  # control.state: connected, pending, error, unreachable, needs-login, connecting, static
    control_detail: str = ""
    error: str | None = None  # the kernel could not be read, or the last apply failed
    hub: bool = False  # offers an exit node or hosts phones: the internet must reach it
    reachable: bool | None = None  # None: not checked yet (no STUN round, no mapping)
    reach_why: str | None = None  # netcheck's verdict: "yes: ..." / "no: <why>; <fix>"
    public_endpoint: str | None = None
    exit_users: tuple[str, ...] = field(default=())


def headline(f: Facts) -> dict[str, Any]:
    level, text, why, fix = _judge(f)
    return {
        "level": level,
        "text": text,
        "facts": {
            "agent": "running",
            "control": f.control,
            "reachable": f.reachable,
            "public_endpoint": f.public_endpoint,
            "exit_users": list(f.exit_users),
            "why": why,
            "fix": fix,
        },
    }


def _judge(f: Facts) -> tuple[str, str, str | None, str | None]:
    detail = f.control_detail.strip()
    if f.error:
        return "error", f"Data plane error: {f.error}", f.error, FIX_ERROR
    if f.control == "needs-login":
        return "warn", "Not in a mesh yet: create a new mesh or join one", None, FIX_LOGIN
    if f.control == "pending":
        approve = "approve it on the control server's dashboard (Waiting for approval)"
        return "warn", "Waiting for the mesh's admin to approve this node", detail or None, approve
    if f.control == "error":
        return "error", _sentence("Control refused this node", detail), detail or None, FIX_LOGIN
    if f.control == "unreachable":
        why = detail or "no answer"
        text = f"Control server unreachable ({why}); the mesh keeps working with the last map"
        return "error", text, why, "check this node's internet connection and that the control server runs"
    if f.control == "connecting":
        wait = "wait a few seconds; if this stays, check the control URL and this node's network"
        return "warn", "Connecting to the control server", detail or None, wait
    if f.hub and f.reachable is False:
        reason, how = _split(f.reach_why or "no: not reachable")
        text = f"Not reachable from outside: {reason}" + (f"; {how}" if how else "")
        return "warn", text, reason, how
    parts = ["Everything works"]
    if f.reachable and f.public_endpoint:
        parts.append(f"reachable from the internet at {f.public_endpoint}")
    if f.exit_users:
        parts.append(f"exit node used by {', '.join(f.exit_users)}")
    return "ok", " · ".join(parts), None, None


def _sentence(head: str, detail: str) -> str:
    return f"{head}: {detail}" if detail else head


def _split(verdict: str) -> tuple[str, str | None]:
    """netcheck's "no: <why>; <fix>[; more fix]" as (why, fix)."""
    text = verdict.removeprefix("no: ").removeprefix("no:").strip()
    why, _, fix = text.partition("; ")
    return why, fix or None
