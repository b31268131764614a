"""`meshpi`: the command line of the node.

meshpi key    [--state-dir D]                      print this node's public key
meshpi agent  --netmap F --prefs F [--state-dir D] run the agent (static mode)
meshpi down   [--state-dir D]                      remove everything meshpi owns
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from appliance.agent.control_client import ControlError
from appliance.agent.statedir import DEFAULT_STATE_DIR, StateDir, StateDirError
from appliance.kernel.base import KernelError
from appliance.wire.fields import ConfigError

log = logging.getLogger("meshpi")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshpi",
        description="meshpi node: WireGuard mesh, exit node and subnet router.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def state_dir(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help=f"keys and ownership records (default {DEFAULT_STATE_DIR})",
        )

    key = sub.add_parser("key", help="print this node's WireGuard public key (made on first use)")
    state_dir(key)

    agent = sub.add_parser(
        "agent",
        help="reconcile the kernel toward a netmap and prefs, and keep doing so",
        description="Apply the netmap and prefs to the kernel, then watch both files and "
        "apply every change. Stopping the agent leaves the data plane up; a new agent "
        "takes it over without a blip. Bad input is refused before any kernel change.",
    )
    agent.add_argument(
        "--netmap",
        type=Path,
        help="static mode: a netmap JSON file (self + peers); "
        "without it the agent follows control (meshpi up) and keeps its files in --state-dir",
    )
    agent.add_argument("--prefs", type=Path, help="static mode: prefs JSON (what this node offers and uses)")
    agent.add_argument(
        "--resync",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="re-read the kernel and repair drift this often (default 30)",
    )
    state_dir(agent)

    down = sub.add_parser(
        "down",
        help="stop the agent and remove the interface, rules, routes, nft table; restore sysctls",
    )
    state_dir(down)

    def pref_flags(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--advertise-exit-node",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="offer this node as an exit node (needs approval on control)",
        )
        cmd.add_argument(
            "--advertise-routes",
            metavar="CIDR,...",
            type=_csv,
            default=None,
            help="share these LAN prefixes with the mesh (empty: none)",
        )
        cmd.add_argument(
            "--advertise-endpoint",
            metavar="IP:PORT",
            action="append",
            default=None,
            dest="advertise_endpoints",
            help="where the internet reaches this node (a port forward); repeatable",
        )
        cmd.add_argument(
            "--exit-node",
            metavar="NAME|IP",
            default=None,
            help="send all traffic through this peer ('' for none)",
        )
        cmd.add_argument(
            "--exit-node-allow-lan-access",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="with an exit node, still reach the local LAN directly",
        )
        cmd.add_argument("--hostname", default=None, help="the name to ask control for")
        cmd.add_argument("--backend", choices=("auto", "kernel", "userspace"), default=None)
        cmd.add_argument("--interface", default=None)
        cmd.add_argument("--mtu", type=int, default=None)
        cmd.add_argument("--listen-port", type=int, default=None)
        state_dir(cmd)

    up = sub.add_parser(
        "up",
        help="join a mesh (or change how this node takes part)",
        description="Log in to a control server and set prefs; the running agent "
        "picks both up. Flags left out keep their current value.",
    )
    up.add_argument(
        "--login-server",
        required=True,
        metavar="URL",
        help="the login URL control printed: http://host:port/#<control key>",
    )
    up.add_argument("--auth-key", default=None, help="a pre-auth key (else an admin approves)")
    up.add_argument("--timeout", type=float, default=30.0, help="wait this long for the agent")
    pref_flags(up)
    set_ = sub.add_parser("set", help="change prefs (same flags as up, no login)")
    pref_flags(set_)
    status = sub.add_parser("status", help="this node, its control link and its peers")
    status.add_argument("--json", action="store_true")
    state_dir(status)
    logout = sub.add_parser("logout", help="leave the mesh: tell control, then take everything down")
    state_dir(logout)
    return p


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _pref_changes(args: argparse.Namespace) -> dict[str, object]:
    from appliance.agent.commands import PREF_FLAGS

    changes = {field: getattr(args, flag) for flag, field in PREF_FLAGS.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes.get("exit_node") == "":
        changes["exit_node"] = None
    return changes


def _make_system(state: StateDir):  # type: ignore[no-untyped-def]
    from appliance.kernel.real import real_system

    return lambda backend: real_system(backend, state.path)


def _owner_verb(args: argparse.Namespace, state: StateDir) -> int:
    from appliance.agent import commands

    if args.command == "up":
        result = commands.up(state, args.login_server, args.auth_key, _pref_changes(args), args.timeout)
        print(f"{result.get('state')}: {result.get('detail', '')}".rstrip())
        return EXIT_OK if result.get("state") in ("connected", "pending") else EXIT_FAILED
    if args.command == "set":
        prefs = commands.set_prefs(state, _pref_changes(args))
        print(json.dumps(prefs.to_json(), indent=2))
        return EXIT_OK
    if args.command == "status":
        st = commands.status(state)
        print(json.dumps(st, indent=2) if args.json else commands.format_status(st))
        return EXIT_OK
    if args.command == "logout":
        print(commands.logout(state))
        from appliance.agent.loop import down

        return down(state, _make_system(state))
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    state = StateDir(args.state_dir)
    try:
        if args.command == "key":
            print(state.node_key().public_key())
            return EXIT_OK
        from appliance.agent.loop import Agent, down

        if args.command == "agent":
            if (args.netmap is None) != (args.prefs is None):
                print("meshpi: --netmap and --prefs go together (static mode)", file=sys.stderr)
                return EXIT_BAD_INPUT
            if args.netmap is None:
                agent = Agent.for_control(state, _make_system(state))
            else:
                agent = Agent(args.netmap, args.prefs, state, _make_system(state))
            return agent.run(args.resync)
        if args.command == "down":
            return down(state, _make_system(state))
        return _owner_verb(args, state)
    except ConfigError as e:
        print(f"meshpi: bad input: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KernelError, StateDirError, ControlError) as e:
        print(f"meshpi: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
