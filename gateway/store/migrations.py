"""SQLite schema, versioned with ``PRAGMA user_version``.

``MIGRATIONS[i]`` upgrades a database from version ``i`` to ``i + 1``. Steps are
append-only: never edit a released step, add a new one. Each step runs in its
own ``BEGIN IMMEDIATE`` transaction together with the ``user_version`` bump
(the header write is transactional), so a crash mid-migration leaves the
previous version intact and the step is retried at the next ``open()``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.store.base import StoreError

Migration = Sequence[str]
"""One step: SQL statements run in order (no ``executescript``: it commits)."""

_V1: Migration = (
    """CREATE TABLE tenants (
        tenant TEXT PRIMARY KEY,
        created TEXT NOT NULL
    )""",
    """CREATE TABLE trusted_certificates (
        tenant TEXT NOT NULL REFERENCES tenants (tenant),
        fingerprint TEXT NOT NULL,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        auto_registration INTEGER NOT NULL,
        pem TEXT NOT NULL,
        proof_of_possession_valid INTEGER NOT NULL,
        tenant_ca INTEGER NOT NULL,
        pop_code TEXT,
        pop_code_until TEXT,
        created TEXT,
        PRIMARY KEY (tenant, fingerprint)
    )""",
    "CREATE INDEX trusted_certificates_fingerprint ON trusted_certificates (fingerprint)",
    # serial: lower-case hex of the int without leading zeros (RevocationEntry.serial_hex)
    """CREATE TABLE revocations (
        tenant TEXT NOT NULL REFERENCES tenants (tenant),
        serial TEXT NOT NULL,
        revoked_at TEXT NOT NULL,
        PRIMARY KEY (tenant, serial)
    )""",
    """CREATE TABLE revocation_settings (
        tenant TEXT PRIMARY KEY REFERENCES tenants (tenant),
        offline INTEGER NOT NULL,
        online INTEGER NOT NULL
    )""",
    """CREATE TABLE device_users (
        tenant TEXT NOT NULL REFERENCES tenants (tenant),
        device_id TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        registered_via TEXT NOT NULL,
        created TEXT,
        last_connect TEXT,
        PRIMARY KEY (tenant, device_id)
    )""",
    "CREATE INDEX device_users_device_id ON device_users (device_id)",
    # attributes: JSON list of [name, value] pairs
    """CREATE TABLE pending_registrations (
        tenant TEXT NOT NULL REFERENCES tenants (tenant),
        device_id TEXT NOT NULL,
        otp_hash TEXT,
        attributes TEXT NOT NULL,
        created TEXT,
        PRIMARY KEY (tenant, device_id)
    )""",
    """CREATE TABLE provisioned_certificates (
        tenant TEXT NOT NULL REFERENCES tenants (tenant),
        device_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        PRIMARY KEY (tenant, device_id, serial)
    )""",
    # roles: JSON list, sorted
    """CREATE TABLE admin_users (
        tenant TEXT NOT NULL REFERENCES tenants (tenant),
        username TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        roles TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        PRIMARY KEY (tenant, username)
    )""",
    "CREATE INDEX admin_users_username ON admin_users (username)",
    """CREATE TABLE options (
        tenant TEXT NOT NULL REFERENCES tenants (tenant),
        "key" TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (tenant, "key")
    )""",
    # No foreign key: the audit log also records events about unknown tenants.
    """CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        type TEXT NOT NULL,
        activity TEXT NOT NULL,
        text TEXT NOT NULL,
        time TEXT NOT NULL,
        "user" TEXT NOT NULL,
        source TEXT NOT NULL,
        severity TEXT NOT NULL
    )""",
    "CREATE INDEX audit_time ON audit (time)",
    "CREATE INDEX audit_tenant_time ON audit (tenant, time)",
    # AUTOINCREMENT (not a bare rowid alias): a seq is never reused, even after
    # the newest rows were trimmed, so pollers never miss a change.
    """CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        tenant TEXT NOT NULL,
        "key" TEXT NOT NULL,
        at TEXT NOT NULL
    )""",
    "CREATE INDEX changes_at ON changes (at)",
)

MIGRATIONS: tuple[Migration, ...] = (_V1,)
"""Ordered steps; ``len(MIGRATIONS)`` is the schema version this code writes."""


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's ``user_version`` (0 for a fresh file)."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(
    conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS, *, name: str = ""
) -> int:
    """Bring the schema up to ``len(migrations)``; returns the final version.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Several
    processes may call this at once: the version is re-read after taking the
    write lock, so each step runs exactly once.
    """
    latest = len(migrations)
    while True:
        version = schema_version(conn)
        if version > latest:
            raise StoreError(
                f"store {name} has schema version {version} but this mtls-gateway only "
                f"knows up to version {latest}: upgrade mtls-gateway (refusing to open)"
            )
        if version == latest:
            return version
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            if schema_version(conn) == version:
                for statement in migrations[version]:
                    conn.execute(statement)
                # PRAGMA takes no bound parameters; version is an int we computed.
                conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
