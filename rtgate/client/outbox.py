"""The offline queue and send pacing (sans-I/O).

Every frame the application sends goes through one ordered queue. While the
client is disconnected the queue only grows (bounded: overflow drops the
oldest); once connected and resumed it drains in order, paced by a token bucket
a little slower than the server's (``welcome.limits``), so that a long queue
never earns a ``rate_limited`` refusal, let alone the 1008 close for sustained
excess. The caller passes the clock.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

DEFAULT_LIMIT = 1000
# Stay under the server's bucket: frames written back to back can reach it
# bunched together, and its clock is not ours.
RATE_SHARE = 0.9
BURST_SHARE = 0.8
# A durable frame is resent only if its first send is at least this much younger
# than the dedup window: the resend still has to reach the server inside it.
DEDUP_MARGIN = 2.0
# Float slack: a wait computed to the token must end with the token available.
_EPSILON = 1e-9


@dataclasses.dataclass(eq=False, slots=True)
class Entry:
    """One frame the application asked to send."""

    type: str
    data: Any
    # Sent with an id; the caller waits for the ack.
    ack: bool = True
    # Carries a clientId: the server stores it once however often it is sent
    # within the dedup window.
    durable: bool = False
    # Safe to send again when a disconnect swallowed the ack (reads, joins, ...).
    idempotent: bool = False
    timeout: float | None = None
    # The shell's handle (the caller's future); the queue never looks at it.
    handle: Any = None
    first_sent_at: float | None = None
    sends: int = 0

    @property
    def resendable(self) -> bool:
        return self.durable or self.idempotent


class TokenBucket:
    """Refills at ``rate`` per second up to ``burst``. ``spend`` may go below zero:
    frames the client must send at once (auth, resume) delay the queue instead."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self._tokens >= 1 - _EPSILON:
            self._tokens -= 1
            return True
        return False

    def spend(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1

    def wait(self, now: float) -> float:
        """Seconds until ``take`` can succeed."""
        self._refill(now)
        return max(_EPSILON, (1 - self._tokens) / self._rate)


@dataclasses.dataclass(frozen=True, slots=True)
class Take:
    # The frame to write now, if any ...
    entry: Entry | None
    # ... else how long until the bucket allows one (None: the queue is empty).
    wait: float | None
    # Durable frames whose dedup window has passed: fail them back, do not send.
    expired: tuple[Entry, ...] = ()


class Outbox:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError("queue limit must be >= 1")
        self.limit = limit
        self.dropped = 0
        self._queue: collections.deque[Entry] = collections.deque()
        self._bucket: TokenBucket | None = None
        self._dedup_window: float | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def entries(self) -> list[Entry]:
        return list(self._queue)

    def configure(
        self, now: float, rate: float | None, burst: float | None, dedup_window: float | None
    ) -> None:
        """Adopt a new connection's ``welcome``: its server bucket starts full."""
        if rate is not None and rate > 0 and burst is not None and burst >= 1:
            self._bucket = TokenBucket(
                rate * RATE_SHARE, max(1.0, float(int(burst * BURST_SHARE))), now
            )
        else:
            self._bucket = None
        self._dedup_window = dedup_window

    def push(self, entry: Entry) -> list[Entry]:
        """Append; returns the entries dropped to stay within the limit (oldest first)."""
        self._queue.append(entry)
        return self._trim()

    def requeue(self, entries: list[Entry]) -> list[Entry]:
        """Put frames whose ack a disconnect swallowed back at the front, in their order:
        they were sent before everything still queued."""
        self._queue.extendleft(reversed(entries))
        return self._trim()

    def _trim(self) -> list[Entry]:
        dropped = []
        while len(self._queue) > self.limit:
            dropped.append(self._queue.popleft())
        self.dropped += len(dropped)
        return dropped

    def remove(self, entry: Entry) -> bool:
        try:
            self._queue.remove(entry)
        except ValueError:
            return False
        return True

    def clear(self) -> list[Entry]:
        entries = list(self._queue)
        self._queue.clear()
        return entries

    def spend(self, now: float) -> None:
        """Account for a frame written outside the queue (auth, resume, a gap fill)."""
        if self._bucket is not None:
            self._bucket.spend(now)

    def expired(self, entry: Entry, now: float) -> bool:
        if not entry.durable or entry.first_sent_at is None or self._dedup_window is None:
            return False
        return now - entry.first_sent_at > self._dedup_window - DEDUP_MARGIN

    def take(self, now: float) -> Take:
        """The next frame to write, or how long to wait for one."""
        # Only frames put back after a disconnect have been sent; they sit at the front,
        # but a caller may have requeued anything, so look at every one.
        expired = [e for e in self._queue if self.expired(e, now)]
        for entry in expired:
            self._queue.remove(entry)
        if not self._queue:
            return Take(None, None, tuple(expired))
        if self._bucket is not None and not self._bucket.take(now):
            return Take(None, self._bucket.wait(now), tuple(expired))
        entry = self._queue.popleft()
        if entry.first_sent_at is None:
            entry.first_sent_at = now
        entry.sends += 1
        return Take(entry, None, tuple(expired))
