"""One stored message: a durable event as it left a stream, plus where it belongs.

Validated on construction, so a message neither backend can store (a NUL in
an id, an epoch that is not a decimal, a room message without a room) fails
alone, where the consumer can deal with it, instead of failing a whole batch
inside the database transaction.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from broker import subjects

# Epochs are compared numerically and stored as a signed 64-bit integer; one
# spelling per number, so the string in an event id and the stored integer
# always agree.
_EPOCH = re.compile(r"0|[1-9][0-9]{0,18}")
_MAX_INT64 = 2**63 - 1

STREAMS = (subjects.ROOMS_STREAM, subjects.DIRECT_STREAM, subjects.GLOBAL_STREAM)


def parse_epoch(epoch: str) -> int:
    """A stream epoch (decimal microseconds, no sign or leading zeros) as a number."""
    if not isinstance(epoch, str) or _EPOCH.fullmatch(epoch) is None:
        raise ValueError(f"epoch must be a decimal string, got {epoch!r}")
    value = int(epoch)
    if value > _MAX_INT64:
        raise ValueError(f"epoch {epoch} is out of range")
    return value


def _is_count(value: object, minimum: int) -> bool:
    # bool is an int subclass; True is not a sequence number.
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= _MAX_INT64


def _check_text(name: str, value: str | None, required: bool) -> None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"{name} must be a non-empty string")
    # PostgreSQL text cannot hold NUL, and neither backend can hold a lone
    # surrogate (not UTF-8).
    if "\x00" in value:
        raise ValueError(f"{name} contains NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode") from None


@dataclasses.dataclass(frozen=True, slots=True)
class StoredMessage:
    stream: str
    # Decimal microseconds of the stream's creation: newer incarnations have
    # larger epochs. Order by ``position``, never by this string.
    epoch: str
    # JetStream sequence: the offset clients saw.
    seq: int
    # Previous sequence on the same subject (Nats-Last-Sequence), 0 if none.
    prev_seq: int
    subject: str
    # Event type: chat:message, room:event, direct:message, global:message.
    kind: str
    # Room messages only (required there).
    room_id: str | None
    from_user: str | None
    # Direct messages only (required there).
    to_user: str | None
    # The event as delivered live: {"type": ..., "data": {..., id, offset, epoch, prevOffset}}.
    event: dict[str, Any]
    # Unix time (seconds) the broker stored it.
    stored_at: float

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {self.stream!r}")
        parse_epoch(self.epoch)
        if not _is_count(self.seq, 1):
            raise ValueError(f"seq must be a positive integer, got {self.seq!r}")
        if not _is_count(self.prev_seq, 0):
            raise ValueError(f"prev_seq must be a non-negative integer, got {self.prev_seq!r}")
        _check_text("subject", self.subject, True)
        _check_text("kind", self.kind, True)
        room = self.stream == subjects.ROOMS_STREAM
        direct = self.stream == subjects.DIRECT_STREAM
        _check_text("room_id", self.room_id, room)
        _check_text("from_user", self.from_user, False)
        _check_text("to_user", self.to_user, direct)
        # The stores find a room's messages by room_id and an inbox by to_user
        # alone (see broker/store/sql.py), so these mark their stream.
        if self.room_id is not None and not room:
            raise ValueError(f"room_id is only for {subjects.ROOMS_STREAM} messages")
        if self.to_user is not None and not direct:
            raise ValueError(f"to_user is only for {subjects.DIRECT_STREAM} messages")
        if not isinstance(self.event, dict):
            raise ValueError("event must be a dict")

    @property
    def position(self) -> tuple[int, int]:
        """Sort key within a channel: (epoch as a number, seq)."""
        return (int(self.epoch), self.seq)
