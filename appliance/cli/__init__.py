"""`meshpi`: the command line of the node.

meshpi key     [--state-dir D]                       print this node's public key
meshpi agent   [--netmap F --prefs F] [--state-dir D] [--local-api PATH] ...   run the agent
meshpi down    [--state-dir D]                       remove everything meshpi owns
meshpi status | up | set | logout | create-mesh | rotate-key   ask the running agent (its LocalAPI)

Here each verb is carried out; its flags and help are in flags.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.cli.flags import build_parser, pref_changes

if TYPE_CHECKING:
    from appliance.agent.statedir import StateDir

log = logging.getLogger("meshpi")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
START_HINT = "start it: systemctl start meshpi-agent (or meshpi agent)"


def _make_system(state: StateDir):  # type: ignore[no-untyped-def]
    from appliance.kernel.real import real_system

    return lambda backend: real_system(backend, state.path)


def _run_agent(args: argparse.Namespace, state: StateDir) -> int:
    from appliance.agent.control.local import LocalControl, LocalControlOptions
    from appliance.agent.loop import Agent

    if (args.netmap is None) != (args.prefs is None):
        print("meshpi: --netmap and --prefs go together (static mode)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        options = LocalControlOptions(args.control_state_dir, args.control_start, args.control_url)
        local = LocalControl(options, state.path)
    except ValueError as e:
        print(f"meshpi: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.netmap is None:
        agent = Agent.for_control(state, _make_system(state), resolv_conf=args.resolv_conf)
    else:
        agent = Agent(args.netmap, args.prefs, state, _make_system(state), resolv_conf=args.resolv_conf)

    def serve(agent: Agent) -> Any:
        from appliance.agent.localapi.routes import build_router
        from appliance.agent.localapi.server import serve

        if agent.reach is not None:  # control on this node: its ports mapped, its public URL shared
            agent.reach.local_control = local.port_here
            local.public_endpoint = agent.reach.control_public

        return serve(Path(args.local_api), build_router(agent, local), args.local_api_group)

    if not args.local_api:
        return agent.run(args.resync)
    from appliance.agent.localapi.socketpath import claim

    return agent.run(args.resync, serve, lambda: claim(Path(args.local_api)))


def _client_verb(args: argparse.Namespace) -> int:
    """A verb the running agent carries out. Only the LocalAPI client is loaded: none of
    the agent's own modules (`meshpi status` on a Pi Zero is mostly Python's start)."""
    from appliance.client.localapi import AgentNotRunning, LocalAPIError, LocalClient

    client = LocalClient(args.local_api)
    try:
        return _ask(args, client)
    except AgentNotRunning as e:
        from appliance.agent.statedir import StateDir

        state = StateDir(args.state_dir)
        if args.command == "set":
            from appliance.agent.commands import set_prefs

            prefs = set_prefs(state.path / "prefs.json", pref_changes(args))
            print(json.dumps(prefs.to_json(), indent=2))
            print(f"meshpi: no agent answers at {args.local_api}: wrote {state.path / 'prefs.json'} "
                  "for its next start", file=sys.stderr)  # fmt: skip
            return EXIT_OK
        hint = START_HINT
        with contextlib.suppress(OSError):  # the state directory is root's
            if state.agent_running():
                hint = f"an agent runs for {state.path}, but serves no LocalAPI at {args.local_api}"
        print(f"meshpi: {e.message}; {hint}", file=sys.stderr)
        return EXIT_FAILED
    except LocalAPIError as e:
        print(f"meshpi: {e.message}", file=sys.stderr)
        return EXIT_BAD_INPUT if e.status == 400 else EXIT_FAILED


def _ask(args: Any, client: Any) -> int:
    if args.command == "status":
        st = client.get("/v1/status")
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            from appliance.agent.localapi.status import format_status

            print(format_status(st))
        return EXIT_OK
    if args.command == "netcheck":
        r = client.get("/v1/netcheck")
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            from appliance.agent.reach.netcheck import format_report

            print(format_report(r))
        return EXIT_OK if r["reachable"] else EXIT_FAILED
    if args.command == "set":
        print(json.dumps(client.patch("/v1/prefs", pref_changes(args)), indent=2))
        return EXIT_OK
    if args.command == "logout":
        print(client.post("/v1/logout")["detail"])
        return EXIT_OK
    if args.command == "rotate-key":
        print(client.post("/v1/rotate-key")["public_key"])
        return EXIT_OK
    if args.command == "up":
        body = {"login_server": args.login_server, "auth_key": args.auth_key, "prefs": pref_changes(args),
                "timeout": args.timeout}  # fmt: skip
        result = client.post("/v1/up", body, timeout=args.timeout + 30)
    else:  # create-mesh
        result = client.post("/v1/mesh/create", {"public_url": args.public_url}, timeout=120)
    print(f"{result.get('state')}: {result.get('detail', '')}".rstrip())
    if result.get("login_url"):
        print(f"other nodes join with: meshpi up --login-server '{result['login_url']}' "
              "--auth-key KEY (make keys with: meshpi-control keys create)")  # fmt: skip
    return EXIT_OK if result.get("state") in ("connected", "pending") else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("pyroute2").setLevel(logging.INFO)  # -v is meshpi's debug, not every netlink message
    try:
        if args.command in ("key", "agent", "down"):
            from appliance.agent.statedir import StateDir

            state = StateDir(args.state_dir)
            if args.command == "key":
                print(state.node_key().public_key())
                return EXIT_OK
            if args.command == "agent":
                return _run_agent(args, state)
            from appliance.agent.down import down

            return down(state, _make_system(state))
        return _client_verb(args)
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - sorted in _failed; what is not ours is raised again
        return _failed(e)


def _failed(e: Exception) -> int:
    """One line for what meshpi or the system refused; anything else is a bug and
    keeps its traceback. The classes are imported here: whatever raised one has
    loaded its module already, and a client verb need not."""
    from appliance.agent.control.client import ControlError
    from appliance.agent.localapi.socketpath import SocketError
    from appliance.agent.statedir import StateDirError
    from appliance.kernel.base import KernelError
    from appliance.wire.fields import ConfigError

    if isinstance(e, ConfigError):
        print(f"meshpi: bad input: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # OSError: e.g. `meshpi set` with no agent, by a user who may not write prefs.json
    if isinstance(e, KernelError | StateDirError | ControlError | SocketError | OSError):
        print(f"meshpi: {e}", file=sys.stderr)
        return EXIT_FAILED
    raise e
