"""Tiny network tools that run inside lab namespaces (stdlib only).

    python -m tests.lab.tools serve --port 8080 --log FILE      TCP whoami/send/recv server
    python -m tests.lab.tools fetch HOST PORT 'whoami'|'send N'|'recv N' [--timeout S]
    python -m tests.lab.tools udp-echo --port 51820 --log FILE  UDP echo server
    python -m tests.lab.tools udp HOST PORT MESSAGE [--timeout S]

Servers listen on both 0.0.0.0 and :: (v6-only, so v4 peers are never shown as
::ffff:a.b.c.d) and append one `key=value` line per event to the log file. The
first line, `listening port=N`, is written once every socket is bound, so a
caller can poll the log instead of sleeping.

Protocol (one request line per TCP connection):
    whoami  -> the peer address as the server sees it
    send N  -> N bytes of `pattern()`, then close
    recv N  -> the client sends N bytes; the server answers their sha256 hex
"""

from __future__ import annotations

import argparse
import hashlib
import selectors
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

CHUNK = 64 * 1024
_PATTERN = bytes(i % 251 for i in range(CHUNK))  # 251 is prime, so chunk seams don't align


def pattern(n: int) -> Iterator[bytes]:
    """The deterministic byte stream of `send N` / `recv N`, in chunks."""
    while n > 0:
        piece = _PATTERN[: min(n, CHUNK)]
        n -= len(piece)
        yield piece


def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(n):
        digest.update(piece)
    return digest.hexdigest()


def _peer(addr: tuple[str, ...] | str) -> str:
    return addr[0] if isinstance(addr, tuple) else str(addr)


class _EventLog:
    """Append-only, line-at-a-time, shared by the server threads."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the server
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        with self._lock:
            self._file.write(line + "\n")


def _read_line(conn: socket.socket, limit: int = 256) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", "replace").strip()


def _handle(conn: socket.socket, peer: str, log: _EventLog) -> None:
    request = _read_line(conn)
    verb, _, arg = request.partition(" ")
    if verb == "whoami":
        log.write(f"peer={peer} req=whoami")
        conn.sendall(peer.encode() + b"\n")
    elif verb == "send" and arg.isdigit():
        for piece in pattern(int(arg)):
            conn.sendall(piece)
        log.write(f"peer={peer} req=send bytes={arg}")
    elif verb == "recv" and arg.isdigit():
        want, digest = int(arg), hashlib.sha256()
        while want > 0:
            chunk = conn.recv(min(want, CHUNK))
            if not chunk:
                break
            digest.update(chunk)
            want -= len(chunk)
        got = int(arg) - want
        log.write(f"peer={peer} req=recv bytes={got} sha256={digest.hexdigest()}")
        conn.sendall(digest.hexdigest().encode() + b"\n")
    else:
        log.write(f"peer={peer} req=bad request={request!r}")
        conn.sendall(b"error: unknown request\n")


def serve(port: int, log_path: Path) -> None:
    log = _EventLog(log_path)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            _handle(self.request, _peer(self.client_address), log)

    class V4(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    class V6(V4):
        address_family = socket.AF_INET6

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            super().server_bind()

    servers = [V4(("0.0.0.0", port), Handler), V6(("::", port), Handler)]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    log.write(f"listening port={port}")
    servers[0].serve_forever()


def udp_echo(port: int, log_path: Path) -> None:
    log = _EventLog(log_path)
    sel = selectors.DefaultSelector()
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sel.register(sock, selectors.EVENT_READ, data=sock)
    log.write(f"listening port={port}")
    while True:
        for key, _ in sel.select():
            sock = key.data
            data, addr = sock.recvfrom(65535)
            log.write(f"peer={_peer(addr)} req=udp bytes={len(data)}")
            sock.sendto(data, addr)


def fetch(host: str, port: int, request: str, timeout: float) -> str:
    verb, _, arg = request.partition(" ")
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(request.encode() + b"\n")
        if verb == "recv" and arg.isdigit():
            for piece in pattern(int(arg)):
                conn.sendall(piece)
        if verb == "send" and arg.isdigit():
            count, digest = 0, hashlib.sha256()
            while chunk := conn.recv(CHUNK):
                count += len(chunk)
                digest.update(chunk)
            return f"{count} {digest.hexdigest()}"
        return _read_line(conn)


def udp(host: str, port: int, message: str, timeout: float) -> str:
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(message.encode(), addr)
        data, _ = sock.recvfrom(65535)
    return data.decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "udp-echo"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--log", type=Path, required=True)
    for name in ("fetch", "udp"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("request")
        p.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "serve":
            serve(args.port, args.log)
        elif args.cmd == "udp-echo":
            udp_echo(args.port, args.log)
        elif args.cmd == "fetch":
            print(fetch(args.host, args.port, args.request, args.timeout))
        else:
            print(udp(args.host, args.port, args.request, args.timeout))
    except OSError as exc:  # timeouts and refusals: one readable line, not a traceback
        print(f"{args.cmd}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
