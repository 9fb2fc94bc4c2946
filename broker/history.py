"""History requests: pages of a channel, newest first, from the store plus the stream's tail.

The store has everything at or below the persist consumer's ack floor; the
stream has everything above it. A page reads the tail from the stream
first, then older items from the store, so history is never behind what
clients already saw live, and never repeats an item across the two.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import jsread, subjects
from broker.persist import Persister, to_stored
from broker.store import (
    Channel,
    ChannelKind,
    Cursor,
    CursorError,
    Store,
    StoredMessage,
    decode_cursor,
    encode_cursor,
)

log = structlog.get_logger("rtgate.history")

MAX_LIMIT = 100
DEFAULT_LIMIT = 50
# A tail longer than this means the broker is far behind: answer "unavailable"
# rather than read an unbounded run from the stream.
MAX_TAIL = 5000


class HistoryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_request(raw: bytes) -> tuple[Channel, str | None, int]:
    try:
        request = json.loads(raw)
        kind = ChannelKind(request["channel"]["kind"])
        channel = Channel(kind, request["channel"].get("id", ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise HistoryError("bad_request", "malformed history request") from exc
    cursor = request.get("cursor")
    limit = request.get("limit", DEFAULT_LIMIT)
    if cursor is not None and not isinstance(cursor, str):
        raise HistoryError("bad_request", "cursor must be a string")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise HistoryError("bad_request", f"limit must be 1 to {MAX_LIMIT}")
    return channel, cursor, limit


def _tail_subject(channel: Channel) -> str:
    if channel.kind is ChannelKind.ROOM:
        return subjects.room_subject(channel.id)
    if channel.kind is ChannelKind.DIRECT:
        # Received messages; sent ones appear once persisted.
        return subjects.direct_subject(channel.id)
    return subjects.GLOBAL_SUBJECT


class History:
    def __init__(
        self, nc: Client, store: Store, persister: Persister, epochs: dict[str, str], timeout: float
    ) -> None:
        self._nc = nc
        self._store = store
        self._persister = persister
        self._epochs = epochs
        self._timeout = timeout

    async def serve(self) -> None:
        await self._nc.subscribe(
            subjects.HISTORY_SUBJECT, queue=subjects.HISTORY_QUEUE, cb=self._on_request
        )

    async def _on_request(self, msg: Msg) -> None:
        try:
            channel, cursor, limit = parse_request(msg.data)
            body: dict[str, Any] = await self.page(channel, cursor, limit)
        except HistoryError as exc:
            body = {"error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:
            log.exception("history request failed")
            body = {"error": {"code": "unavailable", "message": f"history failed: {exc!r}"}}
        if msg.reply:
            await self._nc.publish(
                msg.reply, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            )

    async def page(self, channel: Channel, cursor_text: str | None, limit: int) -> dict[str, Any]:
        try:
            cursor = decode_cursor(cursor_text, channel) if cursor_text else None
        except CursorError as exc:
            raise HistoryError("bad_request", str(exc)) from exc
        stream = channel.stream
        epoch = self._epochs.get(stream, "")
        floor = await self._persister.floor(stream)
        tail = await self._tail(channel, stream, epoch, floor)
        # The tail is every unstored message of these subjects, in order: each
        # one's prevOffset is the one before it on its subject. The first on a
        # subject falls back to the store, exact below the floor.
        known_prev: dict[tuple[str, int], int] = {}
        last_on: dict[str, int] = {}
        for m in tail:
            if m.subject in last_on:
                known_prev[(m.epoch, m.seq)] = last_on[m.subject]
            last_on[m.subject] = m.seq
        if cursor is not None:
            tail = [m for m in tail if m.position < cursor.position]
        tail.reverse()  # newest first
        items = tail[:limit]
        more = len(tail) > limit
        if not more:
            # Older than the tail: from the store, below the floor of this epoch.
            boundary = Cursor(channel, epoch, floor + 1) if epoch else None
            if cursor is not None and (boundary is None or cursor.position < boundary.position):
                boundary = cursor
            room_left = limit - len(items)
            # A full page from the tail still asks for one row: is there an older page?
            page = await self._store.page(channel, boundary, room_left or 1)
            if room_left:
                items.extend(page.items)
                more = page.next_cursor is not None
            else:
                more = bool(page.items)
        events = [await self._with_prev(m, items, known_prev) for m in items]
        result: dict[str, Any] = {"items": events}
        if more and items:
            result["nextCursor"] = encode_cursor(Cursor.at(channel, items[-1]))
        return result

    async def _tail(
        self, channel: Channel, stream: str, epoch: str, floor: int
    ) -> list[StoredMessage]:
        if not epoch:
            return []
        try:
            run = await jsread.run_of(
                self._nc, stream, _tail_subject(channel), floor, MAX_TAIL + 1, self._timeout
            )
        except jsread.ReadError as exc:
            raise HistoryError("unavailable", f"stream read failed: {exc}") from exc
        if len(run) > MAX_TAIL:
            raise HistoryError("unavailable", "history is catching up; try again shortly")
        out = []
        for stored in run:
            try:
                out.append(to_stored(stream, epoch, stored.seq, stored.subject, stored.event))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    async def _with_prev(
        self,
        message: StoredMessage,
        page: list[StoredMessage],
        known_prev: dict[tuple[str, int], int],
    ) -> dict[str, Any]:
        """The event as delivered live: with prevOffset, the previous message on its subject."""
        known = known_prev.get((message.epoch, message.seq))
        if known is not None:
            event = dict(message.event)
            event["data"] = dict(event["data"], prevOffset=known)
            return event
        older = [
            m.seq
            for m in page
            if m.subject == message.subject and m.epoch == message.epoch and m.seq < message.seq
        ]
        prev = (
            max(older)
            if older
            else await self._store.prev_on_subject(message.subject, message.epoch, message.seq)
        )
        event = dict(message.event)
        event["data"] = dict(event["data"], prevOffset=prev)
        return event
