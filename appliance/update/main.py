"""meshpi-update: apply a signed bundle on the console (root), with rollback.

    meshpi-update apply BUNDLE [--force]   check, install beside, switch, restart, watch
    meshpi-update spool                    apply the dashboard's upload, if one waits (root's
                                           meshpi-update.service, started by meshpi-update.path)
    meshpi-update check [--url URL]        fetch the bundle at prefs' update_url; apply it when
                                           newer (root's daily meshpi-update-check.timer)
    meshpi-update status                   the running version and the last update's result

meshpi is stopped for the switch and its state directories copied aside
(snapshot.py). The new version must answer on the LocalAPI as `running`, with
the data plane applied and its own version number, within --deadline seconds of
its start; else it is stopped, the previous version switched back with the state
as it was before the update, and started, and the result says why. Every step
prints one line; the last line is JSON (the result).
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
from appliance.update.fetch import check, record, rolled_back_before
from appliance.update.install import Layout, install, prune, switch
from appliance.update.snapshot import STATE_DIRS, Snapshot, SnapshotError
from appliance.update.spool import take_upload
from appliance.update.state import (
    AVAILABLE,
    CURRENT,
    KEYS,
    RESULT,
    SPOOL,
    VERSIONS,
    clear_progress,
    write_progress,
)

log = logging.getLogger(__name__)

UNITS = ("meshpi-agent.service", "meshpi-web.service", "meshpi-control.service")


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
    service: Service,
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
    write_progress(layout.versions, str(manifest.version), "restarting", since)
    service.stop()
    try:
        kept = service.snapshot.take()
    except SnapshotError as e:
        service.start()  # nothing was switched: the running version comes back as it was
        raise BundleError(f"{e}; nothing was switched") from e
    previous = switch(layout, target)
    say(f"switched to {manifest.version} (state kept: {', '.join(map(str, kept)) or 'none'}); "
        f"the new version has {deadline:.0f} s to be healthy")  # fmt: skip
    service.start()
    problem = wait_healthy(check_for(manifest.version), deadline)
    prev_name = previous.name if previous else None
    if problem is None:
        service.snapshot.drop()
        prune(layout, keep=previous)
        say(f"version {manifest.version} runs and is healthy")
        return Result("updated", str(manifest.version), prev_name, None, time.monotonic() - t0, time.time())
    say(f"not healthy in {deadline:.0f} s ({problem}): switching back to {prev_name} and its state")
    if previous is not None:
        service.stop()
        switch(layout, previous)
        service.snapshot.restore()
        service.start()
    return Result(
        "rolled back", str(manifest.version), prev_name, problem, time.monotonic() - t0, time.time()
    )


@dataclass(frozen=True)
class Service:
    """How meshpi is stopped and started around the switch, and its state kept."""

    stop: Callable[[], None]
    start: Callable[[], None]
    snapshot: Snapshot


def systemd_service(units: tuple[str, ...], snapshot: Snapshot) -> Service:
    """The units running now are stopped, and started again (on either version)."""
    running = [u for u in units if subprocess.run(["systemctl", "is-active", "--quiet", u]).returncode == 0]

    def systemctl(verb: str) -> Callable[[], None]:
        def run() -> None:
            if running:
                _run(["systemctl", verb, *running])

        return run

    return Service(systemctl("stop"), systemctl("start"), snapshot)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        say(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


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
    sp = sub.add_parser("spool", help="apply the bundle the dashboard left, if any (root's unit runs it)")
    sp.add_argument("--spool", type=Path, default=SPOOL, help=f"the dashboard's upload (default {SPOOL})")
    c = sub.add_parser("check", help="fetch the bundle at the update URL; apply it when newer")
    c.add_argument("--url", help="this URL, not prefs' update_url")
    c.add_argument("--available", type=Path, default=AVAILABLE, help=f"what was found (default {AVAILABLE})")
    c.add_argument("--no-apply", action="store_true", help="only fetch, check and record what was found")
    for cmd in (a, sp, c):
        cmd.add_argument(
            "--deadline", type=float, default=90.0, help="seconds for the new version to be healthy"
        )
        cmd.add_argument(
            "--restart", help="the command that starts meshpi (default: systemctl start of the units running)"
        )
        cmd.add_argument("--stop", help="the command that stops meshpi (default: systemctl stop of them)")
        cmd.add_argument(
            "--state",
            type=Path,
            action="append",
            help="a state directory kept for a rollback (repeatable; default: "
            + ", ".join(map(str, STATE_DIRS))
            + ")",
        )
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
    if args.command == "check":
        return _check(args, layout)
    force = args.command == "apply" and args.force  # never from the dashboard: the console's word only
    if args.command == "spool":
        # A copy only root can write, made before the lock: the dashboard's file is
        # the web user's, and nothing it does later can change what is checked.
        try:
            taken = take_upload(args.spool, args.versions / ".upload.bundle")
        except BundleError as e:
            return _report(Result("refused", None, None, e.message, 0.0, time.time()), result_file)
        if taken is None:
            print(json.dumps({"result": "nothing to do"}))
            return 0
        args.bundle = taken
    if not args.bundle.is_file():
        print(f"meshpi-update: bundle: {args.bundle} is not a file", file=sys.stderr)
        return 2
    return _apply_locked(args, layout, args.bundle, force, remove=args.command == "spool")


def _apply_locked(args: argparse.Namespace, layout: Layout, bundle: Path, force: bool, remove: bool) -> int:
    """apply() under the versions' lock, its result written and printed; `remove`: the
    bundle is a copy made for this run."""
    with (layout.versions / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("meshpi-update: another update is running", file=sys.stderr)
            return 1

        service = _service(args)

        def check_for(v: Version) -> Callable[[], str | None]:
            return healthy(args.local_api, v)

        try:
            result = apply(bundle, layout, args.keys, service, check_for, args.deadline, force)
        except BundleError as e:  # InstallError too: nothing was switched
            result = Result("refused", None, None, e.message, 0.0, time.time())
        finally:
            clear_progress(layout.versions)
            if remove:
                bundle.unlink(missing_ok=True)
        return _report(result, layout.versions / RESULT)


def _service(args: argparse.Namespace) -> Service:
    """systemd's units by default; --stop and --restart commands instead (tests, other inits)."""
    snapshot = Snapshot(tuple(args.state or STATE_DIRS))

    def command(line: str) -> Callable[[], None]:
        return lambda: _run(shlex.split(line))

    if args.stop is not None and args.restart is not None:
        return Service(command(args.stop), command(args.restart), snapshot)
    units = systemd_service(UNITS, snapshot)
    stop = command(args.stop) if args.stop is not None else units.stop
    start = command(args.restart) if args.restart is not None else units.start
    return Service(stop, start, snapshot)


def _report(result: Result, result_file: Path) -> int:
    if result.result == "refused":
        print(f"meshpi-update: {result.reason}", file=sys.stderr)
    atomic_write(result_file, json.dumps(asdict(result)) + "\n")
    print(json.dumps(asdict(result)))
    return {"updated": 0, "rolled back": 3}.get(result.result, 1)


def _check(args: argparse.Namespace, layout: Layout) -> int:
    url = args.url
    if url is None:
        try:
            url = LocalClient(args.local_api).get("/v1/prefs").get("update_url")
        except LocalAPIError as e:
            print(
                f"meshpi-update: cannot read prefs' update_url from the agent: {e.message}", file=sys.stderr
            )
            return 1
    if not url:
        args.available.unlink(missing_ok=True)
        print(json.dumps({"result": "off", "why": "no update_url in prefs"}))
        return 0
    try:
        keys = trusted_keys(args.keys)
    except BundleError as e:
        print(f"meshpi-update: {e.message}", file=sys.stderr)
        return 1
    found = check(url, args.available.parent, keys, layout.running_version())
    record(found, args.available)
    if found.error is not None or found.manifest is None or found.bundle is None:
        print(json.dumps({"result": "refused" if found.error else "up to date", **found.to_json()}))
        return 1 if found.error else 0
    if args.no_apply or rolled_back_before(found.manifest.version, layout.versions / RESULT):
        why = "--no-apply" if args.no_apply else "this version was rolled back here before"
        say(f"{found.manifest.version} is available at {url}; not applied ({why})")
        print(json.dumps({"result": "available", **found.to_json()}))
        return 0
    return _apply_locked(args, layout, found.bundle, False, remove=True)


if __name__ == "__main__":
    sys.exit(main())
