"""docs/configuration.md is generated from gateway/config.py and kept up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_config_docs.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_committed_reference_is_up_to_date() -> None:
    r = _run("--check")
    assert r.returncode == 0, r.stderr  # run `python scripts/gen_config_docs.py`


def test_check_notices_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text((REPO / "docs" / "configuration.md").read_text().replace("8883", "1883"))
    r = _run("--check", "--output", str(stale))
    assert r.returncode == 1
    assert "out of date" in r.stderr


def test_every_setting_is_described(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    assert _run("--output", str(out)).returncode == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| `")]
    table_rows = [r for r in rows if not r.startswith("| `MTLS_GATEWAY_")]
    assert table_rows
    for row in table_rows:
        description = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert description, f"undocumented setting: {row}"


def test_committed_api_reference_is_up_to_date() -> None:
    """docs/api.md is rendered from gateway/openapi.yaml (`make docs`)."""
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_api_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
