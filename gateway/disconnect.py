"""WebSocket close codes, defined once, with what a client should do on each.

docs/protocol.md renders the same table; clients follow the ``reconnect`` column.
"""

from __future__ import annotations

import dataclasses
import enum


class Reconnect(enum.Enum):
    NEVER = "never"
    BACKOFF = "backoff"
    AFTER_DELAY = "after advertised delay"
    WITH_NEW_TOKEN = "only with a new token"
    LONG_BACKOFF = "long backoff"
    IMMEDIATELY = "yes"


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    code: int
    reason: str
    reconnect: Reconnect


NORMAL = Disconnect(1000, "normal closure", Reconnect.NEVER)
BAD_FRAMES = Disconnect(1007, "too many bad frames", Reconnect.NEVER)
POLICY = Disconnect(1008, "policy violation", Reconnect.NEVER)
POLICY_RATE = Disconnect(1008, "sustained excess frame rate", Reconnect.NEVER)
TOO_BIG = Disconnect(1009, "frame too big", Reconnect.NEVER)
INTERNAL = Disconnect(1011, "internal error", Reconnect.BACKOFF)
UNAVAILABLE = Disconnect(1011, "messaging backbone unavailable", Reconnect.BACKOFF)
RESTART = Disconnect(1012, "service restart", Reconnect.AFTER_DELAY)
SLOW_CONSUMER = Disconnect(1013, "slow consumer", Reconnect.BACKOFF)
BAD_TOKEN = Disconnect(4401, "bad or expired token", Reconnect.WITH_NEW_TOKEN)
TOKEN_EXPIRED = Disconnect(4401, "token expired", Reconnect.WITH_NEW_TOKEN)
REVOKED = Disconnect(4403, "revoked", Reconnect.NEVER)
AUTH_TIMEOUT = Disconnect(4408, "no auth in time", Reconnect.IMMEDIATELY)
TOO_MANY_CONNECTIONS = Disconnect(4429, "too many connections", Reconnect.LONG_BACKOFF)

ALL: tuple[Disconnect, ...] = (
    NORMAL,
    BAD_FRAMES,
    POLICY,
    TOO_BIG,
    INTERNAL,
    RESTART,
    SLOW_CONSUMER,
    BAD_TOKEN,
    REVOKED,
    AUTH_TIMEOUT,
    TOO_MANY_CONNECTIONS,
)


def reason_bytes(reason: Disconnect) -> bytes:
    """The close reason as sent: at most 123 UTF-8 bytes, cut on a character boundary.

    A close frame's payload is limited to 125 bytes, two of which are the code.
    """
    data = reason.reason.encode("utf-8")
    if len(data) <= 123:
        return data
    return data[:123].decode("utf-8", errors="ignore").encode("utf-8")
