"""`meshpi-firstboot system|mesh`: apply meshpi.toml once, in two phases.

    system  meshpi-firstboot.service, early (before the network starts): check the file;
            set the hostname, Wi-Fi, the SSH key (and turn SSH on), the admin password;
            rewrite the file without its secrets; leave the mesh steps for phase two
            in firstboot-mesh.json (0600)
    mesh    meshpi-firstboot-mesh.service, once the agent runs and the network is up:
            create or join the mesh, offer the exit node and the LAN

Both record what they did in /var/lib/meshpi/firstboot.json, {"ok", "errors", "applied",
"done"}, which the agent's LocalAPI shows to the web UI, and print it (the units send
stdout to the console and the journal). A bad file changes nothing, says exactly what
is wrong, and is checked again on the next boot; a good one is applied once
(firstboot.done). Every step that can run does, and each failure is reported, never
raised: the rest of the system boots either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.base.files import atomic_write
from appliance.core.prefs import Prefs, load_prefs
from appliance.firstboot import plan
from appliance.firstboot.config import FirstbootConfig, Mesh, Wifi, load_countries, parse_config
from appliance.wire.fields import ConfigError

log = logging.getLogger("meshpi-firstboot")

WIFI_INTERFACE = "wlan0"  # the kernel's name: the image boots with net.ifnames=0
MESH_INTERFACES = frozenset({"meshpi0"})


@dataclass(frozen=True)
class Paths:
    root: Path = Path("/")

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    @property
    def config(self) -> Path:
        return self / "boot/firmware/meshpi.toml"

    @property
    def state(self) -> Path:
        return self / "var/lib/meshpi"

    @property
    def report(self) -> Path:
        return self.state / "firstboot.json"

    @property
    def done(self) -> Path:
        return self.state / "firstboot.done"

    @property
    def pending(self) -> Path:
        return self.state / "firstboot-mesh.json"


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    done: bool = False

    @classmethod
    def load(cls, path: Path) -> Report:
        try:
            doc = json.loads(path.read_text())
            return cls(list(doc.get("errors", [])), list(doc.get("applied", [])))
        except (OSError, ValueError, AttributeError):
            return cls()

    def save(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        doc = {"ok": not self.errors, **asdict(self)}
        atomic_write(path, json.dumps(doc, indent=2) + "\n")

    def step(self, what: str, apply: Callable[[], str | None]) -> None:
        """Run one step; record what it applied, or why it failed, and go on."""
        try:
            detail = apply()
        except (StepError, OSError) as e:
            self.errors.append(f"{what}: {e}")
            say(f"FAILED {what}: {e}")
            return
        done = f"{what}: {detail}" if detail else what
        self.applied.append(done)
        say(done)


class StepError(Exception):
    pass


def say(message: str) -> None:
    print(f"meshpi-firstboot: {message}", flush=True)


class Commands:
    """Runs the programs first boot needs, found on an explicit PATH."""

    def __init__(self, path: str, live: bool) -> None:
        self.path, self.live = path, live

    def run(self, argv: Sequence[str], input: str | None = None, timeout: float = 300) -> str:
        env = {"PATH": self.path, "LANG": "C.UTF-8", "HOME": "/root"}
        try:
            res = subprocess.run(
                list(argv), input=input, env=env, capture_output=True, text=True, timeout=timeout
            )
        except FileNotFoundError:
            raise StepError(f"{argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise StepError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} took over {timeout:g} s") from None
        if res.returncode != 0:
            said = " ".join((res.stderr.strip() or res.stdout.strip()).splitlines()[-3:])
            raise StepError(f"exit {res.returncode}: {said or 'no output'}")
        lines = res.stdout.strip().splitlines()
        return lines[-1][:200] if lines else ""


# -- phase one ---------------------------------------------------------------------------


def system_phase(paths: Paths, commands: Commands) -> int:
    try:
        raw = paths.config.read_bytes()
    except FileNotFoundError:
        say(f"no {paths.config}: nothing to do")
        return 0
    tab = paths / "usr/share/zoneinfo/iso3166.tab"
    countries = load_countries(tab.read_text()) if tab.exists() else None
    report = Report()
    try:
        config = parse_config(raw, str(paths.config), countries)
    except ConfigError as e:
        report.errors.append(str(e))
        report.done = True
        report.save(paths.report)
        say(f"ERROR: nothing in {paths.config} was applied:")
        say(f"ERROR: {e}")
        say("Fix the file (it is on the card's boot partition, readable on any computer) and boot again.")
        return 1
    say(f"applying {paths.config}")
    paths.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    report.step(f"hostname {config.hostname}", lambda: _hostname(paths, commands, config.hostname))
    if config.wifi is not None:
        wifi = config.wifi
        report.step(f"Wi-Fi {wifi.ssid!r} in {wifi.country}", lambda: _wifi(paths, wifi))
    if config.ssh_keys:
        report.step("SSH", lambda: _ssh(paths, commands, config.ssh_keys))
    if config.admin_password is not None:
        password = config.admin_password
        report.step("admin password", lambda: _admin_password(commands, password))
    if config.mesh is not None:
        mesh = config.mesh
        report.step("mesh", lambda: _leave_for_phase_two(paths, mesh))
    report.step("meshpi.toml", lambda: _rewrite(paths, raw, config))
    paths.done.touch()
    report.done = config.mesh is None
    report.save(paths.report)
    return 0 if not report.errors else 1


def _hostname(paths: Paths, commands: Commands, name: str) -> str:
    atomic_write(paths / "etc/hostname", name + "\n")
    hosts = paths / "etc/hosts"
    atomic_write(hosts, plan.hosts_file(hosts.read_text() if hosts.exists() else "", name))
    if commands.live:
        socket.sethostname(name)
    return f"{name}.local on the LAN"


def _wifi(paths: Paths, wifi: Wifi) -> str:
    conf = paths / f"etc/wpa_supplicant/wpa_supplicant-{WIFI_INTERFACE}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(conf, plan.wpa_supplicant_conf(wifi), mode=0o600)
    # wpa_supplicant@wlan0 starts when wlan0 appears (image/overlay), after this unit.
    return f"/{conf.relative_to(paths.root)} for {WIFI_INTERFACE}"


def _ssh(paths: Paths, commands: Commands, keys: tuple[str, ...]) -> str:
    ssh_dir = paths / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = ssh_dir / "authorized_keys"
    atomic_write(path, plan.authorized_keys(path.read_text() if path.exists() else "", keys), mode=0o600)
    # No reload: the unit file is loaded already; --no-block: this runs during boot.
    commands.run(["systemctl", "--no-reload", "enable", "ssh.service"])
    commands.run(["systemctl", "--no-block", "start", "ssh.service"])
    return f"{len(keys)} key(s) for root, ssh.service on"


def _admin_password(commands: Commands, password: str) -> str:
    # The same as `printf %s "$pw" | meshpi-web passwd`: never on a command line.
    commands.run(["meshpi-web", "passwd"], input=password, timeout=60)
    return "set for the web dashboard"


def _leave_for_phase_two(paths: Paths, mesh: Mesh) -> str:
    atomic_write(paths.pending, json.dumps(asdict(mesh)) + "\n", mode=0o600)
    return f"{mesh.mode} once the agent runs"


def _rewrite(paths: Paths, raw: bytes, config: FirstbootConfig) -> str:
    text = plan.redact(raw.decode("utf-8"), config)
    if text is None:
        return "kept (it holds no secret)"
    write_on_fat(paths.config, text)
    return "secrets removed from the file"


def write_on_fat(path: Path, text: str) -> None:
    """tmp + fsync + rename + fsync of the directory, without chmod (FAT has no modes)."""
    atomic_write(path, text, mode=None)


# -- phase two ---------------------------------------------------------------------------


def mesh_phase(paths: Paths, commands: Commands, find_lan: Callable[[], plan.Lan | None],
               agent_timeout: float | None) -> int:  # fmt: skip
    try:
        text = paths.pending.read_text()
    except FileNotFoundError:
        say("no mesh steps left: nothing to do")
        return 0
    report = Report.load(paths.report)
    try:
        mesh = Mesh(**json.loads(text))
    except (ValueError, TypeError) as e:
        report.errors.append(f"mesh: {paths.pending} is damaged ({e}); set the mesh up in the dashboard")
    else:
        if agent_timeout is not None and not _wait_for_agent(paths, agent_timeout):
            report.errors.append(f"mesh: the agent did not start within {agent_timeout:g} s")
        try:
            lan = find_lan()
        except (OSError, ValueError, subprocess.CalledProcessError) as e:
            lan = None
            say(f"cannot read the network configuration: {e}")
        steps, warnings = plan.mesh_commands(mesh, lan, _listen_port(paths))
        for warning in warnings:
            report.errors.append(warning)
            say(f"WARNING {warning}")
        for cmd in steps:
            report.step(cmd.what, _runner(commands, cmd))
    paths.pending.unlink()
    report.done = True
    report.save(paths.report)
    return 0 if not report.errors else 1


def _runner(commands: Commands, cmd: plan.Command) -> Callable[[], str | None]:
    def run() -> str | None:
        output = commands.run(cmd.argv)
        return output if cmd.show_output and output else None

    return run


def _listen_port(paths: Paths) -> int:
    prefs = paths.state / "prefs.json"
    try:
        return load_prefs(prefs).listen_port if prefs.exists() else Prefs().listen_port
    except ConfigError:
        return Prefs().listen_port


def _wait_for_agent(paths: Paths, timeout: float) -> bool:
    """Until the agent answers on its LocalAPI (what the meshpi commands use next)."""
    from appliance.client.localapi import DEFAULT_SOCKET, LocalAPIError, LocalClient

    client, deadline = (
        LocalClient(paths / str(DEFAULT_SOCKET).lstrip("/"), timeout=5.0),
        time.monotonic() + timeout,
    )
    while True:
        try:
            client.get("/v1/status")
            return True
        except LocalAPIError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def live_lan() -> plan.Lan | None:
    def ip_json(*args: str) -> list[dict[str, Any]]:
        res = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
        doc = json.loads(res.stdout or "[]")
        return doc if isinstance(doc, list) else []

    routes = ip_json("-4", "route", "show", "default") + ip_json("-6", "route", "show", "default")
    return plan.detect_lan(routes, ip_json("addr", "show"), MESH_INTERFACES)


# -- the command -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpi-firstboot", description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("system", "mesh"))
    p.add_argument("--agent-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="mesh: wait this long for the agent (default 120)")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="meshpi-firstboot: %(message)s", stream=sys.stdout)
    paths = Paths()
    # The venv's own programs (meshpi, meshpi-web) first.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/sbin:/usr/bin")])
    commands = Commands(path, live=True)
    try:
        if args.phase == "system":
            return system_phase(paths, commands)
        return mesh_phase(paths, commands, live_lan, args.agent_timeout)
    except Exception as e:  # the boot goes on; the report says what broke
        log.exception("internal error")
        report = Report.load(paths.report)
        report.errors.append(f"{args.phase}: internal error: {e!r}")
        report.done = True
        report.save(paths.report)
        return 1


if __name__ == "__main__":
    sys.exit(main())
