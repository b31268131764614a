"""A node's relay side in a lab namespace, for tests/netns/test_relay.py.

    serve    register with an auth key, run a RelayClient for the node's WireGuard
             port, point each peer's WireGuard endpoint at its local proxy
             (`wg set`), write the endpoints to --ready, run until SIGTERM
    hostile  connect as attackers do and print (JSON) what the relay answered:
             no answer, garbage, a replayed answer, a pending node, and, as an
             approved node, floods to a real key and to unknown keys, then a
             frame over 64 KiB

Run as `python -m tests.netns.relay_node ...` inside the namespace.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from appliance.agent.control.client import ControlClient
from appliance.agent.reach.relay import RelayClient
from appliance.base.keys import PrivateKey, PublicKey
from appliance.wire.seal import ControlPublicKey, MachineKey, b64, seal_request


def _register(args: argparse.Namespace, machine: MachineKey, node_key: PublicKey, auth: str | None) -> None:
    client = ControlClient(args.control, machine, ControlPublicKey.from_text(args.control_key))
    client.call("register", {"node_key": str(node_key), "hostname": args.hostname, "auth_key": auth})


def serve(args: argparse.Namespace) -> int:
    machine = MachineKey.generate()
    node_key = PublicKey.from_base64(args.node_key)
    _register(args, machine, node_key, args.auth_key)
    control_pub = ControlPublicKey.from_text(args.control_key)
    relay = RelayClient(args.control, machine, control_pub, node_key, listen_port=args.listen_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if not relay.wait_connected(10):
            print("relay: not connected after 10 s", file=sys.stderr)
            return 1
        endpoints = {}
        for peer in args.peer:
            endpoint = relay.endpoint_for(PublicKey.from_base64(peer))
            subprocess.run(["wg", "set", args.interface, "peer", peer, "endpoint", str(endpoint)], check=True)
            endpoints[peer] = str(endpoint)
        Path(args.ready).write_text(json.dumps({"endpoints": endpoints}))
        stop.wait()
        Path(args.ready).write_text(json.dumps({"stats": relay.stats().__dict__}))
    finally:
        relay.close()
    return 0


def _ws(args: argparse.Namespace) -> ClientConnection:
    return connect(args.control.replace("http", "ws", 1) + "/v1/relay", compression=None, proxy=None)


def _closed(conn: ClientConnection) -> int | None:
    try:
        while True:
            conn.recv(timeout=15)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd is not None else None
    except TimeoutError:
        return None


def _answer(conn: ClientConnection, machine: MachineKey, control_pub: ControlPublicKey) -> bytes:
    hello = conn.recv(timeout=5)
    assert isinstance(hello, bytes)
    return seal_request(machine, control_pub, {"op": "relay", "challenge": b64(hello[1:])})[0]


def hostile(args: argparse.Namespace) -> int:
    control_pub = ControlPublicKey.from_text(args.control_key)
    seen: dict[str, Any] = {}
    with _ws(args) as conn:  # no answer: the challenge times out
        seen["silent"] = _closed(conn)
    with _ws(args) as conn:
        conn.recv(timeout=5)
        conn.send(b"\x01" + b"\xff" * 200)
        seen["garbage"] = _closed(conn)
    approved = MachineKey.generate()
    _register(args, approved, PrivateKey.generate().public_key(), args.auth_key)
    with _ws(args) as conn:
        recorded = _answer(conn, approved, control_pub)
        conn.send(recorded)
        conn.recv(timeout=5)
    with _ws(args) as conn:
        conn.recv(timeout=5)
        conn.send(recorded)
        seen["replayed"] = _closed(conn)
    pending = MachineKey.generate()
    _register(args, pending, PrivateKey.generate().public_key(), None)
    with _ws(args) as conn:
        conn.send(_answer(conn, pending, control_pub))
        seen["pending"] = _closed(conn)
    with _ws(args) as conn:
        conn.send(_answer(conn, approved, control_pub))
        conn.recv(timeout=5)
        target = PublicKey.from_base64(args.target).raw
        strays = [PrivateKey(bytes([i + 1]) * 32).public_key().raw for i in range(7)]
        for i in range(args.strays):
            conn.send(strays[i % 7] + b"\x01" * 148)  # a handshake initiation's size
        for i in range(args.flood):
            conn.send(target + b"\x04" + i.to_bytes(4, "big") * 30)  # looks like WireGuard data
        conn.send(target + bytes(64 * 1024))
        seen["oversize"] = _closed(conn)
    print(json.dumps(seen))
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "hostile"])
    parser.add_argument("--control", required=True)
    parser.add_argument("--control-key", required=True)
    parser.add_argument("--auth-key", required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--node-key")
    parser.add_argument("--interface")
    parser.add_argument("--listen-port", type=int, default=51820)
    parser.add_argument("--peer", action="append", default=[])
    parser.add_argument("--ready")
    parser.add_argument("--target")
    parser.add_argument("--strays", type=int, default=3000)
    parser.add_argument("--flood", type=int, default=20000)
    args = parser.parse_args()
    return serve(args) if args.mode == "serve" else hostile(args)


if __name__ == "__main__":
    sys.exit(main())
