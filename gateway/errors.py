"""Error codes of the wire protocol, defined once."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    BAD_FRAME = "bad_frame"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    LIMIT_EXCEEDED = "limit_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A request the gateway refuses; becomes an ack error or an ``error`` frame."""

    def __init__(self, code: ErrorCode, message: str, user_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Presence refusals: the users the asker may not see.
        self.user_ids = user_ids

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.user_ids is not None:
            out["userIds"] = self.user_ids
        return out


def raise_for_reply(reply: dict[str, Any], what: str) -> None:
    """A broker service's reply ``{"error": {code, message}}`` as the ProtocolError
    it stands for; unknown codes are ``internal``."""
    error = reply.get("error")
    if error is None:
        return
    if not isinstance(error, dict):
        raise ProtocolError(ErrorCode.INTERNAL, f"{what} failed")
    try:
        code = ErrorCode(str(error.get("code")))
    except ValueError:
        code = ErrorCode.INTERNAL
    raise ProtocolError(code, str(error.get("message", f"{what} failed")))
