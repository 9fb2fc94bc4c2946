"""The presence service: the NATS shell around ``PresenceState``.

Every broker replica runs one; a lease in NATS KV makes exactly one active.
The active one consumes what gateways report (``rt.presence.>``), ticks the
state machine, publishes the resulting events stamped with its fencing token
(the lease revision), and answers queries. Every input is journaled
(broker/presence_journal.py) before its events go out, and the state is saved
to a NATS object store now and then; the next active service restores the
save and replays the journal after it, so it continues exactly where the
last one stopped. A standby only waits for the lease. docs/presence.md has
the design and its failure modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import structlog
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import (
    BucketNotFoundError,
    NotFoundError,
    ObjectDeletedError,
    ObjectNotFoundError,
)
from prometheus_client import CollectorRegistry, Counter, Gauge

from broker import presence_journal as journal
from broker import presence_wire as wire
from broker import subjects
from broker.jsread import ReadError
from broker.lease import Lease
from broker.presence_journal import Fenced, Journal, JournalGap
from broker.presence_state import (
    PresenceConfig,
    PresenceEvent,
    PresenceState,
    RoomUserJoined,
    RoomUserLeft,
)
from broker.settings import PresenceSettings

log = structlog.get_logger("rtgate.presence")

LEASE_KEY = "presence"
SNAPSHOT_BUCKET = "rtgate_presence"
SNAPSHOT_OBJECT = "state"
# How often deadlines (grace, gateway death) are acted upon.
TICK_SECONDS = 0.25
# Pages of room members, and the most a query may ask for.
MAX_PAGE = 1000
MAX_QUERY_USERS = 100
# A sync whose parts stop arriving is dropped after this; the next heartbeat
# asks again.
SYNC_ASSEMBLY_SECONDS = 10.0
# Reports that arrive while a journal append is in flight share the next one
# (group commit), up to this many bytes per entry: under nats-server's
# max_payload (1 MiB) with room for two 256 KiB sync parts.
MAX_ENTRY_BYTES = 512 * 1024
# Reports waiting for the journal, at most (by count and by bytes: a takeover
# brings every gateway's sync at once): beyond either the subscription stops
# taking them, and nats-py's pending limits apply.
MAX_WAITING_REPORTS = 10_000
MAX_WAITING_BYTES = 64 * 1024 * 1024
# What a report adds to a batch entry besides its own bytes: its kind and
# gateway id and the brackets around them.
_BATCH_ITEM_OVERHEAD = 16


class PresenceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.users_online = Gauge(
            "rtgate_presence_users_online",
            "Users announced online (those in grace included)",
            registry=registry,
        )
        self.connections = Gauge(
            "rtgate_presence_connections",
            "Live connections on gateways not declared dead",
            registry=registry,
        )
        self.rooms = Gauge(
            "rtgate_presence_rooms", "Rooms with at least one member", registry=registry
        )
        self.gateways_alive = Gauge(
            "rtgate_presence_gateways_alive",
            "Gateways heard from within the heartbeat deadline",
            registry=registry,
        )
        self.events = Counter(
            "rtgate_presence_events", "Presence events published", ["type"], registry=registry
        )
        self.journaled = Counter(
            "rtgate_presence_journaled_reports",
            "Gateway reports journaled (reports arriving during an append share the next)",
            registry=registry,
        )
        self.appends = Counter(
            "rtgate_presence_journal_appends",
            "Journal appends (ticks, takeover marks and reports)",
            registry=registry,
        )
        self.waiting = Gauge(
            "rtgate_presence_reports_waiting",
            "Reports received and waiting for the journal (at most 10,000 or 64 MiB)",
            registry=registry,
        )
        self.failovers = Counter(
            "rtgate_presence_failovers",
            "Times this process took over from another presence service",
            registry=registry,
        )
        self.active = Gauge(
            "rtgate_presence_active",
            "1 while this process is the active presence service",
            registry=registry,
        )
        self.syncs = Counter(
            "rtgate_presence_syncs", "Full states received from gateways", registry=registry
        )
        for kind in ("user:online", "user:offline", "room:user_joined", "room:user_left"):
            self.events.labels(kind)

    def show(self, state: PresenceState | None) -> None:
        c = state.counters() if state is not None else None
        self.users_online.set(c.users_online if c else 0)
        self.connections.set(c.connections if c else 0)
        self.rooms.set(c.rooms if c else 0)
        self.gateways_alive.set(c.gateways_alive if c else 0)


class PresenceService:
    def __init__(
        self,
        nc: Nats,
        settings: PresenceSettings,
        holder: str,
        registry: CollectorRegistry,
        replicas: int = 1,
        timeout: float = 2.0,
    ) -> None:
        self._nc = nc
        self._settings = settings
        self._replicas = replicas
        self._timeout = timeout
        self._holder = holder
        self._config = PresenceConfig(
            grace_seconds=settings.grace_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            missed_heartbeats=settings.missed_heartbeats,
        )
        self.metrics = PresenceMetrics(registry)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # While active:
        self.state: PresenceState | None = None
        self.revision = 0
        self.answering = False
        self._quiet_until = 0.0
        self._dirty = False
        self._journal: Journal | None = None
        self._lease: Lease | None = None
        # One input at a time, journaled then applied then announced, so the
        # journal's order is the order the state saw.
        self._lock = asyncio.Lock()
        # Reports received and checked, waiting for the committer, which
        # journals everything waiting in one append.
        self._waiting: list[tuple[str, str, bytes, wire.Report]] = []
        self._waiting_bytes = 0
        self._arrived = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._committer: asyncio.Task[None] | None = None
        self._fenced = False
        # Stepping down: inputs are refused.
        self._closing = False
        self._subs: list[Subscription] = []
        # gateway -> (sync id, parts expected, parts so far, started at)
        self._syncs: dict[str, tuple[str, int, dict[int, wire.SyncPart], float]] = {}
        # Another holder was seen: the next acquisition is a takeover.
        self._other_seen = False

    @property
    def active(self) -> bool:
        return self.state is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Save the state, hand the lease over and stop (a standby takes over at once)."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("presence service did not stop in time")

    async def _sleep(self, delay: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)
        return not self._stop.is_set()

    # -- leadership ----------------------------------------------------------

    async def _run(self) -> None:
        lease = Lease(self._nc, LEASE_KEY, self._holder, self._settings.lease_ttl_seconds)
        while not self._stop.is_set():
            try:
                holder = await lease.try_acquire()
            except Exception as exc:
                log.warning("presence lease unavailable", error=repr(exc))
                await self._sleep(1)
                continue
            if holder is not None:
                if not self._other_seen:
                    log.info("presence service on standby", active=holder)
                self._other_seen = True
                await self._sleep(0.5)
                continue
            try:
                await self._lead(lease)
            except Exception as exc:
                log.error("presence service failed; stepping down", error=repr(exc))
            finally:
                clean = self._stop.is_set()
                await self._step_down(lease, save=clean)
            if not self._stop.is_set():
                # Lost the lease or failed: let another replica try first.
                await self._sleep(lease.ttl)

    async def _lead(self, lease: Lease) -> None:
        # Renewed by its own task from the start: a slow rebuild or save must not
        # let the lease expire under an active service.
        renewer = asyncio.get_running_loop().create_task(self._keep(lease))
        try:
            await self._lead_with(lease)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _keep(self, lease: Lease) -> None:
        while await self._sleep(lease.ttl / 3):
            if not await lease.renew():
                log.error("presence lease lost: another service is active now")
                return

    async def _lead_with(self, lease: Lease) -> None:
        self._lease = lease
        self.revision = lease.token
        self._fenced = False
        loop = asyncio.get_running_loop()
        self._journal = Journal(
            self._nc, self._replicas, self._timeout, f"{self._holder}/{lease.token}"
        )
        await self._journal.open()
        saved = await self._load()
        # One clock reading for the rebuilt state and the takeover mark: a later
        # replay rebases at the mark's reading, exactly as this service did.
        now = loop.time()
        state, exact = await self._rebuild(saved, self._journal, now)
        if state is not None:
            self.state = state
            self._quiet_until = 0.0
            ready_at = now + self._settings.settle_seconds
            if not exact:
                log.warning(
                    "presence state rebuilt from an incomplete journal: events of "
                    "the last moments before the takeover may be announced again"
                )
        elif self._journal.last_seq == 0:
            # The first presence service on this NATS: nobody was told anything.
            self.state = PresenceState(self._config)
            self._quiet_until = 0.0
            ready_at = now + self._settings.settle_seconds
        else:
            # A service ran before, but neither its save nor its journal is
            # left: every gateway's state arrives as news that observers were
            # already told. Stay quiet until every live gateway has had a
            # heartbeat to notice the empty table and sync.
            self.state = PresenceState(self._config)
            ready_at = now + self._settings.heartbeat_seconds + self._settings.settle_seconds
            self._quiet_until = ready_at
            log.warning(
                "presence state lost (no save, no journal): rebuilding from the "
                "gateways without announcing",
                quiet_seconds=ready_at - now,
            )
        took_over = self._other_seen or (saved is not None and saved.get("holder") != self._holder)
        if took_over:
            self.metrics.failovers.inc()
        self._other_seen = False
        if lease.lost:
            return
        # Fences the journal: a former service's next append fails.
        await self._journal.append(journal.encode(now, "takeover", self._holder))
        self.metrics.active.set(1)
        log.info(
            "presence service active",
            revision=self.revision,
            restored=saved is not None,
            took_over=took_over,
            exact=exact,
        )
        self._waiting.clear()
        self._waiting_bytes = 0
        self._committer = loop.create_task(self._commit_loop())
        self._subs.append(
            await self._nc.subscribe(subjects.PRESENCE_PREFIX + ">", cb=self._on_report)
        )
        await self._nc.publish(
            subjects.PRESENCE_SYNC_SUBJECT,
            wire.encode_sync_request(self.revision, "takeover"),
            headers=self._fence(),
        )
        await self._nc.flush(timeout=2)
        self._dirty = True
        saved_at = now
        while await self._sleep(TICK_SECONDS):
            if self._fenced:
                log.error("presence journal written by another service: stepping down")
                return
            if lease.lost:
                return
            now = loop.time()
            if not self.answering and now >= ready_at:
                self._subs.append(
                    await self._nc.subscribe(
                        subjects.PRESENCE_API_SUBJECT,
                        queue=subjects.PRESENCE_API_QUEUE,
                        cb=self._on_query,
                    )
                )
                self.answering = True
                log.info("presence service answering queries")
            await self._tick()
            self.metrics.show(self.state)
            await self._expire_syncs(now)
            if self._dirty and now - saved_at >= self._settings.snapshot_interval_seconds:
                await self._save()
                saved_at = now

    async def _rebuild(
        self, saved: dict[str, Any] | None, log_: Journal, now: float
    ) -> tuple[PresenceState | None, bool]:
        """The last service's state: its save, then its journal replayed with its own
        clock readings. ``exact`` is False when the journal could not be read whole."""
        after = 0
        state: PresenceState | None = None
        clock = 0.0
        if saved is not None:
            try:
                clock = float(saved.get("clock", 0.0))
                state = PresenceState.restore(saved["state"], clock, self._config)
                after = int(saved.get("journalSeq", 0))
            except Exception as exc:
                log.error(
                    "saved presence state is unreadable; starting without it", error=repr(exc)
                )
                state, clock, after = None, 0.0, 0
        try:
            entries = await log_.after(after)
        except (JournalGap, ReadError, ValueError, KeyError) as exc:
            log.warning("presence journal unreadable", error=repr(exc))
            entries = None
        if entries:
            if state is None:
                state = PresenceState(self._config)
            for entry in entries:
                if entry.kind == "takeover":
                    # Entries after a takeover mark carry the next service's
                    # clock: move over as that service did when it wrote the mark.
                    state.rebase(entry.now, clock)
                else:
                    try:
                        inputs = journal.unbatch(entry)
                    except ValueError as exc:
                        log.warning(
                            "bad presence journal entry skipped", seq=entry.seq, error=str(exc)
                        )
                        inputs = []
                    for kind, gateway, report in inputs:
                        if kind == journal.SYNC_EXPIRED:
                            self._syncs.pop(gateway, None)
                            continue
                        try:
                            decoded = None if kind == "tick" else wire.decode(kind, report)
                            self._apply(state, kind, gateway, decoded, entry.now)
                        except Exception as exc:  # as the live service skipped it
                            log.warning(
                                "bad presence journal entry skipped", seq=entry.seq, error=str(exc)
                            )
                clock = entry.now
            self._syncs.clear()
        if state is None:
            return None, entries is not None
        # Into this process's clock: deadlines keep what remained of them.
        state.rebase(now, clock)
        return state, entries is not None

    async def _step_down(self, lease: Lease, save: bool) -> None:
        self.answering = False
        # An input in progress finishes first (journaled means announced); later
        # ones are refused, so unsubscribing cancels nothing half done.
        self._closing = True
        async with self._lock:
            # Holding the lock, the committer is between inputs.
            if self._committer is not None:
                self._committer.cancel()
        if self._committer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None
        self._waiting.clear()
        self._waiting_bytes = 0
        self.metrics.waiting.set(0)
        self._has_room.set()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if save and self.state is not None and not lease.lost and not self._fenced:
            await self._save()
        self.state = None
        self._journal = None
        self._syncs.clear()
        self.metrics.active.set(0)
        self.metrics.show(None)
        self._closing = False
        if not lease.lost:
            await lease.release()

    # -- snapshot ------------------------------------------------------------

    async def _load(self) -> dict[str, Any] | None:
        js = self._nc.jetstream()
        try:
            store = await js.object_store(SNAPSHOT_BUCKET)
            result = await store.get(SNAPSHOT_OBJECT)
        except (BucketNotFoundError, ObjectNotFoundError, ObjectDeletedError, NotFoundError) as exc:
            log.info("no saved presence state", reason=type(exc).__name__)
            return None
        # Anything else (a timeout) propagates: taking over without the save
        # would rebuild quietly and then overwrite the good save.
        try:
            data: dict[str, Any] = json.loads(result.data or b"")
        except ValueError as exc:
            log.error("saved presence state is unreadable; starting without it", error=repr(exc))
            return None
        return data

    def _superseded(self) -> bool:
        return self._fenced or (self._lease is not None and self._lease.lost)

    async def _save(self) -> None:
        assert self.state is not None and self._journal is not None
        if self._superseded():
            return  # a replaced service must not overwrite its successor's save
        if self._syncs:
            # Parts already journaled would fall before the save's journal
            # position without being in the state: wait for the sync to finish.
            return
        # The state and the journal position it covers, taken together.
        async with self._lock:
            clock = asyncio.get_running_loop().time()
            data = self.state.snapshot(clock)
            seq = self._journal.last_seq
            self._dirty = False
        body = json.dumps(
            {
                "holder": self._holder,
                "revision": self.revision,
                "savedAt": time.time(),
                "clock": clock,
                "journalSeq": seq,
                "state": data,
            }
        ).encode()
        js = self._nc.jetstream()
        try:
            try:
                store = await js.object_store(SNAPSHOT_BUCKET)
            except Exception:
                store = await js.create_object_store(bucket=SNAPSHOT_BUCKET)
            await store.put(SNAPSHOT_OBJECT, body)
        except Exception as exc:
            self._dirty = True
            log.warning("could not save presence state", error=repr(exc))
            return
        if not self._superseded():
            await self._journal.trim(seq)

    # -- reports from gateways -------------------------------------------------

    async def _on_report(self, msg: Msg) -> None:
        kind, _, token = msg.subject[len(subjects.PRESENCE_PREFIX) :].partition(".")
        try:
            gateway = subjects.decode_token(token)
            # Strict UTF-8: json.loads also takes UTF-16 and BOMs, which the
            # journal (it embeds the report as received) could not replay.
            msg.data.decode("utf-8")
            # Checked before it is journaled, and decoded once.
            report = wire.decode(kind, wire.parse(msg.data))
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning(
                "malformed presence report dropped", subject=msg.subject[:200], error=str(exc)
            )
            return
        # Waits while the committer is far behind, so what waits stays bounded.
        while len(self._waiting) >= MAX_WAITING_REPORTS or self._waiting_bytes >= MAX_WAITING_BYTES:
            self._has_room.clear()
            await self._has_room.wait()
        if self._closing or self._committer is None:
            return  # stepping down: refused, as the committer would refuse it
        self._waiting.append((kind, gateway, msg.data, report))
        self._waiting_bytes += len(msg.data)
        self.metrics.waiting.set(len(self._waiting))
        self._arrived.set()

    async def _commit_loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._waiting:
                batch: list[tuple[str, str, bytes, wire.Report]] = []
                size = 0
                for item in self._waiting:
                    cost = len(item[0]) + len(item[1]) + len(item[2]) + _BATCH_ITEM_OVERHEAD
                    if batch and size + cost > MAX_ENTRY_BYTES:
                        break
                    batch.append(item)
                    size += cost
                del self._waiting[: len(batch)]
                self._waiting_bytes -= sum(len(item[2]) for item in batch)
                self.metrics.waiting.set(len(self._waiting))
                self._has_room.set()
                try:
                    await self._input(batch)
                except Exception as exc:
                    log.error("presence reports failed", count=len(batch), error=repr(exc))

    async def _input(self, reports: list[tuple[str, str, bytes, wire.Report]]) -> None:
        """Journal reports (one append for all), apply them, announce what they
        caused: in that order."""
        async with self._lock:
            state, log_ = self.state, self._journal
            if state is None or log_ is None or self._fenced or self._closing:
                return
            now = asyncio.get_running_loop().time()
            if len(reports) == 1:
                kind, gateway, raw, _ = reports[0]
                entry = journal.encode(now, kind, gateway, raw)
            else:
                entry = journal.encode_batch(now, [(k, g, raw) for k, g, raw, _ in reports])
            if not await self._append(log_, entry):
                return
            self.metrics.journaled.inc(len(reports))
            events: list[PresenceEvent] = []
            resync: dict[str, None] = {}  # in order, once per gateway
            for kind, gateway, _, report in reports:
                try:
                    caused, needs_sync = self._apply(state, kind, gateway, report, now)
                except Exception as exc:
                    # A bug, not bad input (that was refused before journaling): the
                    # rest of the batch still counts, and a replay skips it alike.
                    log.error("presence report failed", gateway=gateway, kind=kind, error=repr(exc))
                    continue
                events += caused
                if needs_sync:
                    resync[gateway] = None
            self._dirty = True
            try:
                for gateway in resync:
                    await self._nc.publish(
                        subjects.presence_sync_subject(gateway),
                        wire.encode_sync_request(self.revision, "digest"),
                        headers=self._fence(),
                    )
            finally:
                await self._emit(events)

    async def _tick(self) -> None:
        async with self._lock:
            state, log_ = self.state, self._journal
            if state is None or log_ is None or self._fenced or self._closing:
                return
            now = asyncio.get_running_loop().time()
            # Most ticks change nothing; only those that do are journaled.
            if not state.tick_due(now):
                return
            if not await self._append(log_, journal.encode(now, "tick", "")):
                return
            alive = state.alive_gateways()
            events = state.tick(now)
            dead = alive - state.alive_gateways()
            if dead:
                log.warning(
                    "gateways declared dead: no heartbeat",
                    gateways=sorted(dead),
                    silent_for=self._config.dead_after,
                )
            self._dirty = True
            await self._emit(events)

    async def _append(self, log_: Journal, entry: bytes) -> bool:
        """False when another service wrote the journal: this one must stop."""
        self.metrics.appends.inc()
        try:
            await log_.append(entry)
        except Fenced:
            self._fenced = True
            return False
        except Exception as exc:
            # JetStream refused the write: keep serving; the next save covers
            # this input, and until then a takeover may repeat its events.
            log.warning("presence journal append failed", error=repr(exc))
        return True

    def _apply(
        self, state: PresenceState, kind: str, gateway: str, decoded: wire.Report | None, now: float
    ) -> tuple[list[PresenceEvent], bool]:
        """One input to the state machine (a decoded report, None for a tick): its
        events, and whether to ask for a sync."""
        if kind == "tick" or decoded is None:
            return state.tick(now), False
        if isinstance(decoded, wire.SyncPart):
            return self._on_sync_part(state, gateway, decoded, now), False
        # Parts of one sync arrive back to back: anything else from the gateway
        # means the rest were lost.
        self._syncs.pop(gateway, None)
        if isinstance(decoded, str):
            return state.heartbeat(gateway, decoded, now)
        return self._on_changes(state, gateway, decoded, now), False

    def _on_changes(
        self, state: PresenceState, gateway: str, changes: list[wire.Change], now: float
    ) -> list[PresenceEvent]:
        events: list[PresenceEvent] = []
        for c in changes:
            if c.kind == "connect":
                events += state.connect(gateway, c.conn, c.user, c.username, now)
            elif c.kind == "disconnect":
                events += state.disconnect(gateway, c.conn, now)
            elif c.kind == "join":
                events += state.join(gateway, c.conn, c.room, now)
            else:
                events += state.leave(gateway, c.conn, c.room, now)
        return events

    def _on_sync_part(
        self, state: PresenceState, gateway: str, part: wire.SyncPart, now: float
    ) -> list[PresenceEvent]:
        pending = self._syncs.get(gateway)
        parts: dict[int, wire.SyncPart] = {}
        if pending is not None and pending[0] == part.sync_id:
            parts = pending[2]
        # Timed from the latest part: under a takeover storm parts of every
        # gateway queue behind each other's journal appends.
        pending = (part.sync_id, part.parts, parts, now)
        self._syncs[gateway] = pending
        parts[part.part] = part
        if len(pending[2]) < part.parts:
            return []
        del self._syncs[gateway]
        full: dict[str, tuple[str, str, list[str]]] = {}
        for p in pending[2].values():
            full.update(p.connections)
        self.metrics.syncs.inc()
        log.info("presence sync", gateway=gateway, connections=len(full))
        return state.sync(gateway, full, now)

    async def _expire_syncs(self, now: float) -> None:
        """Drop syncs whose parts stopped arriving; journaled, so that a replay
        does not complete one with a part that came later."""
        expired = [
            g for g, (_, _, _, at) in self._syncs.items() if now - at > SYNC_ASSEMBLY_SECONDS
        ]
        if not expired:
            return
        async with self._lock:
            log_ = self._journal
            if log_ is None or self._fenced or self._closing:
                return
            # Read under the lock: the journal's clock readings only go up.
            now = asyncio.get_running_loop().time()
            expired = [
                g
                for g in expired
                if g in self._syncs and now - self._syncs[g][3] > SYNC_ASSEMBLY_SECONDS
            ]  # not completed, and no part came, meanwhile
            if not expired:
                return
            # One append for all: a storm of expiries costs one round trip.
            entry = journal.encode_batch(now, [(journal.SYNC_EXPIRED, g, b"null") for g in expired])
            if not await self._append(log_, entry):
                return
            for gateway in expired:
                log.warning("incomplete presence sync dropped", gateway=gateway)
                del self._syncs[gateway]

    # -- events out ------------------------------------------------------------

    def _fence(self) -> dict[str, str]:
        return {subjects.HDR_PRESENCE_REVISION: str(self.revision)}

    async def _emit(self, events: list[PresenceEvent]) -> None:
        if not events:
            return
        if asyncio.get_running_loop().time() < self._quiet_until:
            return
        fence = str(self.revision)
        for event in events:
            body = json.dumps(wire.event_frame(event)).encode()
            if isinstance(event, RoomUserJoined | RoomUserLeft):
                await self._nc.publish(
                    subjects.live_room_subject(event.room),
                    body,
                    headers={
                        subjects.HDR_PRESENCE_REVISION: fence,
                        subjects.HDR_PRESENCE_USER: event.user,
                    },
                )
            else:
                await self._nc.publish(
                    subjects.live_presence_user_subject(event.user),
                    body,
                    headers={subjects.HDR_PRESENCE_REVISION: fence},
                )
            self.metrics.events.labels(event.kind).inc()

    # -- queries ---------------------------------------------------------------

    async def _on_query(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            reply = self.answer(json.loads(msg.data))
        except QueryError as exc:
            reply = {"error": {"code": exc.code, "message": str(exc)}}
        except ValueError:
            reply = {"error": {"code": "bad_request", "message": "a query must be JSON"}}
        await self._nc.publish(msg.reply, json.dumps(reply).encode(), headers=self._fence())

    def answer(self, query: Any) -> dict[str, Any]:
        """One query (docs/nats.md): ``room``, ``users`` or ``user``."""
        state = self.state
        if state is None:
            raise QueryError("unavailable", "presence service is not active")
        if not isinstance(query, dict):
            raise QueryError("bad_request", "a query must be a JSON object")
        op = query.get("op")
        if op == "room":
            room = _query_str(query, "roomId")
            cursor = query.get("cursor")
            if cursor is not None and not isinstance(cursor, str):
                raise QueryError("bad_request", "cursor must be a string")
            limit = query.get("limit", MAX_PAGE)
            if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
                raise QueryError("bad_request", f"limit must be 1 to {MAX_PAGE}")
            page = state.room_members(room, after=cursor or None, limit=limit + 1)
            out: dict[str, Any] = {
                "members": [
                    {"userId": m.user, "username": m.username, "socketCount": m.socket_count}
                    for m in page[:limit]
                ],
                "count": state.room_count(room),
            }
            if len(page) > limit:
                out["cursor"] = page[limit - 1].user
            return out
        if op == "users":
            users = query.get("userIds")
            if (
                not isinstance(users, list)
                or not all(isinstance(u, str) for u in users)
                or len(users) > MAX_QUERY_USERS
            ):
                raise QueryError(
                    "bad_request", f"userIds must be a list of at most {MAX_QUERY_USERS} strings"
                )
            asker = query.get("asker")
            hidden: list[str] = []
            if isinstance(asker, str):
                hidden = [u for u in users if u != asker and not state.shares_room(asker, u)]
            return {
                "online": {u: state.is_online(u) for u in users if u not in hidden},
                "hidden": hidden,
            }
        if op == "user":
            user = _query_str(query, "userId")
            return {
                "userId": user,
                "online": state.is_online(user),
                "username": state.username(user) if state.is_online(user) else None,
                "socketCount": state.socket_count(user),
                "rooms": sorted(state.rooms_of(user)),
            }
        raise QueryError("bad_request", "op must be room, users or user")


class QueryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _query_str(query: dict[str, Any], key: str) -> str:
    value = query.get(key)
    if not isinstance(value, str) or not value:
        raise QueryError("bad_request", f"'{key}' must be a non-empty string")
    return value
