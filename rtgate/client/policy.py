"""What to do after a close: the close-code table of docs/protocol.md section 10.

The server's own table is gateway/disconnect.py; tests/test_client_units.py checks
that this one matches it, code by code.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from rtgate.client.backoff import Backoff, Random


class Reconnect(enum.Enum):
    # The values are the protocol table's "Reconnect" column (gateway/disconnect.py).
    NEVER = "never"
    BACKOFF = "backoff"
    AFTER_DELAY = "after advertised delay"
    WITH_NEW_TOKEN = "only with a new token"
    LONG_BACKOFF = "long backoff"
    IMMEDIATELY = "yes"


CLOSE_CODES: Mapping[int, Reconnect] = {
    1000: Reconnect.NEVER,
    1007: Reconnect.NEVER,
    1008: Reconnect.NEVER,
    1009: Reconnect.NEVER,
    1011: Reconnect.BACKOFF,
    1012: Reconnect.AFTER_DELAY,
    1013: Reconnect.BACKOFF,
    4401: Reconnect.WITH_NEW_TOKEN,
    4403: Reconnect.NEVER,
    4408: Reconnect.IMMEDIATELY,
    4429: Reconnect.LONG_BACKOFF,
}

# 1012 without a preceding "reconnect" frame: the protocol suggests 1 to 5 s.
RESTART_MIN = 1.0
RESTART_MAX = 5.0


def rule(code: int | None) -> Reconnect:
    """The rule for a close code. A network failure (no code, 1006), a refused
    handshake and codes the table does not know are retried with backoff."""
    if code is None:
        return Reconnect.BACKOFF
    return CLOSE_CODES.get(code, Reconnect.BACKOFF)


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    reconnect: bool
    delay: float = 0.0
    # Ask token_provider for a new token before the attempt.
    new_token: bool = False
    # Stopped because max_attempts ran out (not because of the close code).
    exhausted: bool = False


def decide(
    code: int | None,
    attempt: int,
    *,
    backoff: Backoff,
    random: Random,
    after_ms: int | None = None,
    can_refresh: bool = False,
) -> Decision:
    """Whether and when to make attempt ``attempt`` (1 for the first after a connection
    was lost; the count restarts after each ``welcome``)."""
    how = rule(code)
    if how is Reconnect.NEVER:
        return Decision(False)
    if how is Reconnect.WITH_NEW_TOKEN and not can_refresh:
        # The same token would be refused again: without a provider there is no way back.
        return Decision(False)
    if backoff.exhausted(attempt):
        return Decision(False, exhausted=True)
    if how is Reconnect.AFTER_DELAY:
        if after_ms is not None:
            # The server already drew the jitter: wait exactly that long.
            return Decision(True, max(0, after_ms) / 1000)
        return Decision(True, RESTART_MIN + random() * (RESTART_MAX - RESTART_MIN))
    if how is Reconnect.LONG_BACKOFF:
        return Decision(True, backoff.long_delay(random))
    if how in (Reconnect.WITH_NEW_TOKEN, Reconnect.IMMEDIATELY):
        # The cause is fixed (a new token, authenticating promptly): go at once, but
        # back off if it keeps happening so a broken provider cannot spin.
        delay = 0.0 if attempt <= 1 else backoff.delay(attempt, random)
        return Decision(True, delay, new_token=how is Reconnect.WITH_NEW_TOKEN)
    return Decision(True, backoff.delay(attempt, random))
