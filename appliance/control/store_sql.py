"""One connection to SQLite or PostgreSQL, and transactions on it, for store.py.

SQL is written once, with `?` placeholders, in the subset both dialects share;
the PostgreSQL side turns `?` into psycopg's `%s`. Parameters are always bound.

Transactions are explicit on both sides (the drivers run in autocommit mode and
we send BEGIN ourselves), so each dialect gets the locking it needs:

- SQLite: a write starts with `BEGIN IMMEDIATE`, taking the database's one write
  lock up front. Two writers can then never both read the address counter and
  deadlock upgrading; the second waits (busy timeout) and sees the first's commit.
- PostgreSQL: a write runs in READ COMMITTED and, when it touches the mesh, first
  locks the single `meta` row (`SELECT … FOR UPDATE`). That serialises mesh writers,
  so versions are handed out in commit order: a reader that has seen version V has
  seen every change at or below V. Reads run in REPEATABLE READ, one snapshot.
  UNIQUE constraints stay the backstop; a violation, deadlock or serialisation
  failure rolls back and the whole transaction is retried.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from appliance.control.store_records import Row, StoreCorrupt, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]

RETRIES = 5
# How long a SQLite writer waits for another to commit before giving up.
SQLITE_BUSY_TIMEOUT = 30.0


class Tx:
    """The statements of one transaction."""

    def __init__(self, db: Database, cursor: Any) -> None:
        self._db = db
        self._cursor = cursor
        # PostgreSQL locks rows a transaction will change; SQLite already holds
        # the database's write lock, and has no FOR UPDATE.
        self.for_update = " FOR UPDATE" if db.dialect == "postgresql" else ""

    def _execute(self, sql: str, params: tuple[Any, ...]) -> Any:
        self._db.statements += 1
        return self._cursor.execute(self._db.translate(sql), params)

    def one(self, sql: str, *params: Any) -> Row | None:
        row: Row | None = self._execute(sql, params).fetchone()
        return row

    def all(self, sql: str, *params: Any) -> list[Row]:
        rows: list[Row] = self._execute(sql, params).fetchall()
        return rows

    def run(self, sql: str, *params: Any) -> int:
        """A statement for its effect; the number of rows it changed."""
        count: int = self._execute(sql, params).rowcount
        return count


class Database:
    """One connection, one transaction at a time.

    Thread-safe: a lock serialises the transactions of threads sharing this object.
    Every call blocks on database I/O, so asyncio code calls it via asyncio.to_thread
    (or accepts the stall); for parallel writers open one Database per thread.
    """

    dialect: Dialect

    def __init__(self, where: str) -> None:
        self.where = where  # the file or the URL without password, for messages
        self.statements = 0  # statements executed, so tests can check a query's cost
        self._lock = threading.Lock()

    # --- per dialect ---
    def translate(self, sql: str) -> str:
        return sql

    def _cursor(self) -> Any:
        raise NotImplementedError

    def _begin(self, write: bool) -> str:
        raise NotImplementedError

    def _retryable(self, error: Exception) -> bool:
        raise NotImplementedError

    def _wrap(self, error: Exception) -> StoreError | None:
        """The store's error for a driver error; None to let it through."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- shared ---
    @contextmanager
    def _transaction(self, write: bool, lock_meta: bool) -> Iterator[Tx]:
        cursor = self._cursor()
        try:
            cursor.execute(self._begin(write))
            tx = Tx(self, cursor)
            if lock_meta and tx.for_update:  # SQLite's BEGIN IMMEDIATE already holds it
                tx.one("SELECT id FROM meta WHERE id = 1" + tx.for_update)
            yield tx
            cursor.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT: SQLite keeps the transaction open then.
            self._rollback(cursor)
            raise
        finally:
            cursor.close()

    def _rollback(self, cursor: Any) -> None:
        try:
            cursor.execute("ROLLBACK")
        except Exception as e:  # the original error matters more than this one
            log.debug("%s: rollback failed: %s", self.where, e)

    def run(self, work: Callable[[Tx], T], *, write: bool = True, lock_meta: bool = False) -> T:
        """`work` in one transaction, retried whole when the database asks for that."""
        with self._lock:
            for attempt in range(1, RETRIES + 1):
                try:
                    with self._transaction(write, lock_meta) as tx:
                        return work(tx)
                except StoreError:
                    raise
                except Exception as e:
                    if attempt < RETRIES and self._retryable(e):
                        log.debug("%s: retrying after %s", self.where, e)
                        continue
                    wrapped = self._wrap(e)
                    if wrapped is None:
                        raise
                    raise wrapped from e
        raise AssertionError("unreachable")  # pragma: no cover


class SqliteDatabase(Database):
    dialect: Dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path
        try:
            # isolation_level=None: the module must not BEGIN behind our back; we do it.
            self._conn = sqlite3.connect(
                path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise StoreUnavailable(f"{path}: cannot open the SQLite database: {e}") from e
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            # FULL: a commit the server acknowledged survives a power cut (WAL's
            # default NORMAL may lose the last ones, and an address could repeat).
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            self._conn.close()
            wrapped = self._wrap(e)
            assert wrapped is not None
            raise wrapped from e
        if mode != "wal":
            log.warning("%s: journal mode is %s, not wal", path, mode)

    def _cursor(self) -> Any:
        return self._conn.cursor()

    def _begin(self, write: bool) -> str:
        return "BEGIN IMMEDIATE" if write else "BEGIN"

    def _retryable(self, error: Exception) -> bool:
        # BEGIN IMMEDIATE serialises writers, so a constraint failure is a bug
        # rather than a race, but retrying is harmless and keeps the backstop uniform.
        return isinstance(error, sqlite3.IntegrityError)

    def _wrap(self, error: Exception) -> StoreError | None:
        if isinstance(error, sqlite3.IntegrityError):
            return StoreError(f"{self.path}: constraint failed: {error}")
        if isinstance(error, sqlite3.DatabaseError):
            text = str(error)
            if "not a database" in text or "malformed" in text:
                return StoreCorrupt(
                    f"{self.path}: is not a readable SQLite database ({text}); "
                    "restore it from a backup, or move it away to start a new mesh"
                )
            return StoreUnavailable(f"{self.path}: {text}")
        return None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresDatabase(Database):
    dialect: Dialect = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__(redact(url))
        try:
            # Imported here: a SQLite-only server never loads the driver.
            import psycopg
        except ImportError as e:
            raise StoreUnavailable(
                f"{self.where}: PostgreSQL needs psycopg: pip install 'psycopg[binary]'"
            ) from e
        self._psycopg = psycopg
        self._url = url
        self._translated: dict[str, str] = {}
        self._conn = self._connect()

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self._url, autocommit=True)
        except self._psycopg.Error as e:
            raise StoreUnavailable(f"{self.where}: cannot connect to PostgreSQL: {e}") from e

    def translate(self, sql: str) -> str:
        # Our SQL has no literal `?` or `%`: patterns and values are always bound.
        text = self._translated.get(sql)
        if text is None:
            text = self._translated[sql] = sql.replace("?", "%s")
        return text

    def _cursor(self) -> Any:
        if self._conn.broken:
            # The server restarted or the network dropped: the last call failed with
            # StoreUnavailable; this one tries a new connection.
            log.warning("%s: connection lost, reconnecting", self.where)
            self._conn = self._connect()
        return self._conn.cursor()

    def _begin(self, write: bool) -> str:
        return "BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"

    def _retryable(self, error: Exception) -> bool:
        errors = self._psycopg.errors
        return isinstance(
            error, errors.UniqueViolation | errors.SerializationFailure | errors.DeadlockDetected
        )

    def _wrap(self, error: Exception) -> StoreError | None:
        psycopg = self._psycopg
        if isinstance(error, psycopg.errors.IntegrityError):
            return StoreError(f"{self.where}: constraint failed: {error}")
        if isinstance(error, psycopg.OperationalError):
            return StoreUnavailable(f"{self.where}: {error}")
        return None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def connect(url_or_path: str | Path) -> Database:
    """`postgresql://…` (or `postgres://…`); else `sqlite:///path` or a plain path."""
    text = str(url_or_path)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(text)
    if text.startswith("sqlite://"):
        # sqlite:///relative and sqlite:////absolute, as SQLAlchemy spells them.
        text = text.removeprefix("sqlite://").removeprefix("/")
        if not text:
            raise StoreUnavailable(f"{url_or_path}: names no file")
    elif "://" in text:
        raise StoreUnavailable(f"{url_or_path}: unknown database URL (sqlite or postgresql)")
    return SqliteDatabase(Path(text))
