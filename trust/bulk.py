"""Bulk device registration CSV (spec: "Bulk registration", "Simple device enrollment").

A pure parser: bytes in, valid rows and per-row failures out. The caller
stores the rows as pending registrations (hashing each ``ENROLLMENT_OTP``);
nothing here touches the store or hashes anything.

Rules (spec, plus the platform's bulk-credentials format):

* ``;`` or ``,`` separated (whichever the header line uses more), UTF-8,
  optional BOM, a header line naming the columns (any case);
* ``ID`` is required: the device id, i.e. the certificate's Common Name;
* ``AUTH_TYPE`` is required and every row's value must be ``CERTIFICATES``;
* ``CREDENTIALS`` must be absent or empty (certificate devices have no password);
* ``ENROLLMENT_OTP`` is optional (EST enrollment); when given it is 8 to 256
  characters. It is never echoed in a failure message;
* ``TYPE``, ``NAME``, ``ICCID``, ``IDTYPE``, ``PATH``, ``SHELL`` and any other
  column are kept as attributes of the pending registration;
* a repeated ``ID`` in the same file fails the later rows; blank lines are skipped;
* bounded: at most :data:`MAX_BULK_CSV_BYTES` bytes and :data:`MAX_BULK_ROWS` rows.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

__all__ = [
    "AUTH_TYPE_CERTIFICATES",
    "MAX_BULK_CSV_BYTES",
    "MAX_BULK_ROWS",
    "BulkCsvError",
    "BulkFailure",
    "BulkParse",
    "BulkRow",
    "parse_bulk_csv",
    "valid_device_id",
]

MAX_BULK_CSV_BYTES = 4 << 20
"""Largest bulk-registration file accepted (5000 rows of ten columns fit easily)."""
MAX_BULK_ROWS = 5000
"""Largest number of device rows in one file (as for revocation CSVs)."""
MAX_DEVICE_ID_CHARS = 256
MAX_VALUE_CHARS = 1024
MAX_COLUMNS = 64
MIN_OTP_CHARS = 8
MAX_OTP_CHARS = 256
AUTH_TYPE_CERTIFICATES = "CERTIFICATES"

_SPECIAL = {"ID", "AUTH_TYPE", "CREDENTIALS", "ENROLLMENT_OTP"}


class BulkCsvError(ValueError):
    """The file as a whole is unusable (size, encoding, header, row count)."""


@dataclass(frozen=True, slots=True)
class BulkRow:
    """A valid row: one device to register (``line`` is 1-based in the file)."""

    line: int
    device_id: str
    otp: str | None = field(default=None, repr=False)
    """``ENROLLMENT_OTP`` in clear: hash it before storing, never log it."""
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class BulkFailure:
    """A refused row and why (no secret in ``reason``)."""

    line: int
    device_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class BulkParse:
    rows: tuple[BulkRow, ...]
    failures: tuple[BulkFailure, ...]

    @property
    def total(self) -> int:
        """Rows in the file (blank lines not counted)."""
        return len(self.rows) + len(self.failures)


def valid_device_id(device_id: str) -> str | None:
    """None when usable as a device id, else the reason it is not."""
    if not device_id:
        return "ID is empty"
    if len(device_id) > MAX_DEVICE_ID_CHARS:
        return f"ID is longer than {MAX_DEVICE_ID_CHARS} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in device_id):
        return "ID contains control characters"
    if device_id != device_id.strip():
        return "ID has leading or trailing spaces"
    return None


def parse_bulk_csv(data: bytes, max_rows: int = MAX_BULK_ROWS) -> BulkParse:
    """Parse a bulk-registration CSV; raises :class:`BulkCsvError` for file-level errors."""
    if len(data) > MAX_BULK_CSV_BYTES:
        raise BulkCsvError(f"CSV file is larger than {MAX_BULK_CSV_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BulkCsvError("CSV file is not UTF-8 text") from None
    if "\x00" in text:
        raise BulkCsvError("CSV file contains NUL bytes (is it a spreadsheet, not CSV?)")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first:
        raise BulkCsvError("CSV file is empty: expected a header line such as ID;AUTH_TYPE")
    delimiter = ";" if first.count(";") >= first.count(",") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:
            raise BulkCsvError("CSV file has no header line such as ID;AUTH_TYPE")
        columns = _columns(header)
        body: list[tuple[int, list[str]]] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            body.append((reader.line_num, row))
            if len(body) > max_rows:
                raise BulkCsvError(f"CSV file has more than {max_rows} device rows")
    except csv.Error as exc:
        raise BulkCsvError(f"CSV line {reader.line_num} is malformed: {exc}") from None
    rows: list[BulkRow] = []
    failures: list[BulkFailure] = []
    seen: dict[str, int] = {}
    for line, cells in body:
        result = _row(line, cells, columns)
        if isinstance(result, BulkRow):
            first_line = seen.get(result.device_id)
            if first_line is not None:
                result = BulkFailure(
                    line, result.device_id, f"duplicate ID: already given on line {first_line}"
                )
            else:
                seen[result.device_id] = line
        if isinstance(result, BulkRow):
            rows.append(result)
        else:
            failures.append(result)
    return BulkParse(tuple(rows), tuple(failures))


def _columns(header: list[str]) -> list[str]:
    names = [h.strip() for h in header]
    if len(names) > MAX_COLUMNS:
        raise BulkCsvError(f"CSV header has more than {MAX_COLUMNS} columns")
    upper = [n.upper() for n in names]
    dupes = sorted({n for n in upper if n and upper.count(n) > 1})
    if dupes:
        raise BulkCsvError(f"CSV header repeats column(s) {', '.join(dupes)}")
    if "ID" not in upper:
        raise BulkCsvError("CSV header has no ID column (e.g. ID;AUTH_TYPE;ENROLLMENT_OTP)")
    if "AUTH_TYPE" not in upper:
        raise BulkCsvError(
            "CSV header has no AUTH_TYPE column: certificate devices need AUTH_TYPE=CERTIFICATES"
        )
    return [u if u in _SPECIAL else n for u, n in zip(upper, names, strict=True)]


def _row(line: int, cells: list[str], columns: list[str]) -> BulkRow | BulkFailure:
    # a row shorter than the header: the missing trailing fields are empty
    values = {name: (cells[i] if i < len(cells) else "") for i, name in enumerate(columns)}
    device_id = values["ID"].strip()
    if len(cells) > len(columns) and any(c.strip() for c in cells[len(columns) :]):
        return BulkFailure(
            line, device_id, f"row has {len(cells)} fields but the header has {len(columns)}"
        )
    problem = valid_device_id(device_id)
    if problem:
        return BulkFailure(line, device_id[:MAX_DEVICE_ID_CHARS], problem)
    auth_type = values["AUTH_TYPE"].strip()
    if auth_type.upper() != AUTH_TYPE_CERTIFICATES:
        shown = auth_type[:40] or "empty"
        return BulkFailure(line, device_id, f"AUTH_TYPE must be CERTIFICATES, got {shown!r}")
    if values.get("CREDENTIALS", "").strip():
        return BulkFailure(line, device_id, "CREDENTIALS must be empty for AUTH_TYPE=CERTIFICATES")
    otp = values.get("ENROLLMENT_OTP", "")
    if otp:
        if not MIN_OTP_CHARS <= len(otp) <= MAX_OTP_CHARS:
            return BulkFailure(
                line,
                device_id,
                f"ENROLLMENT_OTP must have {MIN_OTP_CHARS} to {MAX_OTP_CHARS} characters",
            )
        if any(ord(c) < 32 or ord(c) == 127 for c in otp):
            return BulkFailure(line, device_id, "ENROLLMENT_OTP contains control characters")
    attributes: list[tuple[str, str]] = []
    for name in columns:
        if name in _SPECIAL or not name:
            continue
        value = values[name].strip()
        if not value:
            continue
        if len(value) > MAX_VALUE_CHARS:
            return BulkFailure(
                line, device_id, f"{name} is longer than {MAX_VALUE_CHARS} characters"
            )
        attributes.append((name, value))
    return BulkRow(line, device_id, otp or None, tuple(attributes))
