"""Online revocation I/O: fetch CRLs from distribution points in the background.

The state (schedule, last good CRL, lookups, policy) is the pure
:class:`trust.crl_cache.CrlCache`; this module moves bytes and applies the
consequences:

* one task wakes every ``crl.poll_interval`` seconds, and at once when a
  decision meets a distribution point without a current CRL, and downloads what
  is due: HTTP/HTTPS with aiohttp (conditional GET, size limit checked while
  streaming, total timeout, no proxy from the environment), ``file://`` when
  ``crl.allow_file_urls`` is on. The hot path never waits for it;
* parsing and indexing run in a worker thread (100k entries take ~0.3 s);
* when CRL data changes the decision cache is cleared and live sessions whose
  chain holds a serial now revoked (tenants with the online check on) are
  closed with reason ``revoked``;
* unusable CRLs (bad signature, wrong issuer, replayed) are ignored: logged
  once per distinct error, counted in ``mtls_gateway_crl_fetches_total``;
* :meth:`CrlFetcher.status` is the status document; it is also written
  atomically to ``<data_dir>/crl-status.json`` whenever it changes and every
  30 s, which ``mtls-gateway crl status`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import aiohttp

from gateway.config import CrlConfig
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionRegistry
from gateway.trust_state import TrustState
from trust.crl import CrlError
from trust.crl_cache import (
    CachePolicy,
    CrlCache,
    FetchResult,
    MissingPolicy,
    Outcome,
    index_crl,
)
from trust.model import Change, ChangeKind, Reason, Rejection
from trust.snapshot import TrustSnapshot
from trust.verify import VerifiedChain

log = logging.getLogger("mtls_gateway.crl")

STATUS_FILE = "crl-status.json"
"""Name of the status snapshot in the data directory."""
STATUS_INTERVAL = 30.0
"""Seconds between rewrites of the status file when nothing changed."""
MAX_PARALLEL_FETCHES = 8
_CHUNK = 64 * 1024


class FetchError(Exception):
    """A download failed; the message is the one-line reason shown in the status."""


@dataclass(frozen=True, slots=True)
class _Downloaded:
    body: bytes | None
    """None: not modified since the validator we sent."""
    validator: tuple[str, str] | None
    """What to send next time: (header, value), e.g. ("If-None-Match", etag)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CrlFetcher:
    """Background CRL downloads feeding a :class:`CrlCache`; the online check's glue."""

    def __init__(
        self,
        cache: CrlCache,
        *,
        trust: TrustState,
        registry: SessionRegistry,
        metrics: GatewayMetrics,
        fetch_timeout: float = 10.0,
        max_size: int = 10 * 1024 * 1024,
        poll_interval: float = 1.0,
        status_path: Path | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.cache = cache
        self.trust = trust
        self.registry = registry
        self.metrics = metrics
        self.fetch_timeout = fetch_timeout
        self.max_size = max_size
        self.poll_interval = poll_interval
        self.status_path = status_path
        self.clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fetches: set[asyncio.Task[None]] = set()
        self._inflight: set[str] = set()
        self._validators: dict[str, tuple[str, str]] = {}
        self._limit = asyncio.Semaphore(MAX_PARALLEL_FETCHES)
        self._session: aiohttp.ClientSession | None = None
        self._generation = cache.generation
        self._status_dirty = True
        self._status_written = 0.0
        self._status_error: str | None = None
        self._register_metrics()

    @classmethod
    def from_config(
        cls,
        config: CrlConfig,
        *,
        trust: TrustState,
        registry: SessionRegistry,
        metrics: GatewayMetrics,
        status_path: Path | None,
    ) -> CrlFetcher:
        schemes = {"http", "https"} | ({"file"} if config.allow_file_urls else set())
        policy = CachePolicy(
            refresh_margin=config.refresh_margin,
            max_age=timedelta(seconds=config.max_age),
            missing=MissingPolicy(config.missing_policy),
            retry_min=timedelta(seconds=config.retry_min),
            retry_max=timedelta(seconds=config.retry_max),
            max_entries=config.max_distribution_points,
            schemes=frozenset(schemes),
        )
        return cls(
            CrlCache(policy),
            trust=trust,
            registry=registry,
            metrics=metrics,
            fetch_timeout=config.fetch_timeout,
            max_size=config.max_size,
            poll_interval=config.poll_interval,
            status_path=status_path,
        )

    # lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Install the online check on the trust state and start fetching."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.fetch_timeout),
            headers={"Accept": "application/pkix-crl, */*;q=0.1"},
        )
        self.trust.online = self.online_check
        self.trust.on_change(self._on_trust_change)
        self._task = asyncio.create_task(self._run(), name="crl-fetcher")

    async def fetch_now(self, urls: Iterable[str]) -> list[FetchResult]:
        """Download ``urls`` once into the cache, without the background task and
        without touching live sessions (``trust verify --tenant`` answers like
        the listeners with it)."""
        own = self._session is None
        if own:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.fetch_timeout),
                headers={"Accept": "application/pkix-crl, */*;q=0.1"},
            )
        try:
            return [await self._fetch_one(url) for url in urls]
        finally:
            if own and self._session is not None:
                await self._session.close()
                self._session = None

    async def stop(self) -> None:
        self.trust.online = None
        tasks = [t for t in (self._task, *self._fetches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # the online check (hot path: no I/O, no waiting) --------------------------------
    def online_check(self, chain: VerifiedChain, now: datetime) -> Rejection | None:
        """The :data:`trust.policy.OnlineCheck` the decisions call; counts results."""
        result = self.cache.evaluate(chain, now)
        self.checks.inc(result.result.value)
        if result.unknown_urls:
            self._wake.set()  # fetch new distribution points now, not at the next poll
        return result.rejection

    # status -----------------------------------------------------------------------
    def status(self, now: datetime | None = None) -> dict[str, Any]:
        """The CRL status document (``crl status``, the admin listener, the status file)."""
        now = now or self.clock()
        return {
            "generatedAt": now.astimezone(UTC).isoformat(),
            "pid": os.getpid(),
            "missingPolicy": self.cache.policy.missing.value,
            "distributionPoints": [s.as_json() for s in self.cache.statuses(now)],
        }

    # the loop ---------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._tick()
                if self._status_dirty or loop.time() - self._status_written > STATUS_INTERVAL:
                    await self._write_status()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("CRL fetch loop failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()

    def _tick(self) -> None:
        now = self.clock()
        turned = self.cache.expire(now)
        for url in turned:
            log.warning("the CRL from %s is past its nextUpdate and could not be renewed", url)
        if turned:
            self._status_dirty = True
        self._apply_generation()
        for url in self.cache.due(now):
            if url in self._inflight:
                continue
            self._inflight.add(url)
            task = asyncio.create_task(self._fetch(url), name=f"crl-fetch {url}")
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)

    async def _fetch(self, url: str) -> None:
        try:
            async with self._limit:
                result = await self._fetch_one(url)
            self._after(result)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("fetching the CRL %s failed unexpectedly", url)
        finally:
            self._inflight.discard(url)
            self._status_dirty = True
            self._wake.set()

    async def _fetch_one(self, url: str) -> FetchResult:
        try:
            got = await self._download(url)
        except FetchError as exc:
            return self.cache.on_failed(url, str(exc), self.clock())
        if got.body is None:
            result = self.cache.on_not_modified(url, self.clock())
        else:
            try:
                index = await asyncio.to_thread(index_crl, got.body, self.cache.issuers(url))
            except CrlError as exc:
                result = self.cache.on_invalid(url, str(exc), self.clock())
            else:
                result = self.cache.on_fetched(url, index, self.clock())
        # Validators only for what the cache took, so an ignored CRL is downloaded again.
        if got.validator is not None and result.outcome in (
            Outcome.UPDATED,
            Outcome.UNCHANGED,
            Outcome.STALE,
        ):
            self._validators[url] = got.validator
        else:
            self._validators.pop(url, None)
        return result

    def _after(self, result: FetchResult) -> None:
        self.fetches.inc(result.outcome.value)
        url, outcome = result.url, result.outcome
        if outcome is Outcome.UPDATED:
            st = self.cache.status(url, self.clock())
            log.info(
                "CRL from %s: number %s, %s revoked serials, next update %s",
                url,
                st.crl_number,
                st.entries,
                st.next_update.isoformat() if st.next_update else "-",
            )
        elif outcome is Outcome.UNCHANGED:
            if result.recovered:
                log.info("CRL from %s fetched again after failures", url)
        elif result.error_changed:
            retry = result.next_fetch.isoformat() if result.next_fetch else "-"
            if outcome is Outcome.INVALID:
                log.warning(
                    "CRL from %s ignored, the last good one (if any) stays in use: %s",
                    url,
                    result.message,
                )
            else:
                log.warning(
                    "CRL from %s not renewed (%s), retry at %s: %s",
                    url,
                    outcome.value,
                    retry,
                    result.message,
                )
        self._apply_generation()

    def _apply_generation(self) -> None:
        if self.cache.generation == self._generation:
            return
        self._generation = self.cache.generation
        # decisions cached under the previous CRLs are outdated
        self.trust.invalidate_decisions()
        self._close_revoked_sessions()

    def _close_revoked_sessions(self) -> None:
        snap = self.trust.snapshot
        for session in self.registry.sessions():
            ident = session.identity
            if session.closing or not snap.tenant(ident.tenant).settings.online:
                continue
            hit = self.cache.revoked_in_chain(ident.chain_serials, ident.chain_fingerprints)
            if hit is None:
                continue
            position, url, _when = hit
            message = f"certificate serial {ident.chain_serials[position]:x} revoked by {url}"
            self.metrics.sessions_closed.inc(Reason.REVOKED.value)
            self.registry.kill(session, Reason.REVOKED.value, message)

    async def _on_trust_change(self, _snap: TrustSnapshot, changes: list[Change]) -> None:
        # A tenant turning the online check on: its live sessions meet the cached CRLs.
        if any(c.kind is ChangeKind.SETTINGS for c in changes):
            self._close_revoked_sessions()

    # downloads ----------------------------------------------------------------------
    async def _download(self, url: str) -> _Downloaded:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file":
            try:
                return await asyncio.wait_for(
                    asyncio.to_thread(self._read_file, url), self.fetch_timeout
                )
            except TimeoutError:
                raise FetchError(f"reading timed out after {self.fetch_timeout:g} s") from None
        if scheme not in ("http", "https"):
            raise FetchError(f"unsupported URL scheme {scheme!r}")
        if self._session is None:
            raise FetchError("the fetcher is not running")
        headers = {}
        sent = self._validators.get(url)
        if sent is not None:
            headers[sent[0]] = sent[1]
        try:
            async with self._session.get(url, headers=headers, max_redirects=3) as resp:
                if resp.status == 304 and sent is not None:
                    return _Downloaded(None, sent)
                if resp.status != 200:
                    raise FetchError(f"HTTP {resp.status} {resp.reason or ''}".strip())
                if resp.content_length is not None and resp.content_length > self.max_size:
                    raise FetchError(
                        f"CRL of {resp.content_length} bytes exceeds crl.max_size ({self.max_size})"
                    )
                body = bytearray()
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    body += chunk
                    if len(body) > self.max_size:
                        raise FetchError(f"CRL exceeds crl.max_size ({self.max_size} bytes)")
                etag = resp.headers.get("ETag")
                modified = resp.headers.get("Last-Modified")
        except FetchError:
            raise
        except TimeoutError:
            raise FetchError(f"timed out after {self.fetch_timeout:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise FetchError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        validator = (
            ("If-None-Match", etag)
            if etag
            else ("If-Modified-Since", modified)
            if modified
            else None
        )
        return _Downloaded(bytes(body), validator)

    def _read_file(self, url: str) -> _Downloaded:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(f"file URL of another host ({parts.netloc})")
        path = Path(url2pathname(parts.path))
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):  # never block on a FIFO or a device
                raise FetchError(f"{path} is not a regular file")
            if st.st_size > self.max_size:
                raise FetchError(f"{path} exceeds crl.max_size ({self.max_size} bytes)")
            version = ("file", f"{st.st_mtime_ns}:{st.st_size}")
            if self._validators.get(url) == version:
                return _Downloaded(None, version)
            with path.open("rb") as f:
                body = f.read(self.max_size + 1)
        except OSError as exc:
            raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from None
        if len(body) > self.max_size:
            raise FetchError(f"{path} exceeds crl.max_size ({self.max_size} bytes)")
        return _Downloaded(body, version)

    # status file --------------------------------------------------------------------
    async def _write_status(self) -> None:
        self._status_dirty = False
        self._status_written = asyncio.get_running_loop().time()
        if self.status_path is None:
            return
        text = json.dumps(self.status(), indent=2) + "\n"
        try:
            await asyncio.to_thread(_write_atomic, self.status_path, text)
        except OSError as exc:
            if str(exc) != self._status_error:
                log.warning("cannot write the CRL status file %s: %s", self.status_path, exc)
            self._status_error = str(exc)
        else:
            self._status_error = None

    # metrics ------------------------------------------------------------------------
    def _register_metrics(self) -> None:
        r = self.metrics.registry
        self.fetches = r.counter(
            "mtls_gateway_crl_fetches_total",
            "CRL downloads from distribution points, by result (updated, unchanged, "
            "stale, invalid: ignored, failed: not downloaded).",
            ("result",),
        )
        self.checks = r.counter(
            "mtls_gateway_crl_checks_total",
            "Online revocation checks of verified chains (decisions not served from the "
            "decision cache), by result.",
            ("result",),
        )

        def per_url(
            value: Callable[[Any], float | None],
        ) -> Callable[[], dict[tuple[str, ...], float]]:
            def collect() -> dict[tuple[str, ...], float]:
                out: dict[tuple[str, ...], float] = {}
                for st in self.cache.statuses(self.clock()):
                    v = value(st)
                    if v is not None:
                        out[(st.url,)] = v
                return out

            return collect

        r.gauge(
            "mtls_gateway_crl_entries",
            "Revoked serials on the cached CRL, by distribution point URL.",
            ("url",),
            collect=per_url(lambda st: None if st.entries is None else float(st.entries)),
        )
        r.gauge(
            "mtls_gateway_crl_next_update_timestamp_seconds",
            "nextUpdate of the cached CRL (Unix time), by distribution point URL.",
            ("url",),
            collect=per_url(lambda st: st.next_update.timestamp() if st.next_update else None),
        )
        r.gauge(
            "mtls_gateway_crl_current",
            "1 when a distribution point has a current CRL, 0 when none was fetched or "
            "it is past its nextUpdate.",
            ("url",),
            collect=per_url(lambda st: 1.0 if st.state == "current" else 0.0),
        )


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, "utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
