"""Tests for protocols.mqtt.topics: validation, matching and tenant mount points."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from protocols.mqtt.topics import (
    TenantIdError,
    TopicError,
    from_backend_client_id,
    from_backend_topic,
    parse_shared_subscription,
    split_backend_client_id,
    to_backend_client_id,
    to_backend_filter,
    to_backend_topic,
    topic_matches,
    validate_tenant_id,
    validate_topic_filter,
    validate_topic_name,
)

# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

# Mix in tenants that are prefixes of each other to exercise the boundaries.
tenants = st.one_of(
    st.sampled_from(["a", "ab", "a-b", "A", "a_", "b"]),
    st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
)
_level_chars = st.characters(exclude_characters="/+#\x00", codec="utf-8")
levels = st.text(_level_chars, max_size=6)
# Small alphabet so that filters and topics actually overlap.
small_levels = st.sampled_from(["", "a", "b", "sensor", "é", "$x"])


def _topic_from(parts: list[str]) -> str:
    return "/".join(parts)


topics = (
    st.lists(levels, min_size=1, max_size=5)
    .map(_topic_from)
    .filter(lambda t: t != "" and not t.startswith("$"))
)
small_topics = (
    st.lists(small_levels, min_size=1, max_size=4)
    .map(_topic_from)
    .filter(lambda t: t != "" and not t.startswith("$"))
)


@st.composite
def _filters(draw: st.DrawFn, level_strategy: st.SearchStrategy[str]) -> str:
    parts = draw(st.lists(st.one_of(level_strategy, st.just("+")), min_size=0, max_size=4))
    if draw(st.booleans()) or not parts:
        parts.append("#")
    return "/".join(parts)


filters = _filters(levels).filter(lambda f: f != "" and not f.startswith("$"))
small_filters = _filters(small_levels).filter(lambda f: f != "" and not f.startswith("$"))
share_groups = st.text(
    st.characters(exclude_characters="/+#\x00", codec="utf-8"), min_size=1, max_size=8
)
any_filters = st.one_of(
    filters, st.tuples(share_groups, filters).map(lambda gf: f"$share/{gf[0]}/{gf[1]}")
)
client_ids = st.text(
    st.characters(exclude_characters="\x00", codec="utf-8"), min_size=1, max_size=20
)

# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["a", "a/b", "/", "/a", "a/", "a//b", "$SYS/x", "é/ü", " "])
def test_valid_topic_names(topic: str) -> None:
    validate_topic_name(topic)


@pytest.mark.parametrize(
    "topic", ["", "a/+", "#", "a/#", "sport+", "a\x00b", "x" * 65536, "\ud800"]
)
def test_invalid_topic_names(topic: str) -> None:
    with pytest.raises(TopicError):
        validate_topic_name(topic)


def test_topic_name_length_counts_utf8_bytes() -> None:
    validate_topic_name("x" * 65535)
    with pytest.raises(TopicError, match="65535"):
        validate_topic_name("é" * 32768)  # 65536 bytes


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "+/+", "a/#", "a/+/b", "/#", "+/", "/+", "a//#", "$share/g/#", "$share/g/a/+"],
)
def test_valid_filters(topic_filter: str) -> None:
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "",
        "a#",
        "a/#/b",
        "#/",
        "a/b#",
        "a+",
        "+a/b",
        "a/++",
        "a\x00",
        "$share/",
        "$share/g",
        "$share/g/",
        "$share//a",
        "$share/g+/a",
        "$share/g#/a",
        "$share/g/a#",
    ],
)
def test_invalid_filters(topic_filter: str) -> None:
    with pytest.raises(TopicError):
        validate_topic_filter(topic_filter)


def test_errors_are_value_errors() -> None:
    assert issubclass(TopicError, ValueError)
    assert issubclass(TenantIdError, ValueError)


def test_parse_shared_subscription() -> None:
    assert parse_shared_subscription("$share/grp/a/b") == ("grp", "a/b")
    assert parse_shared_subscription("a/b") is None
    assert parse_shared_subscription("$sharex/g/a") is None


@pytest.mark.parametrize("tenant", ["a", "A-b_9", "x" * 64])
def test_valid_tenants(tenant: str) -> None:
    validate_tenant_id(tenant)


@pytest.mark.parametrize(
    "tenant", ["", "x" * 65, "a/b", "a:b", "a.b", "a+", "#", "$SYS", "é", "a\n"]
)
def test_invalid_tenants(tenant: str) -> None:
    with pytest.raises(TenantIdError):
        validate_tenant_id(tenant)
    with pytest.raises(TenantIdError):
        to_backend_topic(tenant, "t")


# --------------------------------------------------------------------------
# Matching (§4.7 examples)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "a/b/c", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/b/c", False),
        ("#", "$SYS/x", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("$share/g/a/+", "a/b", True),
        ("$share/g/a/+", "a/b/c", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_topic_matches_rejects_invalid_input() -> None:
    with pytest.raises(TopicError):
        topic_matches("a/#/b", "a/x/b")
    with pytest.raises(TopicError):
        topic_matches("a/+", "a/+")


# --------------------------------------------------------------------------
# Mount points
# --------------------------------------------------------------------------


def test_mount_examples() -> None:
    assert to_backend_topic("acme", "dev/1/temp") == "acme/dev/1/temp"
    assert to_backend_topic("acme", "/leading") == "acme//leading"
    assert from_backend_topic("acme", "acme//leading") == "/leading"
    assert to_backend_filter("acme", "#") == "acme/#"
    assert to_backend_filter("acme", "+/x") == "acme/+/x"
    assert to_backend_filter("acme", "/#") == "acme//#"
    assert to_backend_filter("acme", "$share/grp/a/#") == "$share/acme.grp/acme/a/#"
    assert to_backend_client_id("acme", "dev-1") == "acme:dev-1"
    assert from_backend_client_id("acme", "acme:dev-1") == "dev-1"
    assert split_backend_client_id("acme:a:b") == ("acme", "a:b")


@pytest.mark.parametrize("topic", ["$SYS/broker/uptime", "$foo", "$share/g/x"])
def test_system_topics_refused(topic: str) -> None:
    with pytest.raises(TopicError, match=r"\$"):
        to_backend_topic("acme", topic)


@pytest.mark.parametrize("topic_filter", ["$SYS/#", "$SYS/+/x", "$share/g/$SYS/#", "$x"])
def test_system_filters_refused(topic_filter: str) -> None:
    with pytest.raises(TopicError):
        to_backend_filter("acme", topic_filter)


def test_mount_refuses_invalid_topics_and_filters() -> None:
    with pytest.raises(TopicError):
        to_backend_topic("acme", "a/+")
    with pytest.raises(TopicError):
        to_backend_topic("acme", "")
    with pytest.raises(TopicError):
        to_backend_filter("acme", "a/#/b")
    with pytest.raises(TopicError):
        to_backend_topic("acme", "x" * 65535)  # too long once mounted


@pytest.mark.parametrize(
    "backend_topic",
    [
        "acme",  # matched by "acme/#" (§4.7.1.2) but outside the namespace
        "acme/",
        "acmex/a",
        "other/acme/a",
        "acme/$SYS/x",
        "$SYS/acme/x",
        "ACME/a",
    ],
)
def test_from_backend_outside_namespace(backend_topic: str) -> None:
    assert from_backend_topic("acme", backend_topic) is None


def test_client_id_mounting() -> None:
    # Tenant ids cannot contain ':', so these two cannot collide.
    assert to_backend_client_id("a", "b:c") == "a:b:c"
    with pytest.raises(TenantIdError):
        to_backend_client_id("a:b", "c")
    with pytest.raises(TopicError):
        to_backend_client_id("a", "")
    with pytest.raises(TopicError):
        to_backend_client_id("a", "x\x00")
    assert from_backend_client_id("b", "a:c") is None
    assert split_backend_client_id("nocolon") is None
    assert split_backend_client_id("a.b:c") is None
    assert split_backend_client_id("a:") is None


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@settings(max_examples=200)
@given(tenants, topics)
def test_topic_mount_round_trip(tenant: str, topic: str) -> None:
    backend = to_backend_topic(tenant, topic)
    assert from_backend_topic(tenant, backend) == topic


@settings(max_examples=200)
@given(tenants, tenants, topics)
def test_topic_never_unmounts_under_other_tenant(a: str, b: str, topic: str) -> None:
    assume(a != b)
    assert from_backend_topic(b, to_backend_topic(a, topic)) is None


@settings(max_examples=300)
@given(tenants, tenants, any_filters, topics)
def test_filter_of_one_tenant_never_matches_topic_of_another(
    a: str, b: str, topic_filter: str, topic: str
) -> None:
    assume(a != b)
    assert not topic_matches(to_backend_filter(a, topic_filter), to_backend_topic(b, topic))


@settings(max_examples=300)
@given(tenants, tenants, small_filters, small_topics)
def test_mounting_preserves_matching(a: str, b: str, topic_filter: str, topic: str) -> None:
    expected = topic_matches(topic_filter, topic)
    assert topic_matches(to_backend_filter(a, topic_filter), to_backend_topic(a, topic)) is expected
    if a != b:
        assert not topic_matches(to_backend_filter(a, topic_filter), to_backend_topic(b, topic))


@settings(max_examples=200)
@given(tenants, share_groups, small_filters, small_topics)
def test_shared_mount_preserves_matching(
    tenant: str, group: str, topic_filter: str, topic: str
) -> None:
    backend_filter = to_backend_filter(tenant, f"$share/{group}/{topic_filter}")
    parsed = parse_shared_subscription(backend_filter)
    assert parsed is not None
    assert parsed[0] == f"{tenant}.{group}"
    validate_topic_filter(backend_filter)
    assert topic_matches(backend_filter, to_backend_topic(tenant, topic)) is topic_matches(
        topic_filter, topic
    )


@settings(max_examples=200)
@given(tenants, tenants, share_groups, share_groups, filters)
def test_share_groups_never_mix(a: str, b: str, ga: str, gb: str, topic_filter: str) -> None:
    assume((a, ga) != (b, gb))
    group_a = parse_shared_subscription(to_backend_filter(a, f"$share/{ga}/{topic_filter}"))
    group_b = parse_shared_subscription(to_backend_filter(b, f"$share/{gb}/{topic_filter}"))
    assert group_a is not None and group_b is not None
    assert group_a[0] != group_b[0]


@settings(max_examples=200)
@given(tenants, filters)
def test_mounted_filters_are_valid(tenant: str, topic_filter: str) -> None:
    validate_topic_filter(to_backend_filter(tenant, topic_filter))


@settings(max_examples=200)
@given(tenants, tenants, client_ids, client_ids)
def test_client_id_mount_is_injective(a: str, b: str, ca: str, cb: str) -> None:
    ida = to_backend_client_id(a, ca)
    assert from_backend_client_id(a, ida) == ca
    assert split_backend_client_id(ida) == (a, ca)
    if (a, ca) != (b, cb):
        assert ida != to_backend_client_id(b, cb)
    if a != b:
        assert from_backend_client_id(b, ida) is None
