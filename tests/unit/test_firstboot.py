"""First boot: meshpi.toml parsed and checked, the plan made from it, and both phases
run against a throwaway root with stand-in programs (systemctl, meshpi-web, meshpi)
on PATH that record how they were called."""

from __future__ import annotations

import base64
import json
import stat
import tomllib
from ipaddress import IPv4Address, ip_network
from pathlib import Path

import pytest

from appliance.firstboot import plan
from appliance.firstboot.config import Mesh, Wifi, load_countries, parse_config
from appliance.firstboot.run import Commands, Paths, mesh_phase, system_phase
from appliance.wire.fields import ConfigError

SRC = "/boot/firmware/meshpi.toml"
COUNTRIES = load_countries("#code\tname\nDE\tGermany\nGB\tBritain (UK)\nUS\tUnited States\n")
CONTROL_KEY = base64.urlsafe_b64encode(bytes(range(1, 33))).decode().rstrip("=")
LOGIN = f"http://10.1.2.3:8080/#{CONTROL_KEY}"


def ssh_key(kind: str = "ssh-ed25519", comment: str = "me@laptop") -> str:
    name = kind.encode()
    blob = len(name).to_bytes(4, "big") + name + (32).to_bytes(4, "big") + bytes(range(32))
    return f"{kind} {base64.b64encode(blob).decode()} {comment}"


FULL = f"""# my Pi
hostname = "Den-Pi"
admin_password = "correct horse"
ssh_authorized_key = "{ssh_key()}"

[wifi]
ssid = "home net"
password = "wifi-secret-1"   # the router's sticker
country = "de"

[mesh]
mode = "join"
login_url = "{LOGIN}"
auth_key = "tskey-abcdef123"
share_lan = false
"""


def parse(text: str) -> object:
    return parse_config(text, SRC, COUNTRIES)


def error(text: str | bytes) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, SRC, COUNTRIES)
    return str(e.value)


# -- parsing -----------------------------------------------------------------------------


def test_firstboot_parses_a_full_file() -> None:
    config = parse_config(FULL, SRC, COUNTRIES)
    assert config.hostname == "den-pi"
    assert config.admin_password == "correct horse"
    assert config.ssh_keys == (ssh_key(),)
    assert config.wifi == Wifi("home net", "DE", "wifi-secret-1")
    assert config.mesh == Mesh("join", LOGIN, "tskey-abcdef123", exit_node=True, share_lan=False)
    assert "correct horse" not in repr(config) and "wifi-secret-1" not in repr(config)


def test_firstboot_empty_file_means_defaults() -> None:
    config = parse_config("", SRC, COUNTRIES)
    assert (config.hostname, config.wifi, config.mesh, config.ssh_keys) == ("meshpi", None, None, ())


def test_firstboot_create_mode_and_a_list_of_keys() -> None:
    keys = [ssh_key(), ssh_key("ssh-rsa", "other")]
    config = parse_config(f'ssh_authorized_key = {json.dumps(keys)}\n[mesh]\nmode = "create"\n', SRC)
    assert config.ssh_keys == tuple(keys)
    assert config.mesh == Mesh("create")


def test_firstboot_byte_order_mark_and_crlf_are_fine() -> None:
    text = '\ufeffhostname = "pi2"\r\n[wifi]\r\nssid = "x"\r\ncountry = "GB"\r\n'
    assert parse_config(text.encode(), SRC, COUNTRIES).hostname == "pi2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[wifi]\nssid = "home"\ncountry = "Germany"', "wifi.country: 'Germany' is not a two-letter country"),
        ('[wifi]\nssid = "home"\ncountry = "XY"', "wifi.country: 'XY' is not an ISO 3166 country code"),
        ('[wifi]\nssid = "home"', "wifi.country: None is required with [wifi]"),
        ('[wifi]\ncountry = "DE"', "wifi.ssid: None is required"),
        (f'[wifi]\nssid = "{"x" * 33}"\ncountry = "DE"', "wifi.ssid: 'xxxx"),
        ('hostname = "my_pi"', "hostname: 'my_pi' is not a host name"),
        ('hostname = "-pi"', "hostname: '-pi' is not a host name"),
        ("hostname = 7", "hostname: 7 must be a string"),
        ('[mesh]\nmode = "joins"', "mesh.mode: 'joins' must be \"create\""),
        ("[mesh]\nmode = 'join'", 'mesh.login_url: None is required with mode = "join"'),
        (
            "[mesh]\nmode = 'join'\nlogin_url = 'http://h:8080/'",
            "mesh.login_url: 'http://h:8080/' has no control key",
        ),
        ("[mesh]\nmode = 'create'\nexit_node = 'yes'", "mesh.exit_node: 'yes' must be true or false"),
        (f"[mesh]\nmode = 'create'\nlogin_url = '{LOGIN}'", "mesh.login_url: 'http://10.1.2.3:8080/#"),
        ('ssh_authorized_key = "-----BEGIN OPENSSH PRIVATE KEY-----"', "is a private key"),
        ('ssh_authorized_key = "ssh-ed25519 AAA"', "is damaged: the key after the type is not base64"),
        (
            f'ssh_authorized_key = "{ssh_key().replace("ssh-ed25519", "ssh-rsa", 1)}"',
            "its key data is not a ssh-rsa key",
        ),
        ('ssh_authorized_key = "hello there"', "is not an SSH public key"),
        ('ssh_authorized_key = "ssh-ed25519 AAAAC3Nza… you@laptop"', "the key after the type is not base64"),
        ('hostnme = "pi"', "hostnme: (value not shown) is an unknown field (did you mean hostname?"),
        (
            f'[mesh]\nmode = "create"\nssh_authorized_key = "{ssh_key()}"',
            "mesh.ssh_authorized_key: (value not shown) is an unknown field (it goes at the top of the file, before [mesh]",
        ),
        ("wifi = 'home'", "wifi: str must be a table ([wifi])"),
    ],
)
def test_firstboot_errors_name_the_field_and_the_value(text: str, expected: str) -> None:
    message = error(text)
    assert message.startswith(f"{SRC}: "), message
    assert expected in message, message


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [
        ('admin_password = "hunter2"', "hunter2", "admin_password: <hidden, 7 characters> is too short"),
        (
            '[wifi]\nssid = "h"\ncountry = "DE"\npassword = "short"',
            "short",
            "wifi.password: <hidden, 5 characters>",
        ),
        (
            '[wifi]\nssid = "h"\ncountry = "DE"\npassword = 12345678',
            "12345678",
            "wifi.password: <hidden int> must be a string",
        ),
        (
            "[mesh]\nmode = 'create'\nauth_key = 'tskey-123'",
            "tskey-123",
            "mesh.auth_key: <hidden, 9 characters> is only for",
        ),
        ("[mesh]\nmode = 'join'\nlogin_url = 'x'\nauth_key = 'has space'", "has space", "mesh.login_url"),
        (
            '[wifi]\nssid = "h"\npasword = "topsecret"',
            "topsecret",
            "wifi.pasword: (value not shown) is an unknown field (did you mean password? known: country, password, ssid)",
        ),
        (
            "[wifi]\npassword = topsecret",
            "topsecret",
            "line 2 column 12: <a line with a secret, not shown> is not valid TOML",
        ),
    ],
)
def test_firstboot_errors_never_quote_a_secret(text: str, secret: str, expected: str) -> None:
    message = error(text)
    assert secret not in message, message
    assert expected in message, message


def test_firstboot_toml_syntax_error_quotes_the_line() -> None:
    message = error('hostname = "a"\nssid = home\n')
    assert "line 2 column 8: 'ssid = home' is not valid TOML" in message, message
    assert "strings need quotes" in message


def test_firstboot_example_file_parses() -> None:
    example = Path(__file__).parents[2] / "image/overlay/boot/firmware/meshpi.toml.example"
    assert parse_config(example.read_text(), str(example), COUNTRIES) == parse_config("", SRC)


def test_firstboot_not_utf8_is_an_error() -> None:
    assert "is not UTF-8 text" in error(b'hostname = "\xff"')


# -- files and commands ------------------------------------------------------------------


def test_firstboot_wpa_psk_is_the_ieee_test_vector() -> None:
    # IEEE 802.11i-2004 H.4.1: passphrase "password", SSID "IEEE".
    assert (
        plan.wifi_psk("IEEE", "password")
        == "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
    )


def test_firstboot_wpa_supplicant_conf_has_no_passphrase() -> None:
    ssid = 'my "net"'
    conf = plan.wpa_supplicant_conf(Wifi(ssid, "GB", "wifi-secret-1"))
    assert "wifi-secret-1" not in conf
    assert "country=GB" in conf and f"ssid={ssid.encode().hex()}" in conf
    assert f"psk={plan.wifi_psk(ssid, 'wifi-secret-1')}" in conf
    assert "key_mgmt=NONE" in plan.wpa_supplicant_conf(Wifi("cafe", "GB"))


def test_firstboot_hosts_file_names_the_host() -> None:
    old = "127.0.0.1\tlocalhost\n127.0.1.1\tmeshpi\n::1\t\tlocalhost\n"
    assert plan.hosts_file(old, "den") == "127.0.0.1\tlocalhost\n127.0.1.1\tden\n::1\t\tlocalhost\n"
    assert plan.hosts_file("127.0.0.1 localhost\n", "den") == "127.0.0.1 localhost\n127.0.1.1\tden\n"


def test_firstboot_authorized_keys_added_once() -> None:
    once = plan.authorized_keys("# mine\n", (ssh_key(),))
    assert once == f"# mine\n{ssh_key()}\n"
    assert plan.authorized_keys(once, (ssh_key(comment="renamed"),)) == once


def test_firstboot_redact_keeps_the_layout_and_drops_secrets() -> None:
    config = parse_config(FULL, SRC, COUNTRIES)
    out = plan.redact(FULL, config)
    assert out is not None
    for secret in config.secrets():
        assert secret not in out
    assert "# the router's sticker" not in out  # the comment shared the secret's line
    assert "# my Pi" in out and 'ssid = "home net"' in out
    assert "# password = (applied on the first boot; removed)" in out
    assert out.startswith(plan.HEADER)
    again = parse_config(out, SRC, COUNTRIES)
    assert again.secrets() == ()
    assert (again.hostname, again.wifi, again.ssh_keys) == ("den-pi", Wifi("home net", "DE"), config.ssh_keys)
    assert again.mesh == Mesh("join", LOGIN, None, share_lan=False)


def test_firstboot_redact_falls_back_to_a_fresh_file() -> None:
    text = 'admin_password = """correct horse"""\nwifi = { ssid = "n", country = "DE", password = "wifi-secret-1" }\n'
    config = parse_config(text, SRC, COUNTRIES)
    out = plan.redact(text, config)
    assert out is not None and "correct" not in out and "wifi-secret-1" not in out
    assert tomllib.loads(out)["wifi"] == {"ssid": "n", "country": "DE"}
    assert plan.redact('hostname = "x"\n', parse_config('hostname = "x"\n', SRC)) is None


IP_ROUTES = [
    {"dst": "default", "gateway": "192.168.1.1", "dev": "eth0", "protocol": "dhcp", "metric": 1024},
    {"dst": "default", "gateway": "fe80::1", "dev": "eth0", "protocol": "ra", "metric": 1024},
]
IP_ADDRS = [
    {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
    {"ifname": "eth0", "addr_info": [
        {"family": "inet", "local": "192.168.1.23", "prefixlen": 24, "scope": "global", "dynamic": True},
        {"family": "inet6", "local": "2001:db8:5::23", "prefixlen": 64, "scope": "global"},
        {"family": "inet6", "local": "2001:db8:5::beef", "prefixlen": 64, "scope": "global", "temporary": True},
        {"family": "inet6", "local": "2001:db8:5::99", "prefixlen": 128, "scope": "global"},
        {"family": "inet6", "local": "fe80::23", "prefixlen": 64, "scope": "link"},
    ]},
    {"ifname": "meshpi0", "addr_info": [{"family": "inet", "local": "100.64.0.1", "prefixlen": 32, "scope": "global"}]},
]  # fmt: skip


def test_firstboot_detects_the_lan_behind_the_default_route() -> None:
    lan = plan.detect_lan(IP_ROUTES, IP_ADDRS, frozenset({"meshpi0"}))
    assert lan == plan.Lan("eth0", (ip_network("192.168.1.0/24"), ip_network("2001:db8:5::/64")),
                           IPv4Address("192.168.1.23"))  # fmt: skip
    assert plan.detect_lan([], IP_ADDRS, frozenset()) is None
    via_mesh = [{"dst": "default", "dev": "meshpi0"}]
    assert plan.detect_lan(via_mesh, IP_ADDRS, frozenset({"meshpi0"})) is None


def test_firstboot_mesh_commands() -> None:
    lan = plan.Lan("eth0", (ip_network("192.168.1.0/24"),), IPv4Address("192.168.1.23"))
    cmds, warnings = plan.mesh_commands(Mesh("create"), lan, 51820)
    assert [c.argv for c in cmds] == [
        ("meshpi", "create-mesh"),
        ("meshpi", "set", "--advertise-exit-node", "--advertise-routes", "192.168.1.0/24",
         "--advertise-endpoint", "192.168.1.23:51820"),
    ]  # fmt: skip
    assert warnings == []
    cmds, warnings = plan.mesh_commands(Mesh("join", LOGIN, "tskey-1", exit_node=False), None, 51820)
    assert cmds[0].argv == ("meshpi", "up", "--login-server", LOGIN, "--auth-key", "tskey-1")
    assert cmds[1].argv == ("meshpi", "set", "--no-advertise-exit-node", "--advertise-routes", "")
    assert all("tskey-1" not in c.what for c in cmds)
    assert warnings == ["mesh.share_lan: no LAN address found (no default route): the LAN is not shared"]


# -- the phases, on a throwaway root ------------------------------------------------------

RECORDER = """#!/bin/sh
# stands in for {name}: records its arguments and stdin
{{ printf '%s' "$*"; printf ' <'; cat; printf '>\\n'; }} >> "{log}"
{tail}
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "boot/firmware").mkdir(parents=True)
    (r / "etc").mkdir()
    (r / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tmeshpi\n")
    return r


def stand_ins(tmp_path: Path, tails: dict[str, str]) -> tuple[Commands, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    for name, tail in tails.items():
        path = bin_dir / name
        path.write_text(RECORDER.format(name=name, log=log, tail=tail))
        path.chmod(0o755)
    return Commands(f"{bin_dir}:/usr/bin:/bin", live=False), log


def test_firstboot_system_phase_applies_and_forgets_the_secrets(root: Path, tmp_path: Path) -> None:
    paths = Paths(root)
    paths.config.write_text(FULL)
    commands, calls = stand_ins(tmp_path, {"systemctl": "", "meshpi-web": "echo password set"})
    assert system_phase(paths, commands) == 0
    assert (root / "etc/hostname").read_text() == "den-pi\n"
    assert "127.0.1.1\tden-pi" in (root / "etc/hosts").read_text()
    wpa = root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
    assert stat.S_IMODE(wpa.stat().st_mode) == 0o600 and "country=DE" in wpa.read_text()
    keys = root / "root/.ssh/authorized_keys"
    assert keys.read_text() == ssh_key() + "\n" and stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert calls.read_text().splitlines() == [
        "--no-reload enable ssh.service <>",
        "--no-block start ssh.service <>",
        "passwd <correct horse>",
    ]
    toml = paths.config.read_text()
    assert "correct horse" not in toml and "wifi-secret-1" not in toml and "tskey-abcdef123" not in toml
    pending = paths.pending
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    assert json.loads(pending.read_text())["auth_key"] == "tskey-abcdef123"
    report = json.loads(paths.report.read_text())
    assert report["ok"] is True and report["errors"] == [] and report["done"] is False
    assert report["applied"][0] == "hostname den-pi: den-pi.local on the LAN"
    assert "correct horse" not in paths.report.read_text()
    assert paths.done.exists()


def test_firstboot_missing_web_ui_is_an_error_and_the_rest_applies(root: Path, tmp_path: Path) -> None:
    paths = Paths(root)
    paths.config.write_text('admin_password = "correct horse"\nhostname = "den"\n')
    commands, _ = stand_ins(tmp_path, {"systemctl": ""})
    assert system_phase(paths, commands) == 1
    report = json.loads(paths.report.read_text())
    assert report["ok"] is False and report["done"] is True
    assert report["errors"] == ["admin password: meshpi-web is not installed"]
    assert (root / "etc/hostname").read_text() == "den\n"
    assert "correct horse" not in paths.config.read_text()


def test_firstboot_bad_file_changes_nothing_and_says_why(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = Paths(root)
    bad = FULL.replace('country = "de"', 'country = "Germany"')
    paths.config.write_text(bad)
    commands, calls = stand_ins(tmp_path, {"systemctl": "", "meshpi-web": ""})
    assert system_phase(paths, commands) == 1
    assert paths.config.read_text() == bad  # still there to fix, secrets and all
    assert not (root / "etc/hostname").exists() and not calls.exists()
    assert not paths.done.exists()  # checked again on the next boot
    report = json.loads(paths.report.read_text())
    assert report == {"ok": False, "errors": [f"{paths.config}: wifi.country: 'Germany' is not a two-letter "
                                               "country code (like GB, DE, US)"], "applied": [], "done": True}  # fmt: skip
    out = capsys.readouterr().out
    assert "meshpi-firstboot: ERROR: nothing in" in out and "'Germany' is not a two-letter" in out


def test_firstboot_mesh_phase_runs_meshpi_and_reports(root: Path, tmp_path: Path) -> None:
    paths = Paths(root)
    paths.config.write_text(FULL.replace("share_lan = false", ""))
    commands, calls = stand_ins(tmp_path, {"systemctl": "", "meshpi-web": "", "meshpi": "echo connected: ok"})
    assert system_phase(paths, commands) == 0
    lan = plan.Lan("eth0", (ip_network("192.168.1.0/24"),), IPv4Address("192.168.1.23"))
    assert mesh_phase(paths, commands, lambda: lan, agent_timeout=None) == 0
    assert calls.read_text().splitlines()[-2:] == [
        f"up --login-server {LOGIN} --auth-key tskey-abcdef123 <>",
        "set --advertise-exit-node --advertise-routes 192.168.1.0/24 --advertise-endpoint 192.168.1.23:51820 <>",
    ]
    assert not paths.pending.exists()
    report = json.loads(paths.report.read_text())
    assert report["ok"] is True and report["done"] is True
    assert report["applied"][-2:] == [
        "joined the mesh at http://10.1.2.3:8080 with an auth key: connected: ok",
        "offered exit node; LAN 192.168.1.0/24; endpoint 192.168.1.23:51820",
    ]
    assert "tskey" not in paths.report.read_text()
    assert mesh_phase(paths, commands, lambda: lan, agent_timeout=None) == 0  # nothing left: a no-op


def test_firstboot_mesh_phase_failure_is_reported(root: Path, tmp_path: Path) -> None:
    paths = Paths(root)
    paths.config.write_text('[mesh]\nmode = "create"\n')
    commands, _ = stand_ins(tmp_path, {"meshpi": "echo 'meshpi: no agent' >&2; exit 1"})
    assert system_phase(paths, commands) == 0
    assert mesh_phase(paths, commands, lambda: None, agent_timeout=None) == 1
    report = json.loads(paths.report.read_text())
    assert report["errors"] == [
        "mesh.share_lan: no LAN address found (no default route): the LAN is not shared",
        "created a new mesh (meshpi-control runs on this Pi): exit 1: meshpi: no agent",
        "offered exit node; LAN not shared: exit 1: meshpi: no agent",
    ]
    assert report["ok"] is False and report["done"] is True
    assert sorted(p.name for p in paths.state.iterdir()) == ["firstboot.done", "firstboot.json"]
