"""`meshpi`: the command line of the node.

meshpi key    [--state-dir D]                      print this node's public key
meshpi agent  --netmap F --prefs F [--state-dir D] run the agent (static mode)
meshpi down   [--state-dir D]                      remove everything meshpi owns
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
        "--netmap", type=Path, help="static mode: a netmap JSON file (self + peers); "
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
    return p


def _make_system(state: StateDir):  # type: ignore[no-untyped-def]
    from appliance.kernel.real import real_system

    return lambda backend: real_system(backend, state.path)


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
    except ConfigError as e:
        print(f"meshpi: bad input: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KernelError, StateDirError) as e:
        print(f"meshpi: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
