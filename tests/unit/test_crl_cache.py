"""The online-revocation cache (trust.crl_cache): pure, time injected."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import pki
from gateway.pki import Issued, PrivateKey
from trust.certs import fingerprint
from trust.crl import CrlError
from trust.crl_cache import (
    CachePolicy,
    CertState,
    ChainResult,
    CrlCache,
    MissingPolicy,
    Outcome,
    distribution_point_urls,
    index_crl,
)
from trust.model import Reason
from trust.verify import VerifiedChain, verify_chain

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ROOT_URL = "http://crl.example/root.crl"
INTER_URL = "http://crl.example/inter.crl"
DELTA_URL = "http://crl.example/inter-delta.crl"
S = timedelta(seconds=1)


class Fleet:
    """root → intermediate (CDP: the root's CRL) → devices (CDP: the intermediate's CRL)."""

    def __init__(self) -> None:
        self.root = pki.make_ca("Root", now=NOW)
        self.inter = pki.make_ca("Issuing CA", issuer=self.root, now=NOW, crl_urls=[ROOT_URL])
        self.dev = self.device("device-1")
        self.other = self.device("device-2")

    def device(self, cn: str, urls: Sequence[str] = (INTER_URL,)) -> Issued:
        return pki.make_device(cn, self.inter, now=NOW, crl_urls=urls)

    def chain(self, dev: Issued | None = None) -> VerifiedChain:
        leaf = dev or self.dev
        return verify_chain([leaf.cert, self.inter.cert], [self.root.cert], NOW)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet()


def crl(
    issuer: Issued,
    revoked: Iterable[int] = (),
    *,
    number: int = 1,
    next_update: datetime = NOW + timedelta(hours=1),
    this_update: datetime = NOW - timedelta(minutes=1),
    sign_with: PrivateKey | None = None,
    delta_base: int | None = None,
    freshest: str | None = None,
    removed: Iterable[int] = (),
    pem: bool = False,
) -> bytes:
    """A CRL of ``issuer`` (DER unless ``pem``); ``delta_base`` makes it a delta CRL."""
    entries = [
        x509.RevokedCertificateBuilder()
        .serial_number(s)
        .revocation_date(this_update - timedelta(hours=1))
        .build()
        for s in revoked
    ]
    entries += [
        x509.RevokedCertificateBuilder()
        .serial_number(s)
        .revocation_date(this_update - timedelta(hours=1))
        .add_extension(x509.CRLReason(x509.ReasonFlags.remove_from_crl), critical=False)
        .build()
        for s in removed
    ]
    # the constructor takes the list at once (add_revoked_certificate is quadratic)
    b = (
        x509.CertificateRevocationListBuilder(revoked_certificates=entries)
        .issuer_name(issuer.cert.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if delta_base is not None:
        b = b.add_extension(x509.DeltaCRLIndicator(delta_base), critical=True)
    if freshest is not None:
        dp = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(freshest)],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        b = b.add_extension(x509.FreshestCRL([dp]), critical=False)
    signed = b.sign(sign_with or issuer.key, hashes.SHA256())
    return signed.public_bytes(Encoding.PEM if pem else Encoding.DER)


def cache(**kw: object) -> CrlCache:
    return CrlCache(CachePolicy(**kw))  # type: ignore[arg-type]


def ready(
    fleet: Fleet, c: CrlCache, *, root: bytes | None = None, inter: bytes | None = None
) -> None:
    """Register the fleet's distribution points and feed them their CRLs."""
    c.check(fleet.chain(), NOW)
    assert c.on_fetched(ROOT_URL, root or crl(fleet.root), NOW).outcome is Outcome.UPDATED
    assert c.on_fetched(INTER_URL, inter or crl(fleet.inter), NOW).outcome is Outcome.UPDATED


# the check ----------------------------------------------------------------------------


def test_unknown_points_are_registered_and_refused_by_default(fleet: Fleet) -> None:
    c = cache()
    rejected = c.check(fleet.chain(), NOW)
    assert rejected is not None and rejected.reason is Reason.CRL_UNAVAILABLE
    assert "not fetched yet" in rejected.message
    # both the device's and the intermediate's distribution points are due at once
    assert set(c.due(NOW)) == {ROOT_URL, INTER_URL}
    assert c.issuers(INTER_URL) == [fleet.inter.cert]
    assert c.issuers(ROOT_URL) == [fleet.root.cert]
    ready(fleet, c)
    assert c.check(fleet.chain(), NOW) is None
    assert c.evaluate(fleet.chain(), NOW).result is ChainResult.GOOD


def test_fail_open_accepts_without_a_crl(fleet: Fleet) -> None:
    c = cache(missing=MissingPolicy.FAIL_OPEN)
    status = c.evaluate(fleet.chain(), NOW)
    assert status.result is ChainResult.FAIL_OPEN and status.rejection is None
    assert set(status.unknown_urls) == {ROOT_URL, INTER_URL}


def test_revoked_device(fleet: Fleet) -> None:
    c = cache()
    ready(fleet, c, inter=crl(fleet.inter, [fleet.dev.cert.serial_number]))
    rejected = c.check(fleet.chain(), NOW)
    assert rejected is not None and rejected.reason is Reason.REVOKED
    assert f"{fleet.dev.cert.serial_number:x}" in rejected.message
    assert INTER_URL in rejected.message
    assert c.check(fleet.chain(fleet.other), NOW) is None


def test_revoked_intermediate_found_through_its_issuers_crl(fleet: Fleet) -> None:
    c = cache()
    ready(fleet, c, root=crl(fleet.root, [fleet.inter.cert.serial_number]))
    for dev in (fleet.dev, fleet.other):
        rejected = c.check(fleet.chain(dev), NOW)
        assert rejected is not None and rejected.reason is Reason.REVOKED
        assert "intermediate" in rejected.message and ROOT_URL in rejected.message


def test_revoked_wins_over_unavailable_anywhere_in_the_chain(fleet: Fleet) -> None:
    c = cache()
    c.check(fleet.chain(), NOW)
    c.on_fetched(ROOT_URL, crl(fleet.root, [fleet.inter.cert.serial_number]), NOW)
    # the device's own point was never fetched; the intermediate is known revoked
    rejected = c.check(fleet.chain(), NOW)
    assert rejected is not None and rejected.reason is Reason.REVOKED


def test_a_serial_of_another_issuer_is_not_revoked(fleet: Fleet) -> None:
    c = cache()
    # the root's CRL lists the device's serial: it is the intermediate's to revoke
    ready(fleet, c, root=crl(fleet.root, [fleet.dev.cert.serial_number]))
    assert c.check(fleet.chain(), NOW) is None


def test_certificates_without_a_usable_point_are_not_checked(fleet: Fleet) -> None:
    root = pki.make_ca("Plain Root", now=NOW)
    plain = pki.make_device("plain", root, now=NOW)
    ldap = pki.make_device("ldap", root, now=NOW, crl_urls=["ldap://dir.example/cn=crl"])
    local = pki.make_device("local", root, now=NOW, crl_urls=["file:///var/crl/root.crl"])
    c = cache()
    for dev in (plain, ldap, local):
        chain = verify_chain([dev.cert], [root.cert], NOW)
        assert c.evaluate(chain, NOW).result is ChainResult.NOT_APPLICABLE
    assert len(c) == 0
    # file:// is only used when the policy allows it
    with_file = cache(schemes=frozenset({"http", "https", "file"}))
    chain = verify_chain([local.cert], [root.cert], NOW)
    assert with_file.evaluate(chain, NOW).result is ChainResult.UNAVAILABLE
    assert with_file.due(NOW) == ["file:///var/crl/root.crl"]


def test_alternative_urls_one_current_crl_is_enough(fleet: Fleet) -> None:
    mirror = "https://mirror.example/inter.crl"
    dev = fleet.device("two-urls", [INTER_URL, mirror])
    assert distribution_point_urls(dev.cert) == (INTER_URL, mirror)
    c = cache()
    c.check(fleet.chain(dev), NOW)
    c.on_fetched(ROOT_URL, crl(fleet.root), NOW)
    c.on_failed(INTER_URL, "connection refused", NOW)
    assert c.check(fleet.chain(dev), NOW) is not None
    c.on_fetched(mirror, crl(fleet.inter), NOW)
    assert c.check(fleet.chain(dev), NOW) is None


def test_distribution_points_are_bounded(fleet: Fleet) -> None:
    c = cache(max_entries=1)
    rejected = c.check(fleet.chain(), NOW)
    assert rejected is not None and rejected.reason is Reason.CRL_UNAVAILABLE
    assert len(c) == 1
    inter = c.cert_status(fleet.inter.cert, fleet.root.cert, NOW)
    assert inter.state is CertState.UNKNOWN and "too many" in inter.message


# schedule -------------------------------------------------------------------------------


def test_refresh_before_next_update(fleet: Fleet) -> None:
    c = cache(refresh_margin=0.2)
    c.check(fleet.chain(), NOW)
    c.on_fetched(ROOT_URL, crl(fleet.root, next_update=NOW + timedelta(days=30)), NOW)
    result = c.on_fetched(INTER_URL, crl(fleet.inter, next_update=NOW + 100 * S), NOW)
    # 80 % of the remaining 100 s
    assert result.next_fetch == NOW + 80 * S
    assert c.due(NOW + 79 * S) == []
    assert c.due(NOW + 80 * S) == [INTER_URL]
    # far nextUpdate: refetched after max_age anyway
    assert c.status(ROOT_URL, NOW).next_fetch == NOW + timedelta(hours=1)
    assert c.next_due() == NOW + 80 * S


def test_backoff_and_logging_once_per_distinct_error(fleet: Fleet) -> None:
    c = cache(retry_min=S, retry_max=10 * S)
    c.check(fleet.chain(), NOW)
    delays, changed = [], []
    t = NOW
    for i in range(6):
        r = c.on_failed(INTER_URL, "connection refused" if i < 4 else "HTTP 500", t)
        assert r.outcome is Outcome.FAILED and r.next_fetch is not None
        delays.append((r.next_fetch - t).total_seconds())
        changed.append(r.error_changed)
        t = r.next_fetch
    assert delays == [1, 2, 4, 8, 10, 10]
    assert changed == [True, False, False, False, True, False]
    st = c.status(INTER_URL, t)
    assert (st.failures, st.consecutive_failures, st.state) == (6, 6, "never_fetched")
    assert st.last_error == "HTTP 500"
    # a success resets the backoff
    r = c.on_fetched(INTER_URL, crl(fleet.inter), t)
    assert r.outcome is Outcome.UPDATED and r.recovered
    assert c.status(INTER_URL, t).consecutive_failures == 0


def test_last_good_is_kept_when_a_refresh_fails(fleet: Fleet) -> None:
    c = cache(retry_min=S)
    ready(fleet, c, inter=crl(fleet.inter, [fleet.other.cert.serial_number]))
    generation = c.generation
    c.on_failed(INTER_URL, "timed out", NOW + 50 * S)
    assert c.generation == generation
    assert c.check(fleet.chain(), NOW + 50 * S) is None
    rejected = c.check(fleet.chain(fleet.other), NOW + 50 * S)
    assert rejected is not None and rejected.reason is Reason.REVOKED
    st = c.status(INTER_URL, NOW + 50 * S)
    assert st.state == "current" and st.last_error == "timed out" and st.crl_number == 1


def test_stale_crl_follows_the_missing_policy_but_still_revokes(fleet: Fleet) -> None:
    later = NOW + timedelta(hours=2)  # past nextUpdate (1 h)
    for policy in MissingPolicy:
        c = cache(missing=policy)
        ready(
            fleet,
            c,
            root=crl(fleet.root, next_update=NOW + timedelta(days=1)),
            inter=crl(fleet.inter, [fleet.other.cert.serial_number]),
        )
        assert c.expire(NOW) == []
        generation = c.generation
        assert c.expire(later) == [INTER_URL]
        assert c.generation == generation + 1  # cached accepts must be re-decided
        assert c.expire(later) == []  # reported once
        assert c.status(INTER_URL, later).state == "stale"
        status = c.evaluate(fleet.chain(), later)
        if policy is MissingPolicy.FAIL_CLOSED:
            assert status.result is ChainResult.UNAVAILABLE and status.rejection is not None
            assert status.rejection.reason is Reason.CRL_UNAVAILABLE
            assert "stale" in status.rejection.message
        else:
            assert status.result is ChainResult.FAIL_OPEN and status.rejection is None
        revoked = c.check(fleet.chain(fleet.other), later)
        assert revoked is not None and revoked.reason is Reason.REVOKED


def test_crl_already_stale_when_fetched_is_kept_and_retried(fleet: Fleet) -> None:
    c = cache(retry_min=S)
    c.check(fleet.chain(), NOW)
    late = crl(
        fleet.inter,
        [fleet.other.cert.serial_number],
        this_update=NOW - timedelta(hours=2),
        next_update=NOW - timedelta(hours=1),
    )
    r = c.on_fetched(INTER_URL, late, NOW)
    assert r.outcome is Outcome.STALE and r.next_fetch == NOW + S
    revoked = c.check(fleet.chain(fleet.other), NOW)
    assert revoked is not None and revoked.reason is Reason.REVOKED


def test_unchanged_and_not_modified_reschedule(fleet: Fleet) -> None:
    c = cache()
    ready(fleet, c)
    generation = c.generation
    data = crl(fleet.inter, number=1)
    # same number, same signature: unchanged; a 304 likewise
    assert c.on_not_modified(INTER_URL, NOW + 60 * S).outcome is Outcome.UNCHANGED
    assert c.status(INTER_URL, NOW).last_fetch == NOW + 60 * S
    assert c.generation == generation
    # same number re-signed: new bytes count as new data
    assert c.on_fetched(INTER_URL, data, NOW + 61 * S).outcome is Outcome.UPDATED
    assert c.generation == generation + 1


# unusable CRLs ------------------------------------------------------------------------------


def test_bad_signature_is_ignored_and_last_good_kept(fleet: Fleet) -> None:
    c = cache()
    c.check(fleet.chain(), NOW)
    forged = crl(fleet.inter, [fleet.dev.cert.serial_number], sign_with=pki.new_key())
    r = c.on_fetched(INTER_URL, forged, NOW)
    assert r.outcome is Outcome.INVALID and r.error_changed
    assert "signature" in r.message
    assert c.on_fetched(INTER_URL, forged, NOW + S).error_changed is False  # logged once
    rejected = c.check(fleet.chain(), NOW)
    assert rejected is not None and rejected.reason is Reason.CRL_UNAVAILABLE
    assert "signature" in rejected.message

    ready(fleet, c)
    generation = c.generation
    r = c.on_fetched(
        INTER_URL,
        crl(fleet.inter, [fleet.dev.cert.serial_number], number=2, sign_with=pki.new_key()),
        NOW,
    )
    assert r.outcome is Outcome.INVALID
    assert c.generation == generation
    assert c.check(fleet.chain(), NOW) is None  # the forged revocation changed nothing
    assert c.status(INTER_URL, NOW).crl_number == 1


def test_crl_of_another_issuer_or_garbage_is_invalid(fleet: Fleet) -> None:
    c = cache()
    c.check(fleet.chain(), NOW)
    assert c.on_fetched(INTER_URL, crl(fleet.root), NOW).outcome is Outcome.INVALID
    assert c.on_fetched(INTER_URL, b"<html>not found</html>", NOW).outcome is Outcome.INVALID
    assert c.status(INTER_URL, NOW).state == "never_fetched"


def test_an_older_crl_is_a_replay(fleet: Fleet) -> None:
    c = cache()
    ready(fleet, c, inter=crl(fleet.inter, [fleet.dev.cert.serial_number], number=5))
    r = c.on_fetched(INTER_URL, crl(fleet.inter, number=4), NOW + S)
    assert r.outcome is Outcome.INVALID and "older" in r.message
    rejected = c.check(fleet.chain(), NOW + S)
    assert rejected is not None and rejected.reason is Reason.REVOKED


def test_pem_crls_are_accepted_and_index_crl_checks_the_issuer(fleet: Fleet) -> None:
    index = index_crl(crl(fleet.inter, [7], pem=True), [fleet.root.cert, fleet.inter.cert])
    assert index.is_revoked(7) is not None and index.issuer == fleet.inter.cert
    with pytest.raises(CrlError, match="not by the certificates' issuer"):
        index_crl(crl(fleet.inter), [fleet.root.cert])


# delta CRLs ------------------------------------------------------------------------------------


def delta_ready(fleet: Fleet, c: CrlCache, base: bytes) -> None:
    ready(fleet, c, inter=base)
    assert DELTA_URL in c.due(NOW)
    assert c.status(INTER_URL, NOW).delta_url == DELTA_URL
    assert c.status(DELTA_URL, NOW).kind == "delta"


def test_delta_crl_adds_revocations(fleet: Fleet) -> None:
    c = cache()
    delta_ready(fleet, c, crl(fleet.inter, number=10, freshest=DELTA_URL))
    assert c.check(fleet.chain(), NOW) is None
    generation = c.generation
    delta = crl(fleet.inter, [fleet.dev.cert.serial_number], number=11, delta_base=10)
    assert c.on_fetched(DELTA_URL, delta, NOW).outcome is Outcome.UPDATED
    assert c.generation > generation
    rejected = c.check(fleet.chain(), NOW)
    assert rejected is not None and rejected.reason is Reason.REVOKED
    assert c.check(fleet.chain(fleet.other), NOW) is None
    # live sessions meet the delta too
    ident_serials = (fleet.dev.cert.serial_number, fleet.inter.cert.serial_number)
    fps = (fingerprint(fleet.dev.cert), fingerprint(fleet.inter.cert))
    assert c.revoked_in_chain(ident_serials, fps) is not None


def test_delta_remove_from_crl_releases_a_hold(fleet: Fleet) -> None:
    c = cache()
    held = fleet.dev.cert.serial_number
    delta_ready(fleet, c, crl(fleet.inter, [held], number=10, freshest=DELTA_URL))
    assert c.check(fleet.chain(), NOW) is not None
    c.on_fetched(DELTA_URL, crl(fleet.inter, removed=[held], number=11, delta_base=10), NOW)
    assert c.check(fleet.chain(), NOW) is None


def test_delta_for_another_base_is_not_applied(fleet: Fleet) -> None:
    c = cache()
    delta_ready(fleet, c, crl(fleet.inter, number=10, freshest=DELTA_URL))
    # built on base 12, which this gateway does not have (§5.2.4: base >= BaseCRLNumber)
    c.on_fetched(
        DELTA_URL, crl(fleet.inter, [fleet.dev.cert.serial_number], number=13, delta_base=12), NOW
    )
    assert c.check(fleet.chain(), NOW) is None
    # once the complete CRL 12 arrives, the delta applies
    c.on_fetched(INTER_URL, crl(fleet.inter, number=12, freshest=DELTA_URL), NOW)
    assert c.check(fleet.chain(), NOW) is not None


def test_delta_and_complete_crls_at_the_wrong_place_are_invalid(fleet: Fleet) -> None:
    c = cache()
    c.check(fleet.chain(), NOW)
    r = c.on_fetched(INTER_URL, crl(fleet.inter, number=11, delta_base=10), NOW)
    assert r.outcome is Outcome.INVALID and "delta" in r.message
    delta_ready(fleet, c, crl(fleet.inter, number=10, freshest=DELTA_URL))
    r = c.on_fetched(DELTA_URL, crl(fleet.inter, number=11), NOW)
    assert r.outcome is Outcome.INVALID
    assert c.check(fleet.chain(), NOW) is None  # the complete CRL alone still answers


# live sessions and large CRLs ---------------------------------------------------------------------


def test_revoked_in_chain_for_live_sessions(fleet: Fleet) -> None:
    c = cache()
    ready(fleet, c)
    serials = (
        fleet.dev.cert.serial_number,
        fleet.inter.cert.serial_number,
        fleet.root.cert.serial_number,
    )
    fps = tuple(fingerprint(x.cert) for x in (fleet.dev, fleet.inter, fleet.root))
    assert c.revoked_in_chain(serials, fps) is None
    c.on_fetched(ROOT_URL, crl(fleet.root, [fleet.inter.cert.serial_number], number=2), NOW)
    hit = c.revoked_in_chain(serials, fps)
    assert hit is not None and hit[:2] == (1, ROOT_URL)


@pytest.fixture(scope="module")
def big_crl(fleet: Fleet) -> tuple[bytes, list[int]]:
    serials = [0x1000 + 7 * i for i in range(100_000)]
    return crl(fleet.inter, serials, number=3), serials


def test_large_crl_is_indexed(fleet: Fleet, big_crl: tuple[bytes, list[int]]) -> None:
    data, serials = big_crl
    c = cache()
    ready(fleet, c, inter=data)
    assert c.status(INTER_URL, NOW).entries == 100_000
    fps = (fingerprint(fleet.dev.cert), fingerprint(fleet.inter.cert))
    # 200k lookups: a scan of 100k entries per lookup would take hours
    for s in serials:
        assert c.revoked_in_chain((s, 1), fps) is not None
        assert c.revoked_in_chain((s + 1, 1), fps) is None
    assert c.check(fleet.chain(), NOW) is None


def test_status_json(fleet: Fleet) -> None:
    c = cache()
    ready(fleet, c)
    doc = [s.as_json() for s in c.statuses(NOW)]
    assert [d["url"] for d in doc] == sorted([ROOT_URL, INTER_URL])
    inter = next(d for d in doc if d["url"] == INTER_URL)
    assert inter["state"] == "current" and inter["entries"] == 0 and inter["crlNumber"] == 1
    assert inter["nextUpdate"] == (NOW + timedelta(hours=1)).isoformat()
    assert inter["lastFetch"] == NOW.isoformat() and inter["failures"] == 0
    assert inter["issuer"] == "CN=Issuing CA"
