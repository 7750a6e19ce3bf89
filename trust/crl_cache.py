"""Online revocation: CRLs from the certificates' distribution points, cached.

Spec ("CRL settings", online revocation): a tenant that turns the online check
on has every certificate of a verified chain that carries a CRL Distribution
Points extension (RFC 5280 §4.2.1.13) checked against the CRL published there.
This module is the pure part: a per-distribution-point state machine driven by
an injected fetcher (``gateway/crl_fetcher.py``) and the check the decision
calls (:meth:`CrlCache.check` is a :data:`trust.policy.OnlineCheck`). Nothing
here does I/O or reads the clock: every call takes ``now``.

How it behaves (the decisions operators can rely on):

* **The hot path never waits.** A distribution point seen for the first time
  is registered and becomes due at once; until its CRL arrives the check
  answers by the *missing policy*: ``fail_closed`` (default) refuses with
  ``crl_unavailable``, ``fail_open`` accepts.
* **What is checked.** The leaf and every intermediate, each against the CRL of
  the next certificate in the chain (its issuer); the anchor is trusted as
  configured. Only ``http``, ``https`` (and, when allowed, ``file``) URIs of
  distribution points without ``cRLIssuer`` or ``reasons`` are used: indirect
  and reason-partitioned CRLs are not supported, and a certificate with no
  usable URI is not checked online. Several URIs are alternatives: one current
  CRL among them is enough.
* **Revoked beats everything.** A serial listed on *any* cached CRL of its
  issuer (same name and key, RFC 5280 §6.3.3(b), (f), (g) checked by
  :class:`~trust.crl.CrlIndex`) is revoked, even when that CRL is stale: a
  revocation is not undone by the publisher being late (``removeFromCRL`` in an
  applicable delta CRL is the only way back, §5.3.1).
* **Freshness.** A CRL is current until its ``nextUpdate`` (§6.3.3(a)(2)); "not
  revoked" is only believed from a current CRL, otherwise the missing policy
  applies. A CRL is refetched when ``refresh_margin`` of its remaining lifetime
  is left (0.2: at 80 %), and at least every ``max_age`` even when its
  ``nextUpdate`` is far away, so mid-cycle revocations arrive.
* **Failures keep the last good CRL.** A fetch error, an unusable CRL (bad
  signature, wrong issuer, malformed) or a replayed older CRL (lower CRLNumber,
  §5.2.3) is ignored: the cached CRL stays in use (until its ``nextUpdate``)
  and the fetch is retried with exponential backoff from ``retry_min`` to
  ``retry_max``.
* **Delta CRLs** (§5.2.4, §5.2.6): a complete CRL with a Freshest CRL extension
  gets a second entry for the delta's URL. A delta (DeltaCRLIndicator) is
  applied when it has the base's issuer and scope and ``BaseCRLNumber <= base
  number < delta number``; its entries add revocations and its
  ``removeFromCRL`` entries release holds. A missing or outdated delta leaves
  the complete CRL in force on its own.
* **Bounded.** At most ``max_entries`` distribution points (beyond that a new
  one is treated as unavailable), ``MAX_ISSUERS`` issuer certificates per
  point; a CRL's serials are indexed once (O(1) lookups for 100k entries).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trust.certs import fingerprint
from trust.crl import CrlError, CrlIndex, load_crls
from trust.model import Reason, Rejection
from trust.verify import VerifiedChain

__all__ = [
    "MAX_ISSUERS",
    "CachePolicy",
    "CertState",
    "CertStatus",
    "ChainResult",
    "ChainStatus",
    "CrlCache",
    "DpStatus",
    "FetchResult",
    "MissingPolicy",
    "Outcome",
    "distribution_point_urls",
    "index_crl",
]

MAX_ISSUERS = 4
"""Issuer certificates remembered per distribution point (key rollover, cross-signing)."""
MAX_URL_LENGTH = 2048

_E = TypeVar("_E", bound=x509.ExtensionType)


class MissingPolicy(StrEnum):
    """What the check answers when no current CRL is available for a certificate."""

    FAIL_CLOSED = "fail_closed"  # refuse with crl_unavailable
    FAIL_OPEN = "fail_open"  # accept (revocations already known still refuse)


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Knobs of the cache (from the ``[crl]`` configuration)."""

    refresh_margin: float = 0.2
    """Refetch when this fraction of a CRL's remaining lifetime is left (0.2: at 80 %)."""
    max_age: timedelta = timedelta(hours=1)
    """Refetch at least this often, whatever the CRL's nextUpdate."""
    missing: MissingPolicy = MissingPolicy.FAIL_CLOSED
    """Answer when no current CRL is available (never fetched, stale, unusable)."""
    retry_min: timedelta = timedelta(seconds=1)
    """First retry delay after a failure; doubles per consecutive failure ..."""
    retry_max: timedelta = timedelta(minutes=5)
    """... up to this."""
    max_entries: int = 1000
    """Distribution points tracked at most (base and delta CRL URLs)."""
    schemes: frozenset[str] = frozenset({"http", "https"})
    """URI schemes fetched; add ``file`` only when every trusted CA is yours."""


class Outcome(StrEnum):
    """What one fetch did to the cache (also the metric's ``result`` label)."""

    UPDATED = "updated"  # new CRL data: decisions and live sessions must be re-checked
    UNCHANGED = "unchanged"  # the same CRL again (same number, or HTTP 304)
    STALE = "stale"  # a usable CRL already past its nextUpdate: kept, retried
    INVALID = "invalid"  # unusable CRL (signature, issuer, encoding, rollback): ignored
    FAILED = "failed"  # no CRL obtained (network, HTTP status, size limit)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The result of feeding one fetch into the cache."""

    url: str
    outcome: Outcome
    message: str = ""
    error_changed: bool = False
    """The failure differs from the previous one (log it); False for repeats."""
    recovered: bool = False
    """A success after failures (log that it works again)."""
    next_fetch: datetime | None = None


class CertState(StrEnum):
    GOOD = "good"  # a current CRL covers it and does not list it
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # no current CRL: the missing policy decides
    NOT_CHECKED = "not_checked"  # no usable distribution point


@dataclass(frozen=True, slots=True)
class CertStatus:
    """Online revocation status of one certificate."""

    state: CertState
    url: str | None = None
    revoked_at: datetime | None = None
    message: str = ""


class ChainResult(StrEnum):
    """Result of the online check of one chain (the checks metric's label)."""

    GOOD = "good"
    REVOKED = "revoked"
    UNAVAILABLE = "unavailable"  # refused: fail_closed without a current CRL
    FAIL_OPEN = "fail_open"  # accepted without a current CRL
    NOT_APPLICABLE = "not_applicable"  # no certificate with a usable distribution point


@dataclass(frozen=True, slots=True)
class ChainStatus:
    result: ChainResult
    rejection: Rejection | None = None
    unknown_urls: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DpStatus:
    """What ``mtls-gateway crl status`` shows for one distribution point."""

    url: str
    kind: str  # "crl" or "delta"
    state: str  # "current", "stale" or "never_fetched"
    delta_of: str | None
    delta_url: str | None
    issuer: str | None
    crl_number: int | None
    entries: int | None
    this_update: datetime | None
    next_update: datetime | None
    last_fetch: datetime | None
    last_attempt: datetime | None
    next_fetch: datetime
    fetches: int
    failures: int
    consecutive_failures: int
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        """camelCase JSON (like the REST API); times are ISO 8601 UTC."""

        def t(value: datetime | None) -> str | None:
            return value.astimezone(UTC).isoformat() if value is not None else None

        return {
            "url": self.url,
            "kind": self.kind,
            "state": self.state,
            "deltaOf": self.delta_of,
            "deltaUrl": self.delta_url,
            "issuer": self.issuer,
            "crlNumber": self.crl_number,
            "entries": self.entries,
            "thisUpdate": t(self.this_update),
            "nextUpdate": t(self.next_update),
            "lastFetch": t(self.last_fetch),
            "lastAttempt": t(self.last_attempt),
            "nextFetch": t(self.next_fetch),
            "fetches": self.fetches,
            "failures": self.failures,
            "consecutiveFailures": self.consecutive_failures,
            "lastError": self.last_error,
        }


@dataclass(eq=False, slots=True)
class _Entry:
    url: str
    next_fetch: datetime
    delta_of: str | None = None
    """Set on a delta CRL's entry: the URL of its complete CRL."""
    issuers: list[tuple[bytes, x509.Certificate]] = field(default_factory=list)
    index: CrlIndex | None = None
    issuer_key: bytes | None = None
    scope: x509.IssuingDistributionPoint | None = None
    base_number: int | None = None
    """A delta's BaseCRLNumber."""
    removed: frozenset[int] = frozenset()
    """A delta's removeFromCRL serials (holds released since the base)."""
    delta_url: str | None = None
    """A complete CRL's Freshest CRL URL."""
    last_success: datetime | None = None
    last_attempt: datetime | None = None
    fetches: int = 0
    failures: int = 0
    consecutive: int = 0
    last_error: str | None = None
    stale_seen: bool = False


class CrlCache:
    """Per-distribution-point CRL state: schedule, last good CRL, lookups."""

    def __init__(self, policy: CachePolicy | None = None) -> None:
        self.policy = policy or CachePolicy()
        self._entries: dict[str, _Entry] = {}
        self._by_key: dict[bytes, set[str]] = {}
        """Issuer key → URLs of complete CRLs validated with that issuer."""
        self._fp_key: dict[str, bytes] = {}
        """Issuer certificate fingerprint → issuer key (for live-session checks)."""
        self.generation = 0
        """Bumped whenever an answer of :meth:`check` may change (new CRL data, a CRL
        turning stale): cached decisions made before are outdated."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, url: object) -> bool:
        return url in self._entries

    # the check (hot path) ---------------------------------------------------------
    def check(self, chain: VerifiedChain, now: datetime) -> Rejection | None:
        """The :data:`trust.policy.OnlineCheck`: a rejection, or None to go on."""
        return self.evaluate(chain, now).rejection

    def evaluate(self, chain: VerifiedChain, now: datetime) -> ChainStatus:
        """Check every certificate of ``chain`` but the anchor against its issuer's CRL."""
        certs = chain.certificates
        checked = False
        unknown: list[tuple[int, CertStatus]] = []
        for i in range(len(certs) - 1):
            status = self.cert_status(certs[i], certs[i + 1], now)
            if status.state is CertState.REVOKED:
                cert = certs[i]
                when = status.revoked_at
                return ChainStatus(
                    ChainResult.REVOKED,
                    Rejection(
                        Reason.REVOKED,
                        f"{_role(i)} certificate {_name(cert.subject)} "
                        f"(serial {cert.serial_number:x}) was revoked"
                        f"{f' on {when:%FT%TZ}' if when else ''} by the CRL at {status.url}",
                    ),
                )
            if status.state is CertState.UNKNOWN:
                unknown.append((i, status))
            checked = checked or status.state is not CertState.NOT_CHECKED
        if unknown:
            urls = tuple(s.url for _, s in unknown if s.url is not None)
            if self.policy.missing is MissingPolicy.FAIL_OPEN:
                return ChainStatus(ChainResult.FAIL_OPEN, None, urls)
            i, status = unknown[0]
            return ChainStatus(
                ChainResult.UNAVAILABLE,
                Rejection(
                    Reason.CRL_UNAVAILABLE,
                    f"no current CRL for the {_role(i)} certificate "
                    f"{_name(certs[i].subject)}: {status.message}",
                ),
                urls,
            )
        return ChainStatus(ChainResult.GOOD if checked else ChainResult.NOT_APPLICABLE)

    def cert_status(
        self, cert: x509.Certificate, issuer: x509.Certificate, now: datetime
    ) -> CertStatus:
        """Status of ``cert`` (issued by ``issuer``); registers unknown distribution points."""
        urls = distribution_point_urls(cert, self.policy.schemes)
        key = self._issuer_key(issuer, remember=bool(urls))
        if key is not None:
            for url in self._by_key.get(key, ()):
                when = self._revoked_at(self._entries[url], cert.serial_number)
                if when is not None:
                    return CertStatus(CertState.REVOKED, url, when)
        if not urls:
            return CertStatus(CertState.NOT_CHECKED)
        assert key is not None  # remembered above
        problems: list[str] = []
        for url in urls:
            found = self._register(url, key, issuer, now)
            if found is None:
                problems.append(f"{url}: too many CRL distribution points are tracked")
                continue
            entry, index = found, found.index
            if entry.delta_of is not None:
                problems.append(f"{url}: serves the delta CRL of {entry.delta_of}")
            elif index is None:
                what = entry.last_error or "not fetched yet"
                problems.append(f"{url}: {what}")
            elif entry.issuer_key != key or not index.covers(cert):
                problems.append(f"{url}: the CRL there does not cover this certificate")
            elif now > index.next_update:
                problems.append(f"{url}: the CRL is stale since {index.next_update:%FT%TZ}")
            else:
                return CertStatus(CertState.GOOD, url)
        return CertStatus(CertState.UNKNOWN, urls[0], None, "; ".join(problems))

    def revoked_in_chain(
        self, serials: Sequence[int], fingerprints: Sequence[str]
    ) -> tuple[int, str, datetime] | None:
        """For a live session's identity (chain serials and SHA-1 fingerprints, leaf
        first): (position, CRL URL, revocation date) of a revoked certificate, or None."""
        for j in range(1, min(len(serials), len(fingerprints))):
            key = self._fp_key.get(fingerprints[j])
            if key is None:
                continue
            for url in self._by_key.get(key, ()):
                when = self._revoked_at(self._entries[url], serials[j - 1])
                if when is not None:
                    return j - 1, url, when
        return None

    # schedule ---------------------------------------------------------------------
    def due(self, now: datetime) -> list[str]:
        """URLs to fetch now, most overdue first."""
        ready = [e for e in self._entries.values() if e.next_fetch <= now]
        ready.sort(key=lambda e: e.next_fetch)
        return [e.url for e in ready]

    def next_due(self) -> datetime | None:
        """When the next fetch is due (None: nothing tracked)."""
        return min((e.next_fetch for e in self._entries.values()), default=None)

    def issuers(self, url: str) -> list[x509.Certificate]:
        """Issuer candidates to validate the CRL fetched from ``url`` with."""
        entry = self._entries.get(url)
        return [c for _, c in entry.issuers] if entry is not None else []

    def expire(self, now: datetime) -> list[str]:
        """Complete CRLs that turned stale since the last call (bumps :attr:`generation`:
        accepts decided while they were current must be decided again)."""
        turned = []
        for e in self._entries.values():
            if e.index is None or e.delta_of is not None:
                continue
            stale = now > e.index.next_update
            if stale and not e.stale_seen:
                turned.append(e.url)
            e.stale_seen = stale
        if turned:
            self.generation += 1
        return turned

    # fetch results ------------------------------------------------------------------
    def on_fetched(self, url: str, crl: bytes | CrlIndex, now: datetime) -> FetchResult:
        """A CRL was downloaded from ``url`` (raw bytes, or already indexed by
        :func:`index_crl` off the event loop)."""
        entry = self._entries.get(url)
        if entry is None:
            return FetchResult(url, Outcome.FAILED, "not a tracked distribution point")
        if isinstance(crl, CrlIndex):
            index = crl
        else:
            try:
                index = index_crl(crl, self.issuers(url))
            except CrlError as exc:
                return self.on_invalid(url, str(exc), now)
        problem = self._unusable(entry, index)
        if problem is not None:
            return self.on_invalid(url, problem, now)
        entry.fetches += 1
        entry.last_attempt = now
        old = entry.index
        changed = (
            old is None
            or old.number != index.number
            or old.crl.signature != index.crl.signature
            or entry.issuer_key != _key_of(index.issuer)
        )
        if changed:
            self._install(entry, index, now)
        recovered = entry.consecutive > 0
        if now > index.next_update:
            # The publisher is late: the CRL still revokes, but "not revoked" is not
            # believed; ask again with backoff rather than at the normal schedule.
            result = self._failure(
                entry,
                Outcome.STALE,
                f"the CRL is stale (nextUpdate {index.next_update:%FT%TZ})",
                now,
            )
            if changed:
                self.generation += 1
            return result
        entry.last_success = now
        entry.consecutive = 0
        entry.last_error = None
        entry.stale_seen = False
        entry.next_fetch = self._refresh_at(index, now)
        if changed:
            self.generation += 1
        outcome = Outcome.UPDATED if changed else Outcome.UNCHANGED
        return FetchResult(url, outcome, recovered=recovered, next_fetch=entry.next_fetch)

    def on_not_modified(self, url: str, now: datetime) -> FetchResult:
        """The server confirmed the cached CRL is still the current one (HTTP 304)."""
        entry = self._entries.get(url)
        if entry is None or entry.index is None:
            return self.on_failed(url, "not modified, but no CRL is cached", now)
        return self.on_fetched(url, entry.index, now)

    def on_invalid(self, url: str, error: str, now: datetime) -> FetchResult:
        """A CRL was downloaded but cannot be used: ignored, the last good one stays."""
        entry = self._entries.get(url)
        if entry is None:
            return FetchResult(url, Outcome.INVALID, error)
        entry.fetches += 1
        return self._failure(entry, Outcome.INVALID, error, now)

    def on_failed(self, url: str, error: str, now: datetime) -> FetchResult:
        """No CRL could be downloaded: the last good one stays, retry with backoff."""
        entry = self._entries.get(url)
        if entry is None:
            return FetchResult(url, Outcome.FAILED, error)
        entry.fetches += 1
        return self._failure(entry, Outcome.FAILED, error, now)

    # status -------------------------------------------------------------------------
    def status(self, url: str, now: datetime) -> DpStatus:
        """The state of one distribution point (``KeyError`` if not tracked)."""
        e = self._entries[url]
        index = e.index
        if index is None:
            state = "never_fetched"
        else:
            state = "stale" if now > index.next_update else "current"
        issuer = index.issuer if index is not None else (e.issuers[0][1] if e.issuers else None)
        return DpStatus(
            url=e.url,
            kind="delta" if e.delta_of is not None else "crl",
            state=state,
            delta_of=e.delta_of,
            delta_url=e.delta_url,
            issuer=_name(issuer.subject) if issuer is not None else None,
            crl_number=index.number if index is not None else None,
            entries=len(index) if index is not None else None,
            this_update=index.this_update if index is not None else None,
            next_update=index.next_update if index is not None else None,
            last_fetch=e.last_success,
            last_attempt=e.last_attempt,
            next_fetch=e.next_fetch,
            fetches=e.fetches,
            failures=e.failures,
            consecutive_failures=e.consecutive,
            last_error=e.last_error,
        )

    def statuses(self, now: datetime) -> list[DpStatus]:
        """Every tracked distribution point, by URL."""
        return [self.status(url, now) for url in sorted(self._entries)]

    # internals ----------------------------------------------------------------------
    def _register(
        self, url: str, key: bytes, issuer: x509.Certificate, now: datetime
    ) -> _Entry | None:
        entry = self._entries.get(url)
        if entry is None:
            if len(self._entries) >= self.policy.max_entries:
                return None
            entry = _Entry(url, next_fetch=now)
            self._entries[url] = entry
        if all(k != key for k, _ in entry.issuers) and len(entry.issuers) < MAX_ISSUERS:
            entry.issuers.append((key, issuer))
            if entry.index is None and entry.consecutive:
                # the CRL may have failed for want of this issuer: try again now
                entry.next_fetch = min(entry.next_fetch, now)
        return entry

    def _issuer_key(self, issuer: x509.Certificate, *, remember: bool) -> bytes | None:
        fp = fingerprint(issuer)
        key = self._fp_key.get(fp)
        if key is None and remember:
            key = _key_of(issuer)
            if len(self._fp_key) < self.policy.max_entries * MAX_ISSUERS:
                self._fp_key[fp] = key
        return key

    def _unusable(self, entry: _Entry, index: CrlIndex) -> str | None:
        if entry.delta_of is None and index.is_delta:
            return "a delta CRL is published at a CRL distribution point (expected a complete CRL)"
        if entry.delta_of is not None and not index.is_delta:
            return "the Freshest CRL URL serves a complete CRL, not a delta CRL"
        old = entry.index
        # §5.2.3: CRLNumbers only grow; an older CRL of the same issuer is a replay
        if (
            old is not None
            and entry.issuer_key == _key_of(index.issuer)
            and index.number < old.number
        ):
            return f"CRL number {index.number} is older than the cached {old.number}"
        return None

    def _install(self, entry: _Entry, index: CrlIndex, now: datetime) -> None:
        key = _key_of(index.issuer)
        if entry.delta_of is None:
            if entry.issuer_key is not None and entry.issuer_key != key:
                _discard(self._by_key, entry.issuer_key, entry.url)
            self._by_key.setdefault(key, set()).add(entry.url)
        entry.index = index
        entry.issuer_key = key
        entry.scope = _extension(index.crl, x509.IssuingDistributionPoint)
        if entry.delta_of is not None:
            indicator = _extension(index.crl, x509.DeltaCRLIndicator)
            entry.base_number = indicator.crl_number if indicator is not None else None
            entry.removed = _removed_serials(index.crl)
            return
        delta_url = _freshest_url(index.crl, self.policy.schemes)
        if delta_url != entry.delta_url:
            old = self._entries.get(entry.delta_url or "")
            if old is not None and old.delta_of == entry.url:
                del self._entries[old.url]
            entry.delta_url = None
            if delta_url is not None:
                existing = self._entries.get(delta_url)
                if existing is None and len(self._entries) < self.policy.max_entries:
                    self._entries[delta_url] = _Entry(
                        delta_url, next_fetch=now, delta_of=entry.url, issuers=list(entry.issuers)
                    )
                    entry.delta_url = delta_url
                elif existing is not None and existing.delta_of == entry.url:
                    entry.delta_url = delta_url

    def _delta_for(self, base: _Entry) -> _Entry | None:
        if base.delta_url is None or base.index is None:
            return None
        d = self._entries.get(base.delta_url)
        if d is None or d.index is None or d.base_number is None:
            return None
        # §5.2.4: same issuer and scope, BaseCRLNumber <= complete number < delta number
        if d.issuer_key != base.issuer_key or d.scope != base.scope:
            return None
        if not d.base_number <= base.index.number < d.index.number:
            return None
        return d

    def _revoked_at(self, entry: _Entry, serial: int) -> datetime | None:
        if entry.index is None:
            return None
        delta = self._delta_for(entry)
        if delta is not None:
            assert delta.index is not None
            when = delta.index.is_revoked(serial)
            if when is not None:
                return when
            if serial in delta.removed:
                return None
        return entry.index.is_revoked(serial)

    def _refresh_at(self, index: CrlIndex, now: datetime) -> datetime:
        remaining = index.next_update - now
        wait = min(remaining * (1 - self.policy.refresh_margin), self.policy.max_age)
        return now + max(wait, self.policy.retry_min)

    def _failure(self, entry: _Entry, outcome: Outcome, error: str, now: datetime) -> FetchResult:
        entry.last_attempt = now
        entry.failures += 1
        entry.consecutive += 1
        changed = error != entry.last_error
        entry.last_error = error
        backoff = self.policy.retry_min * (2 ** min(entry.consecutive - 1, 20))
        entry.next_fetch = now + min(backoff, self.policy.retry_max)
        return FetchResult(
            entry.url, outcome, error, error_changed=changed, next_fetch=entry.next_fetch
        )


def index_crl(data: bytes, issuers: Iterable[x509.Certificate]) -> CrlIndex:
    """Parse one CRL (DER or PEM) and validate it with the first issuer it verifies
    with. Pure and thread-safe: the fetcher runs it off the event loop, since
    indexing 100k entries takes a noticeable fraction of a second."""
    crls = load_crls(data)
    if len(crls) != 1:
        raise CrlError(f"expected one CRL, got {len(crls)}")
    crl = crls[0]
    candidates = [c for c in issuers if c.subject == crl.issuer]
    if not candidates:
        raise CrlError(f"the CRL is issued by {_name(crl.issuer)}, not by the certificates' issuer")
    error: CrlError | None = None
    for issuer in candidates:
        try:
            return CrlIndex(crl, issuer)
        except CrlError as exc:
            error = error or exc
    assert error is not None
    raise error


def distribution_point_urls(
    cert: x509.Certificate, schemes: frozenset[str] = frozenset({"http", "https"})
) -> tuple[str, ...]:
    """The usable CRL URLs of ``cert`` (RFC 5280 §4.2.1.13), in the certificate's order."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return ()
    except Exception:
        return ()  # unreadable extensions: the verifier would already have refused
    urls: list[str] = []
    for dp in points:
        # An indirect CRL (cRLIssuer) or one partitioned by reason does not say that a
        # certificate it does not list is good: not supported.
        if dp.crl_issuer or dp.reasons or not dp.full_name:
            continue
        urls += _uris(dp.full_name, schemes)
    return tuple(dict.fromkeys(urls))


def _freshest_url(crl: x509.CertificateRevocationList, schemes: frozenset[str]) -> str | None:
    freshest = _extension(crl, x509.FreshestCRL)
    if freshest is None:
        return None
    for dp in freshest:
        if dp.crl_issuer or dp.reasons or not dp.full_name:
            continue
        for url in _uris(dp.full_name, schemes):
            return url
    return None


def _uris(names: Iterable[x509.GeneralName], schemes: frozenset[str]) -> list[str]:
    out = []
    for name in names:
        if not isinstance(name, x509.UniformResourceIdentifier):
            continue
        url = name.value
        if len(url) > MAX_URL_LENGTH:
            continue
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError:
            continue
        if scheme in schemes:
            out.append(url)
    return out


def _removed_serials(crl: x509.CertificateRevocationList) -> frozenset[int]:
    removed = set()
    for entry in crl:
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            continue
        if reason is x509.ReasonFlags.remove_from_crl:
            removed.add(entry.serial_number)
    return frozenset(removed)


def _extension(crl: x509.CertificateRevocationList, kind: type[_E]) -> _E | None:
    try:
        return crl.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _key_of(cert: x509.Certificate) -> bytes:
    """Issuer identity for CRL purposes: subject name and public key (§6.3.3(b), (g));
    two certificates of one CA (re-issued, cross-signed) share it."""
    h = hashlib.sha256(cert.subject.public_bytes())
    h.update(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    return h.digest()


def _discard(index: dict[bytes, set[str]], key: bytes, url: str) -> None:
    urls = index.get(key)
    if urls is not None:
        urls.discard(url)
        if not urls:
            del index[key]


def _role(position: int) -> str:
    return "device" if position == 0 else "intermediate"


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string() or "<empty name>"
    except Exception:
        return "<unreadable name>"
