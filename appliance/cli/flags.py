"""The grammar of `meshpi`: its verbs, their flags and help, and the pref flags
turned into the prefs change the agent checks.

Apart from the verbs' code (__init__.py) because it is most of the command's
text and changes with every new pref, while what each verb does changes seldom.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.base.defaults import (
    DEFAULT_CONTROL_START,
    DEFAULT_CONTROL_STATE,
    DEFAULT_CONTROL_URL,
    DEFAULT_STATE_DIR,
    SOCKET_GROUP,
)
from appliance.client.localapi import DEFAULT_SOCKET


def build_parser() -> argparse.ArgumentParser:
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


def pref_changes(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.agent.commands import PREF_FLAGS

    changes = {field: getattr(args, flag) for flag, field in PREF_FLAGS.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes.get("exit_node") == "":
        changes["exit_node"] = None
    if changes.get("advertise_dns") == {}:
        changes["advertise_dns"] = None
    return changes
