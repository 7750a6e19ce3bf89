"""The ``Store`` interface: every piece of durable state the gateway keeps.

Two implementations share this contract and one test suite
(``tests/unit/store_suite.py``): SQLite (embedded default) and Redis (several
gateway instances). Every write appends to a change feed with a monotonic
``seq``; gateways poll or subscribe to it to refresh their in-memory trust
snapshot and to close sessions the change affects. The hot path never reads
the store directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from trust.model import (
    AdminUser,
    AuditRecord,
    Change,
    DeviceUser,
    PendingRegistration,
    ProvisionedCertificate,
    RevocationEntry,
    RevocationSettings,
    Status,
    TrustedCertificate,
)

T = TypeVar("T")

PROVISIONED_KEEP = 5
"""Provisioned certificates kept per device, newest ``not_before`` first (spec)."""


class StoreError(Exception):
    """Base class of store errors; the message is safe to show an operator."""


class NotFound(StoreError):
    """The object does not exist (in that tenant)."""


class Conflict(StoreError):
    """The object already exists (e.g. the same certificate in the same tenant)."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached; changes are refused, reads may be stale."""


@dataclass(frozen=True, slots=True)
class Page:
    """A page request: ``current_page`` counts from 1 like the platform's API."""

    page_size: int = 5
    current_page: int = 1


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Audit-log filters (all optional)."""

    tenant: str | None = None
    type: str | None = None
    date_from: datetime | None = None
    date_to: datetime | None = None


class Store(ABC):
    """Durable state. All methods are coroutines; implementations must be safe to
    call from one event loop with many concurrent tasks, and several processes
    (the daemon and the CLI) may use the same store at once.
    """

    # lifecycle ---------------------------------------------------------------
    @abstractmethod
    async def open(self) -> None:
        """Connect and create or migrate the schema."""

    @abstractmethod
    async def close(self) -> None:
        """Flush and release resources."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers."""

    # tenants -----------------------------------------------------------------
    @abstractmethod
    async def create_tenant(self, tenant: str) -> bool:
        """Create a tenant; False if it existed already (never an error)."""

    @abstractmethod
    async def list_tenants(self) -> list[str]: ...

    @abstractmethod
    async def tenant_exists(self, tenant: str) -> bool: ...

    # trusted certificates ----------------------------------------------------
    @abstractmethod
    async def add_trusted_certificate(self, cert: TrustedCertificate) -> None:
        """Insert; :class:`Conflict` when the fingerprint exists in that tenant."""

    @abstractmethod
    async def get_trusted_certificate(self, tenant: str, fingerprint: str) -> TrustedCertificate:
        """:class:`NotFound` when absent in that tenant."""

    @abstractmethod
    async def list_trusted_certificates(
        self, tenant: str | None = None
    ) -> list[TrustedCertificate]:
        """A tenant's certificates (all tenants when None), oldest first."""

    @abstractmethod
    async def find_trusted_certificates(self, fingerprint: str) -> list[TrustedCertificate]:
        """Every tenant's copy of one certificate (uniqueness and PoP rules)."""

    @abstractmethod
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
        """Change the given fields only; returns the new value. ``pem`` is for CA renewal."""

    @abstractmethod
    async def delete_trusted_certificate(self, tenant: str, fingerprint: str) -> None:
        """:class:`NotFound` when absent. Also deletes a tenant-CA private key stored for it."""

    # revocation --------------------------------------------------------------
    @abstractmethod
    async def add_revocations(self, entries: Sequence[RevocationEntry]) -> tuple[int, int]:
        """Insert entries; a duplicate (tenant, serial) keeps the existing entry.

        Returns (added, already_present). Entries are irreversible: no delete.
        """

    @abstractmethod
    async def list_revocations(self, tenant: str) -> list[RevocationEntry]: ...

    @abstractmethod
    async def get_revocation_settings(self, tenant: str) -> RevocationSettings: ...

    @abstractmethod
    async def set_revocation_settings(self, tenant: str, settings: RevocationSettings) -> None: ...

    # device users ------------------------------------------------------------
    @abstractmethod
    async def register_device(
        self, tenant: str, device_id: str, via: str, now: datetime
    ) -> tuple[DeviceUser, bool]:
        """Create the device user if absent, atomically (race-free across processes).

        Returns (user, created). Consumes a pending registration of that device.
        """

    @abstractmethod
    async def get_device(self, tenant: str, device_id: str) -> DeviceUser:
        """:class:`NotFound` when absent."""

    @abstractmethod
    async def list_devices(self, tenant: str) -> list[DeviceUser]: ...

    @abstractmethod
    async def find_device_tenants(self, device_id: str) -> list[str]:
        """Tenants where a device user with that id exists (LWM2M tenant lookup)."""

    @abstractmethod
    async def set_device_enabled(
        self, tenant: str, device_id: str, enabled: bool
    ) -> DeviceUser: ...

    @abstractmethod
    async def touch_device(self, tenant: str, device_id: str, now: datetime) -> None:
        """Record a connect time (no change-feed entry: it affects no decision)."""

    # pending (bulk) registrations ---------------------------------------------
    @abstractmethod
    async def add_pending_registration(self, pending: PendingRegistration) -> None:
        """:class:`Conflict` if the device user or a pending entry already exists."""

    @abstractmethod
    async def get_pending_registration(
        self, tenant: str, device_id: str
    ) -> PendingRegistration: ...

    @abstractmethod
    async def list_pending_registrations(self, tenant: str) -> list[PendingRegistration]: ...

    @abstractmethod
    async def consume_pending_registration(
        self, tenant: str, device_id: str
    ) -> PendingRegistration:
        """Remove and return it atomically (an OTP works once). :class:`NotFound` if absent."""

    # provisioned certificates -------------------------------------------------
    @abstractmethod
    async def record_provisioned_certificate(self, cert: ProvisionedCertificate) -> None:
        """Upsert by (tenant, device, serial): keep ``first_seen``, update ``last_seen``;
        then keep only the newest :data:`PROVISIONED_KEEP` by ``not_before``."""

    @abstractmethod
    async def list_provisioned_certificates(
        self, tenant: str, device_id: str
    ) -> list[ProvisionedCertificate]:
        """Newest ``not_before`` first."""

    # admin users -------------------------------------------------------------
    @abstractmethod
    async def put_admin_user(self, user: AdminUser) -> None:
        """Create or replace."""

    @abstractmethod
    async def get_admin_user(self, tenant: str, username: str) -> AdminUser: ...

    @abstractmethod
    async def find_admin_users(self, username: str) -> list[AdminUser]:
        """Users of that name in any tenant (login with a bare user name)."""

    async def list_admin_users(self, tenant: str) -> list[AdminUser]:
        """A tenant's management users by name (``admin-users list``).

        Not abstract so that stores written before it keep working; they say
        the listing is unsupported until they implement it.
        """
        raise StoreError(f"{type(self).__name__} cannot list admin users")

    # secrets and options (tenant CA keys, token signing keys, feature toggles) -
    @abstractmethod
    async def set_option(self, tenant: str, key: str, value: str) -> None: ...

    @abstractmethod
    async def get_option(self, tenant: str, key: str) -> str | None: ...

    @abstractmethod
    async def delete_option(self, tenant: str, key: str) -> None: ...

    # audit -------------------------------------------------------------------
    @abstractmethod
    async def add_audit(self, record: AuditRecord) -> int:
        """Append; returns the record id."""

    @abstractmethod
    async def list_audit(self, query: AuditQuery, page: Page) -> tuple[list[AuditRecord], int]:
        """Newest first; returns (records, total matching)."""

    # change feed -------------------------------------------------------------
    @abstractmethod
    async def change_seq(self) -> int:
        """The seq of the newest change (0 when none)."""

    @abstractmethod
    async def changes_since(self, seq: int, limit: int = 10000) -> list[Change]:
        """Changes with ``seq`` greater than the argument, oldest first."""


def chunks(items: Iterable[T], size: int) -> Iterable[list[T]]:
    """Split for bulk writes (bounded transactions)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
