"""The live trust state of one gateway process.

Holds the current :class:`~trust.snapshot.TrustSnapshot`, follows the store's
change feed (changes made by this process, another instance or the CLI take
effect within ``trust.refresh_interval``), keeps the TLS contexts whose CA
store is the union of enabled anchors, and caches decisions per presented
chain (invalidated whenever the snapshot changes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from gateway.store.base import NotFound, Store, StoreError
from trust.certs import CertificateError, load_der_chain
from trust.model import (
    Change,
    ChangeKind,
    Decision,
    DeviceIdentity,
    DeviceUser,
    Listener,
    PendingRegistration,
    Reason,
    Rejection,
)
from trust.policy import DecisionPolicy, OnlineCheck, decide
from trust.snapshot import TenantTrust, TrustSnapshot, parse_anchor

log = logging.getLogger("mtls_gateway.trust")

REJECTION_CACHE_TTL = timedelta(seconds=60)

ChangeListener = Callable[[TrustSnapshot, list[Change]], Awaitable[None]]


async def load_snapshot(store: Store) -> TrustSnapshot:
    """Read everything a decision needs from the store (start-up and resync)."""
    seq = await store.change_seq()
    tenants = await store.list_tenants()
    certificates = await store.list_trusted_certificates(None)
    revocations = []
    settings = {}
    devices = []
    pending = []
    for t in tenants:
        revocations += await store.list_revocations(t)
        settings[t] = await store.get_revocation_settings(t)
        devices += await store.list_devices(t)
        pending += await store.list_pending_registrations(t)
    return TrustSnapshot.build(
        seq=seq,
        tenants=tenants,
        certificates=certificates,
        revocations=revocations,
        settings=settings,
        devices=devices,
        pending=pending,
    )


async def apply_changes(
    store: Store, snap: TrustSnapshot, changes: Sequence[Change]
) -> TrustSnapshot:
    """Derive the next snapshot by re-reading only what the changes touched.

    Device and pending updates are gathered and applied in one copy each, so a
    burst of registrations costs O(devices + changes), not their product.
    """
    tenants_to_reload: set[str] = set()
    devices: dict[tuple[str, str], DeviceUser | None] = {}
    pendings: dict[tuple[str, str], PendingRegistration | None] = {}
    for ch in changes:
        key = (ch.tenant, ch.key)
        if ch.kind in (
            ChangeKind.TENANT,
            ChangeKind.ANCHOR,
            ChangeKind.REVOCATION,
            ChangeKind.SETTINGS,
        ):
            tenants_to_reload.add(ch.tenant)
        elif ch.kind is ChangeKind.DEVICE and key not in devices:
            try:
                devices[key] = await store.get_device(ch.tenant, ch.key)
            except NotFound:
                devices[key] = None
        elif ch.kind is ChangeKind.PENDING and key not in pendings:
            try:
                pendings[key] = await store.get_pending_registration(ch.tenant, ch.key)
            except NotFound:
                pendings[key] = None
    if devices:
        snap = snap.with_devices(devices)
    if pendings:
        snap = snap.with_pendings(pendings)
    for tenant in sorted(tenants_to_reload):
        if not await store.tenant_exists(tenant):
            snap = snap.without_tenant(tenant)
            continue
        records = await store.list_trusted_certificates(tenant)
        anchors = tuple(a for a in (parse_anchor(r) for r in records) if a is not None)
        revoked = frozenset(e.serial for e in await store.list_revocations(tenant))
        settings = await store.get_revocation_settings(tenant)
        snap = snap.with_tenant(TenantTrust(tenant, anchors, revoked, settings))
    seq = max((c.seq for c in changes), default=snap.seq)
    return _with_seq(snap, seq)


def _with_seq(snap: TrustSnapshot, seq: int) -> TrustSnapshot:
    return replace(snap, seq=seq)


def peer_chain_der(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes] | None:
    """The chain the peer presented (leaf first), as DER; None on a resumed session.

    Python 3.13 made ``get_unverified_chain`` public; on 3.11/3.12 it exists on
    the private ``_sslobj``. This is the only place that touches it.
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        inner = getattr(ssl_object, "_sslobj", None)
        getter = getattr(inner, "get_unverified_chain", None)
    if getter is None:  # pragma: no cover - would be a Python without the API
        leaf = ssl_object.getpeercert(binary_form=True)
        return [leaf] if leaf else None
    # 3.11 answers [None] (not []) when the client sent no certificate
    chain = [c for c in (getter() or ()) if c is not None]
    if not chain:
        leaf = ssl_object.getpeercert(binary_form=True)
        return [leaf] if leaf else None
    der = 2  # _ssl.ENCODING_DER; not re-exported by ``ssl`` on 3.11
    return [c.public_bytes(der) for c in chain]


def _leaf_key(listener: Listener, leaf_der: bytes) -> bytes:
    """The key of a leaf certificate's last decision on a listener (one bytes
    object per cached device instead of a tuple and a digest)."""
    return hashlib.sha256(listener.value.encode() + b"\0" + leaf_der).digest()


@dataclass(slots=True)
class _Cached:
    seq: int
    decision: Decision
    valid_until: datetime | None


class TrustState:
    """Snapshot + change-feed follower + TLS contexts + decision cache."""

    def __init__(
        self,
        store: Store,
        policy: DecisionPolicy,
        *,
        server_cert: Path,
        server_key: Path,
        refresh_interval: float = 0.2,
        cache_size: int = 100_000,
        session_tickets: bool = False,
        min_tls: str = "1.2",
        outage_grace: float = 300.0,
    ) -> None:
        self.store = store
        self.policy = policy
        self.server_cert = server_cert
        self.server_key = server_key
        self.refresh_interval = refresh_interval
        self.cache_size = cache_size
        self.session_tickets = session_tickets
        self.outage_grace = outage_grace
        self.min_tls = min_tls
        self.snapshot = TrustSnapshot()
        self._cache: dict[bytes, _Cached] = {}
        # A device's registration or enable flag changes only that device's
        # decisions: evict those instead of the whole cache (first-connect bursts
        # would otherwise empty it for everyone).
        # (one cached chain per device nearly always: its key alone, a set only for more)
        self._cache_by_device: dict[str, bytes | set[bytes]] = {}
        self._generation = 0
        self._by_leaf: dict[bytes, bytes] = {}  # _leaf_key(listener, leaf) -> cache key
        self._refresh_lock = asyncio.Lock()
        self._listeners: list[ChangeListener] = []
        self._anchor_key: tuple[str, ...] = ()
        self._trust_context: ssl.SSLContext | None = None
        self._task: asyncio.Task[None] | None = None
        self.store_healthy = True
        self.store_down_since: float | None = None
        self.last_refresh_error: str | None = None
        # Online CRL check (issue 8), installed by gateway.crl_fetcher; it calls
        # invalidate_decisions() whenever the CRL data changes.
        self.online: OnlineCheck | None = None

    # lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self.snapshot = await load_snapshot(self.store)
        self._rebuild_context()
        self._task = asyncio.create_task(self._follow(), name="trust-refresh")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener(new_snapshot, changes)`` after each applied batch."""
        self._listeners.append(listener)

    async def refresh(self) -> bool:
        """Apply pending changes now; True if the snapshot changed."""
        async with self._refresh_lock:  # the poll loop and explicit callers never interleave
            return await self._refresh()

    async def _refresh(self) -> bool:
        seq = await self.store.change_seq()
        if seq <= self.snapshot.seq:
            return False
        changes = await self.store.changes_since(self.snapshot.seq)
        if not changes:
            return False
        if changes[0].seq > self.snapshot.seq + 1 and self.snapshot.seq > 0:
            # the feed was trimmed past what we saw: resync everything
            log.warning(
                "change feed gap (%d → %d): full trust resync", self.snapshot.seq, changes[0].seq
            )
            new = await load_snapshot(self.store)
            self.invalidate_decisions()
        else:
            new = await apply_changes(self.store, self.snapshot, changes)
            self._invalidate(changes)
        self.snapshot = new
        self._rebuild_context()
        for listener in self._listeners:
            try:
                await listener(new, changes)
            except Exception:
                log.exception("change listener failed")
        return True

    async def _follow(self) -> None:
        # A store that pushes change notifications (Redis pub/sub) wakes us at
        # once; the interval stays as the fallback should a notification be lost.
        wait_for_change: Callable[[float], Awaitable[bool]] | None = getattr(
            self.store, "wait_for_change", None
        )
        while True:
            try:
                await self.refresh()
                if not self.store_healthy:
                    log.info("store reachable again")
                self.store_healthy = True
                self.store_down_since = None
                self.last_refresh_error = None
            except asyncio.CancelledError:
                raise
            except (StoreError, OSError) as exc:
                if self.store_healthy:
                    log.error(
                        "store unavailable, deciding from the last trust snapshot for up to "
                        "%.0f s: %s",
                        self.outage_grace,
                        exc,
                    )
                    self.store_down_since = time.monotonic()
                self.store_healthy = False
                self.last_refresh_error = str(exc)
            except Exception:
                log.exception("trust refresh failed")
            if wait_for_change is None:
                await asyncio.sleep(self.refresh_interval)
                continue
            try:
                await wait_for_change(self.refresh_interval)
            except (StoreError, OSError):
                await asyncio.sleep(self.refresh_interval)

    # TLS -------------------------------------------------------------------
    def _invalidate(self, changes: Sequence[Change]) -> None:
        if all(c.kind in (ChangeKind.DEVICE, ChangeKind.PENDING) for c in changes):
            for c in changes:
                keys = self._cache_by_device.pop(c.key, ())
                for key in (keys,) if isinstance(keys, bytes) else keys:
                    self._cache.pop(key, None)
            return
        self.invalidate_decisions()

    def invalidate_decisions(self) -> None:
        """Forget every cached decision (trust data changed)."""
        self._generation += 1
        self._cache.clear()
        self._cache_by_device.clear()
        self._by_leaf.clear()

    def server_context(self, listener: Listener) -> ssl.SSLContext:
        """The base context a listener is created with; its SNI callback swaps in
        the current trust context for each handshake (it runs without SNI too)."""
        ctx = self._new_context()
        # The verify mode is read from the base context, not the swapped one.
        ctx.verify_mode = ssl.CERT_OPTIONAL if listener is Listener.HTTPS else ssl.CERT_REQUIRED
        self._load_anchors(ctx)

        def swap(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            current = self._trust_context
            if current is not None:
                sslobj.context = current

        ctx.sni_callback = swap
        return ctx

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = (
            ssl.TLSVersion.TLSv1_3 if self.min_tls == "1.3" else ssl.TLSVersion.TLSv1_2
        )
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        # An intermediate may be the trust anchor (spec: upload CA *or intermediate).
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if not self.session_tickets:
            # Tickets cost ~30% of a handshake even when nobody resumes.
            ctx.num_tickets = 0
            ctx.options |= ssl.OP_NO_TICKET
        return ctx

    def _load_anchors(self, ctx: ssl.SSLContext) -> None:
        certs = self.snapshot.enabled_anchor_certificates()
        if certs:
            ctx.load_verify_locations(
                cadata="".join(c.public_bytes(Encoding.PEM).decode() for c in certs)
            )

    def _rebuild_context(self) -> None:
        key = tuple(
            sorted(
                fp
                for fp, anchors in self.snapshot.by_fingerprint.items()
                if any(a.enabled for a in anchors)
            )
        )
        if key == self._anchor_key and self._trust_context is not None:
            return
        ctx = self._new_context()
        ctx.verify_mode = ssl.CERT_OPTIONAL
        self._load_anchors(ctx)
        self._trust_context = ctx
        self._anchor_key = key
        log.info("TLS trust store now holds %d enabled anchors", len(key))

    def reload_server_certificate(self, cert: Path, key: Path) -> None:
        """Serve a new server certificate to new connections (SIGHUP).

        Every listener's handshake swaps in the rebuilt trust context, whose
        certificate is the one served. If the files do not load (``ssl.SSLError``,
        ``OSError``) nothing changes and the error is raised.
        """
        previous = self.server_cert, self.server_key
        self.server_cert, self.server_key = cert, key
        self._anchor_key = ()
        try:
            self._rebuild_context()
        except BaseException:
            # keep serving the certificate that worked (a half-copied key, a mismatch)
            self.server_cert, self.server_key = previous
            raise

    # decisions -------------------------------------------------------------
    def decide_der(
        self, chain_der: Sequence[bytes] | None, listener: Listener, now: datetime | None = None
    ) -> Decision:
        """Decide a presented chain (DER, leaf first), cached per chain and listener."""
        now = now or datetime.now(UTC)
        if not chain_der:
            return Rejection(Reason.NO_CERTIFICATE, "no client certificate was presented")
        if self.snapshot_too_stale():
            return Rejection(
                Reason.STORE_UNAVAILABLE,
                "the store has been unreachable for longer than the outage grace period",
            )
        h = hashlib.sha256(listener.value.encode())
        for der in chain_der:
            h.update(len(der).to_bytes(4, "big"))
            h.update(der)
        key = h.digest()
        seq = self._generation
        hit = self._cache.get(key)
        if (
            hit is not None
            and hit.seq == seq
            and (hit.valid_until is None or now < hit.valid_until)
        ):
            return hit.decision
        try:
            chain = load_der_chain(list(chain_der))
        except CertificateError as exc:
            return Rejection(Reason.MALFORMED, str(exc))
        decision = decide(chain, self.snapshot, now, listener, self.policy, online=self.online)
        if isinstance(decision, DeviceIdentity):
            # never serve a cached accept past the earliest expiry in the chain
            valid_until = min(c.not_valid_after_utc for c in chain)
        else:
            # a rejection may stop applying with time alone (not yet valid)
            valid_until = now + REJECTION_CACHE_TTL
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
            self._cache_by_device.clear()
            self._by_leaf.clear()
        self._cache[key] = _Cached(seq, decision, valid_until)
        if decision.device_id:
            known = self._cache_by_device.get(decision.device_id)
            if known is None or known == key:
                self._cache_by_device[decision.device_id] = key
            elif isinstance(known, bytes):
                self._cache_by_device[decision.device_id] = {known, key}
            else:
                known.add(key)
        if isinstance(decision, DeviceIdentity):
            self._by_leaf[_leaf_key(listener, chain_der[0])] = key
        return decision

    def snapshot_too_stale(self) -> bool:
        """True once the store has been unreachable for longer than ``outage_grace``:
        the last snapshot may then miss revocations, so new devices are refused."""
        down = self.store_down_since
        return down is not None and time.monotonic() - down > self.outage_grace

    def decide_resumed(
        self, leaf_der: bytes | None, listener: Listener, now: datetime | None = None
    ) -> Decision:
        """A resumed TLS session carries no chain, only the leaf: reuse the decision
        a full handshake made for that certificate while it is still current
        (same trust generation, not expired); otherwise refuse, so the device
        falls back to a full handshake on its next attempt."""
        now = now or datetime.now(UTC)
        if not leaf_der:
            return Rejection(Reason.NO_CERTIFICATE, "no client certificate in the resumed session")
        key = self._by_leaf.get(_leaf_key(listener, leaf_der))
        hit = self._cache.get(key) if key is not None else None
        if (
            hit is not None
            and hit.seq == self._generation
            and (hit.valid_until is None or now < hit.valid_until)
        ):
            return hit.decision
        return Rejection(
            Reason.UNTRUSTED,
            "resumed TLS session with no current decision for its certificate; "
            "a full handshake is required",
        )
