"""Channels: what a history page is read from (a room, a user's inbox, global)."""

from __future__ import annotations

import dataclasses
import enum

from broker import subjects
from broker.store.message import StoredMessage


class ChannelKind(enum.StrEnum):
    ROOM = "room"
    # A user's direct inbox: messages the user received and sent.
    DIRECT = "direct"
    GLOBAL = "global"


@dataclasses.dataclass(frozen=True, slots=True)
class Channel:
    kind: ChannelKind
    # The room id or the user id; empty for the global channel.
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ChannelKind):
            raise ValueError(f"unknown channel kind {self.kind!r}")
        if self.kind is ChannelKind.GLOBAL:
            if self.id:
                raise ValueError("the global channel has no id")
        elif not isinstance(self.id, str) or not self.id:
            raise ValueError(f"a {self.kind} channel needs an id")

    @classmethod
    def room(cls, room_id: str) -> Channel:
        return cls(ChannelKind.ROOM, room_id)

    @classmethod
    def direct(cls, user_id: str) -> Channel:
        return cls(ChannelKind.DIRECT, user_id)

    @property
    def stream(self) -> str:
        """The stream every message of this channel comes from.

        One stream per channel is what makes (epoch, seq) unique within a
        channel, so a cursor never skips or repeats an item.
        """
        if self.kind is ChannelKind.ROOM:
            return subjects.ROOMS_STREAM
        if self.kind is ChannelKind.DIRECT:
            return subjects.DIRECT_STREAM
        return subjects.GLOBAL_STREAM

    def includes(self, message: StoredMessage) -> bool:
        """Whether ``message`` belongs here; the same rule as the stores' queries."""
        if message.stream != self.stream:
            return False
        if self.kind is ChannelKind.ROOM:
            return message.room_id == self.id
        if self.kind is ChannelKind.DIRECT:
            return self.id in (message.to_user, message.from_user)
        return True


GLOBAL_CHANNEL = Channel(ChannelKind.GLOBAL)
