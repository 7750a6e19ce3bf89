"""The fleet directory: bad-device selection, files, chains and the manifest."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from gateway.fleet.pki import (
    ManifestError,
    bad_positions,
    generate_fleet,
    load_manifest,
)


@pytest.mark.parametrize(
    ("count", "ratio", "expected"),
    [(50, 0.1, 5), (10, 0.3, 3), (7, 0.0, 0), (7, 1.0, 7), (1000, 0.01, 10), (3, 0.5, 1)],
)
def test_bad_positions_count(count: int, ratio: float, expected: int) -> None:
    assert len(bad_positions(count, ratio)) == expected


def test_bad_positions_are_spread() -> None:
    assert sorted(bad_positions(50, 0.1)) == [9, 19, 29, 39, 49]
    with pytest.raises(ValueError):
        bad_positions(10, 1.5)


def test_generate_and_load(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    data = generate_fleet(out, 4, intermediate=True, bad_ratio=0.5, prefix="d-", workers=1)
    assert data["counts"] == {"devices": 4, "bad": 2}
    m = load_manifest(out)
    assert [d.device_id for d in m.devices] == ["d-00001", "d-00002", "d-00003", "d-00004"]
    assert [d.device_id for d in m.bad] == ["d-00002", "d-00004"]
    assert json.loads((out / "manifest.json").read_text())["format"] == "mtls-gateway-fleet/1"

    root = x509.load_pem_x509_certificate(m.root_cert.read_bytes())
    for dev in m.devices:
        chain = x509.load_pem_x509_certificates(dev.cert.read_bytes())
        assert len(chain) == 3  # device, intermediate, root
        assert chain[0].subject.rfc4514_string() == f"CN={dev.device_id}"
        assert (chain[-1] == root) is not dev.bad
        assert stat.S_IMODE(dev.key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        generate_fleet(out, 1)


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ManifestError, match="not a fleet manifest"):
        load_manifest(tmp_path)
