"""`meshpi-web`: serve the dashboard (waitress), or set the admin password.

meshpi-web serve [--listen HOST:PORT]   systemd socket activation when LISTEN_FDS is set
meshpi-web passwd                        from the terminal (asked twice) or from stdin:
                                         printf %s "$pw" | meshpi-web passwd
meshpi-web passwd --from-file F          reset from a file on the boot partition, then delete it
meshpi-web setup-code [--boot-dir D]     print the first-run setup code (made if there is none;
                                         with --boot-dir also written to D/meshpi-setup-code.txt);
                                         once a password exists, remove both instead
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import socket
import sys
from pathlib import Path

from webui import DEFAULTS, create_app
from webui.passwords import PasswordError, PasswordFile, check_new_password
from webui.setupcode import BOOT_FILE_NAME, FILE_NAME, SetupCode, show

log = logging.getLogger("meshpi-web")

SD_LISTEN_FDS_START = 3


class UsageError(Exception):
    pass


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: {text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def activated_sockets(env: dict[str, str] | None = None) -> list[socket.socket]:
    """The sockets systemd passed us (sd_listen_fds), or [] when not socket-activated."""
    env = dict(os.environ) if env is None else env
    count = env.get("LISTEN_FDS")
    if not count:
        return []
    if env.get("LISTEN_PID") not in (None, str(os.getpid())):
        return []  # meant for another process
    if not count.isdigit() or int(count) < 1:
        raise UsageError(f"LISTEN_FDS={count!r} is not a number of sockets")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(int(count))]


def serve(args: argparse.Namespace) -> int:
    from waitress import serve as waitress_serve

    app = create_app(
        {"LOCALAPI_SOCKET": args.socket, "STATE_DIR": args.state_dir, "ALLOWED_HOSTS": args.allow_host}
    )
    sockets = activated_sockets()
    # ident="": the Server header names no software; threads: a /v1/up waits up to 20 s.
    options = {"threads": args.threads, "ident": "", "clear_untrusted_proxy_headers": True}
    if sockets:
        names = ", ".join(str(s.getsockname()) for s in sockets)
        log.info("serving on %s (from systemd), agent at %s, state in %s", names, args.socket, args.state_dir)
        waitress_serve(app, sockets=sockets, **options)
    else:
        host, port = parse_listen(args.listen)
        log.info("serving on %s:%d, agent at %s, state in %s", host, port, args.socket, args.state_dir)
        waitress_serve(app, host=host, port=port, **options)
    return 0


def read_new_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("New admin password: ")
        check_new_password(first)
        check_new_password(first, getpass.getpass("Once more: "))
        return first
    # From a pipe (first boot): the whole of stdin, less one trailing newline.
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def passwd(args: argparse.Namespace) -> int:
    source = Path(args.from_file) if args.from_file else None
    if source is not None:
        # A reset from the boot partition: the first line of a file the owner put
        # there (Windows line ends too); the file goes once the hash is stored.
        lines = source.read_text(encoding="utf-8-sig").splitlines()
        password = lines[0] if lines else ""
        check_new_password(password)
    else:
        password = read_new_password()
    PasswordFile(Path(args.state_dir)).set(password)
    print(f"meshpi-web: admin password set in {Path(args.state_dir) / 'password'}; open sessions end")
    if source is not None:
        source.unlink()
        print(f"meshpi-web: removed {source}")
    return 0


def setup_code(args: argparse.Namespace) -> int:
    """Root runs this at boot on the image (meshpi-setup-code.service): the code on the
    console and in the journal, and on the boot partition, while setup is open."""
    state = Path(args.state_dir)
    code = SetupCode(state / FILE_NAME)
    boot_copy = Path(args.boot_dir) / BOOT_FILE_NAME if args.boot_dir else None
    if PasswordFile(state).is_set():
        code.remove()
        if boot_copy is not None and boot_copy.exists():
            boot_copy.unlink()
            print(f"meshpi-web: setup is done; removed {boot_copy}")
        return 0
    value, _made = code.ensure()
    print(f"meshpi-web: first-run setup code: {show(value)}  (give it on http://<this Pi>/setup)")
    if boot_copy is not None:
        text = (
            f"meshpi first-run setup code: {show(value)}\r\n"
            "Give it on the setup page (http://meshpi.local/) to choose the admin password.\r\n"
        )
        if not boot_copy.exists() or boot_copy.read_bytes() != text.encode():
            _write_on_fat(boot_copy, text)
    return 0


def _write_on_fat(path: Path, text: str) -> None:
    # FAT has no atomic rename over a file; write, fsync, done (a torn copy is rewritten next boot).
    with open(path, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=DEFAULTS["STATE_DIR"], help="session key and password hash")
    p = argparse.ArgumentParser(prog="meshpi-web", description="meshpi's LAN dashboard")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve", parents=[common], help="serve the dashboard (socket-activated, or on --listen)"
    )
    s.add_argument("--listen", default="0.0.0.0:80", help="HOST:PORT when not socket-activated")
    s.add_argument("--socket", default=DEFAULTS["LOCALAPI_SOCKET"], help="the agent's LocalAPI socket")
    s.add_argument("--threads", type=int, default=8)
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this Host name (repeatable)")  # fmt: skip
    pw = sub.add_parser(
        "passwd", parents=[common], help="set or reset the admin password (stdin when it is not a terminal)"
    )
    pw.add_argument(
        "--from-file",
        metavar="PATH",
        help="take the first line of PATH (e.g. /boot/firmware/meshpi-password.txt) and delete the file",
    )
    sc = sub.add_parser("setup-code", parents=[common], help="print the first-run setup code")
    sc.add_argument("--boot-dir", metavar="DIR", help="also write DIR/meshpi-setup-code.txt (boot partition)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" chatter
    try:
        commands = {"serve": serve, "passwd": passwd, "setup-code": setup_code}
        return commands[args.command](args)
    except (UsageError, PasswordError, OSError) as e:
        print(f"meshpi-web: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
