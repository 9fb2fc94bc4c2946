"""The presence messages between gateways and the presence service (sans-I/O).

Both tiers import this module: gateways encode what they report, the service
decodes it, and the reverse for sync requests. Everything is JSON so that a
backend can read the subjects with the nats CLI (docs/nats.md). Decoding
checks shapes and raises ``WireError``; the service drops such a message with
a warning and lets the next heartbeat's digest repair whatever it carried.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

from broker.presence_state import FullState, PresenceEvent, RoomUserJoined, RoomUserLeft

# A sync is cut into messages of about this size: far below NATS's default
# max_payload (1 MiB) even with the largest rooms list a connection may hold.
SYNC_PART_BYTES = 256 * 1024

EVENT_KINDS = ("connect", "disconnect", "join", "leave")


class WireError(ValueError):
    """A presence message that does not have the documented shape."""


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One connection or membership change a gateway reports."""

    kind: str  # one of EVENT_KINDS
    conn: str
    user: str
    username: str
    room: str = ""  # join and leave only

    def as_dict(self) -> dict[str, str]:
        out = {"type": self.kind, "conn": self.conn, "userId": self.user, "username": self.username}
        if self.room:
            out["roomId"] = self.room
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class SyncPart:
    sync_id: str
    part: int
    parts: int
    connections: dict[str, tuple[str, str, list[str]]]


# -- gateway -> service -------------------------------------------------------


def encode_changes(gateway: str, changes: Iterable[Change]) -> bytes:
    return json.dumps({"gateway": gateway, "events": [c.as_dict() for c in changes]}).encode()


def encode_heartbeat(gateway: str, digest: str, connections: int, interval: float) -> bytes:
    return json.dumps(
        {
            "gateway": gateway,
            "digest": digest,
            "connections": connections,
            "intervalSeconds": interval,
        }
    ).encode()


def encode_sync(gateway: str, state: FullState) -> Iterator[bytes]:
    """The full state as one or more messages, in order; an empty state is one message."""
    sync_id = secrets.token_hex(8)
    entries = [
        json.dumps([conn, user, username, sorted(rooms)])
        for conn, (user, username, rooms) in state.items()
    ]
    chunks: list[list[str]] = [[]]
    size = 0
    for entry in entries:
        if size + len(entry) > SYNC_PART_BYTES and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += len(entry) + 1
    for i, chunk in enumerate(chunks):
        head = json.dumps({"gateway": gateway, "syncId": sync_id, "part": i, "parts": len(chunks)})
        # Built by hand so each entry is encoded once.
        yield (head[:-1] + ', "connections": [' + ",".join(chunk) + "]}").encode()


def parse(data: bytes) -> dict[str, Any]:
    """A report's JSON object; the decoders below take what this returns."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("not a JSON object")
    return obj


def _str(obj: dict[str, Any], key: str, *, empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (not value and not empty):
        raise WireError(f"'{key}' must be a non-empty string")
    return value


def decode_changes(obj: dict[str, Any]) -> list[Change]:
    events = obj.get("events")
    if not isinstance(events, list):
        raise WireError("'events' must be a list")
    out: list[Change] = []
    for event in events:
        if not isinstance(event, dict) or event.get("type") not in EVENT_KINDS:
            raise WireError(f"unknown presence event {str(event)[:80]}")
        kind = event["type"]
        room = _str(event, "roomId") if kind in ("join", "leave") else ""
        out.append(
            Change(
                kind,
                _str(event, "conn"),
                _str(event, "userId"),
                _str(event, "username", empty=True),
                room,
            )
        )
    return out


def decode_heartbeat(obj: dict[str, Any]) -> str:
    """The digest a heartbeat carries."""
    return _str(obj, "digest")


def decode_sync(obj: dict[str, Any]) -> SyncPart:
    part, parts = obj.get("part"), obj.get("parts")
    if not isinstance(part, int) or not isinstance(parts, int) or not 0 <= part < parts:
        raise WireError("'part' and 'parts' must be integers, 0 <= part < parts")
    raw = obj.get("connections")
    if not isinstance(raw, list):
        raise WireError("'connections' must be a list")
    connections: dict[str, tuple[str, str, list[str]]] = {}
    for entry in raw:
        if not (
            isinstance(entry, list)
            and len(entry) == 4
            and all(isinstance(x, str) for x in entry[:3])
            and isinstance(entry[3], list)
            and all(isinstance(r, str) for r in entry[3])
        ):
            raise WireError("a connection must be [conn, userId, username, [roomIds]]")
        connections[entry[0]] = (entry[1], entry[2], entry[3])
    return SyncPart(_str(obj, "syncId"), part, parts, connections)


Report = list[Change] | str | SyncPart


def decode(kind: str, obj: Any) -> Report:
    """A report of ``kind`` (the subject's: events, heartbeat, sync), checked."""
    if not isinstance(obj, dict):
        raise WireError("not a JSON object")
    if kind == "events":
        return decode_changes(obj)
    if kind == "heartbeat":
        return decode_heartbeat(obj)
    if kind == "sync":
        return decode_sync(obj)
    raise WireError(f"unknown report kind {kind[:32]!r}")


# -- service -> gateways and clients --------------------------------------------


def encode_sync_request(revision: int, reason: str) -> bytes:
    return json.dumps({"revision": revision, "reason": reason}).encode()


def event_frame(event: PresenceEvent) -> dict[str, Any]:
    """The frame clients receive, exactly as the service publishes it."""
    data: dict[str, Any]
    if isinstance(event, RoomUserJoined | RoomUserLeft):
        data = {"roomId": event.room, "userId": event.user, "username": event.username}
    else:
        data = {"userId": event.user, "username": event.username}
        socket_count = getattr(event, "socket_count", None)
        if socket_count is not None:
            data["socketCount"] = socket_count
    return {"type": event.kind, "data": data}
