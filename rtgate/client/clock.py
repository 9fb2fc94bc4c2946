"""Time for the client: a real clock, and a manual one for tests.

Every delay the client waits (reconnect backoff, a 1012's ``afterMs``, ack
timeouts, queue pacing, the typing throttle) goes through ``Clock.sleep``, and
every timestamp through ``Clock.now``, so a test can drive them all by hand.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """Time stands still until ``advance``; sleepers wake when their time comes."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._changed: asyncio.Event | None = None
        # Every duration passed to ``sleep``, in call order.
        self.requested: list[float] = []

    def now(self) -> float:
        return self._now

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    async def sleep(self, seconds: float) -> None:
        self.requested.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        self._event().set()
        await fut

    def sleeping(self) -> list[float]:
        """The wake-up times of everyone still asleep, earliest first."""
        return sorted(t for t, _, fut in self._sleepers if not fut.done())

    def advance(self, seconds: float) -> None:
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    async def wait_for_sleeper(
        self, duration: float, timeout: float = 5.0, tolerance: float = 1e-9
    ) -> None:
        """Wait (in real time) until someone sleeps for ``duration`` from now."""
        async with asyncio.timeout(timeout):
            while not any(abs(t - self._now - duration) <= tolerance for t in self.sleeping()):
                event = self._event()
                event.clear()
                await event.wait()
