"""``fleet pki``: a fleet directory with a CA, N device certificates and a manifest.

Layout of ``DIR``::

    manifest.json             what is here (see :func:`generate_fleet`)
    ca/root.pem, root.key     the fleet's root CA (upload it as trusted certificate)
    ca/intermediate.pem/.key  optional intermediate (``--intermediate``)
    untrusted/…               a CA the gateway does not trust (signs the bad devices)
    server-ca.pem, server.pem, server.key
                              a loopback server certificate (localhost, 127.0.0.1)
                              for a gateway or a mosquitto under test
    devices/<id>.pem          chain: device, intermediate (if any), root
    devices/<id>.key          device private key (mode 0600)

Device keys and certificates are made in a process pool: key generation and
signing are CPU-bound and independent.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

from gateway.fleet.driver import Device
from gateway.pki import (
    Issued,
    KeyType,
    load_private_key,
    make_ca,
    make_device,
    make_server,
    pem_chain,
    write_private,
)
from trust.certs import fingerprint, load_certificate

__all__ = [
    "MANIFEST",
    "Manifest",
    "ManifestError",
    "bad_positions",
    "generate_fleet",
    "load_manifest",
]

MANIFEST = "manifest.json"
FORMAT = "mtls-gateway-fleet/1"
MAX_DEVICES = 1_000_000
_CHUNK = 250


class ManifestError(ValueError):
    """The fleet directory is missing or its manifest is unusable."""


def bad_positions(count: int, ratio: float) -> set[int]:
    """Indices of the deliberately bad devices: ``floor(count * ratio)`` of them,
    spread evenly (device ``i`` is bad when ``floor((i+1)r) > floor(i r)``)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"bad ratio must be between 0 and 1, got {ratio}")
    r = Fraction(ratio).limit_denominator(1_000_000)
    return {i for i in range(count) if math.floor((i + 1) * r) > math.floor(i * r)}


# worker side -------------------------------------------------------------------

_ISSUERS: dict[bool, tuple[Issued, bytes]] = {}
_SETUP: dict[str, Any] = {}


def _init_worker(
    issuers: dict[bool, tuple[bytes, bytes, bytes]], key_type: str, out: str, days: float
) -> None:
    for bad, (cert_pem, key_pem, tail) in issuers.items():
        issued = Issued(load_certificate(cert_pem), load_private_key(key_pem))
        _ISSUERS[bad] = (issued, tail)
    _SETUP.update(key_type=key_type, out=out, days=days)


def _issue(batch: Sequence[tuple[str, bool]]) -> list[dict[str, Any]]:
    out = Path(_SETUP["out"])
    key_type: KeyType = _SETUP["key_type"]
    rows = []
    for device_id, bad in batch:
        issuer, tail = _ISSUERS[bad]
        dev = make_device(device_id, issuer, key_type=key_type, days=_SETUP["days"])
        cert_rel = f"devices/{device_id}.pem"
        key_rel = f"devices/{device_id}.key"
        (out / cert_rel).write_bytes(dev.cert_pem() + tail)
        write_private(out / key_rel, dev.key_pem())
        rows.append(
            {
                "id": device_id,
                "cert": cert_rel,
                "key": key_rel,
                "serial": format(dev.cert.serial_number, "x"),
                "fingerprint": fingerprint(dev.cert),
                "bad": bad,
            }
        )
    return rows


# parent side -------------------------------------------------------------------


def _write_ca(out: Path, sub: str, name: str, issued: Issued) -> dict[str, str]:
    (out / sub).mkdir(parents=True, exist_ok=True)
    cert_rel, key_rel = f"{sub}/{name}.pem", f"{sub}/{name}.key"
    (out / cert_rel).write_bytes(issued.cert_pem())
    write_private(out / key_rel, issued.key_pem())
    return {"cert": cert_rel, "key": key_rel, "fingerprint": fingerprint(issued.cert)}


def _hierarchy(
    out: Path, sub: str, label: str, key_type: KeyType, intermediate: bool
) -> tuple[dict[str, Any], Issued, bytes]:
    """A root (and intermediate); returns manifest entry, device issuer, chain tail PEM."""
    root = make_ca(f"{label} Root CA", key_type=key_type, org="mtls-gateway fleet")
    entry: dict[str, Any] = {"root": _write_ca(out, sub, "root", root), "intermediate": None}
    if not intermediate:
        return entry, root, root.cert_pem()
    inter = make_ca(
        f"{label} Intermediate CA",
        issuer=root,
        key_type=key_type,
        org="mtls-gateway fleet",
        pathlen=0,
    )
    entry["intermediate"] = _write_ca(out, sub, "intermediate", inter)
    return entry, inter, pem_chain(inter, root)


def generate_fleet(
    out: Path,
    devices: int,
    *,
    key_type: KeyType = "ec",
    intermediate: bool = False,
    prefix: str = "dev-",
    bad_ratio: float = 0.0,
    workers: int | None = None,
    days: float = 365,
) -> dict[str, Any]:
    """Write a fleet directory (see the module docstring); returns the manifest."""
    if not 1 <= devices <= MAX_DEVICES:
        raise ValueError(f"--devices must be between 1 and {MAX_DEVICES}")
    if not prefix or any(c in prefix for c in "/\\\0") or prefix.startswith("."):
        raise ValueError(f"invalid device id prefix {prefix!r}")
    bad = bad_positions(devices, bad_ratio)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out / MANIFEST} exists: choose an empty directory")
    (out / "devices").mkdir(exist_ok=True)

    ca, good_issuer, good_tail = _hierarchy(out, "ca", "Fleet", key_type, intermediate)
    untrusted, bad_issuer, bad_tail = _hierarchy(
        out, "untrusted", "Untrusted Fleet", key_type, intermediate
    )
    server_ca = make_ca("Fleet Server CA")
    server = make_server(server_ca, hosts=("localhost",), ips=("127.0.0.1", "::1"))
    (out / "server-ca.pem").write_bytes(server_ca.cert_pem())
    (out / "server.pem").write_bytes(server.cert_pem())
    write_private(out / "server.key", server.key_pem())

    digits = max(5, len(str(devices)))
    jobs = [(f"{prefix}{i + 1:0{digits}d}", i in bad) for i in range(devices)]
    chunks = [jobs[i : i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    issuers = {
        False: (good_issuer.cert_pem(), good_issuer.key_pem(), good_tail),
        True: (bad_issuer.cert_pem(), bad_issuer.key_pem(), bad_tail),
    }
    nproc = max(1, min(workers or _cpus(), len(chunks)))
    init_args = (issuers, key_type, str(out), days)
    rows: list[dict[str, Any]] = []
    if nproc == 1:
        _init_worker(*init_args)
        for chunk in chunks:
            rows += _issue(chunk)
    else:
        with ProcessPoolExecutor(nproc, initializer=_init_worker, initargs=init_args) as pool:
            for part in pool.map(_issue, chunks):
                rows += part
    manifest = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "keyType": key_type,
        "prefix": prefix,
        "badRatio": bad_ratio,
        "counts": {"devices": devices, "bad": len(bad)},
        "ca": ca,
        "untrustedCa": untrusted,
        "server": {"ca": "server-ca.pem", "cert": "server.pem", "key": "server.key"},
        "devices": rows,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", "utf-8")
    tmp.replace(out / MANIFEST)
    return manifest


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Manifest:
    """A loaded fleet directory."""

    dir: Path
    data: dict[str, Any]
    devices: tuple[Device, ...]

    @property
    def root_cert(self) -> Path:
        return self.dir / str(self.data["ca"]["root"]["cert"])

    @property
    def server_ca(self) -> Path:
        return self.dir / str(self.data["server"]["ca"])

    @property
    def good(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if not d.bad)

    @property
    def bad(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.bad)

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.data["devices"]
        return rows


def load_manifest(directory: Path) -> Manifest:
    """Read ``DIR/manifest.json``; :class:`ManifestError` when unusable."""
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: create the fleet with `fleet pki` first") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a fleet manifest ({FORMAT})")
    try:
        devices = tuple(
            Device(
                device_id=str(row["id"]),
                cert=directory / row["cert"],
                key=directory / row["key"],
                bad=bool(row["bad"]),
            )
            for row in data["devices"]
        )
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: malformed device entry ({exc})") from None
    return Manifest(directory, data, devices)
