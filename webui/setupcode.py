"""The one-time setup code: proof that whoever sets the first password owns the Pi.

Until an admin password exists, anyone on the LAN could otherwise set it. The code
is something only the owner can see: the Pi's console (HDMI) and journal, and, on
the image, the file `meshpi-setup-code.txt` on the boot partition.

Who makes it:
- on the image, root, at boot, before the dashboard (meshpi-setup-code.service runs
  `meshpi-web setup-code --boot-dir /boot/firmware`): the file is root:meshpi-web 0640
  in the web state directory, so the unprivileged web service can read it but not
  rewrite it;
- on a plain install (scripts/install.sh, no first boot), the web service itself at
  its first start with no password, which logs it (`journalctl -u meshpi-web`).
`sudo meshpi-web setup-code` prints it (making it when there is none).

It is removed once the password is set; a later boot removes the boot partition's
copy. Twelve characters of a 32-letter alphabet: 60 bits, far beyond guessing even
without the per-address throttle that also guards it.
"""

from __future__ import annotations

import grp
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

# No 0/O, 1/I/L, U: easy to read off a screen and to type.
ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
LETTERS = 12
FILE_NAME = "setup-code"
BOOT_FILE_NAME = "meshpi-setup-code.txt"
WEB_GROUP = "meshpi-web"


def normalize(text: str) -> str:
    """What the owner typed, as stored: upper case, without spaces and dashes."""
    return "".join(c for c in text.upper() if c not in " -\t\r\n")


def show(code: str) -> str:
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def new_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(LETTERS))


class SetupCode:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> str | None:
        """The code, or None when there is none (or it cannot be read: then setup stays shut)."""
        try:
            text = normalize(self.path.read_text())
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("cannot read the setup code in %s: %s", self.path, e)
            return None
        return text if len(text) == LETTERS and all(c in ALPHABET for c in text) else None

    def ensure(self) -> tuple[str, bool]:
        """The code, made now (exclusively, 0640, group meshpi-web when root makes it) if
        there is none; returns (code, made)."""
        existing = self.read()
        if existing is not None:
            return existing, False
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        code = new_code()
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, (show(code) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        _give_to_web_group(tmp)
        os.rename(tmp, self.path)  # replaces an unreadable leftover
        return code, True

    def check(self, given: str) -> bool:
        expected = self.read()
        return expected is not None and hmac.compare_digest(normalize(given).encode(), expected.encode())

    def remove(self) -> None:
        try:
            self.path.unlink()
            log.info("setup is done: removed the setup code %s", self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove the used setup code %s: %s", self.path, e)


def _give_to_web_group(path: Path) -> None:
    if os.geteuid() != 0:
        return
    try:
        gid = grp.getgrnam(WEB_GROUP).gr_gid
    except KeyError:
        return  # a development machine: the server runs as root too
    os.chown(path, 0, gid)
    # The state directory is the web user's (systemd's StateDirectory= would otherwise
    # chown it, and everything in it, at the service's start).
    try:
        import pwd

        user = pwd.getpwnam(WEB_GROUP)
        os.chown(path.parent, user.pw_uid, user.pw_gid)
    except KeyError:
        pass
