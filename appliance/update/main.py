"""meshpi-update: apply a signed bundle on the console (root), with rollback.

    meshpi-update apply BUNDLE [--force]   check, install beside, switch, restart, watch
    meshpi-update spool                    apply the dashboard's upload, if one waits (root's
                                           meshpi-update.service, started by meshpi-update.path)
    meshpi-update status                   the running version and the last update's result

The new version must answer on the LocalAPI as `running`, with the data plane
applied and its own version number, within --deadline seconds of the restart;
else the previous version is switched back and restarted, and the result says
why. Every step prints one line; the last line is JSON (the result).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.base.files import atomic_write
from appliance.client.localapi import DEFAULT_SOCKET, LocalAPIError, LocalClient
from appliance.update.bundle import BundleError, Version, trusted_keys, verify_bundle
from appliance.update.install import Layout, install, prune, switch
from appliance.update.spool import take_upload
from appliance.update.state import CURRENT, KEYS, RESULT, SPOOL, VERSIONS, clear_progress, write_progress

log = logging.getLogger(__name__)

RESTART = "systemctl try-restart meshpi-agent.service meshpi-web.service meshpi-control.service"


@dataclass(frozen=True)
class Result:
    result: str  # updated | rolled back | refused
    version: str | None
    previous: str | None
    reason: str | None
    seconds: float
    time: float


def healthy(socket: str, want: Version) -> Callable[[], str | None]:
    """None when the agent at `socket` runs `want` with its data plane applied;
    else what is missing, for the rollback's reason."""

    def check() -> str | None:
        try:
            st = LocalClient(socket).get("/v1/status")
        except LocalAPIError as e:
            return f"the agent does not answer ({e.message})"
        if st.get("version") != str(want):
            return f"the agent runs version {st.get('version')}, not {want}"
        if st.get("error"):
            return f"the agent reports an error: {st['error']}"
        if st.get("interface") is None and st.get("control", {}).get("state") not in (
            "needs-login",
            "pending",
        ):
            return "the agent has not applied the data plane"
        return None

    return check


def wait_healthy(check: Callable[[], str | None], deadline: float) -> str | None:
    end = time.monotonic() + deadline
    problem = check()
    while problem is not None and time.monotonic() < end:
        time.sleep(0.5)
        problem = check()
    return problem


def apply(
    bundle: Path,
    layout: Layout,
    keys: Path,
    restart: Callable[[], None],
    check_for: Callable[[Version], Callable[[], str | None]],
    deadline: float,
    force: bool = False,
) -> Result:
    t0, since = time.monotonic(), time.time()
    installed = layout.running_version()
    say(f"checking {bundle} (installed: {installed or 'unknown'})")
    write_progress(layout.versions, None, "checking", since)
    with bundle.open("rb") as f:
        manifest = verify_bundle(f, trusted_keys(keys), layout.versions / ".staging", installed, force)
    say(f"signature and {len(manifest.files)} wheels good: version {manifest.version}; installing beside")
    write_progress(layout.versions, str(manifest.version), "installing", since)
    target = install(layout, layout.versions / ".staging", manifest)
    previous = switch(layout, target)
    say(f"switched to {manifest.version}; restarting, the new version has {deadline:.0f} s to be healthy")
    write_progress(layout.versions, str(manifest.version), "restarting", since)
    restart()
    problem = wait_healthy(check_for(manifest.version), deadline)
    prev_name = previous.name if previous else None
    if problem is None:
        prune(layout, keep=previous)
        say(f"version {manifest.version} runs and is healthy")
        return Result("updated", str(manifest.version), prev_name, None, time.monotonic() - t0, time.time())
    say(f"not healthy in {deadline:.0f} s ({problem}): switching back to {prev_name}")
    if previous is not None:
        switch(layout, previous)
        restart()
    return Result(
        "rolled back", str(manifest.version), prev_name, problem, time.monotonic() - t0, time.time()
    )


def say(line: str) -> None:
    print(f"meshpi-update: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpi-update", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--versions", type=Path, default=VERSIONS, help=f"one venv per version (default {VERSIONS})"
    )
    p.add_argument(
        "--current", type=Path, default=CURRENT, help=f"the symlink the units run (default {CURRENT})"
    )
    p.add_argument("--keys", type=Path, default=KEYS, help=f"trusted update keys, *.pub (default {KEYS})")
    p.add_argument(
        "--local-api", default=str(DEFAULT_SOCKET), help=f"the agent's socket (default {DEFAULT_SOCKET})"
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply", help="check, install, switch and watch a bundle")
    a.add_argument("bundle", type=Path)
    a.add_argument("--force", action="store_true", help="allow the same or an older version (a downgrade)")
    a.add_argument("--deadline", type=float, default=90.0, help="seconds for the new version to be healthy")
    a.add_argument(
        "--restart", default=RESTART, help=f"the command that restarts meshpi (default: {RESTART})"
    )
    sp = sub.add_parser("spool", help="apply the bundle the dashboard left, if any (root's unit runs it)")
    sp.add_argument("--spool", type=Path, default=SPOOL, help=f"the dashboard's upload (default {SPOOL})")
    sp.add_argument("--deadline", type=float, default=90.0, help="seconds for the new version to be healthy")
    sp.add_argument("--restart", default=RESTART, help="the command that restarts meshpi")
    sub.add_parser("status", help="the running version and the last update's result")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    layout = Layout(args.versions, args.current)
    result_file = args.versions / RESULT
    if args.command == "status":
        last = json.loads(result_file.read_text()) if result_file.exists() else None
        print(json.dumps({"running": str(layout.running_version() or "unknown"), "last": last}))
        return 0
    args.versions.mkdir(parents=True, exist_ok=True)
    force = args.command == "apply" and args.force  # never from the dashboard: the console's word only
    if args.command == "spool":
        # A copy only root can write, made before the lock: the dashboard's file is
        # the web user's, and nothing it does later can change what is checked.
        try:
            taken = take_upload(args.spool, args.versions / ".upload.bundle")
        except BundleError as e:
            refused = Result("refused", None, None, e.message, 0.0, time.time())
            atomic_write(result_file, json.dumps(asdict(refused)) + "\n")
            print(f"meshpi-update: {e.message}", file=sys.stderr)
            print(json.dumps(asdict(refused)))
            return 1
        if taken is None:
            print(json.dumps({"result": "nothing to do"}))
            return 0
        args.bundle = taken
    if not args.bundle.is_file():
        print(f"meshpi-update: bundle: {args.bundle} is not a file", file=sys.stderr)
        return 2
    with (args.versions / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("meshpi-update: another update is running", file=sys.stderr)
            return 1

        def restart() -> None:
            subprocess.run(shlex.split(args.restart), check=False, timeout=120)

        def check_for(v: Version) -> Callable[[], str | None]:
            return healthy(args.local_api, v)

        try:
            result = apply(args.bundle, layout, args.keys, restart, check_for, args.deadline, force)
        except BundleError as e:  # InstallError too: nothing was switched
            result = Result("refused", None, None, e.message, 0.0, time.time())
            print(f"meshpi-update: {e.message}", file=sys.stderr)
        finally:
            clear_progress(args.versions)
            if args.command == "spool":
                args.bundle.unlink(missing_ok=True)
        atomic_write(result_file, json.dumps(asdict(result)) + "\n")
    print(json.dumps(asdict(result)))
    return {"updated": 0, "rolled back": 3}.get(result.result, 1)


if __name__ == "__main__":
    sys.exit(main())
