"""The tenant CA (trust.ca): creation, renewal, schedule, and device signing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from trust import ca
from trust.anchors import validate_upload
from trust.certs import to_pem
from trust.verify import verify_chain

NOW = datetime(2026, 3, 15, 10, 30, 0, tzinfo=UTC)
E = TypeVar("E", bound=x509.ExtensionType)
CsrKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@cache
def tenant_ca() -> ca.TenantCa:
    return ca.create_tenant_ca("t1", NOW)


@cache
def ec_key(curve: type[ec.EllipticCurve] = ec.SECP256R1) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve())


@cache
def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_csr(
    key: CsrKey,
    cn: str | None = "dev1",
    *,
    names: Sequence[x509.NameAttribute[Any]] = (),
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.CertificateSigningRequest:
    attrs = list(names)
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    alg = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, alg)


def sign(
    csr: x509.CertificateSigningRequest, device_id: str = "dev1", now: datetime = NOW
) -> x509.Certificate:
    cert, key = tenant_ca()
    return ca.sign_device_certificate(csr, cert, key, device_id, now)


def ext_value(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


def der_len_of_serial(serial: int) -> int:
    """Octets of the serial's DER INTEGER content."""
    return serial.bit_length() // 8 + 1


# ---------------------------------------------------------------------------
# Creating the CA
# ---------------------------------------------------------------------------


def test_ca_subject_names_the_tenant_and_organisation() -> None:
    cert = tenant_ca().certificate
    assert cert.subject.rfc4514_string() == "CN=t1,O=mtls-gateway"
    assert ca.platform_subject(cert.subject) == "CN=t1, O=mtls-gateway"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed


def test_ca_organisation_is_configurable() -> None:
    cert, _ = ca.create_tenant_ca("acme-42", NOW, organisation="Acme, Inc.")
    assert ca.platform_subject(cert.subject) == r"CN=acme-42, O=Acme\, Inc."


def test_ca_validity_is_1095_days_from_now() -> None:
    cert = tenant_ca().certificate
    assert cert.not_valid_after_utc == NOW + timedelta(days=1095)
    assert cert.not_valid_before_utc == NOW - ca.NOT_BEFORE_BACKDATE
    exact, _ = ca.create_tenant_ca("t1", NOW, backdate=timedelta(0))
    assert exact.not_valid_before_utc == NOW


def test_ca_extensions() -> None:
    cert, key = tenant_ca()
    bc = ext_value(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = ext_value(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature
    assert not ku.value.key_encipherment
    ski = ext_value(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext_value(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.version is x509.Version.v3


def test_ca_key_and_serial() -> None:
    cert, key = tenant_ca()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.serial_number > 0 and der_len_of_serial(cert.serial_number) <= 20
    other, _ = ca.create_tenant_ca("t1", NOW)
    assert other.serial_number != cert.serial_number


def test_rsa_ca() -> None:
    cert, key = ca.create_tenant_ca("t2", NOW, key_type="rsa")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == ca.CA_RSA_BITS
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)


def test_ca_is_a_valid_trusted_certificate_upload() -> None:
    cert = tenant_ca().certificate
    assert validate_upload(to_pem(cert), "t1", [], NOW) == cert


@pytest.mark.parametrize("tenant", ["", "a b", "x" * 65, "t/1"])
def test_bad_tenant_id_is_a_local_error(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        ca.create_tenant_ca(tenant, NOW)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        ca.create_tenant_ca("t1", datetime(2026, 1, 1))


# ---------------------------------------------------------------------------
# Renewal
# ---------------------------------------------------------------------------

# NOW + 1095 days = 2029-03-14 10:30; 24 calendar months before is 2027-03-14 10:30.
LAST_NOT_DUE = datetime(2027, 3, 14, 10, 30, tzinfo=UTC)


def test_renewal_due_boundary_is_24_calendar_months() -> None:
    cert = tenant_ca().certificate
    assert not ca.renewal_due(cert, NOW)
    assert not ca.renewal_due(cert, LAST_NOT_DUE)
    assert ca.renewal_due(cert, LAST_NOT_DUE + timedelta(seconds=1))
    assert ca.renewal_due(cert, NOW + timedelta(days=2000))  # expired: due


def test_renewal_refused_while_24_months_or_more_remain() -> None:
    cert, key = tenant_ca()
    with pytest.raises(ca.RenewalNotAllowed) as info:
        ca.renew_tenant_ca(cert, key, LAST_NOT_DUE)
    assert info.value.status == 409
    assert "24 months" in info.value.message
    assert "2029-03-14" in info.value.message  # says until when it is valid


def test_renewal_keeps_key_subject_and_extensions() -> None:
    cert, key = tenant_ca()
    later = LAST_NOT_DUE + timedelta(days=1)
    renewed = ca.renew_tenant_ca(cert, key, later)
    assert renewed.subject == cert.subject and renewed.issuer == cert.issuer
    assert renewed.public_key() == cert.public_key()
    assert list(renewed.extensions) == list(cert.extensions)
    assert renewed.not_valid_before_utc == later - ca.NOT_BEFORE_BACKDATE
    assert renewed.not_valid_after_utc == later + timedelta(days=1095)
    # A new serial: RFC 5280 §4.1.2.2 (see the module docstring).
    assert renewed.serial_number != cert.serial_number
    renewed.verify_directly_issued_by(renewed)
    assert not ca.renewal_due(renewed, later)


def test_expired_ca_can_be_renewed() -> None:
    cert, key = tenant_ca()
    late = NOW + timedelta(days=1200)
    renewed = ca.renew_tenant_ca(cert, key, late)
    assert renewed.not_valid_after_utc == late + timedelta(days=1095)


def test_renewal_with_a_foreign_key_is_refused() -> None:
    cert, _ = tenant_ca()
    with pytest.raises(ca.CaError) as info:
        ca.renew_tenant_ca(cert, ec_key(), NOW + timedelta(days=400))
    assert info.value.status == 500
    assert info.value.message.startswith(ca.KEYPAIR_MISSING)
    assert "PRIVATE" not in info.value.message


def test_devices_issued_before_renewal_verify_against_the_renewed_ca() -> None:
    cert, key = tenant_ca()
    # Renewal opens a year after creation: issue the device shortly before.
    before = sign(make_csr(ec_key()), now=LAST_NOT_DUE - timedelta(days=30))
    renewal = LAST_NOT_DUE + timedelta(days=1)
    renewed = ca.renew_tenant_ca(cert, key, renewal)
    at = renewal + timedelta(hours=1)
    chain = verify_chain([before], [renewed], at)
    assert chain.anchor == renewed
    # ... and the other way round: new devices verify against the old CA while it lasts.
    after = ca.sign_device_certificate(make_csr(ec_key()), renewed, key, "dev1", at)
    assert verify_chain([after], [cert], at).anchor == cert


# ---------------------------------------------------------------------------
# Auto-renewal schedule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (NOW, datetime(2026, 10, 2, 2, 0, tzinfo=UTC)),
        (datetime(2026, 10, 2, 1, 59, 59, tzinfo=UTC), datetime(2026, 10, 2, 2, 0, tzinfo=UTC)),
        (datetime(2026, 10, 2, 2, 0, tzinfo=UTC), datetime(2027, 10, 2, 2, 0, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 59, tzinfo=UTC), datetime(2027, 10, 2, 2, 0, tzinfo=UTC)),
        # 03:30 at UTC+2 is 01:30 UTC: still before the day's run.
        (
            datetime(2026, 10, 2, 3, 30, tzinfo=timezone(timedelta(hours=2))),
            datetime(2026, 10, 2, 2, 0, tzinfo=UTC),
        ),
    ],
)
def test_next_auto_renewal_default_schedule(now: datetime, expected: datetime) -> None:
    assert ca.next_auto_renewal(now) == expected


def test_next_auto_renewal_configurable_across_the_year_boundary() -> None:
    now = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)
    assert ca.next_auto_renewal(now, month=1, day=1, hour=0, minute=15) == datetime(
        2027, 1, 1, 0, 15, tzinfo=UTC
    )


def test_next_auto_renewal_on_29_february_waits_for_a_leap_year() -> None:
    assert ca.next_auto_renewal(NOW, month=2, day=29) == datetime(2028, 2, 29, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "kwargs", [{"month": 2, "day": 30}, {"month": 13}, {"hour": 24}, {"minute": 60}]
)
def test_next_auto_renewal_refuses_impossible_schedules(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ca.next_auto_renewal(NOW, **kwargs)


# ---------------------------------------------------------------------------
# Usable for enrollment
# ---------------------------------------------------------------------------


def test_ca_usable_for_enrollment() -> None:
    cert = tenant_ca().certificate
    last_day = cert.not_valid_after_utc - timedelta(days=365)
    assert not ca.ca_usable_for_enrollment(None, NOW)
    assert ca.ca_usable_for_enrollment(cert, NOW)
    assert ca.ca_usable_for_enrollment(cert, last_day)
    assert not ca.ca_usable_for_enrollment(cert, last_day + timedelta(seconds=1))
    assert not ca.ca_usable_for_enrollment(cert, cert.not_valid_after_utc + timedelta(days=1))
    assert not ca.ca_usable_for_enrollment(cert, NOW - timedelta(days=1))  # not yet valid


# ---------------------------------------------------------------------------
# Signing device certificates
# ---------------------------------------------------------------------------


def test_issued_certificate_profile() -> None:
    key = ec_key()
    cert = sign(make_csr(key))
    ca_cert = tenant_ca().certificate
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev1")])
    assert cert.issuer == ca_cert.subject
    assert cert.public_key() == key.public_key()
    bc = ext_value(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext_value(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    eku = ext_value(cert, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = ext_value(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext_value(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext_value(ca_cert, x509.SubjectKeyIdentifier).value.digest
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)
    assert cert.not_valid_before_utc == NOW - ca.NOT_BEFORE_BACKDATE
    assert cert.serial_number > 0 and der_len_of_serial(cert.serial_number) == 20
    chain = verify_chain([cert], [ca_cert], NOW)
    assert chain.leaf == cert


def test_rsa_device_key_gets_key_encipherment() -> None:
    cert = sign(make_csr(rsa_key(2048)))
    assert ext_value(cert, x509.KeyUsage).value.key_encipherment
    verify_chain([cert], [tenant_ca().certificate], NOW)


def test_p384_device_key_is_accepted() -> None:
    cert = sign(make_csr(ec_key(ec.SECP384R1)))
    verify_chain([cert], [tenant_ca().certificate], NOW)


def test_rsa_ca_signs_devices() -> None:
    cert, key = ca.create_tenant_ca("t2", NOW, key_type="rsa")
    dev = ca.sign_device_certificate(make_csr(ec_key()), cert, key, "dev1", NOW)
    verify_chain([dev], [cert], NOW)


def test_serials_are_unique_over_1000_issuances() -> None:
    csr = make_csr(ec_key())
    serials = {sign(csr).serial_number for _ in range(1000)}
    assert len(serials) == 1000
    assert all(der_len_of_serial(s) == 20 for s in serials)


def test_requested_extensions_and_attributes_are_not_copied() -> None:
    csr = make_csr(
        ec_key(),
        names=[
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil"),
        ],
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=True,
                    data_encipherment=True,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.SubjectAlternativeName([x509.DNSName("bank.example")]), False),
        ],
    )
    cert = sign(csr)
    assert ext_value(cert, x509.BasicConstraints).value.ca is False
    assert not ext_value(cert, x509.KeyUsage).value.key_cert_sign
    assert list(ext_value(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert {e.oid for e in cert.extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    assert cert.subject.rfc4514_string() == "CN=dev1"


def test_cn_mismatch_is_forbidden() -> None:
    with pytest.raises(ca.CsrRejected) as info:
        sign(make_csr(ec_key(), "dev2"), device_id="dev1")
    assert info.value.status == 403
    assert "'dev2'" in info.value.message and "'dev1'" in info.value.message


def test_cn_must_match_exactly() -> None:
    with pytest.raises(ca.CsrRejected):
        sign(make_csr(ec_key(), "Dev1"), device_id="dev1")


def test_rsa_1024_csr_is_rejected() -> None:
    with pytest.raises(ca.CsrRejected) as info:
        sign(make_csr(rsa_key(1024)))
    assert info.value.status == 400
    assert "1024" in info.value.message and "2048" in info.value.message


@pytest.mark.parametrize(
    ("key", "word"),
    [
        (lambda: ec_key(ec.SECP521R1), "secp521r1"),
        (lambda: ec_key(ec.SECP256K1), "secp256k1"),
        (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
    ],
)
def test_unsupported_keys_are_rejected(key: object, word: str) -> None:
    assert callable(key)
    with pytest.raises(ca.CsrRejected, match=word):
        sign(make_csr(key()))


def test_forged_csr_signature_is_rejected() -> None:
    der = make_csr(ec_key(), "dev1").public_bytes(Encoding.DER)
    # Someone edits the subject of a CSR signed by another party.
    forged = x509.load_der_x509_csr(der.replace(b"dev1", b"dev2"))
    with pytest.raises(ca.CsrRejected, match="signature"):
        sign(forged, device_id="dev2")
    # ... or corrupts the signature itself (the last octet of the ECDSA s value).
    flipped = x509.load_der_x509_csr(der[:-1] + bytes([der[-1] ^ 0x01]))
    with pytest.raises(ca.CsrRejected, match="signature"):
        sign(flipped)


def test_csr_without_cn_is_rejected() -> None:
    csr = make_csr(ec_key(), None, names=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")])
    with pytest.raises(ca.CsrRejected, match="no Common Name"):
        sign(csr)


def test_csr_with_two_cns_is_rejected() -> None:
    csr = make_csr(ec_key(), "dev1", names=[x509.NameAttribute(NameOID.COMMON_NAME, "dev1")])
    with pytest.raises(ca.CsrRejected, match="more than one"):
        sign(csr)


def test_device_certificate_is_clamped_to_the_ca() -> None:
    # A CA created 1095 - 200 days ago has 200 days left.
    created = NOW - timedelta(days=1095 - 200)
    cert, key = ca.create_tenant_ca("t1", created)
    dev = ca.sign_device_certificate(make_csr(ec_key()), cert, key, "dev1", NOW)
    assert dev.not_valid_after_utc == cert.not_valid_after_utc
    assert not ca.ca_usable_for_enrollment(cert, NOW)


def test_expired_or_not_yet_valid_ca_does_not_sign() -> None:
    cert, key = tenant_ca()
    for when in (cert.not_valid_after_utc, NOW - timedelta(days=1)):
        with pytest.raises(ca.CaUnavailable) as info:
            ca.sign_device_certificate(make_csr(ec_key()), cert, key, "dev1", when)
        assert info.value.message == ca.CA_UNAVAILABLE


def test_signing_with_the_wrong_key_is_refused() -> None:
    cert, _ = tenant_ca()
    with pytest.raises(ca.CaError) as info:
        ca.sign_device_certificate(make_csr(ec_key()), cert, rsa_key(2048), "dev1", NOW)
    assert info.value.status == 500
    assert ca.KEYPAIR_MISSING in info.value.message


def test_a_non_ca_certificate_does_not_sign() -> None:
    leaf_key = ec_key(ec.SECP384R1)
    leaf = sign(make_csr(leaf_key))
    with pytest.raises(ca.CaError, match="not a CA") as info:
        ca.sign_device_certificate(make_csr(ec_key()), leaf, leaf_key, "dev1", NOW)
    assert info.value.status == 500
