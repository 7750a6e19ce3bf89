"""The backend side of the MQTT front-end: a byte pipe to a broker.

The front-end never trusts the backend for identity: by the time a
connection is opened here, the device is authenticated and its CONNECT
rewritten into the tenant's namespace. A backend only moves bytes.
"""

from __future__ import annotations

from typing import Protocol


class BackendConnection(Protocol):
    """One device session's connection to the broker."""

    async def read(self) -> bytes:
        """Next chunk from the broker; ``b""`` once the broker closed."""

    def write(self, data: bytes) -> None:
        """Queue bytes for the broker."""

    async def drain(self) -> None:
        """Wait until the queued bytes were taken (back-pressure)."""

    def close(self) -> None:
        """Close without waiting (idempotent)."""


class Backend(Protocol):
    """A broker the gateway forwards authenticated sessions to."""

    name: str

    async def start(self) -> None:
        """Start (embedded) or check reachability (upstream)."""

    async def stop(self) -> None:
        """Stop; open connections are closed."""

    async def connect(self) -> BackendConnection:
        """Open a connection for one device session (raises OSError on failure)."""


class BackendPeer(Protocol):
    """The receiving end of a :class:`BackendLink`: callbacks, no tasks."""

    def backend_data(self, data: bytes) -> None:
        """Bytes from the broker."""

    def backend_lost(self) -> None:
        """The broker closed or the connection was lost (not called after ``close``)."""

    def backend_pause_writing(self) -> None:
        """The link's send buffer is full: stop feeding it."""

    def backend_resume_writing(self) -> None:
        """The link's send buffer drained again."""


class BackendLink(Protocol):
    """A callback-driven connection to the broker for one device session."""

    def write(self, data: bytes) -> None:
        """Queue bytes for the broker (no-op once closed)."""

    def pause_reading(self) -> None:
        """Stop delivering :meth:`BackendPeer.backend_data` until resumed."""

    def resume_reading(self) -> None:
        """Resume delivering data."""

    def close(self) -> None:
        """Close without waiting (idempotent, never raises)."""
