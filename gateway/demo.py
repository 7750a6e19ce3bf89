"""The demo set-up of ``mtls-gateway init`` (and of ``run`` on a fresh data dir).

Everything lives in ``<data_dir>/demo/``: a root CA and an intermediate CA for
devices, three MQTT devices and one LWM2M device signed by the intermediate, a
separate server CA with the gateway's server certificate, and the password of
the ``admin`` user. In the store: tenant ``demo``, the root uploaded as an
enabled trusted certificate with auto-registration (possession proven with its
key), the admin user and the LWM2M device user.

:func:`ensure_demo` is idempotent and never destroys anything: existing files,
keys, users and settings are kept, only missing pieces are created. A piece
that exists but no longer matches its issuer (or its key) is an error, not a
reason to overwrite it.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from gateway import operations as ops
from gateway.pki import (
    Issued,
    load_private_key,
    make_ca,
    make_device,
    make_server,
    pem_chain,
    write_private,
)
from gateway.store.base import NotFound, Store
from trust.anchors import UploadError
from trust.certs import CertificateError, fingerprint, load_certificates
from trust.model import Status

DEMO_TENANT = "demo"
ADMIN_USERNAME = "admin"
ADMIN_ROLES = ("ROLE_TENANT_ADMIN", "ROLE_TENANT_MANAGEMENT_ADMIN")
DEVICE_IDS = ("device-0001", "device-0002", "device-0003")
LWM2M_DEVICE_ID = "lwm2m-0001"
SERVER_HOSTS = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")
ROOT_NAME = "mtls-gateway demo root CA"
ACTOR = "mtls-gateway init"


class DemoError(Exception):
    """The demo directory is inconsistent; the message says what to do."""


@dataclass(frozen=True, slots=True)
class DemoItem:
    """One piece of the demo: a file or a store object, created now or kept."""

    what: str
    created: bool
    note: str = ""


@dataclass(frozen=True, slots=True)
class DemoReport:
    directory: Path
    tenant: str
    root_fingerprint: str
    admin_username: str
    admin_password_file: Path
    items: tuple[DemoItem, ...]

    @property
    def created(self) -> list[DemoItem]:
        return [i for i in self.items if i.created]

    @property
    def kept(self) -> list[DemoItem]:
        return [i for i in self.items if not i.created]


@dataclass(frozen=True, slots=True)
class DemoPki:
    root: Issued
    intermediate: Issued
    server_ca: Issued


async def ensure_demo(data_dir: Path, store: Store, now: datetime) -> DemoReport:
    """Create whatever part of the demo is missing (files first, then the store)."""
    directory = data_dir / "demo"
    pki, items = await asyncio.to_thread(ensure_demo_files, directory, now)
    items += await _ensure_store(store, directory, pki, now)
    return DemoReport(
        directory=directory,
        tenant=DEMO_TENANT,
        root_fingerprint=fingerprint(pki.root.cert),
        admin_username=ADMIN_USERNAME,
        admin_password_file=directory / "admin-password",
        items=tuple(items),
    )


# files -------------------------------------------------------------------------


def ensure_demo_files(directory: Path, now: datetime) -> tuple[DemoPki, list[DemoItem]]:
    """The PKI files (blocking I/O and key generation: run it in a thread)."""
    directory.mkdir(parents=True, exist_ok=True)
    items: list[DemoItem] = []
    root = _ensure_ca(directory, "root-ca", ROOT_NAME, None, 1, 3650, now, items)
    inter = _ensure_ca(
        directory, "intermediate-ca", "mtls-gateway demo intermediate CA", root, 0, 1825, now, items
    )
    for device_id in (*DEVICE_IDS, LWM2M_DEVICE_ID):
        _ensure_device(directory, device_id, inter, root, now, items)
    server_ca = _ensure_ca(
        directory, "server-ca", "mtls-gateway demo server CA", None, 0, 3650, now, items
    )
    _ensure_server(directory, server_ca, now, items)
    return DemoPki(root=root, intermediate=inter, server_ca=server_ca), items


def _ensure_ca(
    directory: Path,
    stem: str,
    cn: str,
    issuer: Issued | None,
    pathlen: int,
    days: int,
    now: datetime,
    items: list[DemoItem],
) -> Issued:
    pem, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    existing = _load_pair(pem, key, issuer)
    if existing is not None:
        items += [DemoItem(str(pem), False), DemoItem(str(key), False)]
        return existing
    ca = make_ca(cn, issuer=issuer, org="mtls-gateway demo", pathlen=pathlen, days=days, now=now)
    _write_pair(pem, key, ca.cert_pem(), ca, items)
    return ca


def _ensure_device(
    directory: Path,
    device_id: str,
    inter: Issued,
    root: Issued,
    now: datetime,
    items: list[DemoItem],
) -> None:
    pem, key = directory / f"{device_id}.pem", directory / f"{device_id}.key"
    if _load_pair(pem, key, inter) is not None:
        items += [DemoItem(str(pem), False), DemoItem(str(key), False)]
        return
    device = make_device(device_id, inter, days=825, now=now)
    _write_pair(pem, key, pem_chain(device, inter, root), device, items)


def _ensure_server(
    directory: Path, server_ca: Issued, now: datetime, items: list[DemoItem]
) -> None:
    pem, key = directory / "server.pem", directory / "server.key"
    if _load_pair(pem, key, server_ca) is not None:
        items += [DemoItem(str(pem), False), DemoItem(str(key), False)]
        return
    server = make_server(server_ca, hosts=SERVER_HOSTS, ips=SERVER_IPS)
    _write_pair(pem, key, server.cert_pem(), server, items)


def _write_pair(pem: Path, key: Path, chain: bytes, issued: Issued, items: list[DemoItem]) -> None:
    write_private(key, issued.key_pem())
    pem.write_bytes(chain)
    items += [DemoItem(str(pem), True), DemoItem(str(key), True)]


def _load_pair(pem: Path, key: Path, issuer: Issued | None) -> Issued | None:
    """The existing certificate (first of the file) and key; None when neither exists."""
    if not pem.exists() and not key.exists():
        return None
    if not pem.exists() or not key.exists():
        present, missing = (pem, key) if pem.exists() else (key, pem)
        raise DemoError(
            f"{present} exists but {missing} does not: restore it, or move {present} aside"
            " to have a new pair generated"
        )
    try:
        cert = load_certificates(pem.read_bytes())[0]
        private = load_private_key(key.read_bytes())
    except (CertificateError, ValueError, TypeError) as exc:
        raise DemoError(f"cannot load {pem} / {key}: {exc}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if private.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise DemoError(f"{key} is not the private key of {pem}")
    signer = issuer.cert if issuer is not None else cert
    try:
        cert.verify_directly_issued_by(signer)
    except Exception:  # ValueError, TypeError or InvalidSignature
        raise DemoError(
            f"{pem} was not issued by the current {'issuer' if issuer else 'key'}:"
            f" move {pem.parent} aside to generate a consistent demo"
        ) from None
    return Issued(cert, private)


# store -------------------------------------------------------------------------


async def _ensure_store(
    store: Store, directory: Path, pki: DemoPki, now: datetime
) -> list[DemoItem]:
    created = await ops.create_tenant(store, DEMO_TENANT, now, ACTOR)
    items = [DemoItem(f"tenant {DEMO_TENANT}", created)]
    items.append(await _ensure_root_anchor(store, pki.root, now))
    items += await _ensure_admin(store, directory / "admin-password", now)
    _, created = await ops.register_device(
        store, DEMO_TENANT, LWM2M_DEVICE_ID, "manual", now, ACTOR
    )
    items.append(DemoItem(f"device user device_{LWM2M_DEVICE_ID} (tenant {DEMO_TENANT})", created))
    return items


async def _ensure_root_anchor(store: Store, root: Issued, now: datetime) -> DemoItem:
    """Upload the root (enabled, auto-registration on) and prove possession of its key."""
    fp = fingerprint(root.cert)
    what = f"trusted certificate {fp} (tenant {DEMO_TENANT})"
    try:
        await store.get_trusted_certificate(DEMO_TENANT, fp)
        return DemoItem(what, False)
    except NotFound:
        pass
    pem = root.cert_pem().decode("ascii")
    try:
        await ops.add_trusted_certificate(
            store, DEMO_TENANT, pem, ROOT_NAME, Status.ENABLED, True, now, ACTOR
        )
    except UploadError as exc:
        raise DemoError(f"cannot upload the demo root CA: {exc.message}") from None
    record = await ops.create_pop_code(store, DEMO_TENANT, fp, now)
    signature = sign_code(root, record.pop_code or "")
    await ops.verify_pop(store, DEMO_TENANT, fp, signature, now, ACTOR)
    return DemoItem(what, True)


def sign_code(issued: Issued, code: str) -> str:
    """What ``openssl dgst -sha256 -sign key code.txt | openssl base64 -A`` prints."""
    key = issued.key
    if isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(code.encode(), padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = key.sign(code.encode(), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(sig).decode("ascii")


async def _ensure_admin(store: Store, password_file: Path, now: datetime) -> list[DemoItem]:
    """The admin user and its password file; a missing half is re-created from the other."""
    try:
        await store.get_admin_user(DEMO_TENANT, ADMIN_USERNAME)
        user_exists = True
    except NotFound:
        user_exists = False
    password = await asyncio.to_thread(_read_password, password_file)
    file_item = DemoItem(str(password_file), False)
    if password is None and user_exists:
        note = "missing: the admin user exists, its password was not changed"
        file_item = DemoItem(str(password_file), False, note)
    elif password is None:
        password = secrets.token_urlsafe(18)
        await asyncio.to_thread(write_private, password_file, (password + "\n").encode())
        file_item = DemoItem(str(password_file), True)
    user_what = f"admin user {ADMIN_USERNAME} (tenant {DEMO_TENANT})"
    if user_exists or password is None:
        return [file_item, DemoItem(user_what, False)]
    await ops.create_admin_user(
        store, DEMO_TENANT, ADMIN_USERNAME, password, ADMIN_ROLES, now=now, actor=ACTOR
    )
    return [file_item, DemoItem(user_what, True)]


def _read_password(path: Path) -> str | None:
    if not path.exists():
        return None
    text = path.read_text("utf-8").strip()
    if len(text) < ops.MIN_PASSWORD_LENGTH:
        raise DemoError(f"{path} holds no usable password: delete it and re-run init")
    return text
