"""Protocol v1: the shape of frames and the validation of their data (sans-I/O).

Everything here is synchronous and pure: it turns decoded maps into typed
requests or raises ``ProtocolError`` with the code the client will see.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

from gateway.errors import ErrorCode, ProtocolError

MAX_ROOM_ID = 128
MAX_USER_ID = 256
MAX_CLIENT_ID = 64
# Frame ids are echoed in acks; keep them within what JavaScript numbers hold exactly.
MAX_FRAME_ID = 2**53 - 1

# Every type a client may send, so metrics and errors never use client text as a label.
CLIENT_TYPES = frozenset(
    {
        "auth",
        "room:join",
        "room:leave",
        "chat:message",
        "chat:typing",
        "ping",
        "direct:message",
        "broadcast:global",
        "room:event",
        "batch",
        "resume",
        "history",
        "presence",
        "presence:users",
        "presence:subscribe",
        "presence:unsubscribe",
    }
)
MAX_HISTORY = 100
MAX_CURSOR = 1024
MAX_BATCH = 50
_EVENT_NAME = re.compile(r"[a-z0-9:_-]{1,64}")


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    type: str
    id: int | None
    data: Any


@dataclasses.dataclass(frozen=True, slots=True)
class ChatMessage:
    room_id: str
    content: str
    client_id: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Typing:
    room_id: str
    is_typing: bool


@dataclasses.dataclass(frozen=True, slots=True)
class DirectMessage:
    to_user_id: str
    content: str
    client_id: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class GlobalMessage:
    content: str
    client_id: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class RoomEvent:
    room_id: str
    event: str
    data: Any
    durable: bool
    client_id: str | None


def parse_frame(obj: Any) -> Frame:
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a map")
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame needs a string 'type'")
    frame_id = obj.get("id")
    if frame_id is not None and (
        not isinstance(frame_id, int)
        or isinstance(frame_id, bool)
        or not 0 <= frame_id <= MAX_FRAME_ID
    ):
        raise ProtocolError(ErrorCode.BAD_FRAME, "'id' must be a non-negative integer")
    return Frame(kind, frame_id, obj.get("data"))


def is_valid_id(value: object, max_len: int) -> bool:
    """1..max_len printable characters, none of them whitespace."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_len
        and value.isprintable()
        and not any(ch.isspace() for ch in value)
    )


def room_id(data: Any) -> str:
    """``{roomId}`` or, as in the tutorial, a bare string."""
    value = data.get("roomId") if isinstance(data, dict) else data
    if not is_valid_id(value, MAX_ROOM_ID):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"roomId must be 1 to {MAX_ROOM_ID} printable characters without whitespace",
        )
    assert isinstance(value, str)
    return value


def _map(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'data' must be a map")
    return data


def client_id(data: dict[str, Any]) -> str | None:
    value = data.get("clientId")
    if value is None:
        return None
    if not is_valid_id(value, MAX_CLIENT_ID):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"clientId must be 1 to {MAX_CLIENT_ID} printable characters without whitespace",
        )
    assert isinstance(value, str)
    return value


def content(data: dict[str, Any], max_bytes: int) -> str:
    value = data.get("content")
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'content' must be a string")
    if len(value) > max_bytes or len(value.encode("utf-8")) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"content is over {max_bytes} bytes")
    return value


def chat_message(data: Any, max_content_bytes: int) -> ChatMessage:
    d = _map(data)
    return ChatMessage(room_id(d), content(d, max_content_bytes), client_id(d))


def typing(data: Any) -> Typing:
    d = _map(data)
    is_typing = d.get("isTyping")
    if not isinstance(is_typing, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'isTyping' must be a boolean")
    return Typing(room_id(d), is_typing)


def direct_message(data: Any, max_content_bytes: int) -> DirectMessage:
    d = _map(data)
    to = d.get("toUserId")
    if not is_valid_id(to, MAX_USER_ID):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"toUserId must be 1 to {MAX_USER_ID} printable characters without whitespace",
        )
    assert isinstance(to, str)
    return DirectMessage(to, content(d, max_content_bytes), client_id(d))


def global_message(data: Any, max_content_bytes: int) -> GlobalMessage:
    d = _map(data)
    return GlobalMessage(content(d, max_content_bytes), client_id(d))


def room_event(data: Any) -> RoomEvent:
    d = _map(data)
    event = d.get("event")
    if not isinstance(event, str) or not _EVENT_NAME.fullmatch(event):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "event must match [a-z0-9:_-]{1,64}")
    durable = d.get("durable", False)
    if not isinstance(durable, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'durable' must be a boolean")
    return RoomEvent(room_id(d), event, d.get("data"), durable, client_id(d))


def batch_items(data: Any) -> list[Any]:
    """The inner frames of a ``batch``: a list of frames, or the tutorial's
    ``{messages: [{event, data}, ...]}`` whose ``event`` names the type."""
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        items: list[Any] = [
            {
                "type": m.get("event"),
                "data": m.get("data"),
                **({"id": m["id"]} if "id" in m else {}),
            }
            if isinstance(m, dict)
            else m
            for m in data["messages"]
        ]
    elif isinstance(data, list):
        items = data
    else:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "batch data must be a list of frames or {messages: [...]}"
        )
    if len(items) > MAX_BATCH:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"at most {MAX_BATCH} frames in a batch")
    return items


def history_page(data: Any) -> tuple[str | None, str | None, int]:
    """``{roomId | direct: true, cursor?, limit?}`` as (room id, None for the inbox; cursor;
    limit)."""
    d = _map(data)
    limit = d.get("limit", 50)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_HISTORY:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"limit must be 1 to {MAX_HISTORY}")
    cursor = d.get("cursor")
    if cursor is not None and (not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "cursor must be a cursor string from history")
    if d.get("direct") is True:
        return None, cursor, limit
    return room_id(d), cursor, limit


# Users one presence:users, presence:subscribe or presence:unsubscribe names;
# members per page of a room's presence.
MAX_PRESENCE_USERS = 100
MAX_PRESENCE_PAGE = 1000


def presence_page(data: Any) -> tuple[str, str | None, int]:
    """``{roomId, cursor?, limit?}`` of a ``presence`` query."""
    d = data if isinstance(data, dict) else {"roomId": data}
    limit = d.get("limit", MAX_PRESENCE_PAGE)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PRESENCE_PAGE:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"limit must be 1 to {MAX_PRESENCE_PAGE}")
    cursor = d.get("cursor")
    if cursor is not None and not is_valid_id(cursor, MAX_USER_ID):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "cursor must be the cursor of the last page")
    return room_id(d), cursor, limit


def user_ids(data: Any) -> list[str]:
    """``{userIds: [...]}``: 1 to MAX_PRESENCE_USERS valid user ids, duplicates dropped."""
    ids = _map(data).get("userIds")
    if not isinstance(ids, list) or not ids:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'userIds' must be a non-empty list")
    if len(ids) > MAX_PRESENCE_USERS:
        raise ProtocolError(
            ErrorCode.LIMIT_EXCEEDED, f"at most {MAX_PRESENCE_USERS} userIds per request"
        )
    for value in ids:
        if not is_valid_id(value, MAX_USER_ID):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"userIds must be 1 to {MAX_USER_ID} printable characters without whitespace",
            )
    return list(dict.fromkeys(ids))


def auth_token(data: Any) -> str:
    token = _map(data).get("token")
    if not isinstance(token, str) or not token:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'token' must be a non-empty string")
    return token


def ack_ok(frame_id: int, data: Any) -> dict[str, Any]:
    return {"type": "ack", "id": frame_id, "ok": True, "data": data}


def ack_error(frame_id: int, error: ProtocolError) -> dict[str, Any]:
    return {"type": "ack", "id": frame_id, "ok": False, "error": error.as_dict()}


def error_frame(error: ProtocolError) -> dict[str, Any]:
    return {"type": "error", "data": error.as_dict()}


def timestamp(epoch_seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, as every event carries.

    Built with time.gmtime rather than datetime: this runs once per message
    sent and showed up in the gateway's profile.
    """
    seconds = int(epoch_seconds)
    millis = int((epoch_seconds - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
