"""Choosing and opening the store the configuration names."""

from __future__ import annotations

from broker.config import BrokerConfig
from broker.store.base import Store
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore


def create_store(config: BrokerConfig) -> Store:
    """The configured store, not opened yet."""
    settings = config.store
    if settings.backend == "postgres":
        return PostgresStore(settings.postgres_dsn, settings.postgres_pool_size)
    return SqliteStore(config.sqlite_file)


async def open_store(config: BrokerConfig) -> Store:
    """The configured store, opened and migrated. Raises StoreError."""
    store = create_store(config)
    await store.open()
    return store
