"""Real databases for the store tests: a SQLite file, and a throwaway PostgreSQL.

The PostgreSQL cluster lives for the test session: `initdb` into a fresh directory
in /tmp, started with no TCP listener, only a unix socket in that same directory
(mode 0700, so no other user on the machine can connect). Each test gets its own
database, dropped afterwards; the cluster is stopped and its directory removed at
the end, whatever happened. PostgreSQL refuses to run as root, so as root its
commands run as the `postgres` user (`runuser`).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from appliance.control.store import Store, open_store

SETUP_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: ./scripts/setup installs them "
    "(Debian package postgresql), and CI must run it"
)


def _bindir() -> Path | None:
    """Where initdb and pg_ctl are: pg_config's answer, else Debian's newest version.

    pg_config alone is not enough: it may come from libpq-dev without a server."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    except (OSError, subprocess.CalledProcessError):
        pass
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    found = [b for b in found if b.parent.name.isdigit() and (b / "pg_ctl").exists()]
    return max(found, key=lambda b: int(b.parent.name)) if found else None


@dataclass
class PgCluster:
    socket_dir: Path
    _names: Iterator[int]

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def create_database(self) -> str:
        name = f"meshpi_test_{next(self._names)}"
        with self.admin() as conn:
            # Identifiers cannot be bound parameters; sql.Identifier quotes them.
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = _bindir()
    if bindir is None:
        pytest.skip(SETUP_HINT)
    as_owner: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="meshpi-pg-"))  # short: a socket path has ~100 bytes
    try:
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run PostgreSQL")
            os.chown(base, owner.pw_uid, owner.pw_gid)
            as_owner = ["runuser", "-u", "postgres", "--"]
        data, log = base / "data", base / "postgres.log"

        def run(*args: str | Path) -> None:
            subprocess.run([*as_owner, *map(str, args)], check=True, capture_output=True)

        # --no-sync and the fsync settings: this cluster is thrown away; what the
        # tests check (locking, constraints, isolation) does not depend on them.
        run(bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "-N")
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{base}' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        try:
            run(bindir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as e:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr!r}\n{text}") from e
        try:
            yield PgCluster(base, itertools.count(1))
        finally:
            run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty database of each kind, as open_store takes it."""
    if request.param == "sqlite":
        yield str(tmp_path / "control.db")
        return
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    name = cluster.create_database()
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture
def open_stores(db_url: str) -> Iterator[Callable[[], Store]]:
    """Opens Stores on the test's database; all are closed at the end."""
    stores: list[Store] = []

    def opener() -> Store:
        store = open_store(db_url)
        stores.append(store)
        return store

    yield opener
    for store in stores:
        store.close()


@pytest.fixture
def store(open_stores: Callable[[], Store]) -> Store:
    return open_stores()
