"""The object list of a Register/Update: CoRE link format (RFC 6690) naming
LWM2M objects and instances, e.g. ``</>;rt="oma.lwm2m",</1/0>,</3/0>;ver=1.1``.

aiocoap's link-format parser reads the syntax; this module applies the LWM2M
rules (LwM2M 1.1 Transport §6.2.1: an optional alternate root path marked
``rt="oma.lwm2m"``, then ``/object`` or ``/object/instance`` links).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiocoap.util import linkformat

MAX_PAYLOAD = 16 * 1024
"""Largest object list accepted (bytes)."""
MAX_LINKS = 1024
"""Most links accepted in one object list."""
_MAX_ID = 65535  # object and instance ids are 16-bit (LwM2M 1.1 Core §7)


@dataclass(frozen=True, slots=True)
class ObjectLink:
    """One object (``instance`` None) or object instance the client hosts."""

    object_id: int
    instance_id: int | None = None
    attributes: tuple[tuple[str, str | None], ...] = ()
    """Link attributes other than the path, e.g. ``(("ver", "1.1"),)``."""

    @property
    def path(self) -> str:
        if self.instance_id is None:
            return f"/{self.object_id}"
        return f"/{self.object_id}/{self.instance_id}"


class LinkFormatError(ValueError):
    """The object list is not valid link format or names no LWM2M objects."""


def parse_object_links(payload: bytes) -> tuple[ObjectLink, ...]:
    """Parse a Register/Update payload; raises :class:`LinkFormatError`."""
    if len(payload) > MAX_PAYLOAD:
        raise LinkFormatError(f"object list larger than {MAX_PAYLOAD} bytes")
    if not payload.strip():
        return ()
    try:
        text = payload.decode("utf-8")
        parsed = linkformat.parse(text)
    except Exception as exc:  # UnicodeDecodeError, the parser's own errors
        raise LinkFormatError(f"not link format: {exc.__class__.__name__}") from None
    if len(parsed.links) > MAX_LINKS:
        raise LinkFormatError(f"more than {MAX_LINKS} links")
    root = ""
    links: list[ObjectLink] = []
    for link in parsed.links:
        href = str(link.href)
        attrs = tuple((str(k), None if v is None else str(v)) for k, v in link.attr_pairs)
        if any(k == "rt" and v == "oma.lwm2m" for k, v in attrs):
            root = href.rstrip("/")  # the alternate root path; "" for "</>"
            continue
        links.append(_object_link(href, root, attrs))
    return tuple(links)


def _object_link(href: str, root: str, attrs: tuple[tuple[str, str | None], ...]) -> ObjectLink:
    if not href.startswith(root + "/"):
        raise LinkFormatError(f"link {href!r} is outside the LWM2M root {root or '/'!r}")
    parts = href[len(root) + 1 :].split("/")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() and p.isascii() for p in parts):
        raise LinkFormatError(f"link {href!r} is not /object or /object/instance")
    ids = [int(p) for p in parts]
    if any(i > _MAX_ID for i in ids):
        raise LinkFormatError(f"link {href!r}: ids are 0..{_MAX_ID}")
    return ObjectLink(ids[0], ids[1] if len(ids) == 2 else None, attrs)


def format_object_links(links: tuple[ObjectLink, ...]) -> str:
    """The canonical link-format text of an object list (for listings)."""
    out = []
    for link in links:
        attrs = "".join(f";{k}" if v is None else f';{k}="{v}"' for k, v in link.attributes)
        out.append(f"<{link.path}>{attrs}")
    return ",".join(out)
