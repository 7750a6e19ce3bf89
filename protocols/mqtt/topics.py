"""Topic validation and matching, and per-tenant namespacing (mount points).

One backend broker serves every tenant, so everything a device names is
rewritten under a per-tenant mount point before it reaches the broker:

* topic ``t``                   -> ``<tenant>/t`` (``/t`` -> ``<tenant>//t``)
* filter ``f``                  -> ``<tenant>/f`` (``#`` -> ``<tenant>/#``)
* shared ``$share/<g>/<f>``     -> ``$share/<tenant>.<g>/<tenant>/<f>``
* client id ``c``               -> ``<tenant>:c``

Tenant ids match ``[A-Za-z0-9_-]{1,64}``: they contain no ``/``, ``+``,
``#``, ``.``, ``:`` or ``$``, which is what makes each mapping injective (the
first ``/``, ``.`` or ``:`` always ends the tenant id) and keeps a tenant's
filters from ever matching another tenant's topics. Device topics and filters
starting with ``$`` (``$SYS/#`` ...) are refused, so devices never reach the
broker's system topics. Messages coming back from the broker must go through
:func:`from_backend_topic`; a ``None`` result means the message is outside the
tenant's namespace (e.g. the bare ``<tenant>`` topic, which ``<tenant>/#``
matches per §4.7.1.2) and must not be delivered.

Section numbers refer to the MQTT 5.0 standard (the rules are the same in 3.1.1).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "MAX_TOPIC_BYTES",
    "SHARE_PREFIX",
    "TenantIdError",
    "TopicError",
    "from_backend_client_id",
    "from_backend_topic",
    "parse_shared_subscription",
    "split_backend_client_id",
    "to_backend_client_id",
    "to_backend_filter",
    "to_backend_topic",
    "topic_matches",
    "validate_client_id",
    "validate_tenant_id",
    "validate_topic_filter",
    "validate_topic_name",
]

MAX_TOPIC_BYTES: Final = 65535
"""UTF-8 strings are length-prefixed with two bytes (§1.5.4)."""
SHARE_PREFIX: Final = "$share/"

_TENANT_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


class TopicError(ValueError):
    """Invalid or forbidden topic name, topic filter or client identifier."""


class TenantIdError(ValueError):
    """Tenant id not matching ``[A-Za-z0-9_-]{1,64}``."""


def validate_tenant_id(tenant: str) -> None:
    """Raise :class:`TenantIdError` unless ``tenant`` is a valid tenant id."""
    if not _TENANT_RE.fullmatch(tenant):
        raise TenantIdError(f"invalid tenant id {tenant!r}: must match [A-Za-z0-9_-]{{1,64}}")


def _check_string(value: str, what: str) -> None:
    if not value:  # §4.7.3 [MQTT-4.7.3-1]
        raise TopicError(f"{what} must not be empty")
    if "\x00" in value:  # §1.5.4 [MQTT-1.5.4-2]
        raise TopicError(f"{what} must not contain U+0000")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise TopicError(f"{what} is not valid UTF-8 (lone surrogate)") from None
    if size > MAX_TOPIC_BYTES:  # [MQTT-4.7.3-3]
        raise TopicError(f"{what} longer than {MAX_TOPIC_BYTES} bytes")


def validate_topic_name(topic: str) -> None:
    """Check a PUBLISH topic name: non-empty, no wildcards, <= 65535 bytes, no U+0000."""
    _check_string(topic, "topic name")
    if "+" in topic or "#" in topic:  # §4.7.1 [MQTT-3.3.2-2]
        raise TopicError(f"topic name {topic!r} must not contain wildcards")


def _check_filter_levels(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):  # §4.7.1.2 [MQTT-4.7.1-1]
            raise TopicError(f"'#' must be a whole last level in {topic_filter!r}")
        if "+" in level and level != "+":  # §4.7.1.3 [MQTT-4.7.1-2]
            raise TopicError(f"'+' must be a whole level in {topic_filter!r}")


def parse_shared_subscription(topic_filter: str) -> tuple[str, str] | None:
    """Split ``$share/<group>/<filter>`` into ``(group, filter)``; ``None`` if not shared.

    Raises :class:`TopicError` for a malformed shared subscription (§4.8.2):
    empty group, group with ``/``, ``+`` or ``#``, or empty/invalid filter.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, sep, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not sep or not group or "+" in group or "#" in group:  # [MQTT-4.8.2-1], [MQTT-4.8.2-2]
        raise TopicError(f"invalid shared subscription {topic_filter!r}")
    if not inner:
        raise TopicError(f"shared subscription {topic_filter!r} has no topic filter")
    _check_filter_levels(inner)
    return group, inner


def validate_topic_filter(topic_filter: str) -> None:
    """Check a SUBSCRIBE/UNSUBSCRIBE topic filter, shared subscriptions included (§4.7, §4.8.2)."""
    _check_string(topic_filter, "topic filter")
    if parse_shared_subscription(topic_filter) is None:
        _check_filter_levels(topic_filter)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic_filter`` matches topic name ``topic`` (§4.7).

    A shared subscription matches like its inner filter. First-level wildcards
    do not match topics starting with ``$`` (§4.7.2 [MQTT-4.7.2-1]). Raises
    :class:`TopicError` if either argument is invalid.
    """
    validate_topic_filter(topic_filter)
    validate_topic_name(topic)
    shared = parse_shared_subscription(topic_filter)
    if shared is not None:
        topic_filter = shared[1]
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":  # also matches the parent level: "a/#" matches "a" (§4.7.1.2)
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


def _check_mounted_size(mounted: str, what: str) -> str:
    if len(mounted.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} too long once mounted under the tenant")
    return mounted


def _refuse_system(value: str, what: str) -> None:
    if value.startswith("$"):  # §4.7.2: reserved for the broker ($SYS/...)
        raise TopicError(f"{what} {value!r} starting with '$' is reserved")


def to_backend_topic(tenant: str, topic: str) -> str:
    """Mount a device topic name: ``t`` -> ``<tenant>/t``.

    Raises :class:`TopicError` for invalid names and names starting with ``$``.
    """
    validate_tenant_id(tenant)
    validate_topic_name(topic)
    _refuse_system(topic, "topic")
    return _check_mounted_size(f"{tenant}/{topic}", "topic")


def from_backend_topic(tenant: str, backend_topic: str) -> str | None:
    """Unmount a broker topic for ``tenant``; ``None`` if outside its namespace.

    ``None`` messages must never be delivered to the tenant's devices.
    """
    validate_tenant_id(tenant)
    prefix_len = len(tenant) + 1
    if backend_topic[:prefix_len] != f"{tenant}/":
        return None
    topic = backend_topic[prefix_len:]
    if not topic or topic.startswith("$") or "+" in topic or "#" in topic or "\x00" in topic:
        return None
    return topic


def to_backend_filter(tenant: str, topic_filter: str) -> str:
    """Mount a device topic filter.

    ``f`` -> ``<tenant>/f`` (``#`` -> ``<tenant>/#``, ``+/x`` -> ``<tenant>/+/x``);
    ``$share/<g>/<f>`` -> ``$share/<tenant>.<g>/<tenant>/<f>``, so share groups of
    different tenants never mix. Filters starting with ``$`` are refused.
    """
    validate_tenant_id(tenant)
    validate_topic_filter(topic_filter)
    shared = parse_shared_subscription(topic_filter)
    if shared is None:
        _refuse_system(topic_filter, "topic filter")
        return _check_mounted_size(f"{tenant}/{topic_filter}", "topic filter")
    group, inner = shared
    _refuse_system(inner, "topic filter")
    return _check_mounted_size(f"{SHARE_PREFIX}{tenant}.{group}/{tenant}/{inner}", "topic filter")


def validate_client_id(client_id: str) -> None:
    """Check a (non-empty) client identifier: no U+0000, encodable, <= 65535 bytes."""
    _check_string(client_id, "client identifier")


def to_backend_client_id(tenant: str, client_id: str) -> str:
    """Mount a client id: ``c`` -> ``<tenant>:c``.

    Injective across tenants because tenant ids cannot contain ``:`` (the first
    ``:`` ends the tenant). An empty id must be replaced by a server-assigned one
    before mounting.
    """
    validate_tenant_id(tenant)
    validate_client_id(client_id)
    return _check_mounted_size(f"{tenant}:{client_id}", "client identifier")


def split_backend_client_id(backend_client_id: str) -> tuple[str, str] | None:
    """Inverse of :func:`to_backend_client_id`: ``(tenant, client_id)`` or ``None``."""
    tenant, sep, client_id = backend_client_id.partition(":")
    if not sep or not client_id or not _TENANT_RE.fullmatch(tenant):
        return None
    return tenant, client_id


def from_backend_client_id(tenant: str, backend_client_id: str) -> str | None:
    """Client id of ``tenant`` behind ``backend_client_id``; ``None`` if another tenant's."""
    validate_tenant_id(tenant)
    split = split_backend_client_id(backend_client_id)
    if split is None or split[0] != tenant:
        return None
    return split[1]
