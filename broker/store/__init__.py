"""The message store: every durable message, kept for history beyond the streams.

One narrow interface (``Store``) with two backends: SQLite (embedded, one
file, the default) and PostgreSQL (for several broker replicas). Modules:
``message`` (what is stored), ``channel`` (what a page is read from),
``cursor`` (opaque paging positions), ``base`` (the interface), ``sql`` (the
queries both run), ``sqlite`` and ``postgres`` (the backends), ``factory``.
"""

from broker.store.base import Page, Store, StoreError
from broker.store.channel import GLOBAL_CHANNEL, Channel, ChannelKind
from broker.store.cursor import Cursor, CursorError, decode_cursor, encode_cursor
from broker.store.factory import create_store, open_store
from broker.store.message import StoredMessage, parse_epoch
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore

__all__ = [
    "GLOBAL_CHANNEL",
    "Channel",
    "ChannelKind",
    "Cursor",
    "CursorError",
    "Page",
    "PostgresStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoredMessage",
    "create_store",
    "decode_cursor",
    "encode_cursor",
    "open_store",
    "parse_epoch",
]
