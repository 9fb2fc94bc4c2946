"""Reconnect delays: exponential backoff with full jitter (sans-I/O).

Full jitter (a uniform draw between 0 and the exponential ceiling) spreads the
clients of a failed gateway over the whole window instead of bringing them back
in waves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

Random = Callable[[], float]


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    # Ceiling of attempt n: min(cap, base * factor ** (n - 1)), in seconds.
    base: float = 1.0
    factor: float = 1.5
    cap: float = 30.0
    # Attempts after a disconnect before giving up; None: never give up.
    max_attempts: int | None = None
    # 4429 (too many connections for this user): the server says "minutes".
    long_min: float = 60.0
    long_max: float = 300.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.factor < 1 or self.cap < self.base:
            raise ValueError("backoff needs base > 0, factor >= 1 and cap >= base")
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError("backoff max_attempts must be >= 0 or None")
        if not 0 <= self.long_min <= self.long_max:
            raise ValueError("backoff needs 0 <= long_min <= long_max")

    def ceiling(self, attempt: int) -> float:
        """The largest delay before attempt ``attempt`` (1 for the first retry)."""
        exponent = max(0, attempt - 1)
        # factor ** exponent overflows a float long before an infinite client gives up.
        if exponent > 1000:
            return self.cap
        return min(self.cap, self.base * self.factor**exponent)

    def delay(self, attempt: int, random: Random) -> float:
        return random() * self.ceiling(attempt)

    def long_delay(self, random: Random) -> float:
        return self.long_min + random() * (self.long_max - self.long_min)

    def exhausted(self, attempt: int) -> bool:
        """True when attempt ``attempt`` is one more than allowed."""
        return self.max_attempts is not None and attempt > self.max_attempts
