"""`meshpi-upgrades`: Debian's security updates, the system side (kernel/upgrades.py).

    meshpi-upgrades configure [--prefs F] [--offline]   apt's config + timers from prefs
    meshpi-upgrades remove [--offline]                  take that config out again
    meshpi-upgrades hook-pre                            apt's DPkg::Pre-Install-Pkgs (v2, stdin)
    meshpi-upgrades hook-post                           apt's DPkg::Post-Invoke
    meshpi-upgrades status [--prefs F]                  the status object, JSON

Run as root by meshpi-upgrades.service (configure) and by apt (the hooks); the agent
only reads what they leave behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from appliance.base.errors import MeshpiError
from appliance.core.prefs import Prefs, load_prefs
from appliance.core.upgrades import HookInputError
from appliance.kernel.base import KernelError
from appliance.kernel.upgrades import (
    UpgradePaths,
    configure,
    hook_post,
    hook_pre,
    read_hook_input,
    read_status,
    remove,
    systemctl,
)

log = logging.getLogger(__name__)
PREFS = Path("/var/lib/meshpi/prefs.json")


def _prefs(path: Path) -> Prefs:
    return load_prefs(path) if path.exists() else Prefs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshpi-upgrades", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("configure", "apt's config and timers from prefs"), ("status", "the status, JSON")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--prefs", type=Path, default=PREFS, help=f"default: {PREFS}")
        if name == "configure":
            cmd.add_argument("--offline", action="store_true", help="files only (a chroot): start nothing")
    sub.add_parser("remove", help="remove meshpi's apt config and timer drop-ins").add_argument(
        "--offline", action="store_true"
    )
    sub.add_parser("hook-pre", help="apt's DPkg::Pre-Install-Pkgs hook (protocol version 2 on stdin)")
    sub.add_parser("hook-post", help="apt's DPkg::Post-Invoke hook")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="meshpi-upgrades: %(message)s", stream=sys.stderr)
    paths = UpgradePaths()
    try:
        if args.command == "configure":
            ctl = systemctl if shutil.which("systemctl") else None
            changed = configure(_prefs(args.prefs), paths, not args.offline, ctl)
            print(json.dumps({"changed": changed}))
        elif args.command == "remove":
            print(json.dumps({"removed": remove(paths, live=not args.offline)}))
        elif args.command == "status":
            print(json.dumps(read_status(_prefs(args.prefs), paths), indent=2))
        elif args.command == "hook-pre":
            hook_pre(read_hook_input(sys.stdin.buffer), paths)
        else:
            hook_post(paths)
    except (MeshpiError, KernelError, HookInputError, OSError) as e:
        # A hook's failure must not fail apt (its apt.conf line says `|| …` too); say why.
        print(f"meshpi-upgrades: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
