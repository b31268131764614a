"""`meshpi`: the command line of the node.

meshpi key     [--state-dir D]                       print this node's public key
meshpi agent   [--netmap F --prefs F] [--state-dir D] [--local-api PATH] ...   run the agent
meshpi down    [--state-dir D]                       remove everything meshpi owns
meshpi status | up | set | logout | create-mesh | rotate-key   ask the running agent (its LocalAPI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from appliance.agent.control.client import ControlError
from appliance.agent.control.local import DEFAULT_CONTROL_START, DEFAULT_CONTROL_STATE, DEFAULT_CONTROL_URL
from appliance.agent.localapi.server import SOCKET_GROUP, SocketError
from appliance.agent.statedir import DEFAULT_STATE_DIR, StateDir, StateDirError
from appliance.client.localapi import DEFAULT_SOCKET
from appliance.kernel.base import KernelError
from appliance.wire.fields import ConfigError

log = logging.getLogger("meshpi")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
START_HINT = "start it: systemctl start meshpi-agent (or meshpi agent)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshpi",
        description="meshpi node: WireGuard mesh, exit node and subnet router. "
        "`status`, `up`, `set`, `logout` and `create-mesh` ask the running agent over its "
        f"LocalAPI socket ({DEFAULT_SOCKET}).",
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

    def local_api(cmd: argparse.ArgumentParser, agent: bool = False) -> None:
        cmd.add_argument(
            "--local-api",
            metavar="PATH",
            default=str(DEFAULT_SOCKET),
            help=f"the agent's LocalAPI socket (default {DEFAULT_SOCKET})"
            + ("; '' for none" if agent else ""),
        )

    key = sub.add_parser("key", help="print this node's WireGuard public key (made on first use)")
    state_dir(key)

    agent = sub.add_parser(
        "agent",
        help="reconcile the kernel toward a netmap and prefs, and keep doing so",
        description="Apply the netmap and prefs to the kernel, then watch both files and "
        "apply every change. Stopping the agent leaves the data plane up; a new agent "
        "takes it over without a blip. Bad input is refused before any kernel change. "
        "The agent serves the LocalAPI (status, prefs, up, logout, logs, metrics) on a unix socket "
        "and drives the status LEDs (prefs led_pins, act_led).",
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
    local_api(agent, agent=True)
    agent.add_argument(
        "--local-api-group",
        metavar="GROUP",
        default=SOCKET_GROUP,
        help=f"the group that may use the LocalAPI (default {SOCKET_GROUP}; root only if it is absent)",
    )
    agent.add_argument(
        "--control-state-dir",
        type=Path,
        metavar="DIR",
        default=DEFAULT_CONTROL_STATE,
        help=f"a local control's control.key and admin.token (default {DEFAULT_CONTROL_STATE})",
    )
    agent.add_argument(
        "--control-start",
        metavar="COMMAND",
        default=DEFAULT_CONTROL_START,
        help=f"starts the local control for create-mesh (default: {DEFAULT_CONTROL_START})",
    )
    agent.add_argument(
        "--control-url",
        metavar="URL",
        default=DEFAULT_CONTROL_URL,
        help=f"where the local control listens (default {DEFAULT_CONTROL_URL})",
    )

    agent.add_argument(
        "--resolv-conf",
        type=Path,
        metavar="FILE",
        default=None,
        help="the resolv.conf to manage when systemd-resolved does not (default /etc/resolv.conf; "
        "in a network namespace /etc/netns/NAME/resolv.conf, which `ip netns exec` mounts)",
    )

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
            "--public-endpoint",
            metavar="HOST[:PORT]",
            default=None,
            help="what phones dial to reach this node: a (dynamic) DNS name or address ('' for: found out)",
        )
        cmd.add_argument(
            "--advertise-dns",
            metavar="DOMAIN,...@RESOLVER",
            type=_lan_dns,
            default=None,
            help="split DNS: names under these LAN domains go to this LAN resolver ('' for none)",
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
        cmd.add_argument("--led-pins", metavar="BCM,...", type=_pins, default=None,
                         help="status LEDs on these GPIO pins (empty: none)")  # fmt: skip
        cmd.add_argument("--act-led", action=argparse.BooleanOptionalAction, default=None,
                         help="show the status on the board's ACT LED too")  # fmt: skip
        cmd.add_argument("--port-mapping", action=argparse.BooleanOptionalAction, default=None,
                         help="map the WireGuard port on the home router (PCP, NAT-PMP, UPnP)")  # fmt: skip
        cmd.add_argument("--dashboard-from-mesh", action=argparse.BooleanOptionalAction, default=None,
                         help="let mesh peers reach the dashboard (default: LAN only)")  # fmt: skip
        cmd.add_argument("--dashboard-port", type=int, default=None, metavar="PORT",
                         help="the dashboard's port here, LAN only (0: none)")  # fmt: skip
        cmd.add_argument("--ssh-port", type=int, default=None, metavar="PORT",
                         help="SSH's port, LAN and mesh only (0: left alone)")  # fmt: skip
        cmd.add_argument("--accept-dns", action=argparse.BooleanOptionalAction, default=None,
                         help="point the host's DNS at the mesh's resolver (default: yes)")  # fmt: skip
        cmd.add_argument("--auto-upgrades", action=argparse.BooleanOptionalAction, default=None,
                         help="install Debian's security updates nightly (default: yes)")  # fmt: skip
        cmd.add_argument("--upgrade-window", metavar="HH:MM-HH:MM", default=None,
                         help="local time, default 03:00-05:00; kernel updates reboot then")  # fmt: skip
        cmd.add_argument("--flowtable", action=argparse.BooleanOptionalAction, default=None,
                         help="forwarding: established flows on an nft flowtable (default: yes)")  # fmt: skip
        cmd.add_argument("--udp-gro-forwarding", action=argparse.BooleanOptionalAction, default=None,
                         help="forwarding: UDP GRO forwarding on the uplink (default: yes)")  # fmt: skip
        state_dir(cmd)
        local_api(cmd)

    up = sub.add_parser(
        "up",
        help="join a mesh (or change how this node takes part)",
        description="Ask the agent to log in to a control server with these prefs, and "
        "wait for control's answer. Flags left out keep their current value.",
    )
    up.add_argument(
        "--login-server",
        required=True,
        metavar="URL",
        help="the login URL control printed: http://host:port/#<control key>",
    )
    up.add_argument("--auth-key", default=None, help="a pre-auth key (else an admin approves)")
    up.add_argument(
        "--timeout", type=int, default=20, help="wait this long for control (seconds, default 20)"
    )
    pref_flags(up)
    set_ = sub.add_parser(
        "set",
        help="change prefs (same flags as up, no login)",
        description="Change prefs through the running agent, which applies them at once. "
        "When no agent runs, prefs.json in --state-dir is written directly, for the next start.",
    )
    pref_flags(set_)
    status = sub.add_parser("status", help="this node, its control link and its peers")
    status.add_argument("--json", action="store_true", help="the LocalAPI's /v1/status as it is")
    state_dir(status)
    local_api(status)
    netcheck = sub.add_parser(
        "netcheck",
        help="what this node's network allows: UDP, public addresses, NAT kind, port mapping, reachability",
        description="Asks the running agent to probe now (STUN from the WireGuard port) and says whether "
        "the internet (a phone, a laptop away) can reach this node, and why not.",
    )
    netcheck.add_argument("--json", action="store_true", help="the LocalAPI's /v1/netcheck as it is")
    state_dir(netcheck)
    local_api(netcheck)
    logout = sub.add_parser(
        "logout", help="leave the mesh: tell control, remove the data plane; the agent waits for a new login"
    )
    state_dir(logout)
    local_api(logout)
    create = sub.add_parser(
        "create-mesh",
        help="start a control server on this node and join it: a new mesh",
        description="The agent starts the local control (meshpi-control.service), makes a "
        "pre-auth key through its admin API and logs this node in; prints the login URL for other nodes.",
    )
    create.add_argument("--public-url", metavar="URL", default=None,
                        help="how other nodes reach this control, e.g. http://home.example:8080 "
                             "(default: this node's LAN address)")  # fmt: skip
    state_dir(create)
    local_api(create)
    rotate = sub.add_parser(
        "rotate-key",
        help="move to a new WireGuard key now (announced to control by the machine key)",
        description="The agent makes a new node key, tells control, and switches; peers follow "
        "within a second and running connections lose at most a packet. The old key stops working.",
    )
    state_dir(rotate)
    local_api(rotate)
    return p


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _lan_dns(text: str) -> dict[str, Any]:
    """`fritz.box,lan@192.168.178.1` -> the advertise_dns pref ('' -> {}: none); the
    agent checks the values (prefs.py) and names what is wrong."""
    if not text.strip():
        return {}
    domains, sep, resolver = text.rpartition("@")
    if not sep or not domains:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not DOMAIN,...@RESOLVER (e.g. fritz.box@192.168.178.1)"
        )
    return {"domains": _csv(domains), "resolver": resolver.strip()}


def _pins(text: str) -> list[int]:
    try:
        return [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of GPIO numbers (e.g. 17,27)") from None


def _pref_changes(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.agent.commands import PREF_FLAGS

    changes = {field: getattr(args, flag) for flag, field in PREF_FLAGS.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes.get("exit_node") == "":
        changes["exit_node"] = None
    if changes.get("advertise_dns") == {}:
        changes["advertise_dns"] = None
    return changes


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

    return agent.run(args.resync, serve if args.local_api else None)


def _client_verb(args: argparse.Namespace, state: StateDir) -> int:
    from appliance.client.localapi import AgentNotRunning, LocalAPIError, LocalClient

    client = LocalClient(args.local_api)
    try:
        return _ask(args, client)
    except AgentNotRunning as e:
        if args.command == "set":
            from appliance.agent.commands import set_prefs

            prefs = set_prefs(state.path / "prefs.json", _pref_changes(args))
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
        from appliance.agent.localapi.status import format_status

        st = client.get("/v1/status")
        print(json.dumps(st, indent=2) if args.json else format_status(st))
        return EXIT_OK
    if args.command == "netcheck":
        from appliance.agent.reach.netcheck import format_report

        r = client.get("/v1/netcheck")
        print(json.dumps(r, indent=2) if args.json else format_report(r))
        return EXIT_OK if r["reachable"] else EXIT_FAILED
    if args.command == "set":
        print(json.dumps(client.patch("/v1/prefs", _pref_changes(args)), indent=2))
        return EXIT_OK
    if args.command == "logout":
        print(client.post("/v1/logout")["detail"])
        return EXIT_OK
    if args.command == "rotate-key":
        print(client.post("/v1/rotate-key")["public_key"])
        return EXIT_OK
    if args.command == "up":
        body = {"login_server": args.login_server, "auth_key": args.auth_key, "prefs": _pref_changes(args),
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
        if args.command == "agent":
            return _run_agent(args, state)
        if args.command == "down":
            from appliance.agent.loop import down

            return down(state, _make_system(state))
        return _client_verb(args, state)
    except ConfigError as e:
        print(f"meshpi: bad input: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KernelError, StateDirError, ControlError, SocketError) as e:
        print(f"meshpi: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except OSError as e:  # e.g. `meshpi set` with no agent, by a user who may not write prefs.json
        print(f"meshpi: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
