"""One WebSocket connection: authentication, its rooms, its limits, its frames.

Frames are handled strictly in arrival order. Durable sends do not hold up
the frames behind them: the publish is sent in order and its ack is written
when the PubAck arrives, through a future callback rather than a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from broker import subjects
from gateway import codec, disconnect, durable, protocol, recovery
from gateway.auth import AuthError, Identity
from gateway.codec import WireFormat
from gateway.disconnect import Disconnect
from gateway.errors import ErrorCode, ProtocolError
from gateway.hub import DIRECT_HOLD, GLOBAL_HOLD, Event, room_hold_key
from gateway.publisher import PubAck
from gateway.ratelimit import RefusalStreak, TokenBucket
from gateway.writer import Writer

if TYPE_CHECKING:
    from gateway.node import Node

log = structlog.get_logger("rtgate.client")

# Returned by handlers whose ack is written later (after a PubAck).
_DEFERRED = object()
# Refused for rate in this many consecutive seconds: closed with 1008.
_ABUSE_SECONDS = 5

Handler = Callable[["Client", protocol.Frame], Awaitable[Any]]


class Client:
    # Thousands of these live per process: slots keep each one small.
    __slots__ = (
        "_bad_frames",
        "_bucket",
        "_refusals",
        "_timers",
        "closing",
        "conn_id",
        "fmt",
        "holds",
        "identity",
        "key",
        "node",
        "opened_at",
        "remote",
        "rooms",
        "user_id",
        "watching",
        "writer",
        "ws",
    )

    def __init__(
        self,
        node: Node,
        ws: web.WebSocketResponse,
        transport: asyncio.WriteTransport,
        fmt: WireFormat,
        remote: str,
    ) -> None:
        limits = node.config.limits
        self.node = node
        self.ws = ws
        self.fmt = fmt
        self.remote = remote
        self.conn_id = secrets.token_hex(8)
        # Origin header value: lets the fan-out recognise this connection's own messages.
        self.key = f"{node.gateway_id}/{self.conn_id}"
        self.identity: Identity | None = None
        self.user_id = ""
        self.rooms: set[str] = set()
        # Users this connection watches (presence:subscribe); None for most.
        self.watching: set[str] | None = None
        self.writer = Writer(
            transport, node.flusher, limits.outbox_frames, limits.outbox_bytes, self._on_overflow
        )
        self.closing: Disconnect | None = None
        self._bucket = TokenBucket(limits.rate_per_second, limits.rate_burst, time.monotonic())
        self._bad_frames = 0
        self._refusals = RefusalStreak(_ABUSE_SECONDS)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Channels being replayed: their live frames wait here (offset, prevOffset,
        # frame) until the replay is sent. None almost always, so the fan-out
        # pays one attribute check.
        self.holds: dict[str, list[tuple[int, int, bytes]]] | None = None
        self.opened_at = time.monotonic()

    # -- lifecycle -------------------------------------------------------------

    async def start(self, identity: Identity | None) -> None:
        """Called once the socket is open: welcome now, or wait for an ``auth`` frame."""
        if identity is not None:
            await self._authenticate(identity)
        else:
            self._set_timer(
                "auth", self.node.config.auth.timeout_seconds, self.close, disconnect.AUTH_TIMEOUT
            )

    def close(self, reason: Disconnect) -> None:
        """Close with ``reason``: what is queued goes out first (an error frame that
        explains the close, say), then the close frame. A slow consumer's queue was
        already dropped."""
        if self.closing is not None:
            return
        self.closing = reason
        self.writer.flush()
        self.writer.close()
        self._cancel_timers()
        self.node.metrics.closes.labels(str(reason.code)).inc()
        self.node.spawn(self.ws.close(code=reason.code, message=disconnect.reason_bytes(reason)))

    def record_close(self, code: int | None) -> None:
        """aiohttp closed the socket itself (protocol error, oversized frame)."""
        if self.closing is None and code is not None:
            match = next((d for d in disconnect.ALL if d.code == code), None)
            self.closing = match or Disconnect(code, "protocol error", disconnect.Reconnect.NEVER)
            self.node.metrics.closes.labels(str(code)).inc()

    def finish(self) -> None:
        """The socket is gone: release everything it held."""
        self.writer.close()
        self._cancel_timers()
        self.node.hub.remove(self)

    def _on_overflow(self) -> None:
        self.node.metrics.slow_consumers.inc()
        log.info("slow consumer", conn_id=self.conn_id, user_id=self.user_id)
        self.close(disconnect.SLOW_CONSUMER)

    # -- inbound ---------------------------------------------------------------

    async def receive(self, raw: bytes, text: bool) -> None:
        """Handle one inbound WebSocket message (``text``: it came in a text frame)."""
        if self.closing is not None:
            return
        metrics = self.node.metrics
        metrics.bytes_received.inc(len(raw))
        self.node.frames_in += 1
        # Every message spends a token, malformed ones too: garbage is no way
        # around the rate limit.
        allowed = self._bucket.take(time.monotonic())
        try:
            if text and self.fmt is WireFormat.MSGPACK:
                raise ProtocolError(ErrorCode.BAD_FRAME, "text frame on a msgpack connection")
            frame = protocol.parse_frame(codec.decode(self.fmt, raw))
        except ProtocolError as exc:
            metrics.frames_by_type["invalid"].inc()
            self._bad_frame(exc)
            return
        self._bad_frames = 0
        if frame.type == "batch" and allowed:
            self._bucket.refund()  # its inner frames pay, each as if sent alone
        await self._dispatch(frame, allowed)

    async def _dispatch(self, frame: protocol.Frame, allowed: bool) -> None:
        kind = frame.type
        counters = self.node.metrics.frames_by_type
        counters.get(kind, counters["unknown"]).inc()
        if not allowed:
            self._fail(frame, ProtocolError(ErrorCode.RATE_LIMITED, "too many frames, slow down"))
            if self._refusals.refused(time.monotonic()):
                self.close(disconnect.POLICY_RATE)
            return
        handler = _HANDLERS.get(kind)
        if handler is None:
            self._fail(frame, ProtocolError(ErrorCode.BAD_REQUEST, f"unknown type '{kind[:64]}'"))
            return
        if self.identity is None and kind not in ("auth", "ping"):
            self._fail(frame, ProtocolError(ErrorCode.UNAUTHENTICATED, "authenticate first"))
            return
        try:
            result = await handler(self, frame)
        except ProtocolError as exc:
            self._fail(frame, exc)
            return
        except Exception:
            log.exception("handler failed", type=kind, conn_id=self.conn_id)
            self._fail(frame, ProtocolError(ErrorCode.INTERNAL, "internal error"))
            return
        if result is not _DEFERRED and frame.id is not None:
            self.send(protocol.ack_ok(frame.id, result))

    def _bad_frame(self, exc: ProtocolError) -> None:
        self._bad_frames += 1
        self._report(None, exc)
        if self._bad_frames >= self.node.config.limits.max_bad_frames:
            self.close(disconnect.BAD_FRAMES)

    def _fail(self, frame: protocol.Frame, exc: ProtocolError) -> None:
        self._report(frame.id, exc)

    def _report(self, frame_id: int | None, exc: ProtocolError) -> None:
        self.node.metrics.errors.labels(exc.code.value).inc()
        self.node.errors_out += 1
        if frame_id is not None:
            self.send(protocol.ack_error(frame_id, exc))
        else:
            self.send(protocol.error_frame(exc))

    # -- replay holds ------------------------------------------------------------

    def hold(self, key: str, parsed: Event, frame: bytes) -> bool:
        """Keep a live frame of a channel being replayed; False if it is not held."""
        assert self.holds is not None
        held = self.holds.get(key)
        if held is None:
            return False
        held.append((parsed.offset, parsed.prev, frame))
        return True

    def holds_start(self, key: str) -> None:
        if self.holds is None:
            self.holds = {}
        self.holds.setdefault(key, [])

    def holds_peek(self, key: str) -> list[tuple[int, int, bytes]]:
        return self.holds.get(key, []) if self.holds is not None else []

    def holds_release(self, key: str, delivered: int | None) -> int:
        """Send the held frames newer than ``delivered`` (all when None); stop holding.

        Returns the newest stored offset the client now has.
        """
        held = self.holds.pop(key, []) if self.holds is not None else []
        if self.holds is not None and not self.holds:
            self.holds = None
        newest = delivered or 0
        for offset, _prev, frame in held:
            if delivered is None or offset == 0 or offset > delivered:
                self.writer.send(frame)
                newest = max(newest, offset)
        return newest

    # -- outbound --------------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        self.writer.send(codec.encode_frame(self.fmt, obj))

    # -- auth ------------------------------------------------------------------

    async def _authenticate(self, identity: Identity) -> None:
        """First time: subscribe the user's inbox and welcome. A refresh: leave the
        rooms the new token no longer allows and renew the expiry timers."""
        if self.node.bans.denied(identity.user_id, time.time()) is not None:
            self.close(disconnect.REVOKED)
            return
        previous = self.identity
        self.identity = identity
        self.user_id = identity.user_id
        self._cancel_timer("auth")
        self._schedule_expiry(identity)
        if previous is not None:
            # A refreshed token may carry a new display name.
            self.node.presence.renamed(self, previous.username)
            for room_id in sorted(self.rooms):
                if not identity.may_join(room_id):
                    self.node.hub.leave(self, room_id)
                    self.send(
                        {
                            "type": "room:removed",
                            "data": {
                                "roomId": room_id,
                                "reason": "token no longer allows this room",
                            },
                        }
                    )
            return
        if self._over_user_cap(identity.user_id):
            self.close(disconnect.TOO_MANY_CONNECTIONS)
            return
        try:
            await self.node.hub.authenticated_as(self, identity.user_id)
        except Exception as exc:
            log.warning("inbox subscription failed", user_id=identity.user_id, error=repr(exc))
            self.close(disconnect.UNAVAILABLE)
            return
        log.info("connected", conn_id=self.conn_id, user_id=identity.user_id, remote=self.remote)
        self.send({"type": "welcome", "data": self._welcome()})

    def remove_from_room(self, room_id: str, reason: str) -> None:
        """A kick: leave the room and say so."""
        if self.node.hub.leave(self, room_id):
            self.send({"type": "room:removed", "data": {"roomId": room_id, "reason": reason}})

    def _over_user_cap(self, user_id: str) -> bool:
        return len(self.node.hub.by_user(user_id)) >= self.node.config.edge.max_connections_per_user

    def _schedule_expiry(self, identity: Identity) -> None:
        self._cancel_timer("expiry")
        self._cancel_timer("expiring")
        expires = identity.expires_at
        if expires is None:
            return
        auth = self.node.config.auth
        now = time.time()
        self._set_timer(
            "expiry",
            max(0.0, expires + auth.leeway_seconds - now),
            self.close,
            disconnect.TOKEN_EXPIRED,
        )
        if auth.expiring_notice_seconds > 0:
            self._set_timer(
                "expiring",
                max(0.0, expires - auth.expiring_notice_seconds - now),
                self.send,
                {"type": "auth:expiring", "data": {"expiresAt": protocol.timestamp(expires)}},
            )

    def _welcome(self) -> dict[str, Any]:
        cfg = self.node.config
        assert self.identity is not None
        return {
            "sessionId": self.conn_id,
            "userId": self.identity.user_id,
            "username": self.identity.username,
            "gatewayId": self.node.gateway_id,
            "heartbeatSeconds": cfg.server.heartbeat_seconds,
            "dedupWindowSeconds": self.node.dedup_window,
            "limits": {
                "ratePerSecond": cfg.limits.rate_per_second,
                "rateBurst": cfg.limits.rate_burst,
                "maxFrameBytes": cfg.limits.max_frame_bytes,
                "maxContentBytes": cfg.limits.max_content_bytes,
                "maxRooms": cfg.limits.max_rooms,
            },
        }

    async def on_auth(self, frame: protocol.Frame) -> Any:
        token = protocol.auth_token(frame.data)
        try:
            identity = self.node.auth.verify(token)
        except AuthError as exc:
            self.close(
                Disconnect(disconnect.BAD_TOKEN.code, str(exc), disconnect.BAD_TOKEN.reconnect)
            )
            return _DEFERRED
        if self.identity is not None and identity.user_id != self.identity.user_id:
            self.close(
                Disconnect(
                    disconnect.BAD_TOKEN.code,
                    "token is for another user",
                    disconnect.BAD_TOKEN.reconnect,
                )
            )
            return _DEFERRED
        if self.identity is None and self._over_user_cap(identity.user_id):
            self.close(disconnect.TOO_MANY_CONNECTIONS)
            return _DEFERRED
        if self.node.bans.denied(identity.user_id, time.time()) is not None:
            self.close(disconnect.REVOKED)  # before any ack: a denied user gets no "ok"
            return _DEFERRED
        if self.identity is None and frame.id is not None:
            # Ack before welcome: the client learns its request worked, then its session.
            self.send(protocol.ack_ok(frame.id, _identity_data(identity)))
            await self._authenticate(identity)
            return _DEFERRED
        await self._authenticate(identity)
        return _identity_data(identity)

    # -- rooms -----------------------------------------------------------------

    def _identity(self) -> Identity:
        assert self.identity is not None, "handlers other than auth and ping need auth"
        return self.identity

    def _check_member(self, room_id: str) -> None:
        assert self.identity is not None
        if room_id not in self.rooms:
            raise ProtocolError(ErrorCode.FORBIDDEN, "join the room before posting to it")
        if not self.identity.may_publish(room_id):
            raise ProtocolError(ErrorCode.FORBIDDEN, "no publish rights for this room")

    async def on_join(self, frame: protocol.Frame) -> Any:
        room_id = protocol.room_id(frame.data)
        since_raw = frame.data.get("since") if isinstance(frame.data, dict) else None
        since = recovery.position(since_raw) if since_raw is not None else None
        self._check_may_join(room_id)
        if since is None:
            new = await self._join(room_id)
            node = self.node
            try:
                offset = await node.room_position(room_id)
            except ProtocolError:
                if new:  # a failed re-join keeps the membership it had
                    node.hub.leave(self, room_id)
                raise
            return {"roomId": room_id, "offset": offset, "epoch": node.room_epoch()}
        budget = recovery.Budget(self.node.config.limits.resume_budget)
        result = await self._join_and_replay(room_id, since, budget)
        return {
            "roomId": room_id,
            "offset": result["offset"],
            "epoch": result["epoch"],
            "rooms": {room_id: result},
        }

    def _check_may_read(self, room_id: str) -> None:
        """Joining, resuming and reading history share one rule: the token and any ban."""
        if not self._identity().may_join(room_id):
            raise ProtocolError(ErrorCode.FORBIDDEN, "token does not allow this room")
        ban = self.node.bans.banned(room_id, self.user_id, time.time())
        if ban is not None:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"banned from this room for another {int(ban[0] - time.time()) + 1} s",
            )

    def _check_may_join(self, room_id: str) -> None:
        self._check_may_read(room_id)
        if not self.node.nats_connected:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "messaging backbone unavailable")

    async def _join(self, room_id: str) -> bool:
        """Join (idempotent); True when the connection was not in the room before."""
        if room_id in self.rooms:
            return False
        limit = self.node.config.limits.max_rooms
        if len(self.rooms) >= limit:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"at most {limit} rooms per connection")
        try:
            await self.node.hub.join(self, room_id)
        except Exception as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "could not subscribe to room") from exc
        return True

    async def _join_and_replay(
        self, room_id: str, since: recovery.Position | None, budget: recovery.Budget
    ) -> dict[str, Any]:
        key = room_hold_key(room_id)
        self.holds_start(key)
        try:
            new = await self._join(room_id)
        except BaseException:
            self.holds_release(key, None)
            raise
        target = recovery.Target(key, subjects.ROOMS_STREAM, subjects.room_subject(room_id))
        try:
            return await recovery.replay(self, target, since, budget)
        except ProtocolError:
            if new:
                self.node.hub.leave(self, room_id)
            raise

    async def on_resume(self, frame: protocol.Frame) -> Any:
        """After reconnecting anywhere: rejoin rooms and replay what was missed, in order."""
        data = frame.data
        if not isinstance(data, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'data' must be a map")
        rooms = data.get("rooms", {})
        if not isinstance(rooms, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'rooms' must map room ids to positions")
        limit = self.node.config.limits.max_rooms
        if len(rooms) > limit:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"at most {limit} rooms per connection")
        # Validate everything before acting on anything.
        wanted = {
            protocol.room_id(room_id): recovery.position(pos) for room_id, pos in rooms.items()
        }
        extra = {
            name: recovery.position(data[name])
            for name in ("direct", "global")
            if data.get(name) is not None
        }
        if not self.node.nats_connected:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "messaging backbone unavailable")
        budget = recovery.Budget(self.node.config.limits.resume_budget)
        result: dict[str, Any] = {"rooms": {}}
        for room_id, since in wanted.items():
            try:
                # Authorized again against the current token and bans: no skipping auth.
                self._check_may_read(room_id)
                result["rooms"][room_id] = await self._join_and_replay(room_id, since, budget)
            except ProtocolError as exc:
                result["rooms"][room_id] = {"recovered": False, "error": exc.as_dict()}
        for name, since in extra.items():
            target = self._personal_target(name)
            self.holds_start(target.hold_key)
            try:
                result[name] = await recovery.replay(self, target, since, budget)
            except ProtocolError as exc:
                result[name] = {"recovered": False, "error": exc.as_dict()}
        return result

    def _personal_target(self, name: str) -> recovery.Target:
        if name == "direct":
            return recovery.Target(
                DIRECT_HOLD, subjects.DIRECT_STREAM, subjects.direct_subject(self.user_id)
            )
        return recovery.Target(GLOBAL_HOLD, subjects.GLOBAL_STREAM, subjects.GLOBAL_SUBJECT)

    async def on_leave(self, frame: protocol.Frame) -> Any:
        room_id = protocol.room_id(frame.data)
        self.node.hub.leave(self, room_id)
        return {"roomId": room_id}

    # -- messages --------------------------------------------------------------

    async def on_chat(self, frame: protocol.Frame) -> Any:
        msg = protocol.chat_message(frame.data, self.node.config.limits.max_content_bytes)
        self._check_member(msg.room_id)
        identity = self._identity()
        body = durable.chat_body(msg.room_id, identity.user_id, identity.username, msg.content)
        return await self._publish_durable(frame, durable.chat(msg.room_id), body, msg.client_id)

    async def on_direct(self, frame: protocol.Frame) -> Any:
        msg = protocol.direct_message(frame.data, self.node.config.limits.max_content_bytes)
        identity = self._identity()
        if (
            self.node.config.presence.direct_messages == "shared-rooms"
            and msg.to_user_id != identity.user_id
        ):
            # Whether or not the recipient is online: refusing only offline
            # strangers would tell the sender who is online.
            await self.node.presence.visible(identity.user_id, [msg.to_user_id], "shared-rooms")
        body = durable.direct_body(identity.user_id, identity.username, msg.to_user_id, msg.content)
        return await self._publish_durable(
            frame, durable.direct(msg.to_user_id), body, msg.client_id
        )

    async def on_global(self, frame: protocol.Frame) -> Any:
        msg = protocol.global_message(frame.data, self.node.config.limits.max_content_bytes)
        identity = self._identity()
        if not identity.admin:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only admins may broadcast to everyone")
        body = durable.global_body(identity.user_id, identity.username, msg.content)
        return await self._publish_durable(frame, durable.broadcast(), body, msg.client_id)

    async def on_room_event(self, frame: protocol.Frame) -> Any:
        ev = protocol.room_event(frame.data)
        self._check_member(ev.room_id)
        identity = self._identity()
        body = durable.event_body(
            ev.room_id, ev.event, ev.data, identity.user_id, identity.username
        )
        if ev.durable:
            return await self._publish_durable(
                frame, durable.room_event(ev.room_id), body, ev.client_id
            )
        node = self.node
        if not node.nats_connected:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "messaging backbone unavailable")
        # Checked like a durable event: every recipient's wire format must carry it.
        payload = durable.payload(
            {"type": "room:event", "data": body}, node.config.limits.max_frame_bytes
        )
        await node.publish_ephemeral(subjects.live_room_subject(ev.room_id), payload, self.key)
        return None

    async def _publish_durable(
        self,
        frame: protocol.Frame,
        target: durable.Target,
        body: dict[str, Any],
        client_id: str | None,
    ) -> Any:
        """Store ``body`` in its stream; the ack is written when the PubAck arrives."""
        started = time.perf_counter()
        future = await durable.send(
            self.node, target, body, user_id=self.user_id, client_id=client_id, origin=self.key
        )
        future.add_done_callback(
            functools.partial(self._on_stored, frame.id, target, body, started)
        )
        return _DEFERRED

    def _on_stored(
        self,
        frame_id: int | None,
        target: durable.Target,
        body: dict[str, Any],
        started: float,
        future: asyncio.Future[PubAck],
    ) -> None:
        node = self.node
        node.metrics.publish_latency.observe(time.perf_counter() - started)
        exc = future.exception()
        if exc is not None:
            error = (
                exc
                if isinstance(exc, ProtocolError)
                else ProtocolError(ErrorCode.INTERNAL, "publish failed")
            )
            self._report(frame_id, error)
            return
        ack = future.result()
        if frame_id is None:
            return
        if ack.duplicate:
            node.spawn(self._ack_duplicate(frame_id, target, ack.seq))
            return
        self.send(
            protocol.ack_ok(frame_id, target.ack(durable.stored(node, target, body, ack.seq)))
        )

    async def _ack_duplicate(self, frame_id: int, target: durable.Target, seq: int) -> None:
        try:
            message = await durable.original(self.node, target, seq)
        except ProtocolError as exc:
            self._report(frame_id, exc)
            return
        self.send(protocol.ack_ok(frame_id, target.ack(message)))

    async def on_history(self, frame: protocol.Frame) -> Any:
        room_id, cursor, limit = protocol.history_page(frame.data)
        if room_id is None:
            channel = {"kind": "direct", "id": self._identity().user_id}
        else:
            self._check_may_read(room_id)  # the same rule as joining
            channel = {"kind": "room", "id": room_id}
        return await self.node.history(channel, cursor, limit)

    # -- presence --------------------------------------------------------------

    async def on_presence(self, frame: protocol.Frame) -> Any:
        """Members of a room, paged; the same rule as joining."""
        room_id, cursor, limit = protocol.presence_page(frame.data)
        self._check_may_read(room_id)
        return await self.node.presence.room_page(room_id, cursor, limit)

    async def on_presence_users(self, frame: protocol.Frame) -> Any:
        users = protocol.user_ids(frame.data)
        node = self.node
        online = await node.presence.visible(self.user_id, users, node.config.presence.visibility)
        return {"online": online}

    async def on_presence_subscribe(self, frame: protocol.Frame) -> Any:
        """Watch users; the ack's state is read after watching began, so no change
        falls between the two."""
        users = protocol.user_ids(frame.data)
        node = self.node
        policy = node.config.presence.visibility
        limit = node.config.presence.max_watched
        new = [u for u in users if self.watching is None or u not in self.watching]
        if len(self.watching or ()) + len(new) > limit:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED, f"at most {limit} watched users per connection"
            )
        if policy != "all":
            # Checked before watching: a stranger's events must never arrive.
            await node.presence.visible(self.user_id, users, policy)
        if self.conn_id not in node.hub.connections:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "connection closed")  # gone meanwhile
        node.presence.watch(self, new)
        since = node.presence.mark()
        try:
            online = await node.presence.visible(self.user_id, users, "all")
        except ProtocolError:
            node.presence.unwatch(self, new)
            raise
        # Other watchers of these users may have missed an event the answer shows;
        # and an event newer than the answer may have come in meanwhile.
        with contextlib.suppress(ProtocolError):
            await node.presence.observed(online, since, asker=self)
        online = node.presence.as_seen(online)
        return {"online": online, "watching": len(self.watching or ())}

    async def on_presence_unsubscribe(self, frame: protocol.Frame) -> Any:
        users = protocol.user_ids(frame.data)
        self.node.presence.unwatch(self, users)
        return {"watching": len(self.watching or ())}

    async def on_batch(self, frame: protocol.Frame) -> Any:
        items = protocol.batch_items(frame.data)
        for item in items:
            try:
                inner = protocol.parse_frame(item)
            except ProtocolError as exc:
                self._report(None, exc)
                continue
            allowed = self._bucket.take(time.monotonic())
            if inner.type == "batch":
                self._fail(inner, ProtocolError(ErrorCode.BAD_REQUEST, "batches do not nest"))
                continue
            await self._dispatch(inner, allowed)
            if self.closing is not None:
                break
        return {"count": len(items)}

    async def on_typing(self, frame: protocol.Frame) -> Any:
        typing = protocol.typing(frame.data)
        self._check_member(typing.room_id)
        assert self.identity is not None
        event = {
            "type": "chat:typing",
            "data": {
                "roomId": typing.room_id,
                "userId": self.identity.user_id,
                "username": self.identity.username,
                "isTyping": typing.is_typing,
            },
        }
        node = self.node
        if not node.nats_connected:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "messaging backbone unavailable")
        key = (self.identity.user_id, typing.room_id)
        now = time.monotonic()
        offer = node.typing.offer(key, event, now)
        if offer.send:
            await node.publish_ephemeral(
                subjects.live_room_subject(typing.room_id),
                codec.encode_payload(WireFormat.JSON, event),
                self.key,
            )
        elif offer.release_at is not None:
            asyncio.get_running_loop().call_later(
                max(0.0, offer.release_at - now), self._release_typing, key, typing.room_id
            )
        return None

    def _release_typing(self, key: tuple[str, str], room_id: str) -> None:
        node = self.node
        sent, event = node.typing.release(key, time.monotonic())
        still_member = self.closing is None and room_id in self.rooms
        if sent and event is not None and still_member and node.nats_connected:
            node.spawn(
                node.publish_ephemeral(
                    subjects.live_room_subject(room_id),
                    codec.encode_payload(WireFormat.JSON, event),
                    self.key,
                )
            )

    async def on_ping(self, frame: protocol.Frame) -> Any:
        self.send({"type": "pong", "data": frame.data})
        return frame.data

    # -- timers ----------------------------------------------------------------

    def _set_timer(
        self, name: str, delay: float, callback: Callable[..., None], *args: Any
    ) -> None:
        self._cancel_timer(name)
        self._timers[name] = asyncio.get_running_loop().call_later(delay, callback, *args)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _cancel_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


def _identity_data(identity: Identity) -> dict[str, Any]:
    expires = identity.expires_at
    return {
        "userId": identity.user_id,
        "username": identity.username,
        "expiresAt": protocol.timestamp(expires) if expires is not None else None,
    }


_HANDLERS: dict[str, Handler] = {
    "auth": Client.on_auth,
    "presence": Client.on_presence,
    "presence:users": Client.on_presence_users,
    "presence:subscribe": Client.on_presence_subscribe,
    "presence:unsubscribe": Client.on_presence_unsubscribe,
    "room:join": Client.on_join,
    "room:leave": Client.on_leave,
    "chat:message": Client.on_chat,
    "chat:typing": Client.on_typing,
    "ping": Client.on_ping,
    "direct:message": Client.on_direct,
    "broadcast:global": Client.on_global,
    "room:event": Client.on_room_event,
    "batch": Client.on_batch,
    "resume": Client.on_resume,
    "history": Client.on_history,
}
