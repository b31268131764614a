"""Schema migrations, per dialect, recorded in `schema_version`; and the mesh row.

A migration is a version number and the statements that take the schema from
the previous version to it. Append new ones, never edit applied ones: a database
records which versions it has, and runs only those it lacks. A database that has
a version this list lacks was written by a newer meshpi and is refused, since
this code would misread it.

Both dialects keep the same tables and columns (see PROTOCOL.md, "Store"): times
are Unix seconds, lists are JSON text, keys are their 32 raw bytes. Only the
spelling of the types differs.

The one `meta` row, with the mesh's ranges, is made on first open like the schema.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from ipaddress import IPv6Network

from appliance.control.store_records import (
    FIRST_INDEX,
    IPV4_RANGE,
    SchemaTooNew,
    mesh_from_row,
    to_epoch,
    utcnow,
)
from appliance.control.store_sql import Database, Dialect, Tx
from appliance.wire.netmap import Mesh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_SQLITE_V1 = (
    # STRICT: SQLite then checks column types as PostgreSQL does, so a bug that
    # writes text into an integer fails in tests on both, not on one.
    """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        ipv4 TEXT NOT NULL,
        ipv6 TEXT NOT NULL,
        mesh_version INTEGER NOT NULL,
        next_address_index INTEGER NOT NULL,
        delta_floor INTEGER NOT NULL DEFAULT 0
    ) STRICT""",
    # AUTOINCREMENT: ids of removed nodes are never handed out again either.
    """CREATE TABLE nodes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_key BLOB NOT NULL UNIQUE,
        node_key BLOB NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        address_index INTEGER NOT NULL UNIQUE,
        state TEXT NOT NULL CHECK (state IN ('pending', 'approved')),
        tags TEXT NOT NULL,
        advertised_routes TEXT NOT NULL,
        approved_routes TEXT NOT NULL,
        endpoints TEXT NOT NULL,
        created INTEGER NOT NULL,
        last_seen INTEGER,
        key_expiry INTEGER,
        expiry_exempt INTEGER NOT NULL DEFAULT 0,
        version INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX nodes_version ON nodes (version)",
    """CREATE TABLE tombstones (
        public_key BLOB PRIMARY KEY,
        version INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX tombstones_version ON tombstones (version)",
    """CREATE TABLE preauth_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        secret_sha256 BLOB NOT NULL UNIQUE,
        reusable INTEGER NOT NULL,
        created INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        tags TEXT NOT NULL,
        used INTEGER NOT NULL DEFAULT 0,
        revoked INTEGER NOT NULL DEFAULT 0
    ) STRICT""",
)

_POSTGRES_V1 = (
    """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        ipv4 TEXT NOT NULL,
        ipv6 TEXT NOT NULL,
        mesh_version BIGINT NOT NULL,
        next_address_index BIGINT NOT NULL,
        delta_floor BIGINT NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE nodes (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        machine_key BYTEA NOT NULL UNIQUE,
        node_key BYTEA NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        address_index BIGINT NOT NULL UNIQUE,
        state TEXT NOT NULL CHECK (state IN ('pending', 'approved')),
        tags TEXT NOT NULL,
        advertised_routes TEXT NOT NULL,
        approved_routes TEXT NOT NULL,
        endpoints TEXT NOT NULL,
        created BIGINT NOT NULL,
        last_seen BIGINT,
        key_expiry BIGINT,
        expiry_exempt BOOLEAN NOT NULL DEFAULT FALSE,
        version BIGINT NOT NULL
    )""",
    "CREATE INDEX nodes_version ON nodes (version)",
    """CREATE TABLE tombstones (
        public_key BYTEA PRIMARY KEY,
        version BIGINT NOT NULL
    )""",
    "CREATE INDEX tombstones_version ON tombstones (version)",
    """CREATE TABLE preauth_keys (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        secret_sha256 BYTEA NOT NULL UNIQUE,
        reusable BOOLEAN NOT NULL,
        created BIGINT NOT NULL,
        expires BIGINT NOT NULL,
        tags TEXT NOT NULL,
        used BIGINT NOT NULL DEFAULT 0,
        revoked BOOLEAN NOT NULL DEFAULT FALSE
    )""",
)

_V3_COLUMNS = (
    "id, machine_key, node_key, name, address_index, state, tags, advertised_routes, approved_routes, "
    "endpoints, created, last_seen, key_expiry, expiry_exempt, version, devices"
)

# Stock WireGuard clients (phones) a node hosts: JSON text, like the other lists.
_V2 = ("ALTER TABLE nodes ADD COLUMN devices TEXT NOT NULL DEFAULT '[]'",)

# A pending machine has no address until an admin approves it (an anonymous caller
# must not use up the mesh's range), and remembers where it registered from (the
# caps on pending registrations count per source). SQLite cannot drop NOT NULL, so
# the table is rebuilt; AUTOINCREMENT's counter is carried over, so ids of removed
# nodes are still never handed out again.
_SQLITE_V3 = (
    """CREATE TABLE nodes_v3 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_key BLOB NOT NULL UNIQUE,
        node_key BLOB NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        address_index INTEGER UNIQUE,
        state TEXT NOT NULL CHECK (state IN ('pending', 'approved')),
        tags TEXT NOT NULL,
        advertised_routes TEXT NOT NULL,
        approved_routes TEXT NOT NULL,
        endpoints TEXT NOT NULL,
        created INTEGER NOT NULL,
        last_seen INTEGER,
        key_expiry INTEGER,
        expiry_exempt INTEGER NOT NULL DEFAULT 0,
        version INTEGER NOT NULL,
        devices TEXT NOT NULL DEFAULT '[]',
        source TEXT
    ) STRICT""",
    f"INSERT INTO nodes_v3 ({_V3_COLUMNS}) SELECT {_V3_COLUMNS} FROM nodes",
    "DELETE FROM sqlite_sequence WHERE name = 'nodes_v3'",
    "INSERT INTO sqlite_sequence (name, seq) "
    "SELECT 'nodes_v3', seq FROM sqlite_sequence WHERE name = 'nodes'",
    "DROP TABLE nodes",
    "ALTER TABLE nodes_v3 RENAME TO nodes",
    "CREATE INDEX nodes_version ON nodes (version)",
    "CREATE INDEX nodes_pending ON nodes (state, source)",
)
_POSTGRES_V3 = (
    "ALTER TABLE nodes ALTER COLUMN address_index DROP NOT NULL",
    "ALTER TABLE nodes ADD COLUMN source TEXT",
    "CREATE INDEX nodes_pending ON nodes (state, source)",
)

# DNS names (wire/dnsname.py): each approved node's label, and every label held in
# the mesh (nodes' and their devices', whose own sit in the devices JSON) in one
# table, so a new name is checked against all of them with one indexed read and the
# primary key is the backstop. Split DNS a subnet router offers: JSON text or NULL.
# Labels of nodes that were there before are given at open (store_names.backfill).
_SQLITE_V4 = (
    "ALTER TABLE nodes ADD COLUMN dns_name TEXT",
    "ALTER TABLE nodes ADD COLUMN advertised_dns TEXT",
    "CREATE UNIQUE INDEX nodes_dns_name ON nodes (dns_name)",
    "CREATE TABLE dns_names (label TEXT PRIMARY KEY, node_id INTEGER NOT NULL) STRICT",
    "CREATE INDEX dns_names_node ON dns_names (node_id)",
)
_POSTGRES_V4 = (
    "ALTER TABLE nodes ADD COLUMN dns_name TEXT",
    "ALTER TABLE nodes ADD COLUMN advertised_dns TEXT",
    "CREATE UNIQUE INDEX nodes_dns_name ON nodes (dns_name)",
    "CREATE TABLE dns_names (label TEXT PRIMARY KEY, node_id BIGINT NOT NULL)",
    "CREATE INDEX dns_names_node ON dns_names (node_id)",
)

MIGRATIONS: dict[Dialect, tuple[Migration, ...]] = {
    "sqlite": (
        Migration(1, "meta, nodes, tombstones, preauth_keys", _SQLITE_V1),
        Migration(2, "nodes.devices", _V2),
        Migration(3, "pending nodes have no address; nodes.source", _SQLITE_V3),
        Migration(4, "dns names: nodes.dns_name, nodes.advertised_dns, dns_names", _SQLITE_V4),
    ),
    "postgresql": (
        Migration(1, "meta, nodes, tombstones, preauth_keys", _POSTGRES_V1),
        Migration(2, "nodes.devices", _V2),
        Migration(3, "pending nodes have no address; nodes.source", _POSTGRES_V3),
        Migration(4, "dns names: nodes.dns_name, nodes.advertised_dns, dns_names", _POSTGRES_V4),
    ),
}

_SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied BIGINT NOT NULL
)"""

# Any constant will do: it only has to be the same in every meshpi-control.
_PG_MIGRATION_LOCK = 0x6D657368  # "mesh"


def latest_version(dialect: Dialect) -> int:
    return MIGRATIONS[dialect][-1].version


def migrate(db: Database) -> int:
    """Bring the schema up to date, all in one transaction; the version it is at."""
    applied = db.run(lambda tx: _migrate(db, tx))
    for migration in applied:
        log.info("%s: schema migrated to version %d (%s)", db.where, migration.version,
                 migration.description)  # fmt: skip
    return latest_version(db.dialect)


def _migrate(db: Database, tx: Tx) -> list[Migration]:
    migrations = MIGRATIONS[db.dialect]
    if db.dialect == "postgresql":
        # Two servers starting on one fresh database: the second waits, then
        # finds the schema made. (SQLite's BEGIN IMMEDIATE already did that.)
        tx.one("SELECT pg_advisory_xact_lock(?)", _PG_MIGRATION_LOCK)
    tx.run(_SCHEMA_VERSION_TABLE)
    row = tx.one("SELECT MAX(version) FROM schema_version")
    current = 0 if row is None or row[0] is None else int(row[0])
    latest = migrations[-1].version
    if current > latest:
        raise SchemaTooNew(
            f"{db.where}: schema version {current} was written by a newer meshpi, "
            f"which this one (schema version {latest}) cannot read; upgrade meshpi"
        )
    missing = [m for m in migrations if m.version > current]
    for migration in missing:
        for statement in migration.statements:
            tx.run(statement)
        tx.run(
            "INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
            migration.version,
            migration.description,
            to_epoch(utcnow()),
        )
    return missing


def random_ula() -> IPv6Network:
    """A /48 in fd00::/8 with 40 random bits (RFC 4193), so two meshes rarely collide."""
    return IPv6Network(((0xFD << 120) | (secrets.randbits(40) << 80), 48))


def ensure_mesh(db: Database) -> Mesh:
    """The mesh's ranges, chosen (the IPv6 /48 at random) the first time only."""

    def work(tx: Tx) -> tuple[Mesh, bool]:
        created = tx.run(
            "INSERT INTO meta (id, ipv4, ipv6, mesh_version, next_address_index, delta_floor) "
            "VALUES (1, ?, ?, 0, ?, 0) ON CONFLICT (id) DO NOTHING",
            str(IPV4_RANGE),
            str(random_ula()),
            FIRST_INDEX,
        )
        row = tx.one("SELECT ipv4, ipv6 FROM meta WHERE id = 1")
        assert row is not None
        return mesh_from_row(row[0], row[1]), created > 0

    mesh, created = db.run(work)
    if created:
        log.info("%s: created a new mesh, %s and %s", db.where, mesh.ipv4, mesh.ipv6)
    return mesh
