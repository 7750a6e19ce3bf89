"""Bulk-registration CSV parsing (:mod:`trust.bulk`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trust.bulk import (
    MAX_BULK_CSV_BYTES,
    BulkCsvError,
    BulkRow,
    parse_bulk_csv,
)

SPEC_EXAMPLE = (
    "ID;TYPE;NAME;ICCID;IDTYPE;PATH;SHELL;AUTH_TYPE;ENROLLMENT_OTP\n"
    "006064ce800a;c8y_Device;Sample_Device1;+491555555;c8y_Serial;bulk group/subgroup1;1;"
    "CERTIFICATES;somePassword@123\n"
    "006064ce8077;c8y_Device;Sample_Device2;+491555555;c8y_Serial;bulk group/subgroup2;1;"
    "CERTIFICATES;password@345\n"
)


def test_spec_example() -> None:
    result = parse_bulk_csv(SPEC_EXAMPLE.encode())
    assert result.failures == ()
    assert result.total == 2
    first, second = result.rows
    assert (first.line, first.device_id, first.otp) == (2, "006064ce800a", "somePassword@123")
    assert dict(first.attributes) == {
        "TYPE": "c8y_Device",
        "NAME": "Sample_Device1",
        "ICCID": "+491555555",
        "IDTYPE": "c8y_Serial",
        "PATH": "bulk group/subgroup1",
        "SHELL": "1",
    }
    assert second.device_id == "006064ce8077"
    assert "password@345" not in repr(second)  # the OTP never shows in logs


def test_comma_separated_without_otp_bom_and_lower_case_header() -> None:
    data = (
        "\ufeffid,credentials,auth_type,name\r\n"
        "dev-1,,CERTIFICATES,One\r\n\r\ndev-2,,certificates,\r\n"
    )
    result = parse_bulk_csv(data.encode())
    assert [r.device_id for r in result.rows] == ["dev-1", "dev-2"]
    assert result.rows[0].otp is None
    assert result.rows[0].attributes == (("name", "One"),)
    assert result.rows[1].attributes == ()
    assert result.rows[1].line == 4  # blank line skipped but counted


def test_rows_shorter_than_the_header_are_padded() -> None:
    result = parse_bulk_csv(b"ID;AUTH_TYPE;NAME\ndev;CERTIFICATES\n")
    assert result.rows == (BulkRow(2, "dev", None, ()),)


def test_bad_rows_are_reported_and_good_rows_kept() -> None:
    data = (
        "ID;AUTH_TYPE;CREDENTIALS;ENROLLMENT_OTP;NAME\n"
        "good-1;CERTIFICATES;;;A\n"
        "pw-dev;CERTIFICATES;secret123;;\n"
        "basic-dev;BASIC;;;\n"
        ";CERTIFICATES;;;\n"
        "short-otp;CERTIFICATES;;abc;\n"
        "good-1;CERTIFICATES;;;dup\n"
        "too-many;CERTIFICATES;;;x;extra\n"
        "ctl\x01dev;CERTIFICATES;;;\n"
        f"long;CERTIFICATES;;;{'n' * 2000}\n"
        "good-2;CERTIFICATES;;a-good-otp-123;\n"
    )
    result = parse_bulk_csv(data.encode())
    assert [r.device_id for r in result.rows] == ["good-1", "good-2"]
    assert result.rows[1].otp == "a-good-otp-123"
    reasons = {f.line: (f.device_id, f.reason) for f in result.failures}
    assert reasons[3] == ("pw-dev", "CREDENTIALS must be empty for AUTH_TYPE=CERTIFICATES")
    assert "AUTH_TYPE must be CERTIFICATES" in reasons[4][1] and "BASIC" in reasons[4][1]
    assert reasons[5][1] == "ID is empty"
    assert "ENROLLMENT_OTP" in reasons[6][1] and "abc" not in reasons[6][1]
    assert reasons[7] == ("good-1", "duplicate ID: already given on line 2")
    assert "fields" in reasons[8][1]
    assert "control" in reasons[9][1]
    assert "NAME is longer" in reasons[10][1]
    assert result.total == 10
    assert all("secret123" not in f.reason for f in result.failures)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\n\n", "empty"),
        (b"NAME;TYPE\nx;y\n", "no ID column"),
        (b"ID;NAME\nx;y\n", "AUTH_TYPE"),
        (b"ID;id;AUTH_TYPE\n", "repeats"),
        (b"\xff\xfeI\x00D\x00", "UTF-8"),
        (b"ID;AUTH_TYPE\nx\x00;CERTIFICATES\n", "NUL"),
        (b"ID;AUTH_TYPE\n" + b"x" * MAX_BULK_CSV_BYTES, "larger"),
        (";".join(f"C{i}" for i in range(100)).encode() + b";ID;AUTH_TYPE\n", "columns"),
    ],
)
def test_file_level_errors(data: bytes, message: str) -> None:
    with pytest.raises(BulkCsvError, match=message):
        parse_bulk_csv(data)


def test_row_limit() -> None:
    rows = "".join(f"d{i};CERTIFICATES\n" for i in range(11))
    assert parse_bulk_csv(("ID;AUTH_TYPE\n" + rows).encode(), max_rows=11).total == 11
    with pytest.raises(BulkCsvError, match="more than 10"):
        parse_bulk_csv(("ID;AUTH_TYPE\n" + rows).encode(), max_rows=10)


def test_quoted_fields_with_separators_and_newlines() -> None:
    data = 'ID,AUTH_TYPE,NAME\n"dev,1",CERTIFICATES,"multi\nline"\ndev2,CERTIFICATES,x\n'
    result = parse_bulk_csv(data.encode())
    assert result.rows[0].device_id == "dev,1"
    assert result.rows[0].attributes == (("NAME", "multi\nline"),)
    assert result.rows[1].line == 4  # physical line numbers


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        result = parse_bulk_csv(data)
    except BulkCsvError:
        return
    assert result.total == len(result.rows) + len(result.failures)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=12), max_size=6),
        max_size=8,
    )
)
def test_arbitrary_tables_never_crash(table: list[list[str]]) -> None:
    text = "ID;AUTH_TYPE;ENROLLMENT_OTP\n" + "\n".join(";".join(r) for r in table)
    try:
        result = parse_bulk_csv(text.encode())
    except BulkCsvError:
        return
    for row in result.rows:
        assert row.device_id and row.device_id == row.device_id.strip()


@pytest.mark.parametrize("data", [b";", b";;\n,\n", b'"";""\n'])
def test_header_of_separators_only(data: bytes) -> None:
    with pytest.raises(BulkCsvError, match="header"):
        parse_bulk_csv(data)


async def test_bulk_register_operation_stores_hashed_otps_and_audits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    from gateway import operations as ops
    from gateway.store.base import AuditQuery, Page
    from gateway.store.sqlite import SqliteStore
    from trust import est

    store = SqliteStore(tmp_path / "s.db")
    await store.open()
    try:
        now = datetime.now(UTC)
        await store.create_tenant("t1")
        await store.register_device("t1", "existing", "auto", now)
        data = (
            b"ID;AUTH_TYPE;ENROLLMENT_OTP;NAME\n"
            b"a;CERTIFICATES;first-otp-1;A\nb;CERTIFICATES;;\nexisting;CERTIFICATES;;\n"
            b"c;PASSWORD;;\n"
        )
        key = b"k" * 32
        hasher = lambda otp: est.hash_otp(otp, key)  # noqa: E731
        result = await ops.bulk_register(store, "t1", data, now, "tester", hash_otp=hasher)
        assert result.total == 4 and result.created == ("a", "b")
        assert [(f.line, f.device_id) for f in result.failures] == [(4, "existing"), (5, "c")]
        pending = await store.get_pending_registration("t1", "a")
        assert pending.otp_hash and pending.otp_hash != "first-otp-1"
        assert est.verify_otp(pending.otp_hash, "first-otp-1", key)
        assert not est.verify_otp(pending.otp_hash, "wrong-otp-1", key)
        assert pending.attributes == (("NAME", "A"),)
        assert (await store.get_pending_registration("t1", "b")).otp_hash is None
        again = await ops.bulk_register(
            store, "t1", b"ID;AUTH_TYPE\na;CERTIFICATES\n", now, "t", hash_otp=hasher
        )
        assert again.created == () and "pending" in again.failures[0].reason
        records, _ = await store.list_audit(AuditQuery(tenant="t1"), Page(50, 1))
        bulk = [r for r in records if r.type == ops.AUDIT_BULK]
        assert len(bulk) == 2 and "2 devices accepted" in bulk[-1].text
        assert all("first-otp-1" not in r.text for r in records)
        with pytest.raises(ops.OperationError, match="AUTH_TYPE"):
            await ops.bulk_register(store, "t1", b"ID\nx\n", now, "t", hash_otp=hasher)
    finally:
        await store.close()
