"""The LWM2M registration interface, sans-IO (OMA LwM2M 1.1 Core §6.2 and
Transport §6.2.1): Register, Update and De-register, and the registry of
registered endpoints with lifetime expiry.

``RegistrationRegistry.handle(request, client, now)`` takes a decoded CoAP
request from an authenticated :class:`Client` and returns the CoAP response
plus what changed. The rules the gateway adds:

* the ``ep`` query parameter must equal the certificate's Common Name (spec:
  "the device endpoint ID in the Common Name"), else 4.03 Forbidden; when ``ep``
  is omitted (allowed by LwM2M 1.1) the CN is used;
* a registration belongs to (tenant, endpoint): an Update or De-register from
  another identity gets 4.04, as if the id did not exist;
* registering again replaces the previous registration of that endpoint.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from aiocoap import Message
from aiocoap.numbers.codes import Code

from protocols.lwm2m.links import LinkFormatError, ObjectLink, parse_object_links

LINK_FORMAT = 40  # application/link-format (RFC 6690)
VERSIONS = ("1.0", "1.1", "1.2")
"""LwM2M enabler versions accepted in ``lwm2m=``."""
DEFAULT_LIFETIME = 86400  # LwM2M 1.1 Core §6.2.1 default of ``lt``
MAX_LIFETIME = 365 * 86400
BINDING_LETTERS = frozenset("UTSNQ")  # 1.0: U, UQ, S, SQ, US, UQS; 1.1: U, T, S, N (+Q)
_MAX_QUERY = 32

# Options a registration request may carry; any other critical option is
# refused with 4.02 (RFC 7252 §5.4.1).
_UNDERSTOOD_OPTIONS = frozenset(
    {
        3,  # Uri-Host
        7,  # Uri-Port
        11,  # Uri-Path
        12,  # Content-Format
        15,  # Uri-Query
        17,  # Accept
        23,  # Block2 (only ever block 0 of our tiny responses)
        28,  # Size2
        60,  # Size1
    }
)


@dataclass(frozen=True, slots=True)
class Client:
    """Who sent a request: the identity of its DTLS session."""

    tenant: str
    endpoint: str
    """The certificate's Common Name (the device id)."""
    session: Hashable
    """The session the request arrived on (server-initiated requests use it)."""


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered LWM2M endpoint."""

    id: str
    tenant: str
    endpoint: str
    lifetime: int
    """Seconds; the registration expires ``lifetime`` after its last update."""
    version: str
    binding: str
    queue_mode: bool
    objects: tuple[ObjectLink, ...]
    registered_at: datetime
    updated_at: datetime
    session: Hashable | None
    """The DTLS session of the last Register/Update; None once it closed."""
    sms: str | None = None

    @property
    def expires_at(self) -> datetime:
        return self.updated_at + timedelta(seconds=self.lifetime)

    @property
    def location(self) -> str:
        return f"/rd/{self.id}"


@dataclass(frozen=True, slots=True)
class Registered:
    registration: Registration
    replaced: Registration | None = None


@dataclass(frozen=True, slots=True)
class Updated:
    registration: Registration


@dataclass(frozen=True, slots=True)
class Deregistered:
    registration: Registration


Outcome = Registered | Updated | Deregistered


class _Refused(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_response(code: Code, diagnostic: str) -> Message:
    """An error response with a diagnostic payload (RFC 7252 §5.5.2)."""
    return Message(code=code, payload=diagnostic.encode("utf-8")[:128])


class RegistrationRegistry:
    """Registered endpoints by (tenant, endpoint), by id and by session."""

    def __init__(
        self,
        *,
        max_registrations: int = 100_000,
        new_id: Callable[[], str] = lambda: secrets.token_hex(5),
    ) -> None:
        self.max_registrations = max_registrations
        self._new_id = new_id
        self._by_id: dict[str, Registration] = {}
        self._by_endpoint: dict[tuple[str, str], str] = {}
        self._by_session: dict[Hashable, set[str]] = {}
        self._expiry: list[tuple[datetime, int, str]] = []
        self._tie = itertools.count()

    def __len__(self) -> int:
        return len(self._by_id)

    # the interface ----------------------------------------------------------------------
    def handle(
        self, request: Message, client: Client, now: datetime
    ) -> tuple[Message, Outcome | None]:
        """Answer one registration-interface request."""
        try:
            return self._dispatch(request, client, now)
        except _Refused as exc:
            return error_response(exc.code, str(exc)), None

    def _dispatch(
        self, request: Message, client: Client, now: datetime
    ) -> tuple[Message, Outcome | None]:
        for option in request.opt.option_list():
            number = int(option.number)
            if number in (35, 39):  # Proxy-Uri, Proxy-Scheme
                raise _Refused(Code.PROXYING_NOT_SUPPORTED, "this is not a proxy")
            if option.number.is_critical() and number not in _UNDERSTOOD_OPTIONS:
                raise _Refused(Code.BAD_OPTION, f"option {number} is not supported")
        path = tuple(request.opt.uri_path)
        if path == ("rd",):
            if request.code != Code.POST:
                raise _Refused(Code.METHOD_NOT_ALLOWED, "use POST /rd to register")
            return self._register(request, client, now)
        if len(path) == 2 and path[0] == "rd":
            if request.code == Code.POST:
                return self._update(path[1], request, client, now)
            if request.code == Code.DELETE:
                return self._deregister(path[1], client)
            raise _Refused(Code.METHOD_NOT_ALLOWED, "use POST (update) or DELETE")
        raise _Refused(Code.NOT_FOUND, "unknown resource")

    def _register(
        self, request: Message, client: Client, now: datetime
    ) -> tuple[Message, Outcome | None]:
        query = _query(request)
        endpoint = query.get("ep") or client.endpoint
        if endpoint != client.endpoint:
            raise _Refused(Code.FORBIDDEN, "ep must equal the certificate's Common Name")
        version = query.get("lwm2m") or "1.0"
        if version not in VERSIONS:
            raise _Refused(Code.PRECONDITION_FAILED, f"LwM2M version {version} not supported")
        lifetime = _lifetime(query.get("lt"), DEFAULT_LIFETIME)
        binding = _binding(query.get("b"), "U")
        objects = _objects(request)
        key = (client.tenant, client.endpoint)
        previous_id = self._by_endpoint.get(key)
        previous = self._by_id.get(previous_id) if previous_id else None
        if previous is None and len(self._by_id) >= self.max_registrations:
            raise _Refused(Code.SERVICE_UNAVAILABLE, "registration capacity reached")
        if previous is not None:
            self._remove(previous)
        reg = Registration(
            id=self._unique_id(),
            tenant=client.tenant,
            endpoint=client.endpoint,
            lifetime=lifetime,
            version=version,
            binding=binding,
            queue_mode="Q" in query or "Q" in binding,
            objects=objects,
            registered_at=now,
            updated_at=now,
            session=client.session,
            sms=query.get("sms") or None,
        )
        self._store(reg)
        return Message(code=Code.CREATED, location_path=("rd", reg.id)), Registered(reg, previous)

    def _update(
        self, reg_id: str, request: Message, client: Client, now: datetime
    ) -> tuple[Message, Outcome | None]:
        reg = self._owned(reg_id, client)
        query = _query(request)
        changes: dict[str, object] = {"updated_at": now, "session": client.session}
        if "lt" in query:
            changes["lifetime"] = _lifetime(query["lt"], reg.lifetime)
        if "b" in query:
            changes["binding"] = _binding(query["b"], reg.binding)
        if "sms" in query:
            changes["sms"] = query["sms"] or None
        if "Q" in query:
            changes["queue_mode"] = True
        if request.payload:
            changes["objects"] = _objects(request)
        updated = replace(reg, **changes)  # type: ignore[arg-type]
        self._store(updated)
        return Message(code=Code.CHANGED), Updated(updated)

    def _deregister(self, reg_id: str, client: Client) -> tuple[Message, Outcome | None]:
        reg = self._owned(reg_id, client)
        self._remove(reg)
        return Message(code=Code.DELETED), Deregistered(reg)

    def _owned(self, reg_id: str, client: Client) -> Registration:
        reg = self._by_id.get(reg_id)
        if reg is None or (reg.tenant, reg.endpoint) != (client.tenant, client.endpoint):
            raise _Refused(Code.NOT_FOUND, "no such registration")
        return reg

    # expiry and sessions --------------------------------------------------------------
    def expire(self, now: datetime) -> list[Registration]:
        """Remove and return registrations whose lifetime has passed."""
        gone: list[Registration] = []
        while self._expiry and self._expiry[0][0] <= now:
            when, _, reg_id = heapq.heappop(self._expiry)
            reg = self._by_id.get(reg_id)
            if reg is None or reg.expires_at != when:
                continue  # stale entry: removed or updated since
            self._remove(reg)
            gone.append(reg)
        return gone

    def next_expiry(self) -> datetime | None:
        while self._expiry:
            when, _, reg_id = self._expiry[0]
            reg = self._by_id.get(reg_id)
            if reg is not None and reg.expires_at == when:
                return when
            heapq.heappop(self._expiry)
        return None

    def detach(self, session: Hashable) -> list[Registration]:
        """The session closed: its registrations stay (until Update or expiry) but
        are unreachable."""
        out = []
        for reg_id in self._by_session.pop(session, set()):
            reg = self._by_id.get(reg_id)
            if reg is not None:
                detached = replace(reg, session=None)
                self._by_id[reg_id] = detached
                out.append(detached)
        return out

    def remove_endpoint(self, tenant: str, endpoint: str) -> Registration | None:
        """Forget an endpoint (its device was revoked or disabled)."""
        reg_id = self._by_endpoint.get((tenant, endpoint))
        reg = self._by_id.get(reg_id) if reg_id else None
        if reg is not None:
            self._remove(reg)
        return reg

    # reads ------------------------------------------------------------------------------
    def get(self, tenant: str, endpoint: str) -> Registration | None:
        reg_id = self._by_endpoint.get((tenant, endpoint))
        return self._by_id.get(reg_id) if reg_id else None

    def by_id(self, reg_id: str) -> Registration | None:
        return self._by_id.get(reg_id)

    def registrations(self, tenant: str | None = None) -> list[Registration]:
        regs = [r for r in self._by_id.values() if tenant is None or r.tenant == tenant]
        return sorted(regs, key=lambda r: (r.tenant, r.endpoint))

    # internals --------------------------------------------------------------------------
    def _store(self, reg: Registration) -> None:
        old = self._by_id.get(reg.id)
        if old is not None and old.session != reg.session:
            self._unlink_session(old)
        self._by_id[reg.id] = reg
        if reg.session is not None:
            self._by_session.setdefault(reg.session, set()).add(reg.id)
        self._by_endpoint[(reg.tenant, reg.endpoint)] = reg.id
        heapq.heappush(self._expiry, (reg.expires_at, next(self._tie), reg.id))
        if len(self._expiry) > 2 * len(self._by_id) + 64:
            # Updates leave stale entries behind: rebuild to keep the heap bounded.
            self._expiry = [(r.expires_at, next(self._tie), r.id) for r in self._by_id.values()]
            heapq.heapify(self._expiry)

    def _remove(self, reg: Registration) -> None:
        current = self._by_id.pop(reg.id, None)
        if current is not None:
            self._unlink_session(current)
        if self._by_endpoint.get((reg.tenant, reg.endpoint)) == reg.id:
            del self._by_endpoint[(reg.tenant, reg.endpoint)]

    def _unlink_session(self, reg: Registration) -> None:
        ids = self._by_session.get(reg.session) if reg.session is not None else None
        if ids is not None:
            ids.discard(reg.id)
            if not ids:
                del self._by_session[reg.session]

    def _unique_id(self) -> str:
        while True:
            reg_id = self._new_id()
            if reg_id not in self._by_id:
                return reg_id


def _query(request: Message) -> dict[str, str]:
    items = tuple(request.opt.uri_query)
    if len(items) > _MAX_QUERY:
        raise _Refused(Code.BAD_REQUEST, "too many query parameters")
    out: dict[str, str] = {}
    for item in items:
        key, _, value = str(item).partition("=")
        if key in out:
            raise _Refused(Code.BAD_REQUEST, f"parameter {key} given twice")
        out[key] = value
    return out


def _lifetime(text: str | None, default: int) -> int:
    if text is None:
        return default
    if not (text.isdigit() and text.isascii()) or not 1 <= int(text) <= MAX_LIFETIME:
        raise _Refused(Code.BAD_REQUEST, f"lt must be 1..{MAX_LIFETIME} seconds")
    return int(text)


def _binding(text: str | None, default: str) -> str:
    if text is None:
        return default
    if not text or not set(text) <= BINDING_LETTERS or len(text) > len(BINDING_LETTERS):
        raise _Refused(Code.BAD_REQUEST, "b must be made of U, T, S, N, Q")
    return text


def _objects(request: Message) -> tuple[ObjectLink, ...]:
    fmt = request.opt.content_format
    if fmt is not None and int(fmt) != LINK_FORMAT:
        raise _Refused(Code.UNSUPPORTED_CONTENT_FORMAT, "the object list must be link format")
    try:
        return parse_object_links(request.payload)
    except LinkFormatError as exc:
        raise _Refused(Code.BAD_REQUEST, str(exc)) from None
