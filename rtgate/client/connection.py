"""The asyncio client: one WebSocket at a time over aiohttp, reconnecting by the rules
of docs/protocol.md. The decisions live in the sans-I/O modules next to this one
(policy, backoff, outbox, recovery, throttle, watches); this module only wires them
to the socket and the clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import itertools
import logging
import random as random_module
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal

import aiohttp

from rtgate.client import codec, policy
from rtgate.client.backoff import Backoff, Random
from rtgate.client.clock import Clock, SystemClock
from rtgate.client.errors import (
    ConnectionClosed,
    DedupWindowExpired,
    Disconnected,
    QueueOverflow,
    RequestTimeout,
    RtgateError,
)
from rtgate.client.events import AnyCallback, Callback, Emitter
from rtgate.client.outbox import DEFAULT_LIMIT, Entry, Outbox
from rtgate.client.recovery import Fill, Recovery, Settled, room_channel
from rtgate.client.throttle import DEFAULT_INTERVAL, TypingThrottle
from rtgate.client.watches import Watches

log = logging.getLogger("rtgate.client")

State = Literal["connecting", "connected", "reconnecting", "closed"]
TokenProvider = Callable[[], Awaitable[str] | str]

# Stored by the server, deduplicated by clientId: safe to send again within the window.
DURABLE_TYPES = frozenset({"chat:message", "direct:message", "broadcast:global"})
# Reads and memberships: sending them twice does no harm.
IDEMPOTENT_TYPES = frozenset(
    {
        "room:join",
        "room:leave",
        "history",
        "presence",
        "presence:users",
        "presence:subscribe",
        "presence:unsubscribe",
        "ping",
    }
)
# A resume or a gap fill may replay thousands of messages before its ack.
RECOVERY_TIMEOUT = 30.0


def _durable(frame_type: str, data: Any) -> bool:
    if frame_type in DURABLE_TYPES:
        return True
    return frame_type == "room:event" and isinstance(data, dict) and data.get("durable") is True


@dataclasses.dataclass(slots=True)
class _Pending:
    type: str
    future: asyncio.Future[Any]
    # The application's frame; None for the client's own (auth, resume, fills).
    entry: Entry | None
    data: Any = None
    timer: asyncio.Task[None] | None = None


@dataclasses.dataclass(slots=True)
class _Ended:
    code: int | None
    reason: str
    welcomed: bool = False
    after_ms: int | None = None


class _Conn:
    """One WebSocket's state; everything it started ends with it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.welcomed = False
        self.after_ms: int | None = None
        self.code: int | None = None
        self.reason = ""
        self.refreshing = False
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection task failed", exc_info=task.exception())

    def abort(self, code: int | None, reason: str) -> None:
        """Close from our side, recording why (the server's close frame did not say)."""
        if self.code is None and not self.reason:
            self.code, self.reason = code, reason
        self.spawn(self.ws.close())

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class Client:
    """An rtgate connection that reconnects, queues while offline and recovers.

    See docs/client-python.md for every option and event.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        format: codec.Format = "json",
        queue_limit: int = DEFAULT_LIMIT,
        max_attempts: int | None = None,
        request_timeout: float = 5.0,
        backoff: Backoff | None = None,
        typing_interval: float = DEFAULT_INTERVAL,
        heartbeat: float | None = 25.0,
        connect_timeout: float = 10.0,
        positions: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        clock: Clock | None = None,
        random: Random | None = None,
    ) -> None:
        self._urls = [urls] if isinstance(urls, str) else list(urls)
        if not self._urls:
            raise ValueError("at least one URL is needed")
        if token is None and token_provider is None:
            raise ValueError("pass token or token_provider")
        if format not in codec.SUBPROTOCOLS:
            raise ValueError("format must be 'json' or 'msgpack'")
        self._token = token
        self._provider = token_provider
        self._format: codec.Format = format
        self._request_timeout = request_timeout
        backoff = backoff or Backoff()
        if max_attempts is not None:
            backoff = dataclasses.replace(backoff, max_attempts=max_attempts)
        self._backoff = backoff
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout
        self._headers = dict(headers or {})
        self._clock: Clock = clock or SystemClock()
        self._random: Random = random or random_module.random

        self._emitter = Emitter()
        self._outbox = Outbox(queue_limit)
        self._recovery = Recovery()
        if positions:
            self._recovery.load(positions)
        self._throttle = TypingThrottle(typing_interval)
        self._watches = Watches()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._timers: set[asyncio.Task[Any]] = set()

        self._state: State = "connecting"
        self._conn: _Conn | None = None
        self._welcome: dict[str, Any] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[dict[str, Any]] | None = None
        self._closing = False

    # -- public state -------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def queued(self) -> int:
        """Frames waiting in the offline queue (sent frames awaiting acks not included)."""
        return len(self._outbox)

    @property
    def dropped(self) -> int:
        """Frames dropped because the queue was full, since the client was created."""
        return self._outbox.dropped

    @property
    def welcome(self) -> dict[str, Any] | None:
        """The current connection's ``welcome`` data (the last one while offline)."""
        return self._welcome

    @property
    def rooms(self) -> list[str]:
        """Rooms the client is in (or joining), which a reconnect joins again."""
        return self._recovery.rooms

    def positions(self) -> dict[str, dict[str, Any]]:
        """Every channel's last ``{offset, epoch}``; pass it as ``positions=`` to a new
        client (after a restart, say) to resume from there."""
        return self._recovery.positions()

    # -- listeners ----------------------------------------------------------------

    def on(self, event: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(data)`` for every ``event``; returns the unsubscribe function."""
        return self._emitter.on(event, callback)

    def on_any(self, callback: AnyCallback) -> Callable[[], None]:
        """Call ``callback(event, data)`` for every event; returns the unsubscribe function."""
        return self._emitter.on_any(callback)

    def _emit(self, event: str, data: Any) -> None:
        self._emitter.emit(event, data)

    def _set_state(self, state: State) -> None:
        if state != self._state:
            self._state = state
            self._emit("state", {"state": state, "queued": len(self._outbox)})

    # -- lifecycle ----------------------------------------------------------------

    async def connect(self) -> dict[str, Any]:
        """Start, and return the first ``welcome``'s data. Failing attempts are retried
        as after a disconnect; RtgateError when the client stops for good first."""
        if self._state == "closed":
            raise ConnectionClosed("the client is closed")
        if self._first is None:
            self._first = asyncio.get_running_loop().create_future()
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
            )
            self._run_task = asyncio.get_running_loop().create_task(self._run())
        return await asyncio.shield(self._first)

    async def close(self) -> None:
        """Close the connection for good. Pending and queued requests fail with
        ConnectionClosed; a last ``disconnect`` event goes out."""
        self._closing = True
        conn = self._conn
        if conn is not None and not conn.ws.closed:
            await conn.ws.close(code=1000, message=b"client closed")
        task = self._run_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._finish(1000, "client closed")
        await self._shutdown()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _shutdown(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        if self._timers:
            await asyncio.gather(*self._timers, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def _finish(self, code: int | None, reason: str) -> None:
        """Stop for good: fail what waits, tell the application once."""
        if self._state == "closed":
            return
        self._set_state("closed")
        exc = ConnectionClosed(reason, code)
        pending, self._pending = self._pending, {}
        for p in pending.values():
            self._cancel_timer(p)
            self._fail(p.future, exc)
        for entry in self._outbox.clear():
            self._fail_entry(entry, exc)
        self._emit("disconnect", {"code": code, "reason": reason, "willReconnect": False})
        if self._first is not None and not self._first.done():
            self._first.set_exception(exc)
            # connect() may have been cancelled by its caller; nobody else reads this.
            self._first.exception()

    async def _run(self) -> None:
        attempt = 0
        index = 0
        try:
            while True:
                ended = await self._attempt(self._urls[index % len(self._urls)])
                if self._closing:
                    return
                attempt = 1 if ended.welcomed else attempt + 1
                decision = policy.decide(
                    ended.code,
                    attempt,
                    backoff=self._backoff,
                    random=self._random,
                    after_ms=ended.after_ms,
                    can_refresh=self._provider is not None,
                )
                if not decision.reconnect:
                    if decision.exhausted:
                        self._emit("reconnect_failed", {"attempts": attempt - 1})
                    self._finish(ended.code, ended.reason)
                    return
                if decision.new_token:
                    self._token = None
                if ended.welcomed:
                    self._emit(
                        "disconnect",
                        {"code": ended.code, "reason": ended.reason, "willReconnect": True},
                    )
                if self._welcome is not None:
                    self._set_state("reconnecting")
                index += 1
                self._emit(
                    "reconnecting",
                    {
                        "attempt": attempt,
                        "delay": decision.delay,
                        "url": self._urls[index % len(self._urls)],
                    },
                )
                await self._clock.sleep(decision.delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("rtgate client stopped")
            self._finish(None, f"client failed: {exc!r}")
        finally:
            if not self._closing and self._state == "closed":
                await self._shutdown()

    async def _attempt(self, url: str) -> _Ended:
        if self._token is None:
            assert self._provider is not None
            try:
                result = self._provider()
                token = await result if inspect.isawaitable(result) else result
            except Exception as exc:
                log.warning("token_provider failed: %r", exc)
                return _Ended(None, f"token_provider failed: {exc!r}")
            if not isinstance(token, str) or not token:
                return _Ended(None, "token_provider returned no token")
            self._token = token
        assert self._http is not None
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await self._http.ws_connect(
                    url,
                    protocols=(codec.SUBPROTOCOLS[self._format],),
                    autoping=True,
                    heartbeat=self._heartbeat,
                    max_msg_size=0,
                    headers=self._headers,
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # A refused handshake (HTTP 503 while draining, 429, ...) or no server.
            return _Ended(None, f"could not connect to {url}: {exc}")
        return await self._serve(ws)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> _Ended:
        conn = _Conn(ws)
        self._conn = conn
        try:
            conn.spawn(self._authenticate(conn))
            while True:
                msg = await ws.receive()
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    try:
                        frame = codec.decode(self._format, msg.data)
                    except Exception:
                        log.warning("undecodable frame from the server")
                        continue
                    if isinstance(frame, dict):
                        self._on_frame(conn, frame)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    if conn.code is None:
                        conn.code, conn.reason = msg.data, msg.extra or ""
                    break
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    conn.reason = conn.reason or f"connection error: {msg.data}"
                    break
                else:  # CLOSING, CLOSED
                    break
        finally:
            self._conn = None
            conn.cancel()
            self._connection_lost()
            if not ws.closed:
                await asyncio.shield(ws.close())
        code = conn.code if conn.code is not None else ws.close_code
        reason = conn.reason or ("connection lost" if code in (None, 1006) else "")
        return _Ended(code, reason, conn.welcomed, conn.after_ms)

    def _connection_lost(self) -> None:
        self._recovery.disconnected()
        resend: list[Entry] = []
        pending, self._pending = self._pending, {}
        for frame_id in sorted(pending):
            p = pending[frame_id]
            self._cancel_timer(p)
            if p.future.done():
                continue
            if p.entry is not None and p.entry.resendable:
                resend.append(p.entry)  # the ack is lost, not the frame's purpose
            else:
                self._fail(p.future, Disconnected(f"connection lost before the ack of {p.type}"))
        self._overflowed(self._outbox.requeue(resend))

    # -- authentication and welcome ------------------------------------------------

    async def _authenticate(self, conn: _Conn) -> None:
        try:
            await self._internal(conn, "auth", {"token": self._token})
        except Disconnected:
            return
        except RequestTimeout:
            conn.abort(None, "no answer to auth")
        except RtgateError as exc:
            # Only a token that is not a non-empty string gets an error ack.
            conn.abort(4401, f"auth refused: {exc.message}")

    async def _refresh(self, conn: _Conn) -> None:
        """``auth:expiring``: a new token before the old one runs out."""
        assert self._provider is not None
        conn.refreshing = True
        try:
            result = self._provider()
            token = await result if inspect.isawaitable(result) else result
            if not isinstance(token, str) or not token:
                raise ValueError("token_provider returned no token")
            await self._internal(conn, "auth", {"token": token})
            self._token = token
            self._emit("token_refreshed", {})
        except Exception as exc:
            # A bad token closes the connection with 4401, and so does the expiry if no
            # refresh got through: that path asks the provider again.
            log.warning("token refresh failed: %r", exc)
        finally:
            conn.refreshing = False

    def _on_welcome(self, conn: _Conn, data: Any) -> None:
        welcome = data if isinstance(data, dict) else {}
        conn.welcomed = True
        self._welcome = welcome
        limits = welcome.get("limits") if isinstance(welcome.get("limits"), dict) else {}
        assert isinstance(limits, dict)
        now = self._clock.now()
        self._outbox.configure(
            now,
            _number(limits.get("ratePerSecond")),
            _number(limits.get("rateBurst")),
            _number(welcome.get("dedupWindowSeconds")),
        )
        self._outbox.spend(now)  # the auth frame
        self._set_state("connected")
        self._emit("connect", welcome)
        if self._first is not None and not self._first.done():
            self._first.set_result(welcome)
        conn.spawn(self._resume(conn))

    async def _resume(self, conn: _Conn) -> None:
        """Rejoin and catch up on every channel, then let the queue flow."""
        attempt = 0
        while True:
            data = self._recovery.resume_data()
            try:
                ack = await self._internal(conn, "resume", data, RECOVERY_TIMEOUT)
            except Disconnected:
                return
            except RtgateError as exc:
                if exc.code in ("unavailable", "timeout", "rate_limited"):
                    # NATS is away from this gateway: the queued sends would fail too.
                    attempt += 1
                    await self._clock.sleep(self._backoff.delay(attempt, self._random))
                    continue
                self._settled(
                    conn, self._recovery.resume_failed({"code": exc.code, "message": exc.message})
                )
                break
            self._settled(conn, self._recovery.resume_result(ack))
            break
        conn.spawn(self._pump(conn))
        if self._watches.users:
            conn.spawn(self._resubscribe(conn))

    async def _resubscribe(self, conn: _Conn) -> None:
        for users in self._watches.chunks():
            await self._renew(conn, users)

    async def _renew(self, conn: _Conn, page: list[str]) -> None:
        """One chunk of watches. Under shared-rooms, users who share no room with
        us any more (offline ones included) fail the whole chunk: drop those the
        refusal names and renew the rest, until nobody is refused."""
        while page:
            try:
                ack = await self._internal(conn, "presence:subscribe", {"userIds": page})
            except RtgateError as exc:
                hidden = [u for u in exc.user_ids or () if u in page]
                if exc.code != "forbidden":
                    hidden = []
                self._not_renewed(exc, hidden)
                if not hidden:
                    return  # still ours to watch: subscribed again at the next reconnect
                page = [u for u in page if u not in hidden]
                continue
            for kind, data in self._watches.resubscribed(ack):
                self._emit(kind, data)
            return

    def _not_renewed(self, exc: RtgateError, hidden: list[str]) -> None:
        log.warning("presence watches not renewed: %s", exc)
        event: dict[str, Any] = {
            "code": exc.code,
            "message": f"presence watches not renewed: {exc.message}",
        }
        if hidden:
            # The server does not watch them now: neither do we.
            self._watches.unsubscribed(hidden)
            event["userIds"] = hidden
        self._emit("error", event)

    def _settled(self, conn: _Conn, settled: Settled) -> None:
        for kind, data in settled.deliver:
            self._emit(kind, data)
        for event in settled.events:
            self._emit("recovered", event)
        for fill in settled.retry:
            conn.spawn(self._fill(conn, fill, attempt=1))

    async def _fill(self, conn: _Conn, fill: Fill, attempt: int = 0) -> None:
        """Replay one channel from its position: a gap, or a channel the resume could not
        read. Retried with backoff while the gateway says ``unavailable``."""
        while True:
            if attempt:
                await self._clock.sleep(self._backoff.delay(attempt, self._random))
            try:
                ack = await self._internal(conn, fill.type, fill.data, RECOVERY_TIMEOUT)
            except Disconnected:
                return  # the resume after the reconnect covers this channel
            except RtgateError as exc:
                if exc.code in ("unavailable", "timeout", "rate_limited"):
                    attempt += 1
                    continue
                self._settled(
                    conn,
                    self._recovery.fill_failed(fill, {"code": exc.code, "message": exc.message}),
                )
                return
            settled = self._recovery.fill_result(fill, ack)
            retry, settled.retry = settled.retry, []
            self._settled(conn, settled)
            if not retry:
                return
            fill = retry[0]
            attempt += 1

    # -- inbound ------------------------------------------------------------------

    def _on_frame(self, conn: _Conn, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        data = frame.get("data")
        if not isinstance(kind, str):
            return
        if kind == "ack":
            self._on_ack(frame)
            return
        if kind == "welcome":
            self._on_welcome(conn, data)
            return
        if kind == "reconnect" and isinstance(data, dict):
            after = data.get("afterMs")
            if isinstance(after, int) and not isinstance(after, bool):
                conn.after_ms = after
        elif kind == "auth:expiring":
            if self._provider is not None and not conn.refreshing:
                conn.spawn(self._refresh(conn))
        elif kind == "room:removed" and isinstance(data, dict):
            room = data.get("roomId")
            if isinstance(room, str):
                self._recovery.forget(room)
                self._throttle.forget(room)
        elif kind in ("user:online", "user:offline"):
            self._watches.event(kind, data)
        observed = self._recovery.observe(kind, data)
        if observed.notice is not None:
            self._emit("recovered", observed.notice)
        if observed.fill is not None:
            conn.spawn(self._fill(conn, observed.fill))
        if observed.deliver:
            self._emit(kind, data)

    def _on_ack(self, frame: dict[str, Any]) -> None:
        frame_id = frame.get("id")
        p = self._pending.pop(frame_id, None) if isinstance(frame_id, int) else None
        if p is None:
            return  # the request timed out already
        self._cancel_timer(p)
        if frame.get("ok") is True:
            data = frame.get("data")
            if p.entry is not None:
                self._acked(p.entry, data)
            if not p.future.done():
                p.future.set_result(data)
            return
        error = frame.get("error") if isinstance(frame.get("error"), dict) else {}
        assert isinstance(error, dict)
        if p.entry is not None and p.entry.type == "room:join":
            room = _room_of(p.entry)
            # A failed join of a new room leaves the connection out of it; a failed
            # re-join keeps it in (docs/protocol.md, room:join).
            if room is not None and self._recovery.position(room_channel(room)) is None:
                self._recovery.forget(room)
        user_ids = error.get("userIds")
        self._fail(
            p.future,
            RtgateError(
                str(error.get("code", "internal")),
                str(error.get("message", "")),
                user_ids=[str(u) for u in user_ids] if isinstance(user_ids, list) else None,
            ),
        )

    def _acked(self, entry: Entry, data: Any) -> None:
        """What the client learns from the application's own requests."""
        if entry.type == "room:join" and isinstance(data, dict):
            room = data.get("roomId")
            if isinstance(room, str) and room in self._recovery.rooms:
                self._recovery.joined(room, data.get("offset"), data.get("epoch"))
        elif entry.type == "presence:subscribe" and isinstance(entry.data, dict):
            self._watches.subscribed(entry.data.get("userIds"), data)

    # -- outbound -----------------------------------------------------------------

    async def _internal(
        self, conn: _Conn, kind: str, data: Any, timeout: float | None = None
    ) -> Any:
        """A frame of the client's own, outside the queue (but paid for in its bucket)."""
        frame_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        p = _Pending(kind, future, None, data)
        self._pending[frame_id] = p
        self._arm(frame_id, p, timeout or self._request_timeout)
        self._outbox.spend(self._clock.now())
        await self._write(conn, {"type": kind, "id": frame_id, "data": data})
        return await future

    async def _write(self, conn: _Conn, frame: dict[str, Any]) -> None:
        try:
            await conn.ws.send_frame(*self._payload(frame))
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            # The reader sees the close too; the pending entry is handled there.
            log.debug("write failed: %r", exc)

    def _payload(self, frame: dict[str, Any]) -> tuple[bytes, aiohttp.WSMsgType]:
        encoded = codec.encode(self._format, frame)
        if isinstance(encoded, str):
            return encoded.encode("utf-8"), aiohttp.WSMsgType.TEXT
        return encoded, aiohttp.WSMsgType.BINARY

    def _arm(self, frame_id: int, p: _Pending, timeout: float) -> None:
        async def expire() -> None:
            await self._clock.sleep(timeout)
            if self._pending.get(frame_id) is p:
                del self._pending[frame_id]
                self._fail(p.future, RequestTimeout(f"no ack for {p.type} within {timeout} s"))

        p.timer = self._timer(expire())

    def _timer(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._timers.add(task)
        task.add_done_callback(self._timers.discard)
        return task

    @staticmethod
    def _cancel_timer(p: _Pending) -> None:
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None

    async def _pump(self, conn: _Conn) -> None:
        """Drain the queue in order, at the pace the server allows."""
        while True:
            take = self._outbox.take(self._clock.now())
            for entry in take.expired:
                self._fail_entry(
                    entry,
                    DedupWindowExpired(
                        f"{entry.type} was first sent longer ago than the server's dedup window; "
                        "not sent again, it may or may not have been stored"
                    ),
                )
            if take.entry is not None:
                await self._send_entry(conn, take.entry)
            elif take.wait is not None:
                await self._clock.sleep(take.wait)
            else:
                self._wake.clear()
                await self._wake.wait()

    async def _send_entry(self, conn: _Conn, entry: Entry) -> None:
        frame: dict[str, Any] = {"type": entry.type}
        if entry.data is not None:
            frame["data"] = entry.data
        room = _room_of(entry)
        if entry.type == "room:join" and room is not None:
            self._recovery.track(room)
        elif entry.type == "room:leave" and room is not None:
            self._recovery.forget(room)
        if entry.ack:
            frame_id = next(self._ids)
            frame["id"] = frame_id
            future = (
                entry.handle
                if isinstance(entry.handle, asyncio.Future)
                else asyncio.get_running_loop().create_future()
            )
            p = _Pending(entry.type, future, entry, entry.data)
            self._pending[frame_id] = p
            self._arm(frame_id, p, entry.timeout or self._request_timeout)
        await self._write(conn, frame)
        if not entry.ack and isinstance(entry.handle, asyncio.Future) and not entry.handle.done():
            entry.handle.set_result(None)

    def _enqueue(self, entry: Entry) -> None:
        if self._state == "closed":
            raise ConnectionClosed("the client is closed")
        self._overflowed(self._outbox.push(entry))
        self._wake.set()

    def _overflowed(self, dropped: list[Entry]) -> None:
        for entry in dropped:
            self._fail_entry(
                entry,
                QueueOverflow(
                    f"the offline queue holds {self._outbox.limit} frames; this {entry.type}, "
                    "the oldest, was dropped"
                ),
            )
            self._emit("queue_overflow", {"dropped": self._outbox.dropped, "type": entry.type})

    def _fail_entry(self, entry: Entry, exc: RtgateError) -> None:
        if isinstance(entry.handle, asyncio.Future):
            self._fail(entry.handle, exc)
        else:
            log.warning("%s not sent: %s", entry.type, exc)

    @staticmethod
    def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)

    def _entry(self, kind: str, data: Any, timeout: float | None, ack: bool = True) -> Entry:
        durable = _durable(kind, data)
        if durable and isinstance(data, dict) and "clientId" not in data:
            data = {**data, "clientId": uuid.uuid4().hex}
        # The protocol asks for an id on every durable frame: its failure has no other way back.
        return Entry(
            kind,
            data,
            ack=ack or durable,
            durable=durable,
            idempotent=kind in IDEMPOTENT_TYPES,
            timeout=timeout,
        )

    # -- requests -----------------------------------------------------------------

    async def request(self, kind: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """Send a frame and return its ack's ``data``; RtgateError with the server's code
        on an error ack. Queued while offline; ``timeout`` (default ``request_timeout``)
        counts from when the frame is written."""
        entry = self._entry(kind, data, timeout)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry.handle = future
        if kind == "room:leave":
            room = _room_of(entry)
            if room is not None:
                self._recovery.forget(room)  # a resume before the leave must not rejoin it
        elif kind == "presence:unsubscribe" and isinstance(data, dict):
            self._watches.unsubscribed(data.get("userIds"))
        self._enqueue(entry)
        try:
            return await future
        except asyncio.CancelledError:
            self._outbox.remove(entry)
            raise

    def emit(self, kind: str, data: Any = None) -> None:
        """Send a frame without waiting for an ack (queued while offline). Durable frames
        still get an id; a failure is logged and surfaces as an ``error`` event."""
        entry = self._entry(kind, data, None, ack=False)
        if entry.ack:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.add_done_callback(self._unawaited)
            entry.handle = future
        self._enqueue(entry)

    def _unawaited(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, RtgateError):
            self._emit("error", {"code": exc.code, "message": exc.message})

    async def join(self, room_id: str, *, timeout: float | None = None) -> Any:
        """Join a room; reconnects join it again and replay what was missed."""
        return await self.request("room:join", {"roomId": room_id}, timeout=timeout)

    async def leave(self, room_id: str, *, timeout: float | None = None) -> Any:
        self._throttle.forget(room_id)
        return await self.request("room:leave", {"roomId": room_id}, timeout=timeout)

    async def send_message(
        self,
        room_id: str,
        content: str,
        *,
        client_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """A durable chat message; returns the stored message (the ack's ``message``)."""
        data: dict[str, Any] = {"roomId": room_id, "content": content}
        if client_id is not None:
            data["clientId"] = client_id
        ack = await self.request("chat:message", data, timeout=timeout)
        return ack.get("message") if isinstance(ack, dict) else ack

    async def direct(
        self,
        user_id: str,
        content: str,
        *,
        client_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        data: dict[str, Any] = {"toUserId": user_id, "content": content}
        if client_id is not None:
            data["clientId"] = client_id
        ack = await self.request("direct:message", data, timeout=timeout)
        return ack.get("message") if isinstance(ack, dict) else ack

    async def broadcast(
        self, content: str, *, client_id: str | None = None, timeout: float | None = None
    ) -> Any:
        """A global message to everyone (admin tokens only)."""
        data: dict[str, Any] = {"content": content}
        if client_id is not None:
            data["clientId"] = client_id
        ack = await self.request("broadcast:global", data, timeout=timeout)
        return ack.get("message") if isinstance(ack, dict) else ack

    async def room_event(
        self,
        room_id: str,
        event: str,
        data: Any = None,
        *,
        durable: bool = False,
        client_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        payload: dict[str, Any] = {"roomId": room_id, "event": event, "data": data}
        if durable:
            payload["durable"] = True
        if client_id is not None:
            payload["clientId"] = client_id
        return await self.request("room:event", payload, timeout=timeout)

    def typing(self, room_id: str, is_typing: bool = True) -> None:
        """Say whether the user is typing in a room; call it on every keystroke. Throttled
        (see TypingThrottle); dropped while not connected, since it would be stale."""
        if self._state != "connected":
            return
        now = self._clock.now()
        offer = self._throttle.offer(room_id, is_typing, now)
        if offer.send:
            self.emit("chat:typing", {"roomId": room_id, "isTyping": is_typing})
        elif offer.release_at is not None:
            self._timer(self._release_typing(room_id, offer.release_at - now))

    async def _release_typing(self, room_id: str, delay: float) -> None:
        await self._clock.sleep(delay)
        value = self._throttle.release(room_id, self._clock.now())
        if value is not None and self._state == "connected":
            self.emit("chat:typing", {"roomId": room_id, "isTyping": value})

    async def history(
        self,
        room: str | None = None,
        *,
        direct: bool = False,
        cursor: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """A page of stored messages, newest first: ``{items, nextCursor?}``."""
        data: dict[str, Any] = {"direct": True} if direct else {"roomId": room}
        if not direct and room is None:
            raise ValueError("history needs a room or direct=True")
        if cursor is not None:
            data["cursor"] = cursor
        if limit is not None:
            data["limit"] = limit
        return await self.request("history", data, timeout=timeout)

    async def presence(
        self,
        room_id: str,
        *,
        cursor: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """A room's members: ``{roomId, members, count, cursor?}``."""
        data: dict[str, Any] = {"roomId": room_id}
        if cursor is not None:
            data["cursor"] = cursor
        if limit is not None:
            data["limit"] = limit
        return await self.request("presence", data, timeout=timeout)

    async def presence_users(self, user_ids: Sequence[str], *, timeout: float | None = None) -> Any:
        return await self.request("presence:users", {"userIds": list(user_ids)}, timeout=timeout)

    async def presence_subscribe(
        self, user_ids: Sequence[str], *, timeout: float | None = None
    ) -> Any:
        """Watch users: ``user:online`` / ``user:offline`` from now on, renewed after every
        reconnect."""
        return await self.request(
            "presence:subscribe", {"userIds": list(user_ids)}, timeout=timeout
        )

    async def presence_unsubscribe(
        self, user_ids: Sequence[str], *, timeout: float | None = None
    ) -> Any:
        return await self.request(
            "presence:unsubscribe", {"userIds": list(user_ids)}, timeout=timeout
        )

    async def ping(self, data: Any = None, *, timeout: float | None = None) -> Any:
        return await self.request("ping", data, timeout=timeout)


def _room_of(entry: Entry) -> str | None:
    data = entry.data
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and isinstance(data.get("roomId"), str):
        room: str = data["roomId"]
        return room
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


async def connect(urls: str | Sequence[str], **options: Any) -> Client:
    """Create a Client, wait for its first ``welcome`` and return it. The options are
    those of Client; RtgateError when it stops for good before a welcome."""
    client = Client(urls, **options)
    try:
        await client.connect()
    except BaseException:
        await client.close()
        raise
    return client
