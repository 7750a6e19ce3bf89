"""The embedded :class:`Store`: one SQLite file shared by the daemon and the CLI.

Concurrency model: one ``sqlite3`` connection per store, used only from a
single worker thread the store owns. Every coroutine submits one function to
that thread, so the event loop never waits on I/O or fsync, and calls from
many tasks are serialised without a lock. Other processes on the same file are
handled by SQLite's locking: every write is one ``BEGIN IMMEDIATE``
transaction (takes the write lock up front, waiting up to ``busy_timeout``),
every read one deferred transaction (a consistent snapshot).

Datetimes are stored as fixed-width ISO-8601 UTC text
(``YYYY-MM-DDTHH:MM:SS.ffffffZ``), which sorts chronologically as text, and
are returned as timezone-aware UTC datetimes. Naive datetimes are refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote

from gateway.store.base import (
    PROVISIONED_KEEP,
    AuditQuery,
    Conflict,
    NotFound,
    Page,
    Store,
    StoreError,
    StoreUnavailable,
)
from gateway.store.migrations import MIGRATIONS, migrate
from trust.model import (
    TENANT_ID_RE,
    AdminUser,
    AuditRecord,
    Change,
    ChangeKind,
    DeviceUser,
    PendingRegistration,
    ProvisionedCertificate,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
    valid_tenant_id,
)

T = TypeVar("T")
Row = sqlite3.Row

CA_KEY_OPTION_PREFIX = "ca-key:"
"""Option key prefix of a tenant CA's private key: ``ca-key:<fingerprint>``."""


# ---------------------------------------------------------------------------
# value encoding


def encode_time(value: datetime) -> str:
    """Fixed-width UTC text; order-preserving, so SQL can compare and sort it."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise StoreError(f"refusing naive datetime {value.isoformat()}: use an aware UTC datetime")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def decode_time(value: str) -> datetime:
    """Inverse of :func:`encode_time`: an aware UTC datetime."""
    return datetime.fromisoformat(value.removesuffix("Z")).replace(tzinfo=UTC)


def _opt_time(value: datetime | None) -> str | None:
    return None if value is None else encode_time(value)


def _opt_decode(value: str | None) -> datetime | None:
    return None if value is None else decode_time(value)


def _trusted(row: Row) -> TrustedCertificate:
    return TrustedCertificate(
        tenant=row["tenant"],
        fingerprint=row["fingerprint"],
        name=row["name"],
        status=Status(row["status"]),
        auto_registration=bool(row["auto_registration"]),
        pem=row["pem"],
        proof_of_possession_valid=bool(row["proof_of_possession_valid"]),
        tenant_ca=bool(row["tenant_ca"]),
        pop_code=row["pop_code"],
        pop_code_until=_opt_decode(row["pop_code_until"]),
        created=_opt_decode(row["created"]),
    )


def _device(row: Row) -> DeviceUser:
    return DeviceUser(
        tenant=row["tenant"],
        device_id=row["device_id"],
        enabled=bool(row["enabled"]),
        registered_via=row["registered_via"],
        created=_opt_decode(row["created"]),
        last_connect=_opt_decode(row["last_connect"]),
    )


def _pending(row: Row) -> PendingRegistration:
    pairs: list[list[str]] = json.loads(row["attributes"])
    return PendingRegistration(
        tenant=row["tenant"],
        device_id=row["device_id"],
        otp_hash=row["otp_hash"],
        attributes=tuple((str(k), str(v)) for k, v in pairs),
        created=_opt_decode(row["created"]),
    )


def _provisioned(row: Row) -> ProvisionedCertificate:
    return ProvisionedCertificate(
        tenant=row["tenant"],
        device_id=row["device_id"],
        serial=int(row["serial"], 16),
        not_before=decode_time(row["not_before"]),
        not_after=decode_time(row["not_after"]),
        fingerprint=row["fingerprint"],
        first_seen=decode_time(row["first_seen"]),
        last_seen=decode_time(row["last_seen"]),
    )


def _admin(row: Row) -> AdminUser:
    roles: list[str] = json.loads(row["roles"])
    return AdminUser(
        tenant=row["tenant"],
        username=row["username"],
        password_hash=row["password_hash"],
        roles=frozenset(roles),
        enabled=bool(row["enabled"]),
    )


def _audit(row: Row) -> AuditRecord:
    return AuditRecord(
        id=row["id"],
        tenant=row["tenant"],
        type=row["type"],
        activity=row["activity"],
        text=row["text"],
        time=decode_time(row["time"]),
        user=row["user"],
        source=row["source"],
        severity=row["severity"],
    )


# ---------------------------------------------------------------------------
# helpers run inside a transaction on the worker thread


def _require_tenant(conn: sqlite3.Connection, tenant: str) -> None:
    if conn.execute("SELECT 1 FROM tenants WHERE tenant = ?", (tenant,)).fetchone() is None:
        raise NotFound(f"tenant {tenant} not found")


def _append_change(conn: sqlite3.Connection, kind: ChangeKind, tenant: str, key: str = "") -> None:
    """Called inside the writing transaction, so the feed never disagrees with the data."""
    conn.execute(
        'INSERT INTO changes (kind, tenant, "key", at) VALUES (?, ?, ?, ?)',
        (kind.value, tenant, key, encode_time(datetime.now(UTC))),
    )


def _get_trusted_row(conn: sqlite3.Connection, tenant: str, fingerprint: str) -> Row:
    _require_tenant(conn, tenant)
    row: Row | None = conn.execute(
        "SELECT * FROM trusted_certificates WHERE tenant = ? AND fingerprint = ?",
        (tenant, fingerprint),
    ).fetchone()
    if row is None:
        raise NotFound(f"trusted certificate {fingerprint} not found in tenant {tenant}")
    return row


def _get_device_row(conn: sqlite3.Connection, tenant: str, device_id: str) -> Row:
    _require_tenant(conn, tenant)
    row: Row | None = conn.execute(
        "SELECT * FROM device_users WHERE tenant = ? AND device_id = ?", (tenant, device_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"device {device_id} not found in tenant {tenant}")
    return row


def _get_pending_row(conn: sqlite3.Connection, tenant: str, device_id: str) -> Row:
    _require_tenant(conn, tenant)
    row: Row | None = conn.execute(
        "SELECT * FROM pending_registrations WHERE tenant = ? AND device_id = ?",
        (tenant, device_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"pending registration of device {device_id} not found in tenant {tenant}")
    return row


def _write_trusted(conn: sqlite3.Connection, cert: TrustedCertificate, *, insert: bool) -> None:
    values = (
        cert.name,
        cert.status.value,
        int(cert.auto_registration),
        cert.pem,
        int(cert.proof_of_possession_valid),
        int(cert.tenant_ca),
        cert.pop_code,
        _opt_time(cert.pop_code_until),
        _opt_time(cert.created),
        cert.tenant,
        cert.fingerprint,
    )
    if insert:
        conn.execute(
            "INSERT INTO trusted_certificates (name, status, auto_registration, pem,"
            " proof_of_possession_valid, tenant_ca, pop_code, pop_code_until, created,"
            " tenant, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        )
    else:
        conn.execute(
            "UPDATE trusted_certificates SET name = ?, status = ?, auto_registration = ?,"
            " pem = ?, proof_of_possession_valid = ?, tenant_ca = ?, pop_code = ?,"
            " pop_code_until = ?, created = ? WHERE tenant = ? AND fingerprint = ?",
            values,
        )


def _in_transaction(
    begin: str, fn: Callable[[sqlite3.Connection], T]
) -> Callable[[sqlite3.Connection], T]:
    """Wrap ``fn`` in BEGIN…COMMIT, rolling back on any exception."""

    def run(conn: sqlite3.Connection) -> T:
        conn.execute(begin)
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    return run


# ---------------------------------------------------------------------------


def from_url(url: str) -> SqliteStore:
    """``sqlite:///abs/path.db`` (absolute) or ``sqlite:relative.db`` (to the cwd)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite://") :]
    elif url.startswith("sqlite://"):
        raise StoreError(f"bad store URL {url!r}: use sqlite:///abs/path.db or sqlite:relative.db")
    elif url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
    else:
        raise StoreError(f"bad store URL {url!r}: not a sqlite: URL")
    path = unquote(path)
    if not path or path.endswith("/") or "?" in path:
        raise StoreError(f"bad store URL {url!r}: expected a database file path")
    return SqliteStore(path)


class SqliteStore(Store):
    """A :class:`Store` in one SQLite file (WAL mode), safe for several processes.

    Tenant CA private keys live in options under ``ca-key:<fingerprint>`` in
    the tenant; :meth:`delete_trusted_certificate` removes that option with
    the certificate.

    The change feed keeps every change for at least ``change_retention``
    (7 days) and the newest ``change_keep_rows`` (100,000) changes; a change
    is trimmed (at :meth:`open` or :meth:`trim_changes`) only when it is both
    older and further behind. A reader lagging beyond that must reload fully.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        change_retention: timedelta = timedelta(days=7),
        change_keep_rows: int = 100_000,
    ) -> None:
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout
        self.change_retention = change_retention
        self.change_keep_rows = change_keep_rows
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # plumbing ----------------------------------------------------------------
    def _translate(self, exc: sqlite3.Error) -> StoreError:
        if isinstance(exc, sqlite3.IntegrityError):
            return Conflict(f"store {self.path}: constraint violated ({exc})")
        if isinstance(exc, sqlite3.OperationalError | sqlite3.ProgrammingError):
            # locked past busy_timeout, I/O error, cannot open, closed connection
            return StoreUnavailable(f"store {self.path} unavailable: {exc}")
        return StoreError(f"store {self.path}: {exc}")

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable(f"store {self.path} is not open")
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    async def _submit(self, fn: Callable[[], T]) -> T:
        executor = self._executor
        if executor is None:
            raise StoreUnavailable(f"store {self.path} is not open")
        try:
            future = executor.submit(fn)
        except RuntimeError as exc:  # shut down by a concurrent close()
            raise StoreUnavailable(f"store {self.path} is closed") from exc
        # Cancelling the awaiting task drops a queued call; one already running
        # finishes on the worker, so a transaction is never left half done.
        return await asyncio.wrap_future(future)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # IMMEDIATE takes the write lock before the first read: a deferred
        # transaction upgrading to a writer in WAL mode fails with SQLITE_BUSY
        # at once (no busy wait) when another process committed in between.
        tx = _in_transaction("BEGIN IMMEDIATE", fn)
        return await self._submit(lambda: self._call(tx))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        tx = _in_transaction("BEGIN", fn)
        return await self._submit(lambda: self._call(tx))

    # lifecycle ---------------------------------------------------------------
    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # autocommit; we issue BEGIN/COMMIT ourselves
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000):d}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"store {self.path}: cannot enable WAL mode (got {mode})")
            # NORMAL in WAL mode: a commit appends to the WAL and only
            # checkpoints fsync. A process crash loses nothing (the WAL is in
            # the OS page cache and replayed on next open); only an OS crash or
            # power cut may lose the last transactions, never corrupt the file.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn, MIGRATIONS, name=self.path)
            self._conn = conn
            self._trim(conn)
        except BaseException as exc:
            self._conn = None
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._translate(exc) from exc
            raise

    async def open(self) -> None:
        if self._executor is not None:
            raise StoreError(f"store {self.path} is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        try:
            await self._submit(self._connect)
        except BaseException:
            executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return

        def shut() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        try:
            await self._submit(shut)
        finally:
            self._executor = None
            executor.shutdown(wait=False)

    async def ping(self) -> None:
        try:
            await self._read(
                lambda conn: conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            )
        except StoreUnavailable:
            raise
        except StoreError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def _trim(self, conn: sqlite3.Connection) -> int:
        cutoff = encode_time(datetime.now(UTC) - self.change_retention)

        def tx(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM changes WHERE at < ?"
                " AND seq <= (SELECT coalesce(max(seq), 0) FROM changes) - ?",
                (cutoff, self.change_keep_rows),
            )
            return cur.rowcount

        return _in_transaction("BEGIN IMMEDIATE", tx)(conn)

    async def trim_changes(self) -> int:
        """Trim the change feed now (see the class docstring); returns rows deleted."""
        return await self._submit(lambda: self._call(self._trim))

    # tenants -----------------------------------------------------------------
    async def create_tenant(self, tenant: str) -> bool:
        # fullmatch too: TENANT_ID_RE ends in "$", which also accepts "t1\n"
        if not (valid_tenant_id(tenant) and TENANT_ID_RE.fullmatch(tenant)):
            raise StoreError(f"invalid tenant id {tenant!r}: 1-64 of A-Z a-z 0-9 _ -")

        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO tenants (tenant, created) VALUES (?, ?)",
                (tenant, encode_time(datetime.now(UTC))),
            )
            if cur.rowcount != 1:
                return False
            _append_change(conn, ChangeKind.TENANT, tenant)
            return True

        return await self._write(tx)

    async def list_tenants(self) -> list[str]:
        rows = await self._read(
            lambda conn: conn.execute("SELECT tenant FROM tenants ORDER BY tenant").fetchall()
        )
        return [str(r["tenant"]) for r in rows]

    async def tenant_exists(self, tenant: str) -> bool:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT 1 FROM tenants WHERE tenant = ?", (tenant,)
            ).fetchone()
        )
        return row is not None

    # trusted certificates ----------------------------------------------------
    async def add_trusted_certificate(self, cert: TrustedCertificate) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, cert.tenant)
            exists = conn.execute(
                "SELECT 1 FROM trusted_certificates WHERE tenant = ? AND fingerprint = ?",
                (cert.tenant, cert.fingerprint),
            ).fetchone()
            if exists is not None:
                raise Conflict(
                    f"trusted certificate {cert.fingerprint} already exists in tenant {cert.tenant}"
                )
            _write_trusted(conn, cert, insert=True)
            _append_change(conn, ChangeKind.ANCHOR, cert.tenant, cert.fingerprint)

        await self._write(tx)

    async def get_trusted_certificate(self, tenant: str, fingerprint: str) -> TrustedCertificate:
        return _trusted(await self._read(lambda conn: _get_trusted_row(conn, tenant, fingerprint)))

    async def list_trusted_certificates(
        self, tenant: str | None = None
    ) -> list[TrustedCertificate]:
        # rowid is the insertion order: "oldest first" even when created is None
        sql = "SELECT * FROM trusted_certificates ORDER BY rowid"
        args: tuple[str, ...] = ()
        if tenant is not None:
            sql = "SELECT * FROM trusted_certificates WHERE tenant = ? ORDER BY rowid"
            args = (tenant,)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [_trusted(r) for r in rows]

    async def find_trusted_certificates(self, fingerprint: str) -> list[TrustedCertificate]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT * FROM trusted_certificates WHERE fingerprint = ? ORDER BY rowid",
                (fingerprint,),
            ).fetchall()
        )
        return [_trusted(r) for r in rows]

    async def update_trusted_certificate(
        self,
        tenant: str,
        fingerprint: str,
        *,
        name: str | None = None,
        status: Status | None = None,
        auto_registration: bool | None = None,
        proof_of_possession_valid: bool | None = None,
        pop_code: str | None = None,
        pop_code_until: datetime | None = None,
        clear_pop_code: bool = False,
        pem: str | None = None,
    ) -> TrustedCertificate:
        if clear_pop_code and (pop_code is not None or pop_code_until is not None):
            raise StoreError("clear_pop_code cannot be combined with pop_code or pop_code_until")
        changes: dict[str, Any] = {
            k: v
            for k, v in {
                "name": name,
                "status": status,
                "auto_registration": auto_registration,
                "proof_of_possession_valid": proof_of_possession_valid,
                "pop_code": pop_code,
                "pop_code_until": pop_code_until,
                "pem": pem,
            }.items()
            if v is not None
        }
        if clear_pop_code:
            changes.update(pop_code=None, pop_code_until=None)
        _opt_time(pop_code_until)  # refuse a naive datetime before touching the file

        def tx(conn: sqlite3.Connection) -> TrustedCertificate:
            new = dataclasses.replace(
                _trusted(_get_trusted_row(conn, tenant, fingerprint)), **changes
            )
            _write_trusted(conn, new, insert=False)
            _append_change(conn, ChangeKind.ANCHOR, tenant, fingerprint)
            return new

        return await self._write(tx)

    async def delete_trusted_certificate(self, tenant: str, fingerprint: str) -> None:
        """Delete the anchor and its tenant-CA private key option ``ca-key:<fingerprint>``."""

        def tx(conn: sqlite3.Connection) -> None:
            _get_trusted_row(conn, tenant, fingerprint)
            conn.execute(
                "DELETE FROM trusted_certificates WHERE tenant = ? AND fingerprint = ?",
                (tenant, fingerprint),
            )
            conn.execute(
                'DELETE FROM options WHERE tenant = ? AND "key" = ?',
                (tenant, CA_KEY_OPTION_PREFIX + fingerprint),
            )
            _append_change(conn, ChangeKind.ANCHOR, tenant, fingerprint)

        await self._write(tx)

    # revocation --------------------------------------------------------------
    async def add_revocations(self, entries: Sequence[RevocationEntry]) -> tuple[int, int]:
        rows = [(e.tenant, e.serial_hex, encode_time(e.revoked_at)) for e in entries]
        if not rows:
            return 0, 0

        def tx(conn: sqlite3.Connection) -> tuple[int, int]:
            for tenant in sorted({r[0] for r in rows}):
                _require_tenant(conn, tenant)
            added = 0
            for row in rows:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO revocations (tenant, serial, revoked_at)"
                    " VALUES (?, ?, ?)",
                    row,
                )
                if cur.rowcount == 1:
                    added += 1
                    _append_change(conn, ChangeKind.REVOCATION, row[0], row[1])
            return added, len(rows) - added

        return await self._write(tx)

    async def list_revocations(self, tenant: str) -> list[RevocationEntry]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT * FROM revocations WHERE tenant = ? ORDER BY rowid", (tenant,)
            ).fetchall()
        )
        return [
            RevocationEntry(
                tenant=r["tenant"],
                serial=int(r["serial"], 16),
                revoked_at=decode_time(r["revoked_at"]),
            )
            for r in rows
        ]

    async def get_revocation_settings(self, tenant: str) -> RevocationSettings:
        def tx(conn: sqlite3.Connection) -> RevocationSettings:
            _require_tenant(conn, tenant)
            row = conn.execute(
                "SELECT offline, online FROM revocation_settings WHERE tenant = ?", (tenant,)
            ).fetchone()
            if row is None:
                return RevocationSettings()
            return RevocationSettings(offline=bool(row["offline"]), online=bool(row["online"]))

        return await self._read(tx)

    async def set_revocation_settings(self, tenant: str, settings: RevocationSettings) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, tenant)
            conn.execute(
                "INSERT INTO revocation_settings (tenant, offline, online) VALUES (?, ?, ?)"
                " ON CONFLICT (tenant) DO UPDATE SET offline = excluded.offline,"
                " online = excluded.online",
                (tenant, int(settings.offline), int(settings.online)),
            )
            _append_change(conn, ChangeKind.SETTINGS, tenant)

        await self._write(tx)

    # device users ------------------------------------------------------------
    async def register_device(
        self, tenant: str, device_id: str, via: str, now: datetime
    ) -> tuple[DeviceUser, bool]:
        """Create-if-absent in one IMMEDIATE transaction: race-free across processes.

        A new user is enabled, ``registered_via=via``, ``created=now`` and has
        no ``last_connect`` yet (call :meth:`touch_device`).
        """
        created_at = encode_time(now)

        def tx(conn: sqlite3.Connection) -> tuple[DeviceUser, bool]:
            _require_tenant(conn, tenant)
            cur = conn.execute(
                "INSERT OR IGNORE INTO device_users"
                " (tenant, device_id, enabled, registered_via, created, last_connect)"
                " VALUES (?, ?, 1, ?, ?, NULL)",
                (tenant, device_id, via, created_at),
            )
            created = cur.rowcount == 1
            if created:
                _append_change(conn, ChangeKind.DEVICE, tenant, device_id)
            cur = conn.execute(
                "DELETE FROM pending_registrations WHERE tenant = ? AND device_id = ?",
                (tenant, device_id),
            )
            if cur.rowcount:
                _append_change(conn, ChangeKind.PENDING, tenant, device_id)
            return _device(_get_device_row(conn, tenant, device_id)), created

        return await self._write(tx)

    async def get_device(self, tenant: str, device_id: str) -> DeviceUser:
        return _device(await self._read(lambda conn: _get_device_row(conn, tenant, device_id)))

    async def list_devices(self, tenant: str) -> list[DeviceUser]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT * FROM device_users WHERE tenant = ? ORDER BY device_id", (tenant,)
            ).fetchall()
        )
        return [_device(r) for r in rows]

    async def find_device_tenants(self, device_id: str) -> list[str]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT tenant FROM device_users WHERE device_id = ? ORDER BY tenant", (device_id,)
            ).fetchall()
        )
        return [str(r["tenant"]) for r in rows]

    async def set_device_enabled(self, tenant: str, device_id: str, enabled: bool) -> DeviceUser:
        def tx(conn: sqlite3.Connection) -> DeviceUser:
            _get_device_row(conn, tenant, device_id)
            conn.execute(
                "UPDATE device_users SET enabled = ? WHERE tenant = ? AND device_id = ?",
                (int(enabled), tenant, device_id),
            )
            _append_change(conn, ChangeKind.DEVICE, tenant, device_id)
            return _device(_get_device_row(conn, tenant, device_id))

        return await self._write(tx)

    async def touch_device(self, tenant: str, device_id: str, now: datetime) -> None:
        at = encode_time(now)

        def tx(conn: sqlite3.Connection) -> None:
            _get_device_row(conn, tenant, device_id)
            conn.execute(
                "UPDATE device_users SET last_connect = ? WHERE tenant = ? AND device_id = ?",
                (at, tenant, device_id),
            )

        await self._write(tx)

    # pending (bulk) registrations ---------------------------------------------
    async def add_pending_registration(self, pending: PendingRegistration) -> None:
        attributes = json.dumps([list(pair) for pair in pending.attributes])
        created = _opt_time(pending.created)
        tenant, device_id = pending.tenant, pending.device_id

        def tx(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, tenant)
            if conn.execute(
                "SELECT 1 FROM device_users WHERE tenant = ? AND device_id = ?", (tenant, device_id)
            ).fetchone():
                raise Conflict(f"device {device_id} is already registered in tenant {tenant}")
            cur = conn.execute(
                "INSERT OR IGNORE INTO pending_registrations"
                " (tenant, device_id, otp_hash, attributes, created) VALUES (?, ?, ?, ?, ?)",
                (tenant, device_id, pending.otp_hash, attributes, created),
            )
            if cur.rowcount != 1:
                raise Conflict(
                    f"a pending registration of device {device_id} already exists"
                    f" in tenant {tenant}"
                )
            _append_change(conn, ChangeKind.PENDING, tenant, device_id)

        await self._write(tx)

    async def get_pending_registration(self, tenant: str, device_id: str) -> PendingRegistration:
        return _pending(await self._read(lambda conn: _get_pending_row(conn, tenant, device_id)))

    async def list_pending_registrations(self, tenant: str) -> list[PendingRegistration]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT * FROM pending_registrations WHERE tenant = ? ORDER BY device_id", (tenant,)
            ).fetchall()
        )
        return [_pending(r) for r in rows]

    async def consume_pending_registration(
        self, tenant: str, device_id: str
    ) -> PendingRegistration:
        def tx(conn: sqlite3.Connection) -> PendingRegistration:
            pending = _pending(_get_pending_row(conn, tenant, device_id))
            conn.execute(
                "DELETE FROM pending_registrations WHERE tenant = ? AND device_id = ?",
                (tenant, device_id),
            )
            _append_change(conn, ChangeKind.PENDING, tenant, device_id)
            return pending

        return await self._write(tx)

    # provisioned certificates -------------------------------------------------

    async def record_provisioned_certificate(self, cert: ProvisionedCertificate) -> None:
        """Upsert, keeping ``first_seen``; ``last_seen`` never moves backwards."""
        values = (
            cert.tenant,
            cert.device_id,
            cert.serial_hex,
            encode_time(cert.not_before),
            encode_time(cert.not_after),
            cert.fingerprint,
            encode_time(cert.first_seen),
            encode_time(cert.last_seen),
        )
        keep_sql = (
            "DELETE FROM provisioned_certificates WHERE tenant = ? AND device_id = ?"
            " AND serial NOT IN (SELECT serial FROM provisioned_certificates"
            " WHERE tenant = ? AND device_id = ?"
            " ORDER BY not_before DESC, length(serial) DESC, serial DESC LIMIT ?)"
        )

        def tx(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, cert.tenant)
            conn.execute(
                "INSERT INTO provisioned_certificates (tenant, device_id, serial, not_before,"
                " not_after, fingerprint, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, device_id, serial)"
                " DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
                values,
            )
            key = (cert.tenant, cert.device_id)
            conn.execute(keep_sql, (*key, *key, PROVISIONED_KEEP))

        await self._write(tx)

    async def list_provisioned_certificates(
        self, tenant: str, device_id: str
    ) -> list[ProvisionedCertificate]:
        sql = (
            "SELECT * FROM provisioned_certificates WHERE tenant = ? AND device_id = ?"
            # serial is lower-case hex without leading zeros: longer is larger
            " ORDER BY not_before DESC, length(serial) DESC, serial DESC"
        )
        rows = await self._read(lambda conn: conn.execute(sql, (tenant, device_id)).fetchall())
        return [_provisioned(r) for r in rows]

    # admin users -------------------------------------------------------------
    async def put_admin_user(self, user: AdminUser) -> None:
        roles = json.dumps(sorted(user.roles))

        def tx(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, user.tenant)
            conn.execute(
                "INSERT INTO admin_users (tenant, username, password_hash, roles, enabled)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, username) DO UPDATE SET"
                " password_hash = excluded.password_hash, roles = excluded.roles,"
                " enabled = excluded.enabled",
                (user.tenant, user.username, user.password_hash, roles, int(user.enabled)),
            )

        await self._write(tx)

    async def get_admin_user(self, tenant: str, username: str) -> AdminUser:
        def tx(conn: sqlite3.Connection) -> AdminUser:
            _require_tenant(conn, tenant)
            row = conn.execute(
                "SELECT * FROM admin_users WHERE tenant = ? AND username = ?", (tenant, username)
            ).fetchone()
            if row is None:
                raise NotFound(f"admin user {username} not found in tenant {tenant}")
            return _admin(row)

        return await self._read(tx)

    async def find_admin_users(self, username: str) -> list[AdminUser]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT * FROM admin_users WHERE username = ? ORDER BY tenant", (username,)
            ).fetchall()
        )
        return [_admin(r) for r in rows]

    async def list_admin_users(self, tenant: str) -> list[AdminUser]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT * FROM admin_users WHERE tenant = ? ORDER BY username", (tenant,)
            ).fetchall()
        )
        return [_admin(r) for r in rows]

    # secrets and options -----------------------------------------------------
    async def set_option(self, tenant: str, key: str, value: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, tenant)
            conn.execute(
                'INSERT INTO options (tenant, "key", value) VALUES (?, ?, ?)'
                ' ON CONFLICT (tenant, "key") DO UPDATE SET value = excluded.value',
                (tenant, key, value),
            )

        await self._write(tx)

    async def get_option(self, tenant: str, key: str) -> str | None:
        """None when the option (or the tenant) does not exist."""
        row = await self._read(
            lambda conn: conn.execute(
                'SELECT value FROM options WHERE tenant = ? AND "key" = ?', (tenant, key)
            ).fetchone()
        )
        return None if row is None else str(row["value"])

    async def delete_option(self, tenant: str, key: str) -> None:
        """Idempotent for a missing key; :class:`NotFound` for a missing tenant."""

        def tx(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, tenant)
            conn.execute('DELETE FROM options WHERE tenant = ? AND "key" = ?', (tenant, key))

        await self._write(tx)

    # audit -------------------------------------------------------------------
    async def add_audit(self, record: AuditRecord) -> int:
        """Append (``record.id`` is ignored). The tenant need not exist."""
        values = (
            record.tenant,
            record.type,
            record.activity,
            record.text,
            encode_time(record.time),
            record.user,
            record.source,
            record.severity,
        )

        def tx(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                'INSERT INTO audit (tenant, type, activity, text, time, "user", source, severity)'
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        return await self._write(tx)

    async def list_audit(self, query: AuditQuery, page: Page) -> tuple[list[AuditRecord], int]:
        """Newest ``time`` first (then newest id); ``date_from``/``date_to`` inclusive."""
        if page.page_size < 1 or page.current_page < 1:
            raise StoreError(
                f"bad page (page_size={page.page_size}, current_page={page.current_page}):"
                " both must be at least 1"
            )
        where: list[str] = []
        args: list[Any] = []
        if query.tenant is not None:
            where.append("tenant = ?")
            args.append(query.tenant)
        if query.type is not None:
            where.append("type = ?")
            args.append(query.type)
        if query.date_from is not None:
            where.append("time >= ?")
            args.append(encode_time(query.date_from))
        if query.date_to is not None:
            where.append("time <= ?")
            args.append(encode_time(query.date_to))
        # only constant fragments are joined; values are bound parameters
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        offset = (page.current_page - 1) * page.page_size

        def tx(conn: sqlite3.Connection) -> tuple[list[AuditRecord], int]:
            total = conn.execute(f"SELECT count(*) FROM audit{clause}", args).fetchone()[0]  # noqa: S608
            rows = conn.execute(
                f"SELECT * FROM audit{clause} ORDER BY time DESC, id DESC LIMIT ? OFFSET ?",  # noqa: S608
                [*args, page.page_size, offset],
            ).fetchall()
            return [_audit(r) for r in rows], int(total)

        return await self._read(tx)

    # change feed -------------------------------------------------------------
    async def change_seq(self) -> int:
        # sqlite_sequence holds the largest seq ever allocated, so the answer
        # does not go back when old rows were trimmed.
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'changes'"
            ).fetchone()
        )
        return 0 if row is None else int(row["seq"])

    async def changes_since(self, seq: int, limit: int = 10000) -> list[Change]:
        """Safe to poll by seq: SQLite serialises writers, so seqs commit in order."""
        if limit < 1:
            raise StoreError(f"bad limit {limit}: must be at least 1")
        rows = await self._read(
            lambda conn: conn.execute(
                'SELECT seq, kind, tenant, "key" FROM changes WHERE seq > ? ORDER BY seq LIMIT ?',
                (seq, limit),
            ).fetchall()
        )
        return [
            Change(seq=r["seq"], kind=ChangeKind(r["kind"]), tenant=r["tenant"], key=r["key"])
            for r in rows
        ]
