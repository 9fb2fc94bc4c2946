"""The SQLite store: one file in the state directory, the embedded default.

The stdlib driver blocks, so every call runs on one dedicated worker thread
that owns the connection: the event loop never waits on the disk, and one
thread means one writer, which is all SQLite allows anyway. WAL lets the
file be read (``sqlite3`` CLI, backups) while the broker writes.
``synchronous=NORMAL``: a commit survives the process being killed; only a
power cut or OS crash can lose the last transactions.

A call cancelled while its statement runs cannot stop the thread: the
transaction still finishes (or rolls back), which idempotent writes make
harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

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

T = TypeVar("T")

# Append only: entry i brings the schema to version i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE messages (
            stream TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            prev_seq INTEGER NOT NULL,
            subject TEXT NOT NULL,
            kind TEXT NOT NULL,
            room_id TEXT,
            from_user TEXT,
            to_user TEXT,
            event TEXT NOT NULL,
            stored_at REAL NOT NULL,
            PRIMARY KEY (stream, epoch, seq)
        )""",
        *sql.CHANNEL_INDEXES,
    ),
    sql.SUBJECT_INDEX,
)

# ON CONFLICT on the key only: INSERT OR IGNORE would also swallow a NOT NULL
# violation, silently dropping a message the broker then acks.
_INSERT = (
    f"INSERT INTO messages ({', '.join(sql.COLUMNS)})"
    f" VALUES ({', '.join(sql.question(i + 1) for i in range(len(sql.COLUMNS)))})"
    f" ON CONFLICT (stream, epoch, seq) DO NOTHING"
)


class SqliteStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._executor: ThreadPoolExecutor | None = None
        # Created, used and closed on the worker thread only.
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        if self._executor is not None:
            raise StoreError("the SQLite store is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtgate-sqlite")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except BaseException as exc:
            executor.shutdown(wait=False)
            if isinstance(exc, StoreError | asyncio.CancelledError):
                raise
            raise StoreError(f"cannot open the SQLite store {self.path}: {exc}") from exc
        self._executor, self._conn = executor, conn

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        self._executor = self._conn = None
        if executor is None or conn is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            executor.shutdown(wait=True)

    async def write(self, messages: Sequence[StoredMessage]) -> int:
        if not messages:
            return 0
        return await self._run(lambda conn: _write(conn, messages))

    async def page(self, channel: Channel, cursor: Cursor | None, limit: int) -> Page:
        check_limit(limit)
        check_cursor(channel, cursor)
        statement, args = sql.page_statement(channel, cursor, limit + 1, sql.question)

        def read(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(statement, args).fetchall()
            return page_of(channel, [sql.message_from_row(row) for row in rows], limit)

        return await self._run(read)

    async def persisted_up_to(self, stream: str, epoch: str) -> int:
        statement, args = sql.persisted_statement(stream, parse_epoch(epoch), sql.question)
        return await self._run(lambda conn: int(conn.execute(statement, args).fetchone()[0]))

    async def prev_on_subject(self, subject: str, epoch: str, seq: int) -> int:
        statement, args = sql.prev_statement(subject, parse_epoch(epoch), seq, sql.question)
        return await self._run(lambda conn: int(conn.execute(statement, args).fetchone()[0]))

    async def count(self, channel: Channel | None = None) -> int:
        statement, args = sql.count_statement(channel, sql.question)
        return await self._run(lambda conn: int(conn.execute(statement, args).fetchone()[0]))

    async def schema_version(self) -> int:
        return await self._run(_version)

    async def _run(self, call: Callable[[sqlite3.Connection], T]) -> T:
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            raise StoreError("the SQLite store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, call, conn)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are the explicit BEGIN ... COMMIT below,
        # not the driver's implicit ones.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"cannot use WAL mode for the SQLite store {self.path} "
                    f"(got {mode}); put it on a local file system"
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            # Someone reading the file (a backup, the CLI) may hold a lock briefly.
            conn.execute("PRAGMA busy_timeout=5000")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn


def _write(conn: sqlite3.Connection, messages: Sequence[StoredMessage]) -> int:
    rows = [sql.row_values(m) for m in messages]
    before = conn.total_changes
    with _transaction(conn):
        conn.executemany(_INSERT, rows)
    # Skipped duplicates change nothing, so this counts only new rows.
    return conn.total_changes - before


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection) -> None:
    with _transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        for version, statements in pending_migrations(_version(conn), MIGRATIONS):
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error.

    IMMEDIATE takes the write lock up front, so a transaction never fails
    half-way for want of it. A failed COMMIT leaves the transaction open in
    SQLite; it is rolled back too, or every later BEGIN would fail.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
