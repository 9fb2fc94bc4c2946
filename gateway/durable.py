"""Durable sends: one path into the streams for clients and the server API alike.

Every durable event (chat, direct, global, durable room event) is published
to its stream with the sender's origin and, for retries, a Nats-Msg-Id;
the sender is answered only from the PubAck, and a deduplicated retry is
answered with the message as first stored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker import subjects
from gateway import codec
from gateway.codec import WireFormat
from gateway.errors import ErrorCode, ProtocolError
from gateway.protocol import timestamp
from gateway.publisher import PubAck

if TYPE_CHECKING:
    from gateway.node import Node


def message_ack(message: dict[str, Any]) -> dict[str, Any]:
    return {"message": message}


def offset_ack(message: dict[str, Any]) -> dict[str, Any]:
    return {"id": message["id"], "offset": message["offset"], "epoch": message["epoch"]}


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where a durable send goes and how its ack looks."""

    stream: str
    subject: str
    kind: str
    # Scopes the clientId (room id, recipient): a clientId reused elsewhere is new.
    dedup_scope: str
    ack: Callable[[dict[str, Any]], dict[str, Any]] = message_ack


def chat(room_id: str) -> Target:
    return Target(subjects.ROOMS_STREAM, subjects.room_subject(room_id), "chat:message", room_id)


def room_event(room_id: str) -> Target:
    return Target(
        subjects.ROOMS_STREAM, subjects.room_subject(room_id), "room:event", room_id, offset_ack
    )


def direct(to_user_id: str) -> Target:
    return Target(
        subjects.DIRECT_STREAM, subjects.direct_subject(to_user_id), "direct:message", to_user_id
    )


def broadcast() -> Target:
    return Target(subjects.GLOBAL_STREAM, subjects.GLOBAL_SUBJECT, "global:message", "*")


# The stored bodies, built in one place for client frames and the server API.
# Identity always comes from the token (or the API call), never the payload.


def _now() -> str:
    return timestamp(time.time())


def chat_body(room_id: str, user_id: str, username: str, content: str) -> dict[str, Any]:
    return {
        "roomId": room_id,
        "userId": user_id,
        "username": username,
        "content": content,
        "timestamp": _now(),
    }


def direct_body(from_user: str, from_name: str, to_user: str, content: str) -> dict[str, Any]:
    return {
        "fromUserId": from_user,
        "fromUsername": from_name,
        "toUserId": to_user,
        "content": content,
        "timestamp": _now(),
    }


def global_body(from_user: str, from_name: str, content: str) -> dict[str, Any]:
    return {
        "fromUserId": from_user,
        "fromUsername": from_name,
        "content": content,
        "timestamp": _now(),
    }


def event_body(room_id: str, event: str, data: Any, user_id: str, username: str) -> dict[str, Any]:
    return {
        "roomId": room_id,
        "event": event,
        "data": data,
        "userId": user_id,
        "username": username,
        "timestamp": _now(),
    }


def payload(event: dict[str, Any], max_bytes: int) -> bytes:
    try:
        data = codec.encode_payload(WireFormat.JSON, event)
    except (TypeError, ValueError) as exc:
        # msgpack clients can send binary or non-string keys; JSON clients could not read them.
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "data must be JSON-compatible (no binary, string keys)"
        ) from exc
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, "event is over the frame size limit")
    return data


async def send(
    node: Node,
    target: Target,
    body: dict[str, Any],
    *,
    user_id: str,
    client_id: str | None,
    origin: str,
) -> asyncio.Future[PubAck]:
    """Publish now; the future resolves with the PubAck (or a ProtocolError)."""
    headers = {subjects.HDR_ORIGIN: origin}
    if client_id is not None:
        headers[subjects.HDR_MSG_ID] = subjects.dedup_id(
            user_id, target.kind, target.dedup_scope, client_id
        )
    data = payload({"type": target.kind, "data": body}, node.config.limits.max_frame_bytes)
    return await node.publisher.publish(target.subject, data, headers)


def stored(node: Node, target: Target, body: dict[str, Any], seq: int) -> dict[str, Any]:
    """The message as stored at ``seq`` (what the sender is acked with)."""
    epoch = node.epochs.get(target.stream, "")
    return dict(body, id=subjects.message_id(epoch, seq), offset=seq, epoch=epoch)


async def original(node: Node, target: Target, seq: int) -> dict[str, Any]:
    """A deduplicated retry's answer: the message as first stored, not this copy."""
    event = await node.stored_event(target.stream, seq)
    return stored(node, target, event["data"], seq)


async def store(
    node: Node,
    target: Target,
    body: dict[str, Any],
    *,
    user_id: str,
    client_id: str | None,
    origin: str,
) -> dict[str, Any]:
    """Publish and wait: the ack data once the stream has stored the message."""
    ack = await (
        await send(node, target, body, user_id=user_id, client_id=client_id, origin=origin)
    )
    message = (
        await original(node, target, ack.seq)
        if ack.duplicate
        else stored(node, target, body, ack.seq)
    )
    return target.ack(message)
