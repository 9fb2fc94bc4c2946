"""The store interface every backend implements, and what they share.

The broker writes what it consumes from the streams and reads history pages;
nothing else touches the database, so the interface stays this narrow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from broker.store.channel import Channel
from broker.store.cursor import Cursor
from broker.store.message import StoredMessage


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    # Newest first.
    items: list[StoredMessage]
    # Where the next (older) page starts; None when nothing older is stored.
    next_cursor: Cursor | None


class Store(Protocol):
    async def open(self) -> None:
        """Connect, and create or migrate the schema. Raises StoreError."""

    async def close(self) -> None:
        """Release connections and threads; harmless when not open."""

    async def write(self, messages: Sequence[StoredMessage]) -> int:
        """Store ``messages`` in one transaction; return how many were new.

        Idempotent by (stream, epoch, seq): a redelivered message is skipped,
        so the caller may ack JetStream once this returns.
        """

    async def page(self, channel: Channel, cursor: Cursor | None, limit: int) -> Page:
        """Up to ``limit`` messages of ``channel`` older than ``cursor``, newest first.

        Ordered by (epoch as a number, seq), so paging crosses stream epochs.
        """

    async def persisted_up_to(self, stream: str, epoch: str) -> int:
        """The highest seq stored for this stream incarnation, 0 if none.

        The highest, not a contiguous floor: with several consumers writing,
        lower sequences may still be on their way.
        """

    async def prev_on_subject(self, subject: str, epoch: str, seq: int) -> int:
        """The stored message before ``seq`` on ``subject`` in that epoch, 0 if none.

        Exact only below the consumer's ack floor, where nothing is missing.
        """

    async def count(self, channel: Channel | None = None) -> int:
        """Messages stored in ``channel``, or in all (for tests and checks)."""

    async def schema_version(self) -> int:
        """The schema version the database is at."""


def pending_migrations(
    current: int, migrations: Sequence[Sequence[str]]
) -> list[tuple[int, Sequence[str]]]:
    """The (version, statements) still to apply to a database at ``current``.

    Migration ``i`` of the list brings the schema to version ``i + 1``; later
    versions are appended, never edited.
    """
    if current > len(migrations):
        raise StoreError(
            f"the database schema is at version {current}, newer than this "
            f"rtgate knows ({len(migrations)}); upgrade rtgate"
        )
    return [(i + 1, migrations[i]) for i in range(current, len(migrations))]


def check_limit(limit: int) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")


def check_cursor(channel: Channel, cursor: Cursor | None) -> None:
    if cursor is not None and cursor.channel != channel:
        # Callers decode client cursors with decode_cursor(text, channel),
        # which already refuses this; reaching here is a programming error.
        raise ValueError("cursor belongs to another channel")


def page_of(channel: Channel, rows: list[StoredMessage], limit: int) -> Page:
    """A page from up to ``limit + 1`` rows read newest first.

    The extra row only says whether anything older exists, so the last page
    has no cursor and a client never makes an empty round trip.
    """
    items = rows[:limit]
    more = len(rows) > limit
    return Page(items, Cursor.at(channel, items[-1]) if more and items else None)
