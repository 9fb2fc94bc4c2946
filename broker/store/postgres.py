"""The PostgreSQL store (asyncpg): the backend for more than one broker replica.

Every replica writes through its own small pool; idempotent inserts make
two replicas writing the same message (a redelivery after a handover) safe.
Schema migrations take a transaction-scoped advisory lock, so replicas
starting together migrate once, one after the other.

Give rtgate its own database, or its own schema through ``search_path``
(in the DSN: ``?options=-csearch_path%3Drtgate``): the tables are named
plainly (``messages``, ``schema_version``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from broker.store import sql
from broker.store.base import (
    Page,
    StoreError,
    check_cursor,
    check_limit,
    page_of,
    pending_migrations,
)
from broker.store.channel import Channel
from broker.store.cursor import Cursor
from broker.store.message import StoredMessage, parse_epoch

# Append only: entry i brings the schema to version i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # event is JSON, not JSONB: JSONB refuses "\u0000" inside strings,
        # which any client can send, and would reorder the event's keys.
        """CREATE TABLE messages (
            stream TEXT NOT NULL,
            epoch BIGINT NOT NULL,
            seq BIGINT NOT NULL,
            prev_seq BIGINT NOT NULL,
            subject TEXT NOT NULL,
            kind TEXT NOT NULL,
            room_id TEXT,
            from_user TEXT,
            to_user TEXT,
            event JSON NOT NULL,
            stored_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (stream, epoch, seq)
        )""",
        *sql.CHANNEL_INDEXES,
    ),
    sql.SUBJECT_INDEX,
)

_VERSION = "SELECT COALESCE(MAX(version), 0) FROM schema_version"

# Any constant works; it only has to be the same in every replica.
_MIGRATION_LOCK = 0x72746761746531  # "rtgate1"

_ARRAY_TYPES = (
    "text",
    "bigint",
    "bigint",
    "bigint",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "float8",
)
# A whole batch is one statement (one round trip, one transaction): each
# column travels as an array and unnest turns them back into rows.
_INSERT = (
    f"INSERT INTO messages ({', '.join(sql.COLUMNS)})"
    f" SELECT {', '.join('event::json' if c == 'event' else c for c in sql.COLUMNS)}"
    f" FROM unnest({', '.join(f'${i + 1}::{t}[]' for i, t in enumerate(_ARRAY_TYPES))})"
    f" AS m({', '.join(sql.COLUMNS)})"
    f" ON CONFLICT (stream, epoch, seq) DO NOTHING"
)

# What a lost or refused connection raises; wrapped so callers catch one type.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        pool_size: int = 4,
        *,
        server_settings: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._dsn = dsn
        self._pool_size = pool_size
        self._server_settings = dict(server_settings or {})
        self._connect_timeout = connect_timeout
        self._pool: Any = None

    async def open(self) -> None:
        if self._pool is not None:
            raise StoreError("the PostgreSQL store is already open")
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                server_settings=self._server_settings or None,
            )
        except Exception as exc:
            # Not the DSN itself: it may hold a password.
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    "version INTEGER PRIMARY KEY, "
                    "applied_at DOUBLE PRECISION NOT NULL)"
                )
                current = await conn.fetchval(_VERSION)
                for version, statements in pending_migrations(current, MIGRATIONS):
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                        version,
                        time.time(),
                    )
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                raise
            raise StoreError(f"cannot migrate the PostgreSQL schema: {exc}") from exc
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def write(self, messages: Sequence[StoredMessage]) -> int:
        if not messages:
            return 0
        columns = list(zip(*(sql.row_values(m) for m in messages), strict=True))
        try:
            status = await self._opened().execute(_INSERT, *columns)
        except _DB_ERRORS as exc:
            raise StoreError(f"PostgreSQL write failed: {exc}") from exc
        # "INSERT 0 <rows inserted>"; conflicts skipped do not count.
        return int(str(status).rsplit(" ", 1)[1])

    async def page(self, channel: Channel, cursor: Cursor | None, limit: int) -> Page:
        check_limit(limit)
        check_cursor(channel, cursor)
        statement, args = sql.page_statement(channel, cursor, limit + 1, sql.dollar)
        rows = await self._fetch(statement, args)
        return page_of(channel, [sql.message_from_row(tuple(row)) for row in rows], limit)

    async def persisted_up_to(self, stream: str, epoch: str) -> int:
        statement, args = sql.persisted_statement(stream, parse_epoch(epoch), sql.dollar)
        return int((await self._fetch(statement, args))[0][0])

    async def prev_on_subject(self, subject: str, epoch: str, seq: int) -> int:
        statement, args = sql.prev_statement(subject, parse_epoch(epoch), seq, sql.dollar)
        return int((await self._fetch(statement, args))[0][0])

    async def count(self, channel: Channel | None = None) -> int:
        statement, args = sql.count_statement(channel, sql.dollar)
        return int((await self._fetch(statement, args))[0][0])

    async def schema_version(self) -> int:
        return int((await self._fetch(_VERSION, []))[0][0])

    async def _fetch(self, statement: str, args: Sequence[Any]) -> list[Any]:
        try:
            rows: list[Any] = await self._opened().fetch(statement, *args)
        except _DB_ERRORS as exc:
            raise StoreError(f"PostgreSQL query failed: {exc}") from exc
        return rows

    def _opened(self) -> Any:
        if self._pool is None:
            raise StoreError("the PostgreSQL store is not open")
        return self._pool
