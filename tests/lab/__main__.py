"""The lab from a shell (run as root from the repo root, or via ./scripts/lab):

python -m tests.lab up [--pmtu-blackhole] [--laptop2] [--keep]   build it, wait for Ctrl-C
python -m tests.lab down [--force]     remove leftovers of crashed runs
python -m tests.lab demo [--interval S] [--count N] [--laptop2]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from tests.lab import cleanup, demo
from tests.lab.topology import Lab


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (e.g. from a CI timeout) takes the same path as Ctrl-C, so teardown runs.
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    with Lab(pmtu_blackhole=args.pmtu_blackhole, laptop2=args.laptop2, keep=args.keep) as lab:
        print(f"lab up; scratch dir {lab.scratch}")
        for host in lab.hosts.values():
            print(f"  {host.role:8} ip netns exec {host.ns} bash")
        print("Ctrl-C tears it down.", flush=True)
        threading.Event().wait()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    done = cleanup.cleanup(force=args.force)
    print("\n".join(done) if done else "nothing to clean up")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return demo.run(interval=args.interval, count=args.count, laptop2=args.laptop2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring the topology up until Ctrl-C")
    up.add_argument("--pmtu-blackhole", action="store_true")
    up.add_argument("--laptop2", action="store_true")
    up.add_argument("--keep", action="store_true", help="keep the scratch dir")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="remove leftovers of crashed runs")
    down.add_argument("--force", action="store_true", help="also runs whose PID is alive")
    down.set_defaults(func=cmd_down)
    dem = sub.add_parser("demo", help="the pi as exit node for the laptop, live")
    dem.add_argument("--interval", type=float, default=2.0)
    dem.add_argument("--count", type=int, default=None, help="stop after N lines")
    dem.add_argument("--laptop2", action="store_true")
    dem.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)  # fmt: skip
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces): try sudo ./scripts/lab")
    # Ctrl-C is how `up` and `demo` end. Install the handler explicitly: a shell starts
    # background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\nstopped; the lab is torn down", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
