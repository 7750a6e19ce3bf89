"""Pure parts of the management API: Basic parsing, the login limiter, roles, paging."""

from __future__ import annotations

import base64

import pytest
from yarl import URL

from gateway.http import jsonmodel as jm
from gateway.http.auth import (
    ROLE_MANAGEMENT_ADMIN,
    ROLE_MANAGEMENT_READ,
    ROLE_TENANT_ADMIN,
    FailureLimiter,
    Principal,
    parse_basic,
)
from gateway.http.server import ApiError


def basic(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return "Basic " + base64.b64encode(raw).decode()


def test_parse_basic_with_and_without_tenant() -> None:
    creds = parse_basic(basic("t1/admin:pa:ss/word"))
    assert (creds.tenant, creds.username, creds.password) == ("t1", "admin", "pa:ss/word")
    bare = parse_basic(basic("admin:pw"))
    assert bare.tenant is None and bare.username == "admin"
    assert parse_basic(basic("t1/adm\u00efn:pw")).username == "adm\u00efn"
    assert parse_basic(basic(b"t1/adm\xefn:pw")).username == "adm\u00efn"  # latin-1 fallback
    assert "pw" not in repr(bare)


@pytest.mark.parametrize(
    "header",
    ["Bearer x", "Basic", "Basic !!!", basic("no-colon"), basic(":pw"), basic("/u:pw"),
     basic("t1/:pw"), "Basic " + "A" * 5000],
)  # fmt: skip
def test_parse_basic_refuses_with_a_challenge(header: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_basic(header)
    assert info.value.status == 401
    assert info.value.headers["WWW-Authenticate"].startswith("Basic realm=")


def test_failure_limiter_sliding_window() -> None:
    limiter = FailureLimiter(limit=3, window=60.0)
    assert not limiter.failure("k", 0.0)
    assert not limiter.failure("k", 10.0)
    assert limiter.retry_after("k", 10.0) == 0
    assert limiter.failure("k", 20.0)  # the third reaches the limit
    assert limiter.retry_after("k", 30.0) == pytest.approx(30.0)  # until t=0 leaves the window
    assert limiter.retry_after("k", 60.0) == 0  # one failure expired: below the limit again
    limiter.forgive("k")
    limiter.reset("other")
    assert limiter.retry_after("k", 61.0) == 0
    limiter.reset("k")
    assert limiter.retry_after("k", 61.0) == 0


def test_failure_limiter_memory_is_bounded() -> None:
    limiter = FailureLimiter(limit=2, window=10.0, max_keys=100)
    for i in range(1000):
        limiter.failure(f"addr-{i}", float(i))
    assert len(limiter) <= 100
    assert limiter.retry_after("addr-999", 999.0) == 0
    limiter.failure("addr-999", 999.5)
    assert limiter.retry_after("addr-999", 999.5) > 0


def test_principal_roles_and_tenants() -> None:
    admin = Principal("t1", "a", frozenset({ROLE_TENANT_ADMIN}))
    reader = Principal("t1", "r", frozenset({ROLE_MANAGEMENT_READ}))
    operator = Principal("management", "ops", frozenset({ROLE_MANAGEMENT_ADMIN}))
    tenant_mgmt = Principal("t2", "m", frozenset({ROLE_MANAGEMENT_ADMIN}))
    assert admin.can_write and admin.can_read and not admin.is_operator
    assert reader.can_read and not reader.can_write
    assert admin.may_access("t1") and not admin.may_access("t2")
    assert operator.is_operator and operator.may_access("t2")
    assert not tenant_mgmt.is_operator and not tenant_mgmt.may_access("t1")
    assert operator.actor("t1") == "management/ops" and admin.actor("t1") == "a"


def test_paging_and_links() -> None:
    paging = jm.parse_paging({"pageSize": "2", "currentPage": "2", "withTotalPages": "true"})
    assert (paging.page.page_size, paging.page.current_page) == (2, 2)
    assert jm.parse_paging({"pageSize": "5000"}).page.page_size == jm.MAX_PAGE_SIZE
    for bad in (
        {"pageSize": "0"},
        {"pageSize": "-1"},
        {"currentPage": "x"},
        {"withTotalPages": "maybe"},
    ):
        with pytest.raises(jm.InputError):
            jm.parse_paging(bad)
    items = list(range(5))
    page = jm.page_slice(items, paging.page)
    body = jm.collection(
        "n", page, lambda i: {"i": i}, URL("https://h/x?pageSize=9&q=1"), paging, len(items)
    )
    assert body["n"] == [{"i": 2}, {"i": 3}]
    assert body["statistics"] == {"currentPage": 2, "pageSize": 2, "totalPages": 3}
    assert body["self"] == "https://h/x?pageSize=2&q=1&currentPage=2"
    assert "currentPage=3" in body["next"] and "currentPage=1" in body["prev"]


def test_trusted_certificate_input_ignores_read_only_fields() -> None:
    value = jm.trusted_certificate_input(
        {"name": "n", "fingerprint": "x", "status": "disabled", "certInPemFormat": "ignored"},
        create=False,
    )
    assert value == jm.TrustedCertificateInput(name="n", status=jm.Status.DISABLED)
    with pytest.raises(jm.InputError) as info:
        jm.trusted_certificate_input({"name": "n"}, create=True)
    assert info.value.field == "certInPemFormat"
    assert jm.iso(jm.parse_time("2024-01-17T10:48:51Z", "t")) == "2024-01-17T10:48:51.000Z"
