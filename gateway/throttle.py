"""Coalescing throttle for ephemeral state such as typing (sans-I/O).

At most one value per interval goes out for a key. Values offered in between
replace each other, and the latest is released when the interval ends, so a
final "stopped typing" is never lost however fast the client toggles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclasses.dataclass(slots=True)
class _Slot(Generic[V]):
    last_sent: float
    pending: V | None = None
    has_pending: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Offer(Generic[V]):
    # Send this value now ...
    send: bool
    # ... or, when a flush is not already scheduled, call ``release`` at this time.
    release_at: float | None


class Coalescer(Generic[K, V]):
    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._slots: dict[K, _Slot[V]] = {}

    def offer(self, key: K, value: V, now: float) -> Offer[V]:
        slot = self._slots.get(key)
        if slot is None or (now - slot.last_sent >= self._interval and not slot.has_pending):
            self._slots[key] = _Slot(last_sent=now)
            return Offer(send=True, release_at=None)
        first_pending = not slot.has_pending
        slot.pending = value
        slot.has_pending = True
        return Offer(
            send=False, release_at=slot.last_sent + self._interval if first_pending else None
        )

    def release(self, key: K, now: float) -> tuple[bool, V | None]:
        """The pending value for ``key`` when its interval is over (sent=False if none)."""
        slot = self._slots.get(key)
        if slot is None or not slot.has_pending:
            return False, None
        value = slot.pending
        slot.pending = None
        slot.has_pending = False
        slot.last_sent = now
        return True, value

    def forget_idle(self, now: float) -> None:
        """Drop keys quiet for a whole interval so the table does not grow forever."""
        stale = [
            k
            for k, s in self._slots.items()
            if not s.has_pending and now - s.last_sent >= self._interval
        ]
        for k in stale:
            del self._slots[k]

    def __len__(self) -> int:
        return len(self._slots)
