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
    """Notices a client refused in every second of a run of seconds: sustained abuse
    rather than a burst, which the token bucket alone already handles."""

    __slots__ = ("_last", "_seconds", "_streak")

    def __init__(self, seconds: int) -> None:
        self._seconds = seconds
        self._last = -2
        self._streak = 0

    def refused(self, now: float) -> bool:
        """Record a refusal at ``now``; True once refusals span ``seconds`` seconds in a row."""
        second = int(now)
        if second != self._last:
            self._streak = self._streak + 1 if second == self._last + 1 else 1
            self._last = second
        return self._streak >= self._seconds
