"""`meshpi-control`: run the coordination server, and administer it.

    meshpi-control serve [--listen HOST:PORT] [--admin-listen HOST:PORT] [--stun-listen HOST:PORT|off]
                         [--db URL] [--state-dir D] [--relay-frames-per-s N] [--relay-frame-burst N]
                         [--relay-bytes-per-s N] [--relay-byte-burst N] [--relay-max-connections N]
                         [--dns-domain DOMAIN]
    meshpi-control nodes list|approve ID|remove ID|expire ID|rename ID NAME
    meshpi-control routes list|approve ID CIDR...
    meshpi-control keys create [--reusable] [--expires SECONDS] [--tag T]...|list|revoke ID

The admin verbs talk to the running server's admin API with the token from the
state directory, so every change reaches the nodes at once. The admin API listens
on loopback only (--admin-listen, default 127.0.0.1:8081), never on the public
listener; the server writes its URL to STATE_DIR/admin.url, where the verbs find it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.control.keys import ControlKeyError
from appliance.control.relay_limits import RelayLimits, parse_amount
from appliance.wire.dnsname import DEFAULT_DOMAIN, parse_domain

DEFAULT_STATE_DIR = Path("/var/lib/meshpi-control")
DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8081"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshpi-control", description="meshpi coordination server")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"control key, admin token, SQLite database (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    serve.add_argument(
        "--admin-listen",
        default=DEFAULT_ADMIN_LISTEN,
        help=f"loopback HOST:PORT of the admin API and /metrics (default {DEFAULT_ADMIN_LISTEN})",
    )
    serve.add_argument(
        "--stun-listen",
        help="UDP HOST:PORT of the STUN server, or off (default 0.0.0.0:3478, and [::]:3478 where "
        "the host has IPv6; if that port is taken, control runs without STUN and says so)",
    )
    serve.add_argument("--db", help="sqlite path or postgresql://… URL (default STATE_DIR/control.db)")
    serve.add_argument("--public-url", help="the URL nodes use, for the login URL it prints")
    relay = serve.add_argument_group(
        "relay limits",
        "per node, what it may send through the relay (WireGuard packets between nodes that "
        "cannot reach each other directly); over the rate, frames are dropped and counted in /metrics. "
        "Numbers take a k, M or G suffix (powers of 1000)",
    )
    d = RelayLimits()
    for flag, default, words in (
        ("--relay-frames-per-s", d.frames_per_s, "packets a second per node"),
        ("--relay-frame-burst", d.frame_burst, "packets a node may send at once above its rate"),
        ("--relay-bytes-per-s", d.bytes_per_s, "bytes a second per node (4M = 32 Mbit/s; a relayed byte "
         "crosses control's uplink twice)"),
        ("--relay-byte-burst", d.byte_burst, "bytes a node may send at once above its rate"),
        ("--relay-max-connections", d.max_connections, "nodes on the relay at once; more are refused "
         "(try again later), and as many again may be proving who they are"),
    ):  # fmt: skip
        whole = flag == "--relay-max-connections"
        relay.add_argument(flag, type=_amount(whole), default=default, metavar="N",
                           help=f"{words} (default {default:.0f})")  # fmt: skip
    serve.add_argument(
        "--dns-domain",
        default=DEFAULT_DOMAIN,
        type=_domain,
        help=f"the mesh's DNS domain: nodes are NAME.DOMAIN (default {DEFAULT_DOMAIN})",
    )

    server_opt = argparse.ArgumentParser(add_help=False)
    server_opt.add_argument(
        "--server",
        help="the admin API's URL (default: STATE_DIR/admin.url, else http://" + DEFAULT_ADMIN_LISTEN + ")",
    )

    nodes = sub.add_parser("nodes", help="list, approve, remove nodes, expire node keys")
    nodes_sub = nodes.add_subparsers(dest="verb", required=True)
    nodes_sub.add_parser("list", parents=[server_opt])
    for verb in ("approve", "expire"):
        nodes_sub.add_parser(verb, parents=[server_opt]).add_argument("id", type=int)
    remove = nodes_sub.add_parser("remove", parents=[server_opt], help="remove nodes from the mesh")
    remove.add_argument("id", type=int, nargs="+", help="one or more node ids (`nodes list`)")
    rename = nodes_sub.add_parser("rename", parents=[server_opt], help="a new name (and DNS name) for a node")
    rename.add_argument("id", type=int)
    rename.add_argument("name")

    routes = sub.add_parser("routes", help="list advertised routes, approve them")
    routes_sub = routes.add_subparsers(dest="verb", required=True)
    routes_sub.add_parser("list", parents=[server_opt])
    approve = routes_sub.add_parser(
        "approve", parents=[server_opt], help="set the approved routes of a node (none: revoke all)"
    )
    approve.add_argument("id", type=int)
    approve.add_argument("cidr", nargs="*")

    keys = sub.add_parser("keys", help="pre-auth keys")
    keys_sub = keys.add_subparsers(dest="verb", required=True)
    create = keys_sub.add_parser("create", parents=[server_opt])
    create.add_argument("--reusable", action="store_true")
    create.add_argument("--expires", type=int, default=3600, metavar="SECONDS")
    create.add_argument("--tag", action="append", default=[])
    keys_sub.add_parser("list", parents=[server_opt])
    keys_sub.add_parser("revoke", parents=[server_opt]).add_argument("id", type=int)
    return p


def _amount(whole: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_amount(text, whole)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def relay_limits(args: argparse.Namespace) -> RelayLimits:
    """The serve flags as RelayLimits (ValueError naming the limit when they do not fit)."""
    return RelayLimits(
        frames_per_s=args.relay_frames_per_s,
        frame_burst=args.relay_frame_burst,
        bytes_per_s=args.relay_bytes_per_s,
        byte_burst=args.relay_byte_burst,
        max_connections=int(args.relay_max_connections),
    )


def _domain(text: str) -> str:
    try:
        return parse_domain(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} {e}") from None


class AdminError(Exception):
    pass


def admin_call(server: str, token: str, method: str, path: str, body: object = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        server.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError):
            detail = json.loads(detail).get("error", detail)
        raise AdminError(f"{method} {path}: {e.code} {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise AdminError(f"cannot reach the server at {server}: {e}") from None


def admin_url(state_dir: Path) -> str:
    """Where the running server's admin API is: it says so in STATE_DIR/admin.url."""
    try:
        text = (state_dir / "admin.url").read_text().strip()
    except OSError:
        text = ""
    return text or f"http://{DEFAULT_ADMIN_LISTEN}"


def _admin(args: argparse.Namespace) -> int:
    from appliance.control.keys import read_admin_token

    token = read_admin_token(args.state_dir)
    server = args.server or admin_url(args.state_dir)

    def call(method: str, path: str, body: object = None) -> Any:
        return admin_call(server, token, method, path, body)

    match args.command, args.verb:
        case "nodes", "list":
            nodes = call("GET", "/admin/v1/nodes")
            print(f"{'ID':>4}  {'NAME':<20} {'STATE':<9} {'ONLINE':<6} ADDRESSES")
            for n in nodes:
                online = "yes" if n["online"] else "no"
                print(f"{n['id']:>4}  {n['name']:<20} {n['state']:<9} {online:<6} {' '.join(n['addresses'])}")
        case "nodes", "approve" | "expire" as verb:
            n = call("POST", f"/admin/v1/nodes/{args.id}/{verb}")
            print(f"{n['name']}: {verb}d")
        case "nodes", "rename":
            n = call("POST", f"/admin/v1/nodes/{args.id}/rename", {"name": args.name})
            print(f"node {args.id} is now {n['name']} ({n['dns_name'] or 'no DNS name while pending'})")
        case "nodes", "remove":
            for node_id in args.id:  # in order; the first refusal stops the rest (the error names it)
                call("DELETE", f"/admin/v1/nodes/{node_id}")
                print(f"node {node_id} removed", flush=True)
        case "routes", "list":
            for n in call("GET", "/admin/v1/nodes"):
                if n["advertised_routes"] or n["approved_routes"]:
                    print(
                        f"{n['id']:>4}  {n['name']:<20} "
                        f"advertised: {', '.join(n['advertised_routes']) or '-'}"
                        f"  approved: {', '.join(n['approved_routes']) or '-'}"
                    )
        case "routes", "approve":
            n = call("POST", f"/admin/v1/nodes/{args.id}/routes", {"approved_routes": args.cidr})
            print(f"{n['name']}: approved {', '.join(n['approved_routes']) or 'nothing'}")
        case "keys", "create":
            body = {"reusable": args.reusable, "expires_in": args.expires, "tags": args.tag}
            key = call("POST", "/admin/v1/keys", body)
            print(key["key"])
        case "keys", "list":
            for k in call("GET", "/admin/v1/keys"):
                state = "revoked" if k["revoked"] else f"used {k['used']}x"
                kind = "reusable" if k["reusable"] else "single-use"
                print(f"{k['id']:>4}  {k['prefix']:<10} {kind:<10} {state:<10} expires {k['expires_at']}")
        case "keys", "revoke":
            call("DELETE", f"/admin/v1/keys/{args.id}")
            print(f"key {args.id} revoked")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command == "serve":
            from appliance.control.app import serve

            serve(args.state_dir, args.listen, args.db, args.public_url, args.admin_listen, args.stun_listen,
                  relay_limits(args), args.dns_domain)  # fmt: skip
            return 0
        return _admin(args)
    except (AdminError, ControlKeyError) as e:
        print(f"meshpi-control: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # ValueError: a bad --listen, --admin-listen or --stun-listen
        print(f"meshpi-control: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
