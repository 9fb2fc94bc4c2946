"""Local connections, their channels, and the fan-out from NATS to sockets.

A channel is a room or a user's direct inbox. A gateway holds one NATS
subscription per channel that has local members, made on the first local
member and dropped with the last; global messages arrive on one subscription
for the whole gateway. Each message from NATS is decoded once, encoded once
per wire format in use, and the same frame bytes are queued to every local
recipient; nothing on this path awaits a socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker import jsread, subjects
from gateway import codec
from gateway.writer import Flusher

if TYPE_CHECKING:
    from gateway.client import Client
    from gateway.presence import PresenceLink

log = structlog.get_logger("rtgate.hub")

# Stored events whose copy to the publishing connection is renamed, as in the
# tutorial: the sender sees its own message as "chat:message:sent".
_SENT_VARIANT = {"chat:message": "chat:message:sent"}
# Messages fanned out per subscription before letting the loop run the flusher.
_YIELD_EVERY = 32


@dataclasses.dataclass(eq=False, slots=True)
class Channel:
    key: str
    # How a client names this channel in its replay holds ("room:<id>", "direct", "global").
    hold_key: str = ""
    members: set[Client] = dataclasses.field(default_factory=set)
    # Offset of the last stored message delivered here: the next one's prevOffset
    # must equal it, or the gateway missed something and fills the gap first.
    last: int = 0
    sub: Subscription | None = None
    # Set once the NATS subscription exists; later members wait on it.
    # Only room channels need it (inboxes have no subscription of their own):
    # an Event costs ~0.75 KiB, per user for inboxes.
    ready: asyncio.Event | None = None
    failed: BaseException | None = None


class _Table:
    """Channels of one kind (rooms, inboxes), each with its NATS subscription."""

    def __init__(
        self,
        hub: Hub,
        live_subject: Callable[[str], str],
        hold_key: Callable[[str], str],
        on_size: Callable[[int], None] | None = None,
        *,
        confirm: bool = True,
    ) -> None:
        self._hub = hub
        self._hold_key = hold_key
        # Confirm each new subscription with a round trip (rooms: the join ack
        # promises delivery of everything after it). Inboxes skip it so that a
        # connection can authenticate while NATS is away; nats-py re-sends the
        # subscription when the link returns.
        self._confirm = confirm
        self._live_subject = live_subject
        self._on_size = on_size
        self.channels: dict[str, Channel] = {}

    def _changed(self) -> None:
        if self._on_size is not None:
            self._on_size(len(self.channels))

    async def add(self, client: Client, key: str) -> None:
        """Add a member, subscribing first if the channel is new here; raises if that fails."""
        channel = self.channels.get(key)
        if channel is None:
            ready = asyncio.Event()
            channel = Channel(key, self._hold_key(key), ready=ready)
            self.channels[key] = channel
            channel.members.add(client)
            nc = self._hub.nc
            try:
                sub = await nc.subscribe(
                    self._live_subject(key), cb=self._hub.callback(lambda _: channel)
                )
                if self._confirm:
                    # A round trip, so a message published anywhere after this
                    # returns is certain to reach the subscription.
                    await nc.flush(timeout=2)
            except BaseException as exc:
                channel.failed = exc
                ready.set()
                # A channel without a subscription serves nobody: forget it whole;
                # members that waited on it see ``failed`` and give up too.
                if self.channels.get(key) is channel:
                    del self.channels[key]
                raise
            channel.sub = sub
            ready.set()
            self._changed()
            if self.channels.get(key) is not channel:
                await _unsubscribe(sub)  # everyone left while we subscribed
            return
        channel.members.add(client)
        if channel.ready is not None and not channel.ready.is_set():
            await channel.ready.wait()
        if channel.failed is not None:
            raise channel.failed

    def discard(self, client: Client, key: str) -> None:
        channel = self.channels.get(key)
        if channel is None:
            return
        channel.members.discard(client)
        if channel.members:
            return
        del self.channels[key]
        self._changed()
        if channel.sub is not None:
            sub = channel.sub
            channel.sub = None
            # UNSUB is a buffered write, not a round trip; keep it off the caller.
            asyncio.get_running_loop().create_task(_unsubscribe(sub))

    async def close(self) -> None:
        for channel in list(self.channels.values()):
            if channel.sub is not None:
                await _unsubscribe(channel.sub)
        self.channels.clear()
        self._changed()


class Hub:
    def __init__(
        self,
        nc: Nats,
        flusher: Flusher,
        epochs: Mapping[str, str],
        on_rooms_changed: Callable[[int], None],
        presence: PresenceLink,
        on_gap_filled: Callable[[int], None] | None = None,
    ) -> None:
        self._on_gap_filled = on_gap_filled
        # Told of every authenticated connection and membership change.
        self.presence = presence
        self.nc = nc
        self._flusher = flusher
        # The node's live mapping of stream name to epoch.
        self._epochs = epochs
        self._rooms = _Table(self, subjects.live_room_subject, room_hold_key, on_rooms_changed)
        # Users' direct inboxes by encoded user id. One wildcard subscription
        # serves them all: a subscription per user costs ~7 KiB (nats-py gives
        # each a queue and a task), more than the connection itself.
        self._inboxes: dict[str, Channel] = {}
        self._direct_sub: Subscription | None = None
        self.connections: dict[str, Client] = {}
        # Set while no connection is open (a drain waits on it).
        self.empty = asyncio.Event()
        self.empty.set()
        # Authenticated connections: the audience of global messages.
        self._global = Channel("global", GLOBAL_HOLD)
        self.authenticated: set[Client] = self._global.members
        self._global_sub: Subscription | None = None

    async def start(self) -> None:
        self._global_sub = await self.nc.subscribe(
            subjects.LIVE_GLOBAL_SUBJECT, cb=self.callback(lambda _: self._global)
        )
        prefix = len(subjects.LIVE_DIRECT_PREFIX)
        inboxes = self._inboxes
        self._direct_sub = await self.nc.subscribe(
            subjects.LIVE_DIRECT_PREFIX + "*",
            cb=self.callback(lambda msg: inboxes.get(msg.subject[prefix:])),
        )

    @property
    def rooms(self) -> dict[str, Channel]:
        return self._rooms.channels

    @property
    def inboxes(self) -> dict[str, Channel]:
        return self._inboxes

    # -- connections ---------------------------------------------------------

    def add(self, client: Client) -> None:
        self.connections[client.conn_id] = client
        self.empty.clear()

    async def authenticated_as(self, client: Client, user_id: str) -> None:
        """A connection proved it is ``user_id``: it now receives that user's direct messages."""
        self.authenticated.add(client)
        self.presence.connected(client)
        token = subjects.encode_token(user_id)
        inbox = self._inboxes.get(token)
        if inbox is None:
            inbox = self._inboxes[token] = Channel(token, DIRECT_HOLD)
        inbox.members.add(client)

    def remove(self, client: Client) -> None:
        """Forget a closed connection and leave its channels (unsubscribing in the background)."""
        self.connections.pop(client.conn_id, None)
        if not self.connections:
            self.empty.set()
        if client in self.authenticated:
            # One disconnect covers the rooms: the service drops them with it.
            self.presence.disconnected(client)
            self.authenticated.discard(client)
        for room_id in list(client.rooms):
            self._rooms.discard(client, room_id)
        client.rooms.clear()
        if client.watching is not None:
            self.presence.unwatch(client)
        if client.user_id:
            token = subjects.encode_token(client.user_id)
            inbox = self._inboxes.get(token)
            if inbox is not None:
                inbox.members.discard(client)
                if not inbox.members:
                    del self._inboxes[token]

    def by_user(self, user_id: str) -> list[Client]:
        inbox = self._inboxes.get(subjects.encode_token(user_id))
        return list(inbox.members) if inbox is not None else []

    # -- rooms ---------------------------------------------------------------

    async def join(self, client: Client, room_id: str) -> None:
        # Reported with the membership, not after the subscription: the
        # presence report stays what client.rooms holds, so a sync can be read
        # from it. A failed subscription is reported as a leave right after.
        client.rooms.add(room_id)
        self.presence.joined(client, room_id)
        try:
            await self._rooms.add(client, room_id)
        except BaseException:
            if room_id in client.rooms:
                client.rooms.discard(room_id)
                self.presence.left(client, room_id)
            raise

    def leave(self, client: Client, room_id: str) -> bool:
        if room_id not in client.rooms:
            return False
        client.rooms.discard(room_id)
        self._rooms.discard(client, room_id)
        self.presence.left(client, room_id)
        return True

    # -- fan-out -------------------------------------------------------------

    def callback(self, route: Callable[[Msg], Channel | None]) -> Callable[[Msg], Any]:
        """A subscription callback; ``route`` names the channel a message is for."""
        since_yield = 0

        async def on_message(msg: Msg) -> None:
            nonlocal since_yield
            channel = route(msg)
            if channel is None:
                return  # a direct message for a user not connected here
            parsed = _parse(msg)
            if parsed is None:
                return
            if parsed.presence_revision:
                self._presence_event(channel, parsed)
                return
            if parsed.offset:
                if channel.last and parsed.prev > channel.last:
                    # Republish is at-most-once: something between what we
                    # delivered and this message never reached us. Fetch it
                    # from the stream and deliver it first, in order.
                    await self._fill_gap(channel, parsed)
                if parsed.offset <= channel.last:
                    return  # already delivered (by a gap fill)
                channel.last = parsed.offset
            self.deliver(channel.members, channel.hold_key, parsed)
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

    async def _fill_gap(self, channel: Channel, parsed: Event) -> None:
        after = channel.last
        try:
            missing = await jsread.run_of(
                self.nc,
                parsed.stream,
                parsed.subject,
                after,
                parsed.prev - after,
                timeout=2.0,
                min_last_seq=parsed.prev,
            )
        except jsread.ReadError as exc:
            log.warning(
                "could not fill a gap from the stream",
                channel=channel.key,
                after=after,
                before=parsed.offset,
                error=str(exc),
            )
            return
        if self._on_gap_filled is not None:
            self._on_gap_filled(len(missing))
        for stored in missing:
            if stored.seq >= parsed.offset:
                break
            event = stored_event(stored, parsed.stream, after)
            if event is not None:
                self.deliver(channel.members, channel.hold_key, event)
                after = stored.seq
                channel.last = stored.seq

    def _presence_event(self, channel: Channel, parsed: Event) -> None:
        """room:user_joined/left: for the room's other members, if not fenced off."""
        if not self.presence.accept_revision(parsed.presence_revision):
            return
        about = parsed.presence_user
        self.deliver([c for c in channel.members if c.user_id != about], channel.hold_key, parsed)

    def deliver_event(self, members: Collection[Client], event: dict[str, Any]) -> None:
        """Queue an event that belongs to no channel (user:online/offline to watchers)."""
        kind = event.get("type") if isinstance(event, dict) else None
        if isinstance(kind, str) and isinstance(event.get("data"), dict):
            self.deliver(members, "", Event(event, kind, None))

    def deliver(self, members: Collection[Client], hold_key: str, parsed: Event) -> None:
        """Queue one event to every member connection; never awaits."""
        if not members:
            return
        received = time.perf_counter()
        event = parsed.event
        data = event["data"]
        stored = parsed.offset > 0
        if stored:
            decorate(parsed, self._epochs.get(parsed.stream, ""))
        origin = parsed.origin
        frames: list[bytes | None] = [None, None]
        encode = codec.encode_frame
        for client in members:
            fmt = client.fmt
            if client.key == origin:
                if not stored:
                    continue  # ephemeral events skip the sender
                sent_type = _SENT_VARIANT.get(parsed.kind)
                if sent_type is not None:
                    own = encode(fmt, {"type": sent_type, "data": data})
                    if client.holds is None or not client.hold(hold_key, parsed, own):
                        client.writer.send(own)
                    continue
            cached = frames[fmt]
            frame = cached if cached is not None else encode(fmt, event)
            frames[fmt] = frame
            # A client replaying this channel gets live frames after its replay.
            if client.holds is None or not client.hold(hold_key, parsed, frame):
                client.writer.send(frame)
        self._flusher.stamp(received)

    async def close(self) -> None:
        await self._rooms.close()
        for sub in (self._global_sub, self._direct_sub):
            if sub is not None:
                await _unsubscribe(sub)


def room_hold_key(room_id: str) -> str:
    return "room:" + room_id


DIRECT_HOLD = "direct"
GLOBAL_HOLD = "global"


@dataclasses.dataclass(slots=True)
class Event:
    """One event from NATS, parsed once for every recipient."""

    event: dict[str, Any]
    kind: str
    origin: str | None
    # Stored events: their sequence and the previous one on the same subject;
    # 0 for ephemeral events.
    offset: int = 0
    prev: int = 0
    stream: str = ""
    subject: str = ""
    # Presence events: the fencing token of the service that sent it ("" otherwise),
    # and the user the event is about (their own connections do not get it).
    presence_revision: str = ""
    presence_user: str = ""


def decorate(parsed: Event, epoch: str) -> None:
    """Add what only the stream knows to a stored event's data: id, offset, epoch, prevOffset."""
    data = parsed.event["data"]
    data["id"] = subjects.message_id(epoch, parsed.offset)
    data["offset"] = parsed.offset
    data["epoch"] = epoch
    data["prevOffset"] = parsed.prev


def _parse(msg: Msg) -> Event | None:
    try:
        event = json.loads(msg.data)
        kind = event["type"]
        if not isinstance(event["data"], dict) or not isinstance(kind, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        log.warning("dropping malformed event from NATS", subject=msg.subject)
        return None
    headers = msg.headers
    if not headers:
        return Event(event, kind, None)
    origin = headers.get(subjects.HDR_ORIGIN)
    seq = headers.get(subjects.HDR_SEQUENCE)
    if seq is None:
        revision = headers.get(subjects.HDR_PRESENCE_REVISION)
        if revision is not None:
            return Event(
                event,
                kind,
                None,
                presence_revision=revision,
                presence_user=headers.get(subjects.HDR_PRESENCE_USER, ""),
            )
        return Event(event, kind, origin)
    return Event(
        event,
        kind,
        origin,
        int(seq),
        int(headers.get(subjects.HDR_LAST_SEQUENCE, "0") or 0),
        headers.get(subjects.HDR_STREAM, ""),
        headers.get("Nats-Subject", ""),
    )


def stored_event(stored: jsread.Stored, stream: str, prev: int) -> Event | None:
    """An event read back from the stream, as it would have arrived live."""
    event = stored.event
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("data"), dict)
        or not isinstance(event.get("type"), str)
    ):
        return None
    return Event(event, event["type"], None, stored.seq, prev, stream, stored.subject)


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # connection closed or draining: the server forgets it anyway
        log.debug("unsubscribe failed", error=repr(exc))
