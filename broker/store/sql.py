"""The queries both backends run, written once.

PostgreSQL numbers its placeholders ``$1`` and SQLite accepts ``?1``, so one
builder serves both. Statements only: no I/O here.

Each channel query selects by the one column that marks its channel (a
room's ``room_id``; an inbox's ``to_user``, and ``from_user`` among rows
that have a ``to_user``; the global stream by the primary key), never by
``stream`` as well: with ``stream`` in the WHERE clause PostgreSQL may walk
the primary key backwards and filter, reading every message of every room
below the cursor. It underestimates ``(epoch, seq) < (...)`` when all rows
share one epoch, the normal case, and then picks exactly that plan.
StoredMessage guarantees the marking columns imply the stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from broker.store.channel import Channel, ChannelKind
from broker.store.cursor import Cursor
from broker.store.message import StoredMessage

COLUMNS = (
    "stream",
    "epoch",
    "seq",
    "prev_seq",
    "subject",
    "kind",
    "room_id",
    "from_user",
    "to_user",
    "event",
    "stored_at",
)
_SELECT = ", ".join(COLUMNS)
_NEWEST_FIRST = "ORDER BY epoch DESC, seq DESC"

# The same in both backends' migrations. Only room messages have a room_id and
# only direct messages a to_user, so these partial indexes hold one channel kind
# each; the queries select by these columns alone (see above).
CHANNEL_INDEXES = (
    "CREATE INDEX messages_room ON messages (room_id, epoch, seq) WHERE room_id IS NOT NULL",
    "CREATE INDEX messages_to_user ON messages (to_user, epoch, seq) WHERE to_user IS NOT NULL",
    # Direct messages by sender.
    "CREATE INDEX messages_from_user ON messages (from_user, epoch, seq) WHERE to_user IS NOT NULL",
)
# Migration 2. History items carry prevOffset: the previous message on the
# same subject, found by one probe of this index.
SUBJECT_INDEX = ("CREATE INDEX messages_subject ON messages (subject, epoch, seq)",)

# Placeholder n (1-based) in a backend's syntax.
Placeholder = Callable[[int], str]


def dollar(n: int) -> str:
    return f"${n}"


def question(n: int) -> str:
    return f"?{n}"


class _Args:
    def __init__(self, placeholder: Placeholder) -> None:
        self.values: list[Any] = []
        self._placeholder = placeholder

    def add(self, value: Any) -> str:
        self.values.append(value)
        return self._placeholder(len(self.values))


def _older(args: _Args, cursor: Cursor | None) -> str:
    if cursor is None:
        return ""
    epoch, seq = cursor.position
    return f" AND (epoch, seq) < ({args.add(epoch)}, {args.add(seq)})"


def page_statement(
    channel: Channel, cursor: Cursor | None, rows: int, placeholder: Placeholder
) -> tuple[str, list[Any]]:
    """SELECT of up to ``rows`` messages of ``channel`` below ``cursor``, newest first."""
    args = _Args(placeholder)
    if channel.kind is ChannelKind.DIRECT:
        user = args.add(channel.id)
        older = _older(args, cursor)
        limit = args.add(rows)
        # Two index-ordered scans, each already limited, merged: an OR over
        # two columns would read and sort every message the user ever had. A
        # message to oneself is taken from the received side only.
        sql = (
            f"SELECT {_SELECT} FROM (SELECT {_SELECT} FROM messages"
            f" WHERE to_user = {user}{older} {_NEWEST_FIRST} LIMIT {limit}) AS received"
            f" UNION ALL"
            f" SELECT {_SELECT} FROM (SELECT {_SELECT} FROM messages"
            f" WHERE from_user = {user} AND to_user <> {user}{older}"
            f" {_NEWEST_FIRST} LIMIT {limit}) AS sent"
            f" {_NEWEST_FIRST} LIMIT {limit}"
        )
        return sql, args.values
    where = _channel_filter(args, channel) + _older(args, cursor)
    sql = f"SELECT {_SELECT} FROM messages WHERE {where} {_NEWEST_FIRST} LIMIT {args.add(rows)}"
    return sql, args.values


def _channel_filter(args: _Args, channel: Channel) -> str:
    if channel.kind is ChannelKind.ROOM:
        return f"room_id = {args.add(channel.id)}"
    if channel.kind is ChannelKind.DIRECT:
        user = args.add(channel.id)
        return f"(to_user = {user} OR (from_user = {user} AND to_user IS NOT NULL))"
    return f"stream = {args.add(channel.stream)}"


def count_statement(channel: Channel | None, placeholder: Placeholder) -> tuple[str, list[Any]]:
    if channel is None:
        return "SELECT COUNT(*) FROM messages", []
    args = _Args(placeholder)
    return f"SELECT COUNT(*) FROM messages WHERE {_channel_filter(args, channel)}", args.values


def persisted_statement(stream: str, epoch: int, placeholder: Placeholder) -> tuple[str, list[Any]]:
    # Served by the primary key (stream, epoch, seq): one index probe.
    args = _Args(placeholder)
    sql = (
        f"SELECT COALESCE(MAX(seq), 0) FROM messages"
        f" WHERE stream = {args.add(stream)} AND epoch = {args.add(epoch)}"
    )
    return sql, args.values


def prev_statement(
    subject: str, epoch: int, seq: int, placeholder: Placeholder
) -> tuple[str, list[Any]]:
    # Served by messages_subject (subject, epoch, seq): one index probe.
    args = _Args(placeholder)
    sql = (
        f"SELECT COALESCE(MAX(seq), 0) FROM messages WHERE subject = {args.add(subject)}"
        f" AND epoch = {args.add(epoch)} AND seq < {args.add(seq)}"
    )
    return sql, args.values


def encode_event(event: dict[str, Any]) -> str:
    """The event as JSON text for the database.

    Readable UTF-8 normally; a string with a lone surrogate (valid in JSON
    from a client, not encodable as UTF-8) falls back to ASCII escapes, so
    one odd message cannot make a whole batch fail forever.
    """
    text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(event, separators=(",", ":"))
    return text


def row_values(message: StoredMessage) -> tuple[Any, ...]:
    """A message as column values in ``COLUMNS`` order."""
    return (
        message.stream,
        int(message.epoch),
        message.seq,
        message.prev_seq,
        message.subject,
        message.kind,
        message.room_id,
        message.from_user,
        message.to_user,
        encode_event(message.event),
        message.stored_at,
    )


def message_from_row(row: Sequence[Any]) -> StoredMessage:
    (stream, epoch, seq, prev_seq, subject, kind, room_id, from_user, to_user, event, stored_at) = (
        row
    )
    return StoredMessage(
        stream=stream,
        epoch=str(epoch),
        seq=int(seq),
        prev_seq=int(prev_seq),
        subject=subject,
        kind=kind,
        room_id=room_id,
        from_user=from_user,
        to_user=to_user,
        event=json.loads(event),
        stored_at=float(stored_at),
    )
