"""What first boot does about a checked meshpi.toml: file contents and commands (pure).

Nothing here reads or writes the system; run.py does, with what these return.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_interface
from typing import Any

from appliance.firstboot.config import SECRETS, FirstbootConfig, Mesh, Wifi
from appliance.wire.loginurl import parse_login_url

IPNet = IPv4Network | IPv6Network
MESH_V4 = IPv4Network("100.64.0.0/10")


# -- /etc files --------------------------------------------------------------------------


def hosts_file(old: str, hostname: str) -> str:
    """/etc/hosts with the 127.0.1.1 line (Debian's own name for this host) naming hostname."""
    lines, done = old.splitlines(), False
    for i, line in enumerate(lines):
        if line.split()[:1] == ["127.0.1.1"]:
            lines[i], done = f"127.0.1.1\t{hostname}", True
    if not done:
        at = next((i + 1 for i, line in enumerate(lines) if line.split()[:1] == ["127.0.0.1"]), 0)
        lines.insert(at, f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


def wpa_supplicant_conf(wifi: Wifi) -> str:
    """wpa_supplicant-wlan0.conf. The passphrase is stored only as its PSK (what
    wpa_passphrase prints), and the SSID in hex, so no character needs quoting."""
    lines = [
        "# Written by meshpi-firstboot from meshpi.toml [wifi].",
        "ctrl_interface=/run/wpa_supplicant",
        "update_config=0",
        f"country={wifi.country}",
        "",
        "network={",
        f"\tssid={wifi.ssid.encode().hex()}",
        "\tscan_ssid=1",  # hidden networks too
    ]
    if wifi.password is None:
        lines.append("\tkey_mgmt=NONE")
    else:
        lines += ["\tkey_mgmt=WPA-PSK", f"\tpsk={wifi_psk(wifi.ssid, wifi.password)}"]
    return "\n".join([*lines, "}", ""])


def wifi_psk(ssid: str, password: str) -> str:
    if len(password) == 64:
        return password.lower()  # already a PSK (the parser allows only hex at this length)
    return hashlib.pbkdf2_hmac("sha1", password.encode(), ssid.encode(), 4096, 32).hex()


def authorized_keys(old: str, keys: tuple[str, ...]) -> str:
    """The old file plus each key it does not have yet (same type and key data)."""
    have = {tuple(line.split()[:2]) for line in old.splitlines() if not line.lstrip().startswith("#")}
    lines = old.splitlines()
    lines += [key for key in keys if tuple(key.split()[:2]) not in have]
    return "\n".join(lines) + "\n" if lines else ""


# -- meshpi.toml without its secrets ----------------------------------------------------

HEADER = (
    "# meshpi-firstboot applied this file on the first boot. Its secrets (passwords,\n"
    "# auth key) were applied and then removed from it; the rest stays for reference.\n"
)
_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.\"' -]+?)\s*=")


def redact(text: str, config: FirstbootConfig) -> str | None:
    """meshpi.toml with each secret's line replaced by a comment saying it was applied;
    None if it holds no secret. Layout and comments stay, unless the file is laid out
    so that a line-by-line rewrite cannot be proved clean (multi-line strings, inline
    tables): then it is written afresh from the parsed config."""
    secrets = config.secrets()
    if not secrets:
        return None
    names = {f"{table}.{key}" if table else key for table, key in SECRETS}
    out, table = [HEADER], ""
    for line in text.removeprefix("\ufeff").splitlines(keepends=True):
        if m := _TABLE.match(line):
            table = m[1]
        elif (m := _KEY.match(line)) and not line.lstrip().startswith("#"):
            key = re.sub(r"[\"'\s]", "", m[1])
            if (f"{table}.{key}" if table else key) in names:
                indent = line[: len(line) - len(line.lstrip())]
                out.append(f"{indent}# {key.rpartition('.')[2]} = (applied on the first boot; removed)\n")
                continue
        out.append(line)
    rewritten = "".join(out)
    return rewritten if _clean(rewritten, secrets) else fresh_toml(config)


def _clean(text: str, secrets: tuple[str, ...]) -> bool:
    if any(secret in text for secret in secrets):
        return False
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return not any(key in (doc.get(table, {}) if table else doc) for table, key in SECRETS)


def fresh_toml(config: FirstbootConfig) -> str:
    """The config's non-secret fields as TOML (JSON strings are TOML basic strings)."""

    def s(value: str) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = [HEADER.rstrip("\n"), f"hostname = {s(config.hostname)}"]
    if config.ssh_keys:
        lines.append(f"ssh_authorized_key = [{', '.join(s(k) for k in config.ssh_keys)}]")
    if config.wifi:
        lines += ["", "[wifi]", f"ssid = {s(config.wifi.ssid)}", f"country = {s(config.wifi.country)}"]
    if config.mesh:
        m = config.mesh
        lines += ["", "[mesh]", f"mode = {s(m.mode)}"]
        lines += [f"login_url = {s(m.login_url)}"] if m.login_url else []
        lines += [f"exit_node = {str(m.exit_node).lower()}", f"share_lan = {str(m.share_lan).lower()}"]
    return "\n".join(lines) + "\n"


# -- the LAN this Pi is on ---------------------------------------------------------------


@dataclass(frozen=True)
class Lan:
    interface: str
    prefixes: tuple[IPNet, ...]
    address: IPv4Address | None  # where mesh peers on this LAN reach the Pi


def detect_lan(routes: list[dict[str, Any]], links: list[dict[str, Any]], skip: frozenset[str]) -> Lan | None:
    """The LAN behind the default route, from `ip -j route show default` (v4 and v6) and
    `ip -j addr show`: its global prefixes (not link-local, not the mesh's own range)."""
    defaults = sorted(
        (r for r in routes if r.get("dst") == "default" and r.get("dev") and r["dev"] not in skip),
        key=lambda r: (":" in str(r.get("gateway", "")), r.get("metric", 0)),  # v4 first
    )
    if not defaults:
        return None
    dev = str(defaults[0]["dev"])
    prefixes: list[IPNet] = []
    address: IPv4Address | None = None
    for link in links:
        if link.get("ifname") != dev:
            continue
        for info in link.get("addr_info", []):
            if info.get("scope") != "global" or info.get("temporary") or info.get("deprecated"):
                continue
            iface = ip_interface(f"{info['local']}/{info['prefixlen']}")
            if iface.version == 4 and iface.ip in MESH_V4:
                continue
            if iface.version == 6 and iface.network.prefixlen > 64:
                continue  # a DHCPv6 /128 is not a LAN
            if iface.network not in prefixes:
                prefixes.append(iface.network)
            if address is None and isinstance(iface.ip, IPv4Address):
                address = iface.ip
    return Lan(dev, tuple(prefixes), address)


# -- the mesh steps ----------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    what: str  # for the log and firstboot.json: never holds a secret
    show_output: bool = False  # add the command's last line of output to `what`


def mesh_commands(mesh: Mesh, lan: Lan | None, listen_port: int) -> tuple[list[Command], list[str]]:
    """The meshpi commands that create or join the mesh and set what this Pi offers,
    and warnings (a LAN to share that cannot be found)."""
    warnings: list[str] = []
    if mesh.mode == "create":
        commands = [
            Command(("meshpi", "create-mesh"), "created a new mesh (meshpi-control runs on this Pi)", True)
        ]
    else:
        assert mesh.login_url is not None  # config.py requires it for "join"
        base, _ = parse_login_url(mesh.login_url)
        argv: tuple[str, ...] = ("meshpi", "up", "--login-server", mesh.login_url)
        argv += ("--auth-key", mesh.auth_key) if mesh.auth_key else ()
        how = "with an auth key" if mesh.auth_key else "(waiting for an admin's approval)"
        commands = [Command(argv, f"joined the mesh at {base} {how}", True)]
    routes: list[str] = []
    if mesh.share_lan:
        if lan is None or not lan.prefixes:
            warnings.append("mesh.share_lan: no LAN address found (no default route): the LAN is not shared")
        else:
            routes = [str(p) for p in lan.prefixes]
    exit_flag = "--advertise-exit-node" if mesh.exit_node else "--no-advertise-exit-node"
    offer: tuple[str, ...] = ("meshpi", "set", exit_flag, "--advertise-routes", ",".join(routes))
    offers = ["exit node" if mesh.exit_node else "no exit node", f"LAN {', '.join(routes) or 'not shared'}"]
    if lan is not None and lan.address is not None:
        # Peers on the same LAN reach the Pi here without a port forward.
        endpoint = f"{lan.address}:{listen_port}"
        offer += ("--advertise-endpoint", endpoint)
        offers.append(f"endpoint {endpoint}")
    commands.append(Command(offer, f"offered {'; '.join(offers)}"))
    return commands, warnings
