"""CRL parsing, indexing and chain checks (trust.crl), plus parser fuzzing."""

from __future__ import annotations

import base64
import contextlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import pki
from gateway.pki import Issued, KeyType, PrivateKey
from trust.certs import CertificateError, load_certificates
from trust.crl import CrlError, CrlIndex, check_chain_against_crls, load_crls
from trust.model import Reason
from trust.verify import ChainError, VerifiedChain, verify_chain

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
_POOLS: dict[str, list[PrivateKey]] = {}


def _keys(key_type: KeyType) -> Iterator[PrivateKey]:
    if key_type not in _POOLS:
        _POOLS[key_type] = [pki.new_key(key_type) for _ in range(6)]
    return itertools.cycle(_POOLS[key_type])


class Fleet:
    """root → intermediate → two devices, one key type."""

    def __init__(self, key_type: KeyType) -> None:
        keys = _keys(key_type)
        self.keys = keys
        self.root = pki.make_ca("Root", key=next(keys), now=NOW)
        self.inter = pki.make_ca("Issuing CA", issuer=self.root, key=next(keys), now=NOW)
        self.dev = pki.make_device("device-1", self.inter, key=next(keys), now=NOW)
        self.other = pki.make_device("device-2", self.inter, key=next(keys), now=NOW)

    def chain(self, dev: Issued | None = None) -> VerifiedChain:
        leaf = dev or self.dev
        return verify_chain([leaf.cert, self.inter.cert], [self.root.cert], NOW)


@pytest.fixture(params=["ec", "rsa"])
def fleet(request: pytest.FixtureRequest) -> Fleet:
    return Fleet(request.param)


def crl_of(
    issuer: Issued,
    serials: Iterable[int],
    *,
    number: int | None = 1,
    this_update: datetime | None = None,
    next_update: datetime | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    signer: PrivateKey | None = None,
) -> x509.CertificateRevocationList:
    """A CRL with full control over the fields the checks look at."""
    revoked = [
        x509.RevokedCertificateBuilder()
        .serial_number(s)
        .revocation_date(NOW - timedelta(days=2))
        .build()
        for s in serials
    ]
    b = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.cert.subject,
        last_update=this_update or NOW - timedelta(hours=1),
        next_update=next_update or NOW + timedelta(days=7),
        extensions=[],
        revoked_certificates=revoked,
    )
    if number is not None:
        b = b.add_extension(x509.CRLNumber(number), critical=False)
    b = b.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
    )
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    return b.sign(signer or issuer.key, hashes.SHA256())


def _error(chain: VerifiedChain, crls: Sequence[x509.CertificateRevocationList]) -> ChainError:
    with pytest.raises(ChainError) as info:
        check_chain_against_crls(chain, crls, NOW)
    return info.value


# -- revocation ------------------------------------------------------------------


def test_revoked_leaf(fleet: Fleet) -> None:
    crl = pki.make_crl(
        fleet.inter, [(fleet.dev.cert.serial_number, NOW - timedelta(days=1))], now=NOW
    )
    err = _error(fleet.chain(), [crl])
    assert err.reason is Reason.REVOKED
    assert format(fleet.dev.cert.serial_number, "x") in err.message
    check_chain_against_crls(fleet.chain(fleet.other), [crl], NOW)  # the other device is fine


def test_revoked_intermediate_via_root_crl(fleet: Fleet) -> None:
    root_crl = crl_of(fleet.root, [fleet.inter.cert.serial_number])
    inter_crl = crl_of(fleet.inter, [])
    assert _error(fleet.chain(), [inter_crl, root_crl]).reason is Reason.REVOKED


def test_not_revoked_and_no_crl_for_issuer(fleet: Fleet) -> None:
    check_chain_against_crls(fleet.chain(), [], NOW)
    check_chain_against_crls(fleet.chain(), [crl_of(fleet.inter, [12345])], NOW)
    # the root has no CRL: the intermediate is not checked, which is not an error
    check_chain_against_crls(fleet.chain(), [crl_of(fleet.inter, [])], NOW)


def test_serial_on_crl_of_another_issuer_is_ignored(fleet: Fleet) -> None:
    other_ca = pki.make_ca("Other CA", key=next(fleet.keys), now=NOW)
    crl = crl_of(other_ca, [fleet.dev.cert.serial_number])
    check_chain_against_crls(fleet.chain(), [crl], NOW)


def test_anchor_revoked_by_another_anchor(fleet: Fleet) -> None:
    # partial chain: the intermediate is the anchor; the root's CRL revokes it
    chain = verify_chain([fleet.dev.cert], [fleet.inter.cert], NOW)
    root_crl = crl_of(fleet.root, [fleet.inter.cert.serial_number])
    check_chain_against_crls(chain, [root_crl], NOW)  # the root is not known
    with pytest.raises(ChainError) as info:
        check_chain_against_crls(chain, [root_crl], NOW, issuers=[fleet.root.cert])
    assert info.value.reason is Reason.REVOKED


def test_unusable_crl_fails_closed(fleet: Fleet) -> None:
    stale = crl_of(
        fleet.inter,
        [],
        this_update=NOW - timedelta(days=10),
        next_update=NOW - timedelta(days=1),
    )
    assert _error(fleet.chain(), [stale]).reason is Reason.CRL_UNAVAILABLE
    future = crl_of(fleet.inter, [], this_update=NOW + timedelta(hours=1))
    assert _error(fleet.chain(), [future]).reason is Reason.CRL_UNAVAILABLE
    no_number = crl_of(fleet.inter, [], number=None)
    assert _error(fleet.chain(), [no_number]).reason is Reason.CRL_UNAVAILABLE


def test_crl_index_can_be_passed_prebuilt(fleet: Fleet) -> None:
    index = CrlIndex(crl_of(fleet.inter, [fleet.dev.cert.serial_number]), fleet.inter.cert)
    with pytest.raises(ChainError) as info:
        check_chain_against_crls(fleet.chain(), [index], NOW)
    assert info.value.reason is Reason.REVOKED


# -- CrlIndex --------------------------------------------------------------------


def test_crl_index_fields(fleet: Fleet) -> None:
    crl = crl_of(fleet.inter, [5, 7], number=42)
    index = CrlIndex(crl, fleet.inter.cert)
    assert index.number == 42
    assert index.is_delta is False
    assert index.this_update == NOW - timedelta(hours=1)
    assert index.next_update == NOW + timedelta(days=7)
    assert index.is_revoked(5) == NOW - timedelta(days=2)
    assert index.is_revoked(6) is None
    assert len(index) == 2
    index.check_time(NOW)
    delta = crl_of(fleet.inter, [], extensions=[(x509.DeltaCRLIndicator(41), True)])
    assert CrlIndex(delta, fleet.inter.cert).is_delta is True


def test_crl_with_bad_signature(fleet: Fleet) -> None:
    forged = crl_of(fleet.inter, [fleet.dev.cert.serial_number], signer=next(fleet.keys))
    with pytest.raises(CrlError, match="signature"):
        CrlIndex(forged, fleet.inter.cert)
    # applied to a chain, an unverifiable CRL of the issuer is not ignored
    assert _error(fleet.chain(), [forged]).reason is Reason.CRL_UNAVAILABLE


def test_crl_from_wrong_issuer(fleet: Fleet) -> None:
    with pytest.raises(CrlError, match="issuer"):
        CrlIndex(crl_of(fleet.root, []), fleet.inter.cert)


def test_crl_profile_errors(fleet: Fleet) -> None:
    with pytest.raises(CrlError, match="CRLNumber"):
        CrlIndex(crl_of(fleet.inter, [], number=None), fleet.inter.cert)
    critical_number = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(fleet.inter.cert.subject)
        .last_update(NOW - timedelta(hours=1))
        .next_update(NOW + timedelta(days=1))
        .add_extension(x509.CRLNumber(3), critical=True)
        .sign(fleet.inter.key, hashes.SHA256())
    )
    with pytest.raises(CrlError, match="critical"):
        CrlIndex(critical_number, fleet.inter.cert)
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55738.666.2"), b"\x05\x00")
    with pytest.raises(CrlError, match="unsupported critical"):
        CrlIndex(crl_of(fleet.inter, [], extensions=[(odd, True)]), fleet.inter.cert)


def test_issuer_without_crl_sign(fleet: Fleet) -> None:
    ku = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    key = next(fleet.keys)
    cert = (
        x509.CertificateBuilder()
        .subject_name(fleet.inter.cert.subject)
        .issuer_name(fleet.inter.cert.subject)
        .public_key(key.public_key())
        .serial_number(99)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .sign(key, hashes.SHA256())
    )
    no_crl_sign = Issued(cert, key)
    with pytest.raises(CrlError, match="cRLSign"):
        CrlIndex(crl_of(no_crl_sign, []), cert)
    # no keyUsage at all is fine (RFC 5280 §6.3.3(f))
    bare = pki.make_ca("Bare CA", key=next(fleet.keys), key_usage=False, now=NOW)
    CrlIndex(crl_of(bare, []), bare.cert)


def test_large_crl_lookup() -> None:
    ca = pki.make_ca("Big CA", now=NOW)
    crl = crl_of(ca, range(1, 100_001))
    index = CrlIndex(crl, ca.cert)  # built once
    assert len(index) == 100_000
    assert index.is_revoked(1) is not None
    assert index.is_revoked(100_000) is not None
    assert index.is_revoked(100_001) is None
    assert all(index.is_revoked(s) is not None for s in range(1, 100_001, 997))


# -- load_crls -------------------------------------------------------------------


def test_load_crls_pem_der_and_errors(fleet: Fleet) -> None:
    a = crl_of(fleet.inter, [1])
    b = crl_of(fleet.root, [2])
    pem = a.public_bytes(Encoding.PEM) + b"\n" + b.public_bytes(Encoding.PEM)
    loaded = load_crls(pem)
    assert [c.issuer for c in loaded] == [fleet.inter.cert.subject, fleet.root.cert.subject]
    assert load_crls(a.public_bytes(Encoding.DER))[0].issuer == fleet.inter.cert.subject
    for bad in (
        b"",
        b"   \n",
        b"garbage",
        fleet.dev.cert_pem(),
        b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    ):
        with pytest.raises(CrlError):
            load_crls(bad)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_load_crls_raises_only_crl_error(data: bytes) -> None:
    with contextlib.suppress(CrlError):
        load_crls(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=1024))
def test_load_crls_pem_wrapped_noise(body: bytes) -> None:
    pem = b"-----BEGIN X509 CRL-----\n" + base64.encodebytes(body) + b"-----END X509 CRL-----\n"
    with pytest.raises(CrlError):
        load_crls(pem)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_load_certificates_raises_only_certificate_error(data: bytes) -> None:
    with contextlib.suppress(CertificateError):
        load_certificates(data)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=512))
def test_load_certificates_text_raises_only_certificate_error(text: str) -> None:
    with contextlib.suppress(CertificateError):
        load_certificates("-----BEGIN CERTIFICATE-----\n" + text + "\n-----END CERTIFICATE-----")
