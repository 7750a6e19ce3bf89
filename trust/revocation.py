"""Offline revocation: the serial-number lists a tenant maintains by hand.

Spec ("CRL settings"): serials are hexadecimal; an empty or future date
becomes the current date; a duplicate keeps the existing entry; entries are
irreversible; a bulk file holds at most 5000 entries. The check itself (every
certificate of the verified chain) is in :mod:`trust.policy`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime

from trust.certs import parse_serial_hex
from trust.model import RevocationEntry

MAX_BULK_ENTRIES = 5000
MAX_CSV_BYTES = 2 << 20
CSV_TEMPLATE = (
    "serialNumberInHex,revocationDate\n0b8a5b9dd501a88775399b9a048811a3,2024-01-17T10:48:51.000Z\n"
)

_SERIAL_HEADERS = {"serialnumberinhex", "serialnumber", "serial", "serial number"}
_DATE_HEADERS = {"revocationdate", "date", "revocation date"}


class RevocationInputError(ValueError):
    """A revocation entry or file is unusable; the message names the problem."""


@dataclass(frozen=True, slots=True)
class RowError:
    """A rejected CSV row (1-based line number in the file)."""

    line: int
    message: str


def parse_date(text: str | None, now: datetime) -> datetime:
    """Parse ``yyyy-MM-dd'T'HH:mm:ss.SSS'Z'`` (or any ISO-8601); empty or future → now."""
    if text is None or not text.strip():
        return now
    raw = text.strip()
    if raw.endswith(("Z", "z")):
        raw = raw[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise RevocationInputError(
            f"revocation date {text!r} is not in the format yyyy-MM-ddTHH:mm:ss.SSSZ"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    when = when.astimezone(UTC)
    return now if when > now else when


def make_entry(tenant: str, serial_hex: str, date: str | None, now: datetime) -> RevocationEntry:
    """Validate one entry as the API or CLI received it."""
    try:
        serial = parse_serial_hex(serial_hex)
    except ValueError as exc:
        raise RevocationInputError(str(exc)) from None
    return RevocationEntry(tenant=tenant, serial=serial, revoked_at=parse_date(date, now))


def parse_csv(
    data: bytes, tenant: str, now: datetime, max_entries: int = MAX_BULK_ENTRIES
) -> tuple[list[RevocationEntry], list[RowError]]:
    """Parse a revocation CSV (``,`` or ``;``; header optional). Valid rows are kept,
    each invalid row is reported; more than ``max_entries`` rows refuses the file."""
    if len(data) > MAX_CSV_BYTES:
        raise RevocationInputError(f"CSV file is larger than {MAX_CSV_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RevocationInputError("CSV file is not UTF-8 text") from None
    lines = text.splitlines()
    delimiter = ";" if lines and lines[0].count(";") > lines[0].count(",") else ","
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    serial_col, date_col, start = 0, 1, 0
    if rows:
        header = [h.strip().lower() for h in rows[0]]
        if any(h in _SERIAL_HEADERS for h in header):
            serial_col = next(i for i, h in enumerate(header) if h in _SERIAL_HEADERS)
            date_col = next((i for i, h in enumerate(header) if h in _DATE_HEADERS), -1)
            start = 1
    body = [(i + 1, r) for i, r in enumerate(rows) if i >= start and any(c.strip() for c in r)]
    if len(body) > max_entries:
        raise RevocationInputError(
            f"CSV file has {len(body)} entries; at most {max_entries} are allowed per file"
        )
    entries: list[RevocationEntry] = []
    errors: list[RowError] = []
    for line, row in body:
        if serial_col >= len(row):
            errors.append(RowError(line, "missing serial number column"))
            continue
        date = row[date_col] if 0 <= date_col < len(row) else None
        try:
            entries.append(make_entry(tenant, row[serial_col], date, now))
        except RevocationInputError as exc:
            errors.append(RowError(line, str(exc)))
    return entries, errors
