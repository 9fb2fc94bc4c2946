"""The gateway node: wires NATS, streams, the hub, the publisher and auth together.

It owns everything that lives as long as the process: the NATS connection,
stream epochs, background tasks, metrics. Connections reach shared state only
through it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import StreamInfo
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry

from broker import jsread, natsconn, streams, subjects
from broker.background import Background
from gateway import admission, bans, disconnect, recovery
from gateway.admission import AddressLimits
from gateway.auth import Authenticator
from gateway.bans import Bans
from gateway.config import GatewayConfig
from gateway.errors import ErrorCode, ProtocolError, raise_for_reply
from gateway.hub import Hub
from gateway.metrics import GatewayMetrics
from gateway.presence import PresenceLink
from gateway.publisher import Publisher, unavailable
from gateway.throttle import Coalescer
from gateway.writer import Flusher

if TYPE_CHECKING:
    from gateway.client import Client

log = structlog.get_logger("rtgate.gateway")


class Node:
    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.gateway_id = config.gateway_id
        self.auth = Authenticator(config.auth)
        self.metrics = GatewayMetrics(registry or CollectorRegistry())
        self.epochs: dict[str, str] = {}
        # What the rooms stream really uses; another service may have set it.
        self.dedup_window = config.streams.duplicate_window_seconds
        self.typing = Coalescer[tuple[str, str], dict[str, Any]](
            1.0 / config.limits.typing_per_second
        )
        self.background = Background()
        self._nc: Nats | None = None
        self._hub: Hub | None = None
        self._publisher: Publisher | None = None
        self._flusher: Flusher | None = None
        self._reprovisioning: asyncio.Task[Any] | None = None
        self.addresses = AddressLimits(
            config.edge.max_connections_per_address,
            config.edge.handshakes_per_second_per_address,
            config.edge.handshake_burst_per_address,
        )
        self.trusted_proxies = admission.parse_networks(config.edge.trusted_proxies)
        # SIGTERM received: no new sockets, clients being moved elsewhere.
        self.draining = False
        # Called when a drain has closed every socket (the CLI makes it exit).
        self.on_drained: Callable[[], None] | None = None
        # Plain counters for /stats, sampled once a second into a one-minute window.
        self.frames_in = 0
        self.errors_out = 0
        self._samples: collections.deque[tuple[float, int, int, int]] = collections.deque(maxlen=61)
        self._started_at = time.monotonic()
        self.bans = Bans()
        self.presence = PresenceLink(
            self.gateway_id,
            config.presence,
            config.nats.request_timeout,
            self.background,
            lambda members, event: self.hub.deliver_event(members, event),
            lambda: self.hub.authenticated,
            self.metrics.presence_fenced.inc,
            self.metrics.presence_corrected.inc,
        )

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._flusher = Flusher(loop, self.metrics.fanout_latency.observe)
        flusher = self._flusher
        self.metrics.watch_sent(lambda: (flusher.frames_sent, flusher.bytes_sent))
        self._nc = await natsconn.connect(
            self.config.nats,
            f"rtgate-gateway {self.gateway_id}",
            on_disconnected=self._on_nats_down,
            on_reconnected=self._on_nats_up,
        )
        self.metrics.nats_connected.set(1)
        await self._load_streams()
        self._publisher = Publisher(self._nc, self.config.nats.ack_timeout, self._reprovision_soon)
        await self._publisher.start()
        self._hub = Hub(
            self._nc,
            self._flusher,
            self.epochs,
            self.metrics.rooms_subscribed.set,
            self.presence,
            self.metrics.gaps_filled.inc,
        )
        await self._hub.start()
        await self.presence.start(self._nc)
        await self._nc.subscribe(
            subjects.control_gateway_subject(self.gateway_id) + ".conn.*", cb=self._on_control
        )
        await self._nc.subscribe(
            subjects.control_gateway_subject(self.gateway_id), cb=self._on_control
        )
        await self._nc.subscribe(subjects.CONTROL_USER_PREFIX + "*", cb=self._on_control)
        self.spawn(
            self.metrics.streams.poll(
                self._nc.jetstream(),
                self.config.streams,
                lambda: self.nats_connected,
                self.background,
                self._on_stream_info,
            )
        )
        self.spawn(self._watch_bans())
        self.spawn(self.auth.watch_keys(self.background, self.config.auth.jwks_check_seconds))
        self._samples.append((time.monotonic(), 0, 0, 0))
        self.spawn(self._housekeeping())
        log.info("gateway started", gateway_id=self.gateway_id)

    async def stop(self) -> None:
        await self.background.stop()
        if self._publisher is not None:
            self._publisher.fail_all()
        await natsconn.close(self._nc)
        log.info("gateway stopped", gateway_id=self.gateway_id)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background task owned by the node (stopped with it)."""
        return self.background.spawn(coro)

    # -- shared state ------------------------------------------------------------

    @property
    def nc(self) -> Nats:
        assert self._nc is not None, "node not started"
        return self._nc

    @property
    def hub(self) -> Hub:
        assert self._hub is not None, "node not started"
        return self._hub

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None, "node not started"
        return self._publisher

    @property
    def flusher(self) -> Flusher:
        assert self._flusher is not None, "node not started"
        return self._flusher

    @property
    def nats_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def room_epoch(self) -> str:
        return self.epochs[subjects.ROOMS_STREAM]

    # -- NATS helpers ------------------------------------------------------------

    async def history(
        self, channel: dict[str, str], cursor: str | None, limit: int
    ) -> dict[str, Any]:
        """A page of history from the broker (any replica answers); never hangs."""
        if not self.nats_connected:
            raise unavailable()
        request: dict[str, Any] = {"channel": channel, "limit": limit}
        if cursor is not None:
            request["cursor"] = cursor
        try:
            msg = await self.nc.request(
                subjects.HISTORY_SUBJECT,
                json.dumps(request).encode(),
                timeout=self.config.nats.request_timeout,
            )
        except Exception as exc:  # timeout, no responders: no broker is serving history
            raise unavailable("history is unavailable right now (no broker answered)") from exc
        reply: dict[str, Any] = json.loads(msg.data)
        raise_for_reply(reply, "history")
        return reply

    async def room_position(self, room_id: str) -> int:
        """Where a client joining ``room_id`` now stands (see recovery.position_of)."""
        if not self.nats_connected:
            raise unavailable()
        timeout = self.config.nats.request_timeout
        try:
            last = await jsread.last_seq(
                self.nc, subjects.ROOMS_STREAM, subjects.room_subject(room_id), timeout
            )
            # The stream's high-water mark is only needed (and read) for an empty room.
            high = (
                0 if last > 0 else (await jsread.bounds(self.nc, subjects.ROOMS_STREAM, timeout))[1]
            )
            return recovery.position_of(last, high)
        except jsread.ReadError as exc:
            raise unavailable(f"stream lookup failed: {exc}") from exc

    async def stored_event(self, stream: str, seq: int) -> dict[str, Any]:
        """The stored event at ``seq`` in ``stream`` (without prevOffset)."""
        if not self.nats_connected:
            raise unavailable()
        try:
            msg = await jsread.get_one(self.nc, stream, self.config.nats.request_timeout, seq=seq)
        except jsread.ReadError as exc:
            raise unavailable(f"stream lookup failed: {exc}") from exc
        if msg is None:
            raise ProtocolError(ErrorCode.INTERNAL, "stored message vanished")
        event: dict[str, Any] = json.loads(msg.data)
        return event

    async def publish_ephemeral(self, subject: str, payload: bytes, origin: str) -> None:
        """A core publish straight to a live subject: never stored, at most once."""
        if not self.nats_connected:
            raise unavailable()
        await self.nc.publish(subject, payload, headers={subjects.HDR_ORIGIN: origin})

    async def _load_streams(self) -> None:
        infos = await streams.ensure_streams(self.nc.jetstream(), self.config.streams)
        for info in infos.values():
            self._on_stream_info(info)

    def _reprovision_soon(self) -> None:
        """A publish found no stream (deleted by hand?): create the streams again, once."""
        if self._reprovisioning is not None and not self._reprovisioning.done():
            return

        async def reprovision() -> None:
            log.warning("a stream is missing; provisioning the streams again")
            try:
                await self._load_streams()
            except Exception as exc:
                log.error("stream provisioning failed", error=repr(exc))
            await self.background.sleep(2)  # at most one attempt per two seconds

        self._reprovisioning = self.spawn(reprovision())

    def _on_stream_info(self, info: StreamInfo) -> None:
        # A stream deleted and created again while we stayed connected has a new
        # epoch; the periodic stats read notices within stats_interval_seconds.
        name = info.config.name
        assert name is not None
        epoch = streams.epoch_of(info)
        old = self.epochs.get(name)
        if old is not None and old != epoch:
            log.warning("stream was recreated: new epoch", stream=name, old=old, new=epoch)
        self.epochs[name] = epoch
        if name == subjects.ROOMS_STREAM and info.config.duplicate_window is not None:
            self.dedup_window = float(info.config.duplicate_window)

    async def _on_nats_down(self) -> None:
        self.metrics.nats_connected.set(0)
        if self._publisher is not None:
            self._publisher.fail_all()

    async def _on_nats_up(self) -> None:
        # nats-py resubscribes every room by itself; the streams may have been
        # recreated while we were away (new epoch), so read them again.
        try:
            await self._load_streams()
        except Exception as exc:
            log.error("stream provisioning after reconnect failed", error=repr(exc))
        self.metrics.nats_connected.set(1)
        # Presence events sent while we were away are lost: check with the service.
        self.presence.recheck()

    async def _on_control(self, msg: Msg) -> None:
        """Commands from backend services: ``{"type": "disconnect", "code", "reason"}``."""
        try:
            command = json.loads(msg.data)
            kind = command["type"]
        except (ValueError, KeyError, TypeError):
            log.warning("malformed control message", subject=msg.subject)
            return
        if kind not in ("disconnect", "kick"):
            log.warning("unknown control command", subject=msg.subject, command=str(kind)[:64])
            return
        code = command.get("code", disconnect.REVOKED.code)
        reason = str(command.get("reason", "disconnected by server"))[:100]
        target = _control_target(msg.subject, self.gateway_id)
        if target[0] == "user":
            clients = self.hub.by_user(target[1])
        elif target[0] == "conn":
            client = self.hub.connections.get(target[1])
            clients = [client] if client is not None else []
        else:
            clients = list(self.hub.connections.values())
        if kind == "kick":
            room_id = command.get("roomId")
            until = command.get("banUntil")
            if isinstance(room_id, str) and target[0] == "user" and isinstance(until, int | float):
                self.bans.apply(bans.room_key(room_id, target[1]), bans.entry(until, reason))
            if isinstance(room_id, str):
                for client in clients:
                    client.remove_from_room(room_id, reason)
            log.info("control kick", count=len(clients))
            return
        denied_until = command.get("deniedUntil")
        if target[0] == "user" and isinstance(denied_until, int | float):
            self.bans.apply(bans.user_key(target[1]), bans.entry(denied_until, reason))
        if command.get("reconnect") is True:
            for client in clients:
                self.tell_to_reconnect(client)
            log.info("control disconnect", target=target[0], count=len(clients), code=1012)
            return
        chosen = next((d for d in disconnect.ALL if d.code == code), None)
        if chosen is None:
            chosen = disconnect.REVOKED
        for client in clients:
            client.close(disconnect.Disconnect(chosen.code, reason, chosen.reconnect))
        log.info("control disconnect", target=target[0], count=len(clients), code=chosen.code)

    # -- bans --------------------------------------------------------------------

    async def _ban_bucket(self) -> KeyValue:
        js = self.nc.jetstream()
        try:
            return await js.key_value(bans.BUCKET)
        except Exception:
            return await js.create_key_value(bucket=bans.BUCKET, history=1)

    async def put_ban(self, key: str, seconds: float, reason: str) -> None:
        """Record a ban every gateway will see; it expires by itself (per-key TTL)."""
        if not self.nats_connected:
            raise unavailable()
        await self._ban_bucket()
        ttl = max(1, int(seconds + 0.999))
        await self.nc.jetstream().publish(
            f"$KV.{bans.BUCKET}.{key}", bans.entry(time.time() + seconds, reason), msg_ttl=ttl
        )
        self.bans.apply(key, bans.entry(time.time() + seconds, reason))

    async def control(self, subject: str, command: dict[str, Any]) -> None:
        if not self.nats_connected:
            raise unavailable()
        await self.nc.publish(subject, json.dumps(command).encode())
        await self.nc.flush(timeout=max(1, int(self.config.nats.request_timeout)))

    async def _watch_bans(self) -> None:
        """Mirror the ban bucket into memory; rebuilt after any failure or reconnect."""
        while not self.background.stopping:
            watcher = None
            try:
                kv = await self._ban_bucket()
                watcher = await kv.watchall()
                # Polled with a timeout rather than iterated: nats-py can swallow a
                # task's cancellation, and the stop flag must still end the loop.
                while not self.background.stopping:
                    try:
                        update = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
                    except NatsTimeout:
                        continue
                    if update is None:
                        continue
                    deleted = update.operation in ("DEL", "PURGE")
                    self.bans.apply(update.key, None if deleted else update.value)
            except Exception as exc:
                if self.background.stopping:
                    return
                log.warning("ban watch interrupted; restarting", error=repr(exc))
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            await self.background.sleep(1)

    async def _housekeeping(self) -> None:
        ticks = 0
        while await self.background.sleep(1):
            now = time.monotonic()
            self._samples.append((now, self.frames_in, self.flusher.frames_sent, self.errors_out))
            ticks += 1
            if ticks % 10 == 0:
                self.typing.forget_idle(now)
                self.addresses.sweep(now, idle=60)

    @property
    def unauthenticated(self) -> int:
        return len(self.hub.connections) - len(self.hub.authenticated)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        current = (now, self.frames_in, self.flusher.frames_sent, self.errors_out)
        oldest = next((s for s in self._samples if now - s[0] <= 60), current)
        span = max(now - oldest[0], 1.0)
        per_minute = 60.0 / span
        frames_in = current[1] - oldest[1]
        errors = current[3] - oldest[3]
        return {
            "gatewayId": self.gateway_id,
            "connections": len(self.hub.connections),
            "authenticated": len(self.hub.authenticated),
            "rooms": len(self.hub.rooms),
            "messagesPerMinuteIn": round(frames_in * per_minute, 1),
            "messagesPerMinuteOut": round((current[2] - oldest[2]) * per_minute, 1),
            "errorsPerMinute": round(errors * per_minute, 1),
            # Inner frames of a batch can fail separately: cap at one error per frame.
            "errorRate": round(min(1.0, errors / frames_in), 4) if frames_in else 0.0,
            "natsConnected": self.nats_connected,
            "draining": self.draining,
            "healthy": self.nats_connected and not self.draining,
            "uptimeSeconds": round(now - self._started_at, 1),
        }

    # -- drain -------------------------------------------------------------------

    def tell_to_reconnect(self, client: Client) -> None:
        """Ask a client to come back (elsewhere) after a short random delay, then close 1012."""
        after_ms = random.randint(0, self.config.edge.reconnect_jitter_ms)
        client.send({"type": "reconnect", "data": {"afterMs": after_ms}})
        client.close(disconnect.RESTART)

    def begin_drain(self) -> None:
        """SIGTERM: stop taking sockets and move the clients off, spread over the window.

        A second SIGTERM during the drain ends it at once.
        """
        if self.draining:
            log.warning("second signal during drain: stopping now")
            self._drained()
            return
        self.draining = True
        log.info(
            "draining", connections=len(self.hub.connections), window=self.config.edge.drain_seconds
        )
        self.spawn(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        window = self.config.edge.drain_seconds
        clients = list(self.hub.connections.values())
        random.shuffle(clients)
        start = loop.time()
        # Spread the closes over the window so the clients do not all land on
        # the other gateways in the same instant.
        for i, client in enumerate(clients):
            delay = start + window * i / len(clients) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.tell_to_reconnect(client)
        deadline = start + window + self.config.server.close_timeout_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.hub.empty.wait(), max(0.0, deadline - loop.time()))
        log.info("drained", left=len(self.hub.connections))
        self._drained()

    def _drained(self) -> None:
        if self.on_drained is not None:
            self.on_drained()


def _control_target(subject: str, gateway_id: str) -> tuple[str, str]:
    if subject.startswith(subjects.CONTROL_USER_PREFIX):
        return "user", subjects.decode_token(subject[len(subjects.CONTROL_USER_PREFIX) :])
    conn_prefix = subjects.control_gateway_subject(gateway_id) + ".conn."
    if subject.startswith(conn_prefix):
        return "conn", subjects.decode_token(subject[len(conn_prefix) :])
    return "gateway", gateway_id
