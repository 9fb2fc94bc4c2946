"""Client-side typing throttle (sans-I/O), the tutorial's throttled emitter.

Call ``offer`` on every keystroke. Per room, at most one frame goes out per
``interval``: the first at once, repeats of the state already sent are dropped
(a ``true`` is repeated once per interval while typing goes on, so that other
members' indicators stay lit), and a change inside an interval is sent when the
interval ends, so the final ``false`` always goes out.
"""

from __future__ import annotations

import dataclasses

DEFAULT_INTERVAL = 1.0


@dataclasses.dataclass(slots=True)
class _Room:
    sent: bool
    sent_at: float
    pending: bool | None = None
    scheduled: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Offer:
    # Send this state now.
    send: bool
    # Else, if set: call ``release(room, now)`` at this time (schedule it only once).
    release_at: float | None = None


class TypingThrottle:
    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        if interval < 0:
            raise ValueError("typing interval must be >= 0")
        self.interval = interval
        self._rooms: dict[str, _Room] = {}

    def offer(self, room_id: str, is_typing: bool, now: float) -> Offer:
        room = self._rooms.get(room_id)
        if room is None:
            if not is_typing:
                return Offer(False)  # never said it was typing: nothing to stop
            self._rooms[room_id] = _Room(sent=True, sent_at=now)
            return Offer(True)
        due = now - room.sent_at >= self.interval
        if due and not room.scheduled:
            if is_typing == room.sent and not is_typing:
                room.pending = None
                return Offer(False)
            room.sent, room.sent_at, room.pending = is_typing, now, None
            return Offer(True)
        # Inside the interval: keep only the latest wish, unless it is what went out.
        room.pending = None if (is_typing == room.sent) else is_typing
        if room.pending is None or room.scheduled:
            return Offer(False)
        room.scheduled = True
        return Offer(False, release_at=room.sent_at + self.interval)

    def release(self, room_id: str, now: float) -> bool | None:
        """At ``release_at``: the state to send, or None when nothing is left to send."""
        room = self._rooms.get(room_id)
        if room is None:
            return None
        room.scheduled = False
        value = room.pending
        room.pending = None
        if value is None:
            return None
        room.sent, room.sent_at = value, now
        return value

    def forget(self, room_id: str) -> None:
        self._rooms.pop(room_id, None)
