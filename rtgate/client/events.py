"""Listeners: ``on(event, callback)`` returns the function that removes it."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rtgate.client")

Callback = Callable[[Any], Any]
AnyCallback = Callable[[str, Any], Any]


class Emitter:
    def __init__(self) -> None:
        self._listeners: dict[str, list[Callback]] = {}
        self._any: list[AnyCallback] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def on(self, event: str, callback: Callback) -> Callable[[], None]:
        self._listeners.setdefault(event, []).append(callback)

        def unsubscribe() -> None:
            listeners = self._listeners.get(event, [])
            if callback in listeners:
                listeners.remove(callback)

        return unsubscribe

    def on_any(self, callback: AnyCallback) -> Callable[[], None]:
        self._any.append(callback)

        def unsubscribe() -> None:
            if callback in self._any:
                self._any.remove(callback)

        return unsubscribe

    def emit(self, event: str, data: Any) -> None:
        # Copies: a listener may unsubscribe (itself or another) while being called.
        for callback in list(self._listeners.get(event, ())):
            self._call(event, callback, data)
        for any_callback in list(self._any):
            self._call(event, any_callback, event, data)

    def _call(self, event: str, callback: Callable[..., Any], *args: Any) -> None:
        # A listener's failure must not break the connection that delivers the events.
        try:
            result = callback(*args)
        except Exception:
            log.exception("listener for %r failed", event)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("listener failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for the async listeners still running."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
