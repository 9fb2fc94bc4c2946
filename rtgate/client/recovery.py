"""Positions, resume and gap detection (sans-I/O).

The client keeps, per channel (each joined room, its direct inbox, the global
channel), the ``{offset, epoch}`` of the last stored frame it received, its own
``chat:message:sent`` included (docs/protocol.md, "Offsets, epochs and
recovery"). From those it builds the ``resume`` frame after every reconnect and
notices gaps while connected.

A frame is delivered to the application at most once: every stored message has
an ``id`` that is the same live, replayed and in history, and the last ids of
each channel are remembered. While a channel is being filled (a ``resume`` or a
``room:join`` with ``since`` is under way), frames that do not continue its
chain are held back: the replay brings them again, in order, and what it did not
bring is released when the fill's ack arrives.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable
from typing import Any

DIRECT = "direct"
GLOBAL = "global"
ROOM_PREFIX = "room:"
SEEN_PER_CHANNEL = 1000
STORED_TYPES = frozenset(
    {"chat:message", "chat:message:sent", "room:event", "direct:message", "global:message"}
)

Frame = tuple[str, dict[str, Any]]


def room_channel(room_id: str) -> str:
    return ROOM_PREFIX + room_id


def room_of(channel: str) -> str | None:
    return channel[len(ROOM_PREFIX) :] if channel.startswith(ROOM_PREFIX) else None


@dataclasses.dataclass(frozen=True, slots=True)
class Position:
    offset: int
    epoch: str

    def wire(self) -> dict[str, Any]:
        return {"offset": self.offset, "epoch": self.epoch}

    @classmethod
    def parse(cls, value: Any) -> Position | None:
        if not isinstance(value, dict):
            return None
        offset, epoch = value.get("offset"), value.get("epoch")
        if (
            isinstance(offset, bool)
            or not isinstance(offset, int)
            or offset < 0
            or not isinstance(epoch, str)
        ):
            return None
        return cls(offset, epoch)


@dataclasses.dataclass(frozen=True, slots=True)
class Fill:
    """A request that replays a channel from ``since``: ``room:join`` with ``since`` for a
    room, ``resume`` with only that channel for the inbox or the global channel."""

    channel: str
    since: Position

    @property
    def type(self) -> str:
        return "room:join" if room_of(self.channel) is not None else "resume"

    @property
    def data(self) -> dict[str, Any]:
        room = room_of(self.channel)
        if room is not None:
            return {"roomId": room, "since": self.since.wire()}
        return {self.channel: self.since.wire()}

    def outcome(self, ack: Any) -> Any:
        """This channel's recovery outcome in the fill's ack data."""
        if not isinstance(ack, dict):
            return None
        room = room_of(self.channel)
        if room is not None:
            rooms = ack.get("rooms")
            return rooms.get(room) if isinstance(rooms, dict) else None
        return ack.get(self.channel)


@dataclasses.dataclass(slots=True)
class Observed:
    deliver: bool
    # Start this fill now (a gap was noticed).
    fill: Fill | None = None
    # A "recovered" event for the application (the stream's epoch changed).
    notice: dict[str, Any] | None = None


@dataclasses.dataclass(slots=True)
class Settled:
    """What a finished resume or fill asks of the shell."""

    # "recovered" events, one per channel that had a position.
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Held frames the replay did not bring, to deliver now, in offset order.
    deliver: list[Frame] = dataclasses.field(default_factory=list)
    # Channels that failed with ``unavailable``: try these again later.
    retry: list[Fill] = dataclasses.field(default_factory=list)


class _Channel:
    __slots__ = ("filling", "held", "position", "seen", "seen_order")

    def __init__(self, position: Position | None = None) -> None:
        self.position = position
        self.filling = False
        self.held: list[Frame] = []
        self.seen: set[str] = set()
        self.seen_order: collections.deque[str] = collections.deque()

    def remember(self, message_id: str) -> None:
        self.seen.add(message_id)
        self.seen_order.append(message_id)
        if len(self.seen_order) > SEEN_PER_CHANNEL:
            self.seen.discard(self.seen_order.popleft())

    def advance(self, position: Position) -> None:
        current = self.position
        if current is None or current.epoch != position.epoch or position.offset > current.offset:
            self.position = position


def _stored(data: dict[str, Any]) -> tuple[str, int, str, int] | None:
    """(id, offset, epoch, prevOffset) of a stored frame, None for an ephemeral one."""
    message_id, offset, epoch = data.get("id"), data.get("offset"), data.get("epoch")
    prev = data.get("prevOffset", 0)
    if not isinstance(message_id, str) or not isinstance(epoch, str):
        return None
    if isinstance(offset, bool) or not isinstance(offset, int):
        return None
    if isinstance(prev, bool) or not isinstance(prev, int):
        prev = 0
    return message_id, offset, epoch, prev


class Recovery:
    def __init__(self) -> None:
        self._rooms: dict[str, _Channel] = {}
        self._direct = _Channel()
        self._global = _Channel()
        # Channels of the resume under way, with the positions it was sent with.
        self._resuming: dict[str, Position | None] = {}

    # -- membership ---------------------------------------------------------------

    def track(self, room_id: str) -> None:
        """A ``room:join`` is on its way: frames of the room count from now on."""
        self._rooms.setdefault(room_id, _Channel())

    def joined(self, room_id: str, offset: Any, epoch: Any) -> None:
        """The join's ack. Frames that came before it may be newer: keep the highest."""
        channel = self._rooms.setdefault(room_id, _Channel())
        position = Position.parse({"offset": offset, "epoch": epoch})
        if position is not None:
            channel.advance(position)

    def forget(self, room_id: str) -> None:
        """Left, removed or refused: the room is no longer resumed."""
        self._rooms.pop(room_id, None)

    @property
    def rooms(self) -> list[str]:
        return list(self._rooms)

    def position(self, channel: str) -> Position | None:
        state = self._channel(channel)
        return state.position if state is not None else None

    def positions(self) -> dict[str, dict[str, Any]]:
        """Every known position, keyed by channel; ``load`` takes it back."""
        out = {
            room_channel(r): c.position.wire()
            for r, c in self._rooms.items()
            if c.position is not None
        }
        for name, channel in ((DIRECT, self._direct), (GLOBAL, self._global)):
            if channel.position is not None:
                out[name] = channel.position.wire()
        return out

    def load(self, positions: dict[str, Any]) -> None:
        """Positions saved by ``positions`` (e.g. across a process restart)."""
        for key, value in positions.items():
            position = Position.parse(value)
            if position is None:
                continue
            room = room_of(key)
            if room is not None:
                self._rooms[room] = _Channel(position)
            elif key == DIRECT:
                self._direct.position = position
            elif key == GLOBAL:
                self._global.position = position

    def _channel(self, channel: str) -> _Channel | None:
        if channel == DIRECT:
            return self._direct
        if channel == GLOBAL:
            return self._global
        room = room_of(channel)
        return self._rooms.get(room) if room is not None else None

    @staticmethod
    def channel_of(frame_type: str, data: Any) -> str | None:
        if frame_type not in STORED_TYPES or not isinstance(data, dict):
            return None
        if frame_type == "direct:message":
            return DIRECT
        if frame_type == "global:message":
            return GLOBAL
        room = data.get("roomId")
        return room_channel(room) if isinstance(room, str) else None

    # -- live frames --------------------------------------------------------------

    def observe(self, frame_type: str, data: Any) -> Observed:
        """A frame from the server: deliver it, drop it (already delivered), or hold it."""
        name = self.channel_of(frame_type, data)
        channel = self._channel(name) if name is not None else None
        stored = _stored(data) if isinstance(data, dict) else None
        if channel is None or stored is None or name is None:
            return Observed(True)  # ephemeral, or a room we do not track
        message_id, offset, epoch, prev = stored
        if message_id in channel.seen:
            return Observed(False)
        position = channel.position
        if position is None or position.epoch != epoch:
            notice = None
            if position is not None and not channel.filling:
                # The stream was recreated: its old offsets mean nothing now.
                notice = _event(name, recovered=False, missed=0, reason="epoch changed")
            channel.position = Position(offset, epoch)
            channel.remember(message_id)
            return Observed(True, notice=notice)
        if prev > position.offset:
            channel.held.append((frame_type, data))
            if channel.filling:
                return Observed(False)
            channel.filling = True
            return Observed(False, fill=Fill(name, position))
        channel.remember(message_id)
        channel.advance(Position(offset, epoch))
        return Observed(True)

    # -- resume -------------------------------------------------------------------

    def resume_data(self) -> dict[str, Any]:
        """The ``resume`` to send after ``welcome``; marks its channels as filling.

        The inbox and the global channel go in even without a position ({0, ""}):
        the ack then gives their current offset, so that a later disconnect can be
        resumed from there.
        """
        self._resuming = {}
        rooms: dict[str, Any] = {}
        for room_id, channel in self._rooms.items():
            if channel.position is None:
                continue  # its join is still on its way and is sent again after this
            rooms[room_id] = channel.position.wire()
            self._resuming[room_channel(room_id)] = channel.position
            channel.filling = True
        data: dict[str, Any] = {"rooms": rooms}
        for name, channel in ((DIRECT, self._direct), (GLOBAL, self._global)):
            data[name] = (channel.position or Position(0, "")).wire()
            self._resuming[name] = channel.position
            channel.filling = True
        return data

    def resume_result(self, ack: Any) -> Settled:
        settled = Settled()
        if not isinstance(ack, dict):
            ack = {}
        rooms = ack.get("rooms") if isinstance(ack.get("rooms"), dict) else {}
        assert isinstance(rooms, dict)
        for name, sent in self._resuming.items():
            room = room_of(name)
            entry = rooms.get(room) if room is not None else ack.get(name)
            self._settle(name, sent, entry, settled)
        self._resuming = {}
        return settled

    def resume_failed(self, error: dict[str, Any]) -> Settled:
        """The whole ``resume`` was refused for good (not ``unavailable``)."""
        settled = Settled()
        for name, sent in self._resuming.items():
            self._settle(name, sent, {"recovered": False, "error": error}, settled, retry=False)
        self._resuming = {}
        return settled

    def fill_result(self, fill: Fill, ack: Any) -> Settled:
        settled = Settled()
        self._settle(fill.channel, fill.since, fill.outcome(ack), settled)
        return settled

    def fill_failed(self, fill: Fill, error: dict[str, Any]) -> Settled:
        settled = Settled()
        self._settle(fill.channel, fill.since, {"recovered": False, "error": error}, settled)
        return settled

    def _settle(
        self, name: str, sent: Position | None, entry: Any, settled: Settled, retry: bool = True
    ) -> None:
        channel = self._channel(name)
        if channel is None:
            return  # left meanwhile
        error = entry.get("error") if isinstance(entry, dict) else None
        if entry is None:
            error = {"code": "internal", "message": "no outcome for this channel in the ack"}
        if isinstance(error, dict):
            code = error.get("code")
            if retry and code == "unavailable" and channel.position is not None:
                # The channel stays held: the retry's replay sorts it out.
                settled.retry.append(Fill(name, channel.position))
                return
            room = room_of(name)
            if code in ("forbidden", "limit_exceeded") and room is not None:
                self._rooms.pop(room, None)
            if sent is not None or room is not None:
                settled.events.append(_event(name, recovered=False, missed=0, error=error))
            self._release(channel, settled)
            return
        assert isinstance(entry, dict)
        reached = Position.parse(entry)
        if reached is not None:
            channel.advance(reached)
        missed = entry.get("missed", 0)
        recovered = entry.get("recovered") is True
        if (
            not recovered
            and sent is not None
            and sent.offset == 0
            and reached is not None
            and reached.offset == 0
            and (not sent.epoch or sent.epoch == reached.epoch)
        ):
            recovered = True  # nothing was stored there, then or now: nothing was missed
        if sent is not None or room_of(name) is not None:
            settled.events.append(
                _event(name, recovered=recovered, missed=missed if isinstance(missed, int) else 0)
            )
        self._release(channel, settled)

    def _release(self, channel: _Channel, settled: Settled) -> None:
        channel.filling = False
        held = sorted(channel.held, key=lambda f: f[1].get("offset", 0))
        channel.held = []
        for frame_type, data in held:
            stored = _stored(data)
            if stored is None or stored[0] in channel.seen:
                continue
            channel.remember(stored[0])
            channel.advance(Position(stored[1], stored[2]))
            settled.deliver.append((frame_type, data))

    def disconnected(self) -> None:
        """The connection is gone: fills in flight are void. Held frames stay held
        until the next ``resume`` replays their channel."""
        self._resuming = {}

    def filling(self, channel: str) -> bool:
        state = self._channel(channel)
        return state is not None and state.filling

    def held(self, channel: str) -> Iterable[Frame]:
        state = self._channel(channel)
        return list(state.held) if state is not None else []


def _event(name: str, **fields: Any) -> dict[str, Any]:
    return {"channel": name, "roomId": room_of(name), **fields}
