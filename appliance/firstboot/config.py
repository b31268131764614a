"""meshpi.toml: what the owner put on the boot partition before the first boot.

    hostname = "meshpi"                       # optional; the name on the LAN (meshpi.local)
    admin_password = "…"                      # optional; the web dashboard's password
    ssh_authorized_key = "ssh-ed25519 AAAA…"  # optional (or a list); SSH stays off without one

    [wifi]                                    # optional; wired Ethernet needs nothing
    ssid = "home"
    password = "…"                            # leave it out for an open network
    country = "GB"                            # ISO 3166 code: channels and power limits

    [mesh]                                    # optional; else set it up in the dashboard
    mode = "create"                           # or "join", with:
    login_url = "http://host:8080/#…"         #   the URL control printed
    auth_key = "…"                            #   a pre-auth key (else an admin approves)
    exit_node = true                          # offer this Pi as an exit node (default true)
    share_lan = true                          # route the home LAN into the mesh (default true)

Every error names the file, the field and the value, as appliance.wire.fields does,
except that secrets (passwords, the auth key) are never quoted: their repr says how
long they are and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from appliance.wire.fields import ConfigError, Fields, parse_bool, parse_str
from appliance.wire.loginurl import LoginUrlError, parse_login_url

T = TypeVar("T")

DEFAULT_HOSTNAME = "meshpi"
TOP_LEVEL = ("hostname", "admin_password", "ssh_authorized_key", "wifi", "mesh")
# (table, key) of every secret: hidden in messages, removed when the file is rewritten.
SECRETS = (("", "admin_password"), ("wifi", "password"), ("mesh", "auth_key"))


@dataclass(frozen=True)
class Wifi:
    ssid: str
    country: str
    password: str | None = field(default=None, repr=False)  # None: an open network


@dataclass(frozen=True)
class Mesh:
    mode: Literal["create", "join"]
    login_url: str | None = None
    auth_key: str | None = field(default=None, repr=False)
    exit_node: bool = True
    share_lan: bool = True


@dataclass(frozen=True)
class FirstbootConfig:
    hostname: str = DEFAULT_HOSTNAME
    admin_password: str | None = field(default=None, repr=False)
    ssh_keys: tuple[str, ...] = ()
    wifi: Wifi | None = None
    mesh: Mesh | None = None

    def secrets(self) -> tuple[str, ...]:
        values = (
            self.admin_password,
            self.wifi.password if self.wifi else None,
            self.mesh.auth_key if self.mesh else None,
        )
        return tuple(v for v in values if v)


class Hidden(str):
    """A secret string: its repr (what ConfigError quotes) gives only its length."""

    def __repr__(self) -> str:
        return f"<hidden, {len(self)} characters>"


class _Opaque:
    """A secret that is not even a string, or a value not worth quoting."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _hide(value: object) -> object:
    return Hidden(value) if isinstance(value, str) else _Opaque(f"<hidden {type(value).__name__}>")


class _Table(Fields):
    """Fields over one TOML table: secrets hidden, unknown keys named without their values."""

    def __init__(self, source: str, path: str, obj: object, secrets: tuple[str, ...] = ()) -> None:
        if not isinstance(obj, Mapping):
            shown = f"[{path}]" if path else "the file"
            raise ConfigError(
                source, path or "(top level)", _Opaque(type(obj).__name__), f"must be a table ({shown})"
            )
        super().__init__(source, path, {k: _hide(v) if k in secrets else v for k, v in obj.items()})

    def table(self, key: str, secrets: tuple[str, ...] = ()) -> _Table | None:
        self._seen.add(key)
        if key not in self.obj:
            return None
        return _Table(self.source, self.where(key), self.obj[key], secrets)

    def known(self, *keys: str) -> None:
        """Refuse unknown keys first: a misspelt one explains the errors it would cause."""
        unknown = sorted(set(self.obj) - set(keys))
        if unknown:
            close = difflib.get_close_matches(unknown[0], keys, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            if self.path and unknown[0] in TOP_LEVEL:
                hint = f"it goes at the top of the file, before [{self.path}]; "
            known = ", ".join(sorted(keys))
            raise self.error(
                unknown[0], _Opaque("(value not shown)"), f"is an unknown field ({hint}known: {known})"
            )


def parse_config(
    text: str | bytes, source: str, countries: Mapping[str, str] | None = None
) -> FirstbootConfig:
    """Parse and check meshpi.toml; `countries` (code -> name) narrows wifi.country."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(source, "(file)", _Opaque(f"byte {e.start}"), "is not UTF-8 text") from None
    text = text.removeprefix("\ufeff")  # a byte order mark from Windows editors
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(source, text, e) from None
    top = _Table(source, "", doc, secrets=("admin_password",))
    top.known(*TOP_LEVEL)
    hostname = top.get("hostname", parse_hostname, DEFAULT_HOSTNAME)
    admin_password = top.get("admin_password", parse_admin_password, None)
    ssh_keys = _ssh_keys(top)
    wifi_table = top.table("wifi", secrets=("password",))
    wifi = _wifi(wifi_table, countries) if wifi_table is not None else None
    mesh_table = top.table("mesh", secrets=("auth_key",))
    mesh = _mesh(mesh_table) if mesh_table is not None else None
    return FirstbootConfig(hostname, admin_password, ssh_keys, wifi, mesh)


def _toml_error(source: str, text: str, e: tomllib.TOMLDecodeError) -> ConfigError:
    where = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
    reason = re.sub(r"\s*\(at .*\)$", "", str(e))
    if where is None:
        return ConfigError(source, "(file)", _Opaque("(its text)"), f"is not valid TOML: {reason}")
    line_no = int(where[1])
    lines = text.splitlines()
    line = lines[line_no - 1].strip() if 0 < line_no <= len(lines) else ""
    # A broken line may hold a secret (password = hunter2, no quotes): don't echo those.
    shown: object = _Opaque("<a line with a secret, not shown>") if _SECRET_WORDS.search(line) else line
    return ConfigError(source, f"line {line_no} column {where[2]}", shown,
                       f"is not valid TOML: {reason} (strings need quotes: key = \"value\")")  # fmt: skip


_SECRET_WORDS = re.compile(r"pass|auth|secret|token|psk", re.IGNORECASE)


def _ssh_keys(top: _Table) -> tuple[str, ...]:
    if isinstance(top.obj.get("ssh_authorized_key"), list):
        return top.get_list("ssh_authorized_key", parse_ssh_key)
    key = top.get("ssh_authorized_key", parse_ssh_key, None)
    return (key,) if key else ()


def _wifi(f: _Table, countries: Mapping[str, str] | None) -> Wifi:
    f.known("ssid", "password", "country")
    ssid = f.require("ssid", parse_ssid)
    password = f.get("password", parse_wifi_password, None)
    country = f.get("country", country_parser(countries), None)
    if country is None:
        raise ConfigError(f.source, f.where("country"), None,
                          "is required with [wifi]: the two-letter country code (like GB, DE, US) "
                          "sets the channels and power Wi-Fi may use")  # fmt: skip
    return Wifi(ssid, country, password)


def _mesh(f: _Table) -> Mesh:
    f.known("mode", "login_url", "auth_key", "exit_node", "share_lan")
    mode = f.require("mode", parse_mode)
    login_url = f.get("login_url", parse_url, None)
    auth_key = f.get("auth_key", parse_auth_key, None)
    exit_node = f.get("exit_node", parse_bool, True)
    share_lan = f.get("share_lan", parse_bool, True)
    if mode == "join" and login_url is None:
        reason = 'is required with mode = "join": the login URL the control server printed'
        raise ConfigError(f.source, f.where("login_url"), None, reason)
    if mode == "create":
        for key in ("login_url", "auth_key"):
            if key in f.obj:
                reason = 'is only for mode = "join" (mode = "create" starts a new mesh on this Pi)'
                raise f.error(key, f.obj[key], reason)
    return Mesh(mode, login_url, auth_key, exit_node, share_lan)


# -- one parser per kind of value; each raises ValueError with the reason only ------------

# fullmatch, never match + `$`: `$` also matches before a trailing newline.
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def parse_hostname(value: object) -> str:
    text = parse_str(value).lower()
    if not _HOSTNAME.fullmatch(text):
        raise ValueError("is not a host name (letters, digits and '-', up to 63, no '-' at either end)")
    if text == "localhost":
        raise ValueError("is reserved")
    return text


def parse_admin_password(value: object) -> str:
    text = str(parse_str(value))
    if len(text) < 8:
        raise ValueError(f"is too short: at least 8 characters (it has {len(text)})")
    if any(c in text for c in "\r\n\0"):
        raise ValueError("must be one line")
    return text


SSH_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})  # fmt: skip


def parse_ssh_key(value: object) -> str:
    """One authorized_keys line: type, base64 blob, optional comment."""
    text = parse_str(value).strip()
    if "PRIVATE KEY" in text:
        raise ValueError("is a private key: put the one line of the .pub file here, never the private key")
    if "\n" in text:
        raise ValueError('must be one line (for several keys, use a list: ["ssh-ed25519 …", "…"])')
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValueError("is not an SSH public key (like: ssh-ed25519 AAAAC3Nz… you@laptop)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):  # (ValueError: not even ASCII)
        raise ValueError("is damaged: the key after the type is not base64 (copied only in part?)") from None
    # The blob starts with its own type name, length-prefixed: a cut or mixed-up paste shows here.
    size = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + size] != parts[0].encode():
        raise ValueError(f"is damaged: its key data is not a {parts[0]} key (copied only in part?)")
    return text


def parse_ssid(value: object) -> str:
    text = parse_str(value)
    size = len(text.encode())
    if not 1 <= size <= 32:
        raise ValueError(f"must be 1 to 32 bytes long (it is {size})")
    return text


def parse_wifi_password(value: object) -> str:
    text = str(parse_str(value))
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text  # a raw PSK, as wpa_passphrase prints it
    if not 8 <= len(text) <= 63:
        raise ValueError(f"must be 8 to 63 characters (it has {len(text)}); leave it out for an open network")
    if any(not " " <= c <= "~" for c in text):
        raise ValueError("must be printable ASCII characters (WPA passphrases are)")
    return text


def country_parser(countries: Mapping[str, str] | None) -> Callable[[object], str]:
    def parse(value: object) -> str:
        code = parse_str(value).strip().upper()
        if not re.fullmatch(r"[A-Z]{2}", code):
            raise ValueError("is not a two-letter country code (like GB, DE, US)")
        if countries is not None and code not in countries:
            raise ValueError("is not an ISO 3166 country code (like GB, DE, US)")
        return code

    return parse


def parse_mode(value: object) -> Literal["create", "join"]:
    text = parse_str(value)
    if text == "create":
        return "create"
    if text == "join":
        return "join"
    raise ValueError('must be "create" (a new mesh on this Pi) or "join" (an existing one)')


def parse_url(value: object) -> str:
    text = parse_str(value).strip()
    try:
        parse_login_url(text)
    except LoginUrlError as e:
        raise ValueError(e.reason) from None
    return text


def parse_auth_key(value: object) -> str:
    text = str(parse_str(value)).strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError("must be the key control printed, without spaces")
    return text


def load_countries(tab: str) -> dict[str, str]:
    """code -> name, from tzdata's iso3166.tab (present on Debian and in the image)."""
    out = {}
    for line in tab.splitlines():
        code, _, name = line.partition("\t")
        if len(code) == 2 and not code.startswith("#"):
            out[code] = name.strip()
    return out
