"""EST request handling (trust.est), checked against the real ``openssl`` CLI."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trust import ca, est
from trust.verify import verify_chain

NOW = datetime(2026, 3, 15, 10, 30, 0, tzinfo=UTC)
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")


@cache
def tenant_ca() -> ca.TenantCa:
    return ca.create_tenant_ca("t1", NOW)


@cache
def csr_der(cn: str = "dev1") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)


def openssl_csr(tmp_path: Path, *args: str) -> bytes:
    """``openssl req -new ... -outform DER | base64``, as a device would run it."""
    assert OPENSSL is not None
    req = subprocess.run(
        [
            OPENSSL,
            "req",
            "-new",
            "-nodes",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-outform",
            "DER",
            *args,
        ],
        check=True,
        capture_output=True,
    )
    b64 = subprocess.run(["base64"], input=req.stdout, check=True, capture_output=True)
    return b64.stdout


def openssl_print_certs(body: bytes) -> list[x509.Certificate]:
    """Base64-decode a certs-only body and read it back with ``openssl pkcs7``."""
    assert OPENSSL is not None
    der = base64.b64decode(body)
    out = subprocess.run(
        [OPENSSL, "pkcs7", "-inform", "DER", "-print_certs"],
        input=der,
        check=True,
        capture_output=True,
    ).stdout
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out, re.DOTALL)
    return [x509.load_pem_x509_certificate(b) for b in blocks]


def issue(csr: x509.CertificateSigningRequest, device_id: str = "dev1") -> x509.Certificate:
    cert, key = tenant_ca()
    return ca.sign_device_certificate(csr, cert, key, device_id, NOW)


# ---------------------------------------------------------------------------
# CSRs made by openssl
# ---------------------------------------------------------------------------

P256 = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")


@needs_openssl
def test_openssl_p256_csr_is_parsed_and_enrolled(tmp_path: Path) -> None:
    body = openssl_csr(tmp_path, *P256, "-subj", "/CN=dev1")
    assert b"\n" in body  # base64(1) wraps lines: they must be tolerated
    csr = est.parse_csr(body, "base64")
    est.check_enroll(csr, "dev1")
    cert = issue(csr)
    assert verify_chain([cert], [tenant_ca().certificate], NOW).leaf == cert


@needs_openssl
def test_openssl_csr_for_another_device_is_forbidden(tmp_path: Path) -> None:
    csr = est.parse_csr(openssl_csr(tmp_path, *P256, "-subj", "/CN=dev2"), None)
    with pytest.raises(est.EstError) as info:
        est.check_enroll(csr, "dev1")
    assert info.value.status == 403
    assert "does not match the device id" in info.value.message


@needs_openssl
def test_openssl_csr_asking_for_ca_true_gets_a_device_certificate(tmp_path: Path) -> None:
    body = openssl_csr(
        tmp_path,
        *P256,
        "-subj",
        "/C=DE/O=Evil/CN=dev1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-addext",
        "subjectAltName=DNS:bank.example",
    )
    csr = est.parse_csr(body, "base64")
    est.check_enroll(csr, "dev1")  # other subject attributes are accepted ...
    cert = issue(csr)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert cert.subject.rfc4514_string() == "CN=dev1"  # ... and ignored


@needs_openssl
def test_openssl_rsa_1024_csr_is_rejected(tmp_path: Path) -> None:
    body = openssl_csr(tmp_path, "-newkey", "rsa:1024", "-subj", "/CN=dev1")
    with pytest.raises(est.EstError) as info:
        est.parse_csr(body, "base64")
    assert info.value.status == 400
    assert "too small" in info.value.message


@needs_openssl
def test_openssl_rsa_2048_csr_is_accepted(tmp_path: Path) -> None:
    body = openssl_csr(tmp_path, "-newkey", "rsa:2048", "-subj", "/CN=dev1")
    issue(est.parse_csr(body, "base64"))


@needs_openssl
def test_openssl_sha1_csr_is_rejected(tmp_path: Path) -> None:
    body = openssl_csr(tmp_path, *P256, "-subj", "/CN=dev1", "-sha1")
    with pytest.raises(est.EstError, match="SHA1"):
        est.parse_csr(body, "base64")


@needs_openssl
def test_openssl_csr_without_cn_is_rejected(tmp_path: Path) -> None:
    body = openssl_csr(tmp_path, *P256, "-subj", "/O=Acme")
    with pytest.raises(est.EstError, match="no Common Name"):
        est.parse_csr(body, "base64")


# ---------------------------------------------------------------------------
# Body encodings
# ---------------------------------------------------------------------------


def _wrapped(text: bytes, width: int, sep: bytes) -> bytes:
    return sep.join(text[i : i + width] for i in range(0, len(text), width))


@pytest.mark.parametrize(
    ("transform", "cte"),
    [
        (lambda der: base64.b64encode(der), "base64"),
        (lambda der: base64.b64encode(der), None),
        (lambda der: base64.b64encode(der), " BASE64 "),
        (lambda der: _wrapped(base64.b64encode(der), 64, b"\r\n") + b"\r\n", "base64"),
        (lambda der: b"  " + _wrapped(base64.b64encode(der), 76, b"\n \t") + b"\n\n", "base64"),
        (lambda der: base64.b64encode(der).rstrip(b"="), "base64"),  # padding dropped
        (lambda der: der, None),  # raw DER
        (lambda der: der, "binary"),
        (lambda der: der, "base64"),  # mislabelled DER is still recognised
        (
            lambda der: (
                b"-----BEGIN CERTIFICATE REQUEST-----\n"
                + _wrapped(base64.b64encode(der), 64, b"\n")
                + b"\n-----END CERTIFICATE REQUEST-----\n"
            ),
            None,
        ),
        (
            lambda der: (
                b"-----BEGIN NEW CERTIFICATE REQUEST-----\n"
                + base64.b64encode(der)
                + b"\n-----END NEW CERTIFICATE REQUEST-----"
            ),
            "7bit",
        ),
    ],
)
def test_accepted_encodings(transform: object, cte: str | None) -> None:
    assert callable(transform)
    der = csr_der()
    csr = est.parse_csr(transform(der), cte)
    assert csr.public_bytes(Encoding.DER) == der


@pytest.mark.parametrize(
    ("body", "cte", "status", "words"),
    [
        (b"", "base64", 400, "empty"),
        (b" \r\n\t", None, 400, "empty"),
        (b"hello world!", "base64", 400, "not base64"),
        (b"aGVsbG8=", "base64", 400, "not a PKCS#10"),  # base64 of "hello"
        (b"A", None, 400, "not base64"),
        (b"\x30\x82\x01\x00garbage", None, 400, "not a PKCS#10"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----", None, 400, "no CERT"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n-----END CERTIFICATE REQUEST-----",
            None,
            400,
            "not base64",
        ),
        (b"MIIB", "gzip", 400, "Content-Transfer-Encoding"),
        (b"A" * (est.MAX_CSR_BYTES + 1), "base64", 413, "larger than"),
        (b"\xff" * (est.MAX_CSR_BYTES + 1), "nonsense", 413, "larger than"),  # size first
    ],
)
def test_garbage_gives_a_clear_error(body: bytes, cte: str | None, status: int, words: str) -> None:
    with pytest.raises(est.EstError) as info:
        est.parse_csr(body, cte)
    assert info.value.status == status
    assert words in info.value.message


def test_a_certificate_is_not_a_csr() -> None:
    der = tenant_ca().certificate.public_bytes(Encoding.DER)
    with pytest.raises(est.EstError, match="not a PKCS#10"):
        est.parse_csr(base64.b64encode(der), "base64")


def test_forged_signature_is_rejected() -> None:
    forged = csr_der().replace(b"dev1", b"dev2")
    with pytest.raises(est.EstError) as info:
        est.parse_csr(base64.b64encode(forged), "base64")
    assert info.value.status == 400
    assert "signature" in info.value.message


def test_decode_csr_leaves_the_check_to_signing() -> None:
    """decode_csr only decodes; sign_device_certificate still refuses the forgery."""
    forged = csr_der().replace(b"dev1", b"dev2")
    csr = est.decode_csr(base64.b64encode(forged), "base64")
    cert, key = tenant_ca()
    with pytest.raises(ca.CsrRejected) as info:
        ca.sign_device_certificate(csr, cert, key, "dev2", NOW)
    assert info.value.status == 400 and "signature" in info.value.message
    with pytest.raises(est.EstError, match="not a PKCS#10"):
        est.decode_csr(b"AAAA", None)
    with pytest.raises(est.EstError) as too_big:
        est.decode_csr(b"A" * (est.MAX_CSR_BYTES + 1), None)
    assert too_big.value.status == 413


def test_est_error_is_a_ca_error() -> None:
    # One ``except CaError`` in the adapter covers EST and CA refusals alike.
    assert issubclass(est.EstError, ca.CaError)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=600),
    cte=st.sampled_from([None, "base64", "binary", "quoted-printable", ""]),
)
def test_arbitrary_bytes_raise_only_est_error(body: bytes, cte: str | None) -> None:
    try:
        est.parse_csr(body, cte)
    except est.EstError as exc:
        assert 400 <= exc.status < 500 and exc.message
    # (a valid CSR from random bytes would be fine too)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_corrupted_csrs_raise_only_est_error(data: st.DataObject) -> None:
    der = bytearray(csr_der())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(der) - 1))
        der[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(der)))
    encode = data.draw(st.booleans())
    body = base64.b64encode(bytes(der[:cut])) if encode else bytes(der[:cut])
    try:
        est.parse_csr(body, "base64" if encode else None)
    except est.EstError as exc:
        assert exc.status == 400


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


@needs_openssl
def test_certs_only_pkcs7_reads_back_with_openssl() -> None:
    device = issue(x509.load_der_x509_csr(csr_der()))
    body = est.certs_only_pkcs7_base64([device, tenant_ca().certificate])
    lines = body.split(b"\n")
    assert lines[-1] == b"" and all(0 < len(line) <= 64 for line in lines[:-1])
    assert openssl_print_certs(body) == [device, tenant_ca().certificate]
    # cryptography reads it back too
    assert pkcs7.load_der_pkcs7_certificates(base64.b64decode(body)) == [
        device,
        tenant_ca().certificate,
    ]


@needs_openssl
def test_cacerts_response_reads_back_with_openssl() -> None:
    ca_cert = tenant_ca().certificate
    body = est.cacerts_response([ca_cert, ca_cert])
    assert openssl_print_certs(body) == [ca_cert]  # duplicates dropped


def test_empty_pkcs7_is_a_local_error() -> None:
    with pytest.raises(ValueError):
        est.certs_only_pkcs7_base64([])


def test_pem_certificate() -> None:
    cert = tenant_ca().certificate
    pem = est.pem_certificate(cert)
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert x509.load_pem_x509_certificate(pem) == cert


@pytest.mark.parametrize(
    ("accept", "pem"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("application/pkcs7-mime", False),
        ("application/pkcs10", True),
        ("Application/PKCS10", True),
        ("text/plain, application/pkcs10; q=0.5", True),
        ("application/pkcs10;q=0", False),
        ("application/pkcs10;q=0.0, */*", False),
        ("application/pkcs10;q=abc", False),
    ],
)
def test_accept_header_selects_the_format(accept: str | None, pem: bool) -> None:
    assert est.wants_pem(accept) is pem


def test_enroll_response() -> None:
    cert = tenant_ca().certificate
    default = est.enroll_response(cert, None)
    assert default.content_type == "application/pkcs7-mime; smime-type=certs-only"
    assert default.content_transfer_encoding == "base64"
    assert pkcs7.load_der_pkcs7_certificates(base64.b64decode(default.body)) == [cert]
    pem = est.enroll_response(cert, "application/pkcs10")
    assert pem.content_type == "application/pkcs10"
    assert pem.content_transfer_encoding is None
    assert x509.load_pem_x509_certificate(pem.body) == cert


# ---------------------------------------------------------------------------
# Spec errors, OTPs, audit
# ---------------------------------------------------------------------------


def test_spec_messages() -> None:
    assert est.CA_UNAVAILABLE == (
        "Tenant CA certificate is either missing, expired, or has a validity of less than one year"
    )
    assert est.KEYPAIR_MISSING == "Failed to retrieve tenant keypair"
    assert est.NO_REQUEST == (
        "No newDeviceRequest found for this ID. It may already be registered, "
        "check the audit logs for details."
    )
    assert (est.ca_unavailable().status, est.ca_unavailable().message) == (409, est.CA_UNAVAILABLE)
    assert (est.keypair_missing().status, est.keypair_missing().message) == (
        500,
        est.KEYPAIR_MISSING,
    )
    assert (est.no_request().status, est.no_request().message) == (401, est.NO_REQUEST)


OTP_KEY = bytes(range(32))


def test_otp_hash_and_verify() -> None:
    otp = "somePassword@123"
    stored = est.hash_otp(otp, OTP_KEY)
    assert stored.startswith("hmac-sha256$")
    assert otp not in stored
    assert est.verify_otp(stored, otp, OTP_KEY)
    assert not est.verify_otp(stored, "somePassword@124", OTP_KEY)
    assert not est.verify_otp(stored, otp[:-1], OTP_KEY)
    assert est.hash_otp(otp, OTP_KEY) != stored  # salted: equal OTPs do not show


def test_otp_needs_the_server_key() -> None:
    """A stolen store alone is not enough: the hash only verifies under the key."""
    stored = est.hash_otp("otp-1", OTP_KEY)
    assert not est.verify_otp(stored, "otp-1", bytes(32))
    with pytest.raises(ValueError):
        est.hash_otp("otp-1", b"short")


def test_otp_tampered_hash_fails() -> None:
    stored = est.hash_otp("otp-1", OTP_KEY)
    scheme, salt, mac = stored.split("$")
    other_salt = est.hash_otp("otp-1", OTP_KEY).split("$")[1]
    assert not est.verify_otp(f"{scheme}${other_salt}${mac}", "otp-1", OTP_KEY)
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    assert not est.verify_otp(f"{scheme}${salt}${flipped}", "otp-1", OTP_KEY)


def test_otp_verify_never_raises() -> None:
    assert not est.verify_otp(None, "anything", OTP_KEY)  # no pending request
    assert not est.verify_otp("not a hash", "x", OTP_KEY)
    assert not est.verify_otp("$argon2id$v=19$m=65536,t=3,p=4$broken", "x", OTP_KEY)
    assert not est.verify_otp("hmac-sha256$!!$??", "x", OTP_KEY)
    assert not est.verify_otp("hmac-sha256$\u00e9$x", "x", OTP_KEY)
    assert not est.verify_otp("hmac-sha256$" + "A" * 5000 + "$x", "x", OTP_KEY)
    stored = est.hash_otp("x", OTP_KEY)
    assert not est.verify_otp(stored, "x" * (est.MAX_OTP_BYTES + 1), OTP_KEY)
    assert not est.verify_otp(stored, "\udcff", OTP_KEY)  # lone surrogate


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=64), st.text(max_size=200))
def test_otp_verify_property(otp: str, stored: str) -> None:
    try:
        real = est.hash_otp(otp, OTP_KEY)
    except ValueError:  # lone surrogates cannot be stored
        return
    assert est.verify_otp(real, otp, OTP_KEY)
    assert not est.verify_otp(stored, otp, OTP_KEY) or stored == real


def test_otp_is_fast_enough_for_bulk_enrollment() -> None:
    """The reason for HMAC over argon2: 500 enrollments/s need a cheap check."""
    stored = est.hash_otp("otp-1", OTP_KEY)
    start = time.perf_counter()
    for _ in range(1000):
        est.verify_otp(stored, "otp-1", OTP_KEY)
    assert time.perf_counter() - start < 0.5  # ~5 us each; argon2id would take ~100 s


def test_otp_hash_refuses_empty_and_huge() -> None:
    with pytest.raises(ValueError):
        est.hash_otp("", OTP_KEY)
    with pytest.raises(ValueError):
        est.hash_otp("x" * (est.MAX_OTP_BYTES + 1), OTP_KEY)


def test_enrollment_audit() -> None:
    activity, kind, text = est.enrollment_audit("dev1", 0x0ABC123)
    assert activity == "Tenant certificate authority (CA) signed certificate for device"
    assert kind == "TenantCertificateAuthority"
    assert "Certificate serial number hex: 'abc123'" in text
    assert "dev1" in text


@needs_openssl
def test_whole_enrollment_flow(tmp_path: Path) -> None:
    """What the HTTP adapter will do for ``/simpleenroll``, minus the I/O."""
    stored = est.hash_otp("otp-1", OTP_KEY)
    assert est.verify_otp(stored, "otp-1", OTP_KEY)
    ca_cert, ca_key = tenant_ca()
    assert ca.ca_usable_for_enrollment(ca_cert, NOW)
    csr = est.parse_csr(openssl_csr(tmp_path, *P256, "-subj", "/CN=dev1"), "base64")
    est.check_enroll(csr, "dev1")
    cert = ca.sign_device_certificate(csr, ca_cert, ca_key, "dev1", NOW)
    response = est.enroll_response(cert, None)
    (printed,) = openssl_print_certs(response.body)
    assert printed == cert
    # the device's key (written by openssl) matches the issued certificate
    key = serialization.load_pem_private_key((tmp_path / "key.pem").read_bytes(), None)
    assert cert.public_key() == key.public_key()
    _, _, text = est.enrollment_audit("dev1", cert.serial_number)
    assert f"'{cert.serial_number:x}'" in text
    assert verify_chain([cert], [ca_cert], NOW + timedelta(days=364)).leaf == cert
