"""Pre-auth keys: made, checked and counted in the store, kept only as a hash.

The secret is 32 random bytes, handed out once as `mpk-<id>-<base64url>`. The id
finds the row without a scan; the sha256 of the secret is all the row keeps, so a
copy of the database admits no one. 32 random bytes need no slow hash: there is
nothing to guess by brute force.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from datetime import datetime

from appliance.control.store_records import (
    PREAUTH_COLUMNS,
    KeyExpired,
    KeyInvalid,
    KeyRevoked,
    KeyUsed,
    NotFound,
    PreauthKey,
    dump_tags,
    preauth_from_row,
    to_epoch,
)
from appliance.control.store_sql import Database, Tx

log = logging.getLogger(__name__)

SECRET_LEN = 32
PREFIX = "mpk"


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def _encode(secret: bytes) -> str:
    return base64.urlsafe_b64encode(secret).rstrip(b"=").decode()


# 32 bytes are 43 base64url characters without padding; ids stay within a BIGINT.
_SECRET_TEXT = re.compile(rf"{PREFIX}-([0-9]{{1,18}})-([A-Za-z0-9_-]{{43}})")


def parse_secret_text(text: str) -> tuple[int, bytes]:
    """The id and secret of `mpk-<id>-<secret>`; KeyInvalid if it is not that shape."""
    match = _SECRET_TEXT.fullmatch(text.strip())
    if match is None:
        raise KeyInvalid(f"auth key is not an {PREFIX}-<id>-<secret> key")
    secret = base64.urlsafe_b64decode(match[2] + "=")
    return int(match[1]), secret


def create(
    db: Database, reusable: bool, expires_at: datetime, tags: Iterable[str], now: datetime
) -> tuple[PreauthKey, str]:
    secret = secrets.token_bytes(SECRET_LEN)
    values = (_digest(secret), reusable, to_epoch(now), to_epoch(expires_at), dump_tags(tags))

    def work(tx: Tx) -> PreauthKey:
        row = tx.one(
            "INSERT INTO preauth_keys (secret_sha256, reusable, created, expires, tags, used, "
            f"revoked) VALUES (?, ?, ?, ?, ?, 0, ?) RETURNING {PREAUTH_COLUMNS}",
            *values,
            False,
        )
        assert row is not None
        return preauth_from_row(row)

    key = db.run(work)
    log.info(
        "pre-auth key %d created (%s, expires %s, tags %s)",
        key.id,
        "reusable" if key.reusable else "single use",
        key.expires_at.isoformat(),
        ",".join(key.tags) or "none",
    )
    return key, f"{PREFIX}-{key.id}-{_encode(secret)}"


def use(db: Database, secret_text: str, now: datetime) -> PreauthKey:
    key_id, secret = parse_secret_text(secret_text)
    when = to_epoch(now)

    def work(tx: Tx) -> PreauthKey:
        # FOR UPDATE (PostgreSQL): two registrations racing on a single-use key
        # queue here, and the second sees the first one's use.
        row = tx.one(
            f"SELECT {PREAUTH_COLUMNS}, secret_sha256 FROM preauth_keys WHERE id = ?" + tx.for_update,
            key_id,
        )
        # Unknown id and wrong secret look the same to the caller: no probing for ids.
        if row is None or not hmac.compare_digest(bytes(row[-1]), _digest(secret)):
            raise KeyInvalid("auth key is not valid")
        key = preauth_from_row(row[:-1])
        if key.revoked:
            raise KeyRevoked(f"auth key {key.id} was revoked")
        if to_epoch(key.expires_at) <= when:
            raise KeyExpired(f"auth key {key.id} expired at {key.expires_at.isoformat()}")
        if not key.reusable and key.used:
            raise KeyUsed(f"auth key {key.id} was already used")
        used = tx.one(
            f"UPDATE preauth_keys SET used = used + 1 WHERE id = ? RETURNING {PREAUTH_COLUMNS}",
            key_id,
        )
        assert used is not None
        return preauth_from_row(used)

    try:
        return db.run(work)
    except KeyInvalid:
        log.info("pre-auth key %d refused: not valid", key_id)
        raise
    except (KeyRevoked, KeyExpired, KeyUsed) as e:
        log.info("pre-auth key refused: %s", e)
        raise


def list_all(db: Database) -> tuple[PreauthKey, ...]:
    rows = db.run(
        lambda tx: tx.all(f"SELECT {PREAUTH_COLUMNS} FROM preauth_keys ORDER BY id"),
        write=False,
    )
    return tuple(preauth_from_row(row) for row in rows)


def revoke(db: Database, key_id: int) -> PreauthKey:
    def work(tx: Tx) -> PreauthKey:
        row = tx.one(
            f"UPDATE preauth_keys SET revoked = ? WHERE id = ? RETURNING {PREAUTH_COLUMNS}",
            True,
            key_id,
        )
        if row is None:
            raise NotFound(f"no pre-auth key with id {key_id}")
        return preauth_from_row(row)

    key = db.run(work)
    log.info("pre-auth key %d revoked", key.id)
    return key
