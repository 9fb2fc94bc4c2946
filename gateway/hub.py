"""Local connections, room membership, and the fan-out from NATS to sockets.

A gateway holds one NATS subscription per room that has local members,
made on the first local join and dropped on the last leave. Each message
from NATS is decoded once, encoded once per wire format in use, and the same
frame bytes are queued to every local member; nothing on this path awaits a
socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker import subjects
from gateway import codec
from gateway.writer import Flusher

if TYPE_CHECKING:
    from gateway.client import Client

log = structlog.get_logger("rtgate.hub")

# Stored events whose copy to the publishing connection is renamed, as in the
# tutorial: the sender sees its own message as "chat:message:sent".
_SENT_VARIANT = {"chat:message": "chat:message:sent"}
# Messages fanned out per subscription before letting the loop run the flusher.
_YIELD_EVERY = 32


@dataclasses.dataclass(eq=False, slots=True)
class Room:
    room_id: str
    members: set[Client] = dataclasses.field(default_factory=set)
    sub: Subscription | None = None
    # Set once the NATS subscription exists; later joiners wait on it.
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    failed: BaseException | None = None


class Hub:
    def __init__(
        self,
        nc: Nats,
        flusher: Flusher,
        epoch: Callable[[], str],
        on_rooms_changed: Callable[[int], None],
    ) -> None:
        self._nc = nc
        self._flusher = flusher
        self._epoch = epoch
        self._on_rooms_changed = on_rooms_changed
        self.rooms: dict[str, Room] = {}
        self.connections: dict[str, Client] = {}

    # -- connections ---------------------------------------------------------

    def add(self, client: Client) -> None:
        self.connections[client.conn_id] = client

    def remove(self, client: Client) -> None:
        """Forget a closed connection and leave its rooms (unsubscribing in the background)."""
        self.connections.pop(client.conn_id, None)
        for room_id in list(client.rooms):
            self._drop_member(client, room_id)
        client.rooms.clear()

    def by_user(self, user_id: str) -> list[Client]:
        return [c for c in self.connections.values() if c.user_id == user_id]

    # -- membership ----------------------------------------------------------

    async def join(self, client: Client, room_id: str) -> None:
        """Add ``client`` to the room, subscribing to it first if it is new here."""
        room = self.rooms.get(room_id)
        if room is None:
            room = Room(room_id)
            self.rooms[room_id] = room
            room.members.add(client)
            client.rooms.add(room_id)
            try:
                sub = await self._nc.subscribe(
                    subjects.live_room_subject(room_id), cb=self._room_callback(room)
                )
                # A round trip, so a message published anywhere after the join ack
                # is certain to reach this subscription.
                await self._nc.flush(timeout=2)
            except BaseException as exc:
                room.failed = exc
                room.ready.set()
                # Nobody is served by a room without a subscription: forget it whole;
                # members that waited on it see ``failed`` and give up too.
                if self.rooms.get(room_id) is room:
                    del self.rooms[room_id]
                client.rooms.discard(room_id)
                raise
            room.sub = sub
            room.ready.set()
            self._on_rooms_changed(len(self.rooms))
            if self.rooms.get(room_id) is not room:
                # Everyone left while we subscribed.
                await _unsubscribe(sub)
            return
        room.members.add(client)
        client.rooms.add(room_id)
        if not room.ready.is_set():
            await room.ready.wait()
        if room.failed is not None:
            client.rooms.discard(room_id)
            raise room.failed

    def leave(self, client: Client, room_id: str) -> bool:
        if room_id not in client.rooms:
            return False
        client.rooms.discard(room_id)
        self._drop_member(client, room_id)
        return True

    def _drop_member(self, client: Client, room_id: str) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        room.members.discard(client)
        if room.members:
            return
        del self.rooms[room_id]
        self._on_rooms_changed(len(self.rooms))
        if room.sub is not None:
            sub = room.sub
            room.sub = None
            # UNSUB is a buffered write, not a round trip; keep it off the caller.
            asyncio.get_running_loop().create_task(_unsubscribe(sub))

    # -- fan-out -------------------------------------------------------------

    def _room_callback(self, room: Room) -> Callable[[Msg], Any]:
        since_yield = 0

        async def on_message(msg: Msg) -> None:
            nonlocal since_yield
            self.deliver(room.members, msg)
            # nats-py hands a burst of queued messages to this callback without
            # returning to the event loop, so nothing would be written until the
            # burst ends. Yielding now and then lets the flusher write (frames
            # still merge: up to this many per socket per write) and keeps
            # queues bounded by the burst slice, not the whole burst.
            since_yield += 1
            if since_yield >= _YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)

        return on_message

    def deliver(self, members: set[Client], msg: Msg) -> None:
        """Queue one NATS message to every member connection; never awaits."""
        if not members:
            return
        received = time.perf_counter()
        try:
            event = json.loads(msg.data)
            data = event["data"]
            kind = event["type"]
        except (ValueError, KeyError, TypeError):
            log.warning("dropping malformed event from NATS", subject=msg.subject)
            return
        headers = msg.headers
        origin = headers.get(subjects.HDR_ORIGIN) if headers else None
        stored = headers is not None and subjects.HDR_SEQUENCE in headers
        if stored:
            assert headers is not None
            offset = int(headers[subjects.HDR_SEQUENCE])
            epoch = self._epoch()
            data["id"] = subjects.message_id(epoch, offset)
            data["offset"] = offset
            data["epoch"] = epoch
            data["prevOffset"] = int(headers.get(subjects.HDR_LAST_SEQUENCE, "0") or 0)
        frames: list[bytes | None] = [None, None]
        encode = codec.encode_frame
        for client in members:
            if client.key == origin:
                if not stored:
                    continue  # ephemeral events skip the sender
                sent_type = _SENT_VARIANT.get(kind)
                if sent_type is not None:
                    client.writer.send(encode(client.fmt, {"type": sent_type, "data": data}))
                    continue
            fmt = client.fmt
            frame = frames[fmt]
            if frame is None:
                frame = frames[fmt] = encode(fmt, event)
            client.writer.send(frame)
        self._flusher.stamp(received)

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            if room.sub is not None:
                await _unsubscribe(room.sub)
        self.rooms.clear()


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # connection closed or draining: the server forgets it anyway
        log.debug("unsubscribe failed", error=repr(exc))
