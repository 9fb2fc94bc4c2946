"""Errors the client raises. Program against ``code``; ``message`` is for people."""

from __future__ import annotations


class RtgateError(Exception):
    """A failed request or connection.

    ``code`` is the server's error code (``forbidden``, ``unavailable``, ...;
    docs/protocol.md section 4) or one of the client's own codes below.
    ``close_code`` is set when the failure is a WebSocket close. ``user_ids``
    names, on a ``forbidden`` presence request, the users you share no room with.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        close_code: int | None = None,
        user_ids: list[str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.close_code = close_code
        self.user_ids = user_ids


class RequestTimeout(RtgateError):
    """No ack within the request's timeout, counted from when the frame was written."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class ConnectionClosed(RtgateError):
    """The client stopped for good: ``close()``, a close code that forbids reconnecting,
    or the reconnect attempts ran out. Pending and queued requests fail with it."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__("closed", message, close_code=close_code)


class Disconnected(RtgateError):
    """The connection dropped while a frame that is not safe to send twice (an ephemeral
    room event, say) waited for its ack: it may or may not have been handled."""

    def __init__(self, message: str) -> None:
        super().__init__("disconnected", message)


class QueueOverflow(RtgateError):
    """The offline queue was full and this frame, the oldest, was dropped."""

    def __init__(self, message: str) -> None:
        super().__init__("queue_overflow", message)


class DedupWindowExpired(RtgateError):
    """A durable frame was first sent longer ago than the server's dedup window: sending
    it again could store it twice, so it is failed back instead of resent."""

    def __init__(self, message: str) -> None:
        super().__init__("dedup_expired", message)
