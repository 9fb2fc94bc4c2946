"""The NATS contract: every subject, stream and header name rtgate uses.

Both tiers import this module; backend services may publish to these subjects
directly (see docs/nats.md). Ids from clients and tokens never reach a subject
raw: ``encode_token`` maps any id to subject-safe characters, one to one, so
``auth0|123``, e-mail addresses and dots work, and no id can inject ``.``,
``*``, ``>`` or whitespace.
"""

from __future__ import annotations

import string

# Characters kept as they are in a subject token. Everything else, including
# the escape character itself, becomes "~" plus two lowercase hex digits per
# UTF-8 byte, which makes the encoding injective and reversible.
_SAFE = frozenset(string.ascii_letters + string.digits + "-_")
_ESCAPE = "~"

# Streams. Each has exactly one RePublish (a JetStream limit), hence one
# stream per kind of destination.
ROOMS_STREAM = "RT_ROOMS"
DIRECT_STREAM = "RT_DIRECT"
GLOBAL_STREAM = "RT_GLOBAL"

# Stored subjects (what publishers send to JetStream) ...
ROOM_PREFIX = "rt.room."
DIRECT_PREFIX = "rt.direct."
GLOBAL_SUBJECT = "rt.global"
# ... and the core subjects the streams republish them to. Ephemeral events
# (typing, non-durable room events) are published straight to the live room
# subject, so a gateway needs one subscription per room for both kinds.
LIVE_ROOM_PREFIX = "rt.live.room."
LIVE_DIRECT_PREFIX = "rt.live.direct."
LIVE_GLOBAL_SUBJECT = "rt.live.global"

# Control: commands to one gateway, one connection on it, or every connection
# of a user wherever it is (kicks, revocations, forced disconnects).
CONTROL_GATEWAY_PREFIX = "rt.ctl.gw."
CONTROL_USER_PREFIX = "rt.ctl.user."

# Requests to the broker (queue group: any replica answers).
HISTORY_SUBJECT = "rt.api.history"
HISTORY_QUEUE = "rtgate-history"

# The durable consumer every broker replica shares to persist a stream.
PERSIST_CONSUMER = "rtgate-persist"

# Presence (docs/presence.md). Gateways report to the presence service on
# rt.presence.<kind>.<gateway> (kind: events, heartbeat, sync); the service
# asks for full state on the sync subjects, answers queries on
# PRESENCE_API_SUBJECT, and publishes user:online/offline per user (each
# gateway holds one wildcard subscription for the users its clients watch).
# room:user_joined/left go to the live room subject like any room event.
PRESENCE_PREFIX = "rt.presence."
PRESENCE_SYNC_SUBJECT = "rt.ctl.presence.sync"
PRESENCE_API_SUBJECT = "rt.api.presence"
PRESENCE_API_QUEUE = "rtgate-presence"
LIVE_PRESENCE_USER_PREFIX = "rt.live.presence.user."

# Headers. The Nats-* ones are set by JetStream on republished copies.
HDR_SEQUENCE = "Nats-Sequence"
HDR_LAST_SEQUENCE = "Nats-Last-Sequence"
HDR_MSG_ID = "Nats-Msg-Id"
HDR_STREAM = "Nats-Stream"
# Which connection published a message (gateway id "/" connection id), so
# the sender's own copy can be told apart without a lookup.
HDR_ORIGIN = "Rt-Origin"

# The presence service's fencing token (its lease revision) on everything it
# publishes, and, on room presence events, the user they are about (whose
# own connections do not receive them).
HDR_PRESENCE_REVISION = "Rt-Presence-Rev"
HDR_PRESENCE_USER = "Rt-Presence-User"

# Status header NATS puts on control replies (404 no message, 503 no responders).
HDR_STATUS = "Status"


def encode_token(value: str) -> str:
    """Map any non-empty string to a NATS subject token, injectively."""
    if not value:
        raise ValueError("empty id")
    out: list[str] = []
    for ch in value:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"{_ESCAPE}{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode_token(token: str) -> str:
    """Inverse of ``encode_token``."""
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == _ESCAPE:
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(ch.encode("ascii"))
            i += 1
    return raw.decode("utf-8")


def room_subject(room_id: str) -> str:
    return ROOM_PREFIX + encode_token(room_id)


def live_room_subject(room_id: str) -> str:
    return LIVE_ROOM_PREFIX + encode_token(room_id)


def direct_subject(user_id: str) -> str:
    return DIRECT_PREFIX + encode_token(user_id)


def live_direct_subject(user_id: str) -> str:
    return LIVE_DIRECT_PREFIX + encode_token(user_id)


def control_gateway_subject(gateway_id: str) -> str:
    return CONTROL_GATEWAY_PREFIX + encode_token(gateway_id)


def control_connection_subject(gateway_id: str, connection_id: str) -> str:
    return f"{control_gateway_subject(gateway_id)}.conn.{encode_token(connection_id)}"


def control_user_subject(user_id: str) -> str:
    return CONTROL_USER_PREFIX + encode_token(user_id)


def presence_subject(kind: str, gateway_id: str) -> str:
    """``kind`` is one of events, heartbeat, sync."""
    return f"{PRESENCE_PREFIX}{kind}.{encode_token(gateway_id)}"


def presence_sync_subject(gateway_id: str) -> str:
    """Where the presence service asks one gateway for its full state."""
    return f"{PRESENCE_SYNC_SUBJECT}.{encode_token(gateway_id)}"


def live_presence_user_subject(user_id: str) -> str:
    return LIVE_PRESENCE_USER_PREFIX + encode_token(user_id)


def dedup_id(user_id: str, kind: str, target: str, client_id: str) -> str:
    """The ``Nats-Msg-Id`` of a client retry.

    Scoped to the user (two users' clientIds never collide), the kind of event
    and the target (a room id, or the recipient of a direct message): the
    stream checks ids across all its subjects, and a clientId reused for
    another room or another kind must be a new message, not an ack for the
    old one.
    """
    return f"{encode_token(user_id)}:{encode_token(kind)}:{encode_token(target)}:{client_id}"


def message_id(epoch: str, offset: int) -> str:
    """A stored message's id. Derived, so a deduplicated retry yields the same id."""
    return f"{epoch}-{offset}"
