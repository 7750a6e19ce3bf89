"""The session registry: every live device session, indexed for revocation.

One object owns the table (STYLE: one dispatcher owns the session table).
Front-ends register a session with its :class:`~trust.model.DeviceIdentity`
and a ``close`` coroutine; the registry, told about trust changes, closes the
sessions a change affects: a revoked serial anywhere in the chain, a disabled
device user, a disabled or deleted anchor, a tenant's CRL settings turned on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from trust.model import Change, ChangeKind, DeviceIdentity, Reason
from trust.snapshot import TrustSnapshot

log = logging.getLogger("mtls_gateway.sessions")

CloseFn = Callable[[str, str], Awaitable[None]]
"""``close(code, message)``: code is a :class:`~trust.model.Reason` value or ``shutdown``."""

K = TypeVar("K")


@dataclass(eq=False, slots=True)
class Session:
    """A live, authenticated device session."""

    id: int
    identity: DeviceIdentity
    peer: str
    close: CloseFn
    closing: bool = field(default=False)


class SessionRegistry:
    """Owns the live-session table and closes sessions on trust changes."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._sessions: dict[int, Session] = {}
        # a device has one session nearly always: its id alone, a set only for more
        # (a set costs 216 bytes even for one id; this index holds one per session)
        self._by_device: dict[tuple[str, str], int | set[int]] = {}
        self._by_tenant: dict[str, set[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, identity: DeviceIdentity, peer: str, close: CloseFn) -> Session:
        session = Session(next(self._ids), identity, peer, close)
        self._sessions[session.id] = session
        key = (identity.tenant, identity.device_id)
        ids = self._by_device.get(key)
        if ids is None:
            self._by_device[key] = session.id
        elif isinstance(ids, int):
            self._by_device[key] = {ids, session.id}
        else:
            ids.add(session.id)
        self._by_tenant.setdefault(identity.tenant, set()).add(session.id)
        return session

    def remove(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        ident = session.identity
        key = (ident.tenant, ident.device_id)
        ids = self._by_device.get(key)
        if ids == session.id:
            del self._by_device[key]
        elif isinstance(ids, set):
            ids.discard(session.id)
            if len(ids) == 1:
                self._by_device[key] = ids.pop()
        _discard(self._by_tenant, ident.tenant, session.id)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def count_by(self) -> dict[tuple[str, str], int]:
        """Live sessions per (listener, tenant), for metrics and status."""
        out: dict[tuple[str, str], int] = {}
        for s in self._sessions.values():
            k = (s.identity.listener.value, s.identity.tenant)
            out[k] = out.get(k, 0) + 1
        return out

    def affected(
        self, snap: TrustSnapshot, changes: Iterable[Change]
    ) -> list[tuple[Session, Reason, str]]:
        """Sessions that the new snapshot no longer allows, with the reason."""
        hits: dict[int, tuple[Session, Reason, str]] = {}
        for ch in changes:
            tenant_ids = self._by_tenant.get(ch.tenant, set())
            if not tenant_ids:
                continue
            trust = snap.tenant(ch.tenant)
            if ch.kind in (ChangeKind.REVOCATION, ChangeKind.SETTINGS):
                if not trust.settings.offline:
                    continue
                for sid in tenant_ids:
                    s = self._sessions[sid]
                    bad = next((x for x in s.identity.chain_serials if x in trust.revoked), None)
                    if bad is not None:
                        hits[sid] = (s, Reason.REVOKED, f"certificate serial {bad:x} revoked")
            elif ch.kind is ChangeKind.DEVICE:
                user = snap.device(ch.tenant, ch.key)
                if user is None or user.enabled:
                    continue
                ids = self._by_device.get((ch.tenant, ch.key), ())
                for sid in (ids,) if isinstance(ids, int) else ids:
                    hits[sid] = (
                        self._sessions[sid],
                        Reason.DEVICE_DISABLED,
                        "device user disabled",
                    )
            elif ch.kind in (ChangeKind.ANCHOR, ChangeKind.TENANT):
                still = {a.fingerprint for a in trust.anchors if a.enabled}
                for sid in tenant_ids:
                    s = self._sessions[sid]
                    if s.identity.anchor_fingerprint not in still:
                        hits[sid] = (
                            s,
                            Reason.ANCHOR_DISABLED,
                            "trusted certificate disabled or deleted",
                        )
        return list(hits.values())

    def kill(self, session: Session, reason: str, message: str) -> None:
        """Start closing one session; the task is tracked, never dropped."""
        if session.closing:
            return
        session.closing = True
        ident = session.identity
        log.info(
            "closing session tenant=%s device=%s listener=%s reason=%s: %s",
            ident.tenant,
            ident.device_id,
            ident.listener.value,
            reason,
            message,
        )
        task = asyncio.create_task(self._close(session, reason, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, session: Session, reason: str, message: str) -> None:
        try:
            await asyncio.wait_for(session.close(reason, message), timeout=5)
        except Exception:
            log.exception("closing session %d failed", session.id)
        finally:
            self.remove(session)

    async def close_all(self, reason: str, message: str) -> None:
        """Close everything (shutdown) and wait for it."""
        for s in self.sessions():
            self.kill(s, reason, message)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _discard(index: dict[K, set[int]], key: K, sid: int) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(sid)
        if not ids:
            del index[key]
