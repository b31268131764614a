"""The admin password: a scrypt hash in one small file of the web state directory.

The hash is self-describing, `scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`, so the
cost can be raised later without breaking stored hashes. Verification is constant
time. The cost parameters read back from a file are bounded, so a tampered file
cannot make a login allocate gigabytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pwd
import secrets
from pathlib import Path

from appliance.base.files import atomic_write

# 16 MiB of memory and ~50 ms on x86, a few hundred ms on a Pi 3: slow enough to make
# guessing costly, quick enough for one admin logging in.
N, R, P = 16384, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
MAX_N = 1 << 20
MIN_LENGTH = 8
WEB_USER = "meshpi-web"


class PasswordError(ValueError):
    """A password that cannot be used, or a hash that cannot be read; the message says why."""


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=HASH_BYTES
    )


def hash_password(password: str) -> str:
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password, salt, N, R, P)
    return f"scrypt${N}${R}${P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n_text, r_text, p_text, salt_text, hash_text = stored.strip().split("$")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt, expected = (
            base64.b64decode(salt_text, validate=True),
            base64.b64decode(hash_text, validate=True),
        )
    except ValueError:
        raise PasswordError(
            "the stored password hash is unreadable; reset it with `meshpi-web passwd`"
        ) from None
    if scheme != "scrypt" or not (2 <= n <= MAX_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 4):
        raise PasswordError(
            "the stored password hash has unknown parameters; reset it with `meshpi-web passwd`"
        )
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


def check_new_password(password: str, confirm: str | None = None) -> None:
    if len(password) < MIN_LENGTH:
        raise PasswordError(f"the password must have at least {MIN_LENGTH} characters")
    if confirm is not None and not hmac.compare_digest(password.encode(), confirm.encode()):
        raise PasswordError("the two passwords differ")


class PasswordTaken(PasswordError):
    """Someone else set the first password a moment earlier."""


class PasswordFile:
    """<state dir>/password: the hash, mode 0600, owned by the web service's user."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "password"

    def read(self) -> str | None:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def is_set(self) -> bool:
        return self.read() is not None

    def check(self, password: str) -> bool:
        stored = self.read()
        return stored is not None and verify_password(password, stored)

    def set(self, password: str) -> None:
        check_new_password(password)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, hash_password(password) + "\n", mode=0o600)
        _give_to_web_user(self.path)

    def create(self, password: str) -> None:
        """The first password, exclusively: of two setups at once, one wins and the other
        gets PasswordTaken. Written in full to a temporary file, then hard-linked to its
        name, which fails if the name exists: never a half-written file, never two winners."""
        check_new_password(password)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".password.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(hash_password(password) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _give_to_web_user(tmp)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise PasswordTaken("the admin password was set a moment ago, from elsewhere") from None
        finally:
            tmp.unlink()
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _give_to_web_user(path: Path) -> None:
    """`meshpi-web passwd` runs as root (on the console, at first boot): the file must
    still be readable by the service, which runs as its own user."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam(WEB_USER)
    except KeyError:
        return  # a development machine: whoever runs the server is root too
    for p in (path.parent, path):
        os.chown(p, user.pw_uid, user.pw_gid)
