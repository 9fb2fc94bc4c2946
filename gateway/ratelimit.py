"""Token bucket (sans-I/O: the caller passes the clock)."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are enough; False means refuse."""
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False

    def refund(self, cost: float = 1.0) -> None:
        """Give back what ``take`` spent on something that turned out not to count."""
        self._tokens = min(self._burst, self._tokens + cost)


class RefusalStreak:
    """Notices a client refused without a break of a second or more for ``seconds``:
    sustained abuse rather than a burst, which the token bucket alone handles."""

    __slots__ = ("_last", "_seconds", "_start")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._start = 0.0
        self._last = float("-inf")

    def refused(self, now: float) -> bool:
        """Record a refusal at ``now``; True once refusals have gone on for ``seconds``."""
        if now - self._last >= 1.0:
            self._start = now  # a pause of a second or more starts a new streak
        self._last = now
        return now - self._start >= self._seconds
