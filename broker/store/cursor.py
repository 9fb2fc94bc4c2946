"""History cursors: an opaque string for clients, a position for the stores.

A cursor names the oldest item of the page it came with; the next page holds
what is strictly older. It carries its channel, so a cursor from one room (or
inbox) handed in for another is refused instead of silently paging from a
position that means nothing there. It is not signed: a client may forge one
for its own channel, which only lets it choose where its own history starts.

Pure functions: no I/O, unit tested on their own.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from typing import Any

from broker.store.channel import Channel, ChannelKind
from broker.store.message import StoredMessage, parse_epoch

# Versioned, so a later format can still read (or clearly refuse) old cursors.
_VERSION = 1
# Room ids (128 characters) and user ids (256) encode far below this; the cap
# keeps a hostile string from costing more than a glance.
MAX_CURSOR_LENGTH = 4096
_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
_KEYS = frozenset({"v", "k", "c", "e", "s"})


class CursorError(ValueError):
    """A cursor string that cannot be used; the message says why, for the client."""


@dataclasses.dataclass(frozen=True, slots=True)
class Cursor:
    channel: Channel
    # Position of the last item returned: (epoch, seq) as in StoredMessage.
    epoch: str
    seq: int

    def __post_init__(self) -> None:
        parse_epoch(self.epoch)
        if not isinstance(self.seq, int) or isinstance(self.seq, bool) or self.seq < 1:
            raise ValueError(f"cursor seq must be a positive integer, got {self.seq!r}")

    @classmethod
    def at(cls, channel: Channel, message: StoredMessage) -> Cursor:
        """The cursor whose next page starts just below ``message``."""
        return cls(channel, message.epoch, message.seq)

    @property
    def position(self) -> tuple[int, int]:
        return (int(self.epoch), self.seq)


def encode_cursor(cursor: Cursor) -> str:
    """URL-safe base64 (unpadded) of compact JSON; safe in a query string as it is."""
    payload = {
        "v": _VERSION,
        "k": cursor.channel.kind.value,
        "c": cursor.channel.id,
        "e": cursor.epoch,
        "s": cursor.seq,
    }
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str, channel: Channel) -> Cursor:
    """Parse a client's cursor for ``channel``; ``CursorError`` if it is not one."""
    cursor = _parse(text)
    if cursor.channel != channel:
        raise CursorError(
            "foreign cursor: it belongs to another channel; "
            "use the nextCursor of this channel's own history"
        )
    return cursor


def _parse(text: str) -> Cursor:
    invalid = CursorError(
        "not a valid cursor: pass nextCursor from a previous history page unchanged"
    )
    if (
        not isinstance(text, str)
        or len(text) > MAX_CURSOR_LENGTH
        or _ALPHABET.fullmatch(text) is None
    ):
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        payload: Any = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError):
        raise invalid from None
    if not isinstance(payload, dict) or set(payload) != _KEYS:
        raise invalid
    if payload["v"] != _VERSION or isinstance(payload["v"], bool):
        raise CursorError(
            "cursor from another version of rtgate: load history again without a cursor"
        )
    kind, channel_id, epoch, seq = payload["k"], payload["c"], payload["e"], payload["s"]
    if not isinstance(kind, str) or not isinstance(channel_id, str):
        raise invalid
    try:
        return Cursor(Channel(ChannelKind(kind), channel_id), epoch, seq)
    except ValueError:
        raise invalid from None
