"""Durable state behind one interface (:class:`gateway.store.base.Store`).

:func:`open_store` picks the implementation from a URL: ``sqlite:///path.db``
(embedded default) or ``redis://host:port/db`` (several gateway instances).
"""

from __future__ import annotations

from gateway.store.base import Store, StoreError


def open_store(url: str) -> Store:
    """An (unopened) store for ``url``; call ``await store.open()`` next."""
    if url.startswith("sqlite:"):
        from gateway.store.sqlite import from_url

        return from_url(url)
    if url.startswith(("redis://", "rediss://")):
        try:
            from gateway.store.redis import RedisStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise StoreError("the Redis store is not available in this build") from None
        store: Store = RedisStore(url)
        return store
    raise StoreError(
        f"unsupported store URL {url!r}: use sqlite:///path.db or redis://host:port/db"
    )
