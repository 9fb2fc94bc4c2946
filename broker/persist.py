"""Persisting the streams into the store, and keeping the streams small.

Every broker replica pulls from one shared durable consumer per stream, so
the work is split among them. A batch is written in one transaction and only
then acknowledged to JetStream: a crash between the two redelivers the
batch, and the store's idempotent writes make the redelivery harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections.abc import Coroutine
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker import jsread, subjects
from broker.background import Background
from broker.settings import StreamSettings
from broker.store import Store, StoredMessage, StoreError
from broker.streams import StreamSpec, epoch_of, specs

log = structlog.get_logger("rtgate.persist")

BATCH = 500
# Redelivery after this long without an ack. It bounds how late a message
# lost in flight is stored: a delivery cut off with the broker's NATS
# connection (its node died) is known to JetStream only as unacked. A batch
# write that runs longer keeps its messages with in-progress acks.
ACK_WAIT_SECONDS = 10.0
PROGRESS_SECONDS = ACK_WAIT_SECONDS / 3
PURGE_INTERVAL_SECONDS = 30.0


class PersistMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.persisted = Counter(
            "rtgate_broker_persisted_total",
            "Messages written to the store",
            ["stream"],
            registry=registry,
        )
        self.lag = Gauge(
            "rtgate_broker_persist_lag_messages",
            "Stream last sequence minus the persisted floor",
            ["stream"],
            registry=registry,
        )
        self.write_seconds = Histogram(
            "rtgate_broker_store_write_seconds", "One batch write to the store", registry=registry
        )
        self.redeliveries = Counter(
            "rtgate_broker_redeliveries_total",
            "Messages JetStream delivered more than once",
            ["stream"],
            registry=registry,
        )
        self.purged = Counter(
            "rtgate_broker_purged_total",
            "Messages purged from a stream after persisting",
            ["stream"],
            registry=registry,
        )


def to_stored(stream: str, epoch: str, seq: int, subject: str, event: Any) -> StoredMessage:
    """A stream message as a store row; ValueError if it cannot be one."""
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("data"), dict)
        or not isinstance(event.get("type"), str)
    ):
        raise ValueError("not a {type, data} event")
    data: dict[str, Any] = event["data"]
    room_id = to_user = None
    if stream == subjects.ROOMS_STREAM:
        room_id = subjects.decode_token(subject[len(subjects.ROOM_PREFIX) :])
    elif stream == subjects.DIRECT_STREAM:
        to_user = subjects.decode_token(subject[len(subjects.DIRECT_PREFIX) :])
    sender = data.get("userId", data.get("fromUserId"))
    # Stored as delivered live; prevOffset is added when read (see history).
    data.update(id=subjects.message_id(epoch, seq), offset=seq, epoch=epoch)
    return StoredMessage(
        stream=stream,
        epoch=epoch,
        seq=seq,
        prev_seq=0,
        subject=subject,
        kind=event["type"],
        room_id=room_id,
        from_user=sender if isinstance(sender, str) else None,
        to_user=to_user,
        event=event,
        stored_at=time.time(),
    )


async def _to_the_end(batch: Coroutine[Any, Any, None]) -> None:
    """Run one batch to its end even if the loop is cancelled meanwhile.

    Stopping cancels the loop; a batch it interrupted could be stored but not
    acked (redelivered after ack_wait). Shielded, stopping waits for the batch
    instead: written then acked, or (write failed) left unacked.
    """
    task = asyncio.ensure_future(batch)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def _release(psub: JetStreamContext.PullSubscription) -> None:
    """Unsubscribe a pull subscription and hand back what it holds unprocessed.

    A pull subscription has no callback: nothing but a fetch takes messages out
    of its queue, and nats-py's fetch takes leftovers (late 408 "request
    timeout" replies to earlier pulls) out without marking them done. So one
    left on the connection makes the connection's drain wait on a queue join
    that never ends, until the drain times out. Messages a cancelled fetch left
    in the queue are nak'd so that JetStream redelivers them now, not after
    ack_wait.
    """
    with contextlib.suppress(Exception):
        await psub.unsubscribe()
    queue = psub._sub._pending_queue
    while not queue.empty():
        msg: Msg = queue.get_nowait()
        queue.task_done()
        if msg.reply and not JetStreamContext.is_status_msg(msg):
            with contextlib.suppress(Exception):
                await msg.nak()


class Persister:
    def __init__(
        self,
        nc: Client,
        store: Store,
        settings: StreamSettings,
        epochs: dict[str, str],
        background: Background,
        registry: CollectorRegistry,
    ) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._store = store
        self._settings = settings
        self._epochs = epochs
        self._background = background
        self.metrics = PersistMetrics(registry)

    def start(self) -> None:
        for spec in specs(self._settings):
            self._background.spawn(self._run(spec))
        self._background.spawn(self._purge_loop())

    async def _subscribe(self, spec: StreamSpec) -> JetStreamContext.PullSubscription:
        # (Re)binding may mean the stream was recreated: take its epoch now, so
        # nothing from the new incarnation is stored under the old one.
        info = await self._js.stream_info(spec.name)
        self._epochs[spec.name] = epoch_of(info)
        config = ConsumerConfig(
            name=subjects.PERSIST_CONSUMER,
            durable_name=subjects.PERSIST_CONSUMER,
            filter_subject=spec.subjects[0],
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=20 * BATCH,
        )
        # Create or update: a consumer an older release made (ack_wait 30 s)
        # takes this release's settings; the same config again is a no-op.
        await self._js.add_consumer(spec.name, config=config)
        return await self._js.pull_subscribe_bind(
            durable=subjects.PERSIST_CONSUMER, stream=spec.name
        )

    async def _run(self, spec: StreamSpec) -> None:
        psub: JetStreamContext.PullSubscription | None = None
        background = self._background
        try:
            while not background.stopping:
                if psub is None:
                    try:
                        psub = await self._subscribe(spec)
                    except Exception as exc:
                        log.warning(
                            "cannot bind the persist consumer", stream=spec.name, error=repr(exc)
                        )
                        await background.sleep(1)
                        continue
                try:
                    msgs = await psub.fetch(batch=BATCH, timeout=1.0)
                except TimeoutError:
                    continue
                except Exception as exc:
                    if background.stopping:
                        return
                    log.warning("fetch failed", stream=spec.name, error=repr(exc))
                    # The consumer or the stream may be gone: bind again, to a new inbox.
                    await _release(psub)
                    psub = None
                    await background.sleep(1)
                    continue
                await _to_the_end(self._persist(spec.name, msgs))
        finally:
            if psub is not None:
                await _release(psub)

    async def _persist(self, stream: str, msgs: list[Msg]) -> None:
        epoch = self._epochs.get(stream, "")
        rows: list[StoredMessage] = []
        kept: list[Msg] = []
        for msg in msgs:
            if msg.metadata.num_delivered > 1:
                self.metrics.redeliveries.labels(stream).inc()
            try:
                rows.append(
                    to_stored(
                        stream,
                        epoch,
                        int(msg.metadata.sequence.stream),
                        msg.subject,
                        json.loads(msg.data),
                    )
                )
                kept.append(msg)
            except (ValueError, KeyError, TypeError) as exc:
                # Not ours to keep (a backend published garbage): never retry it.
                log.error(
                    "unstorable message",
                    stream=stream,
                    seq=msg.metadata.sequence.stream,
                    error=str(exc),
                )
                await msg.term()
        if rows:
            started = time.perf_counter()
            try:
                await self._write(rows, kept)
            except StoreError as exc:
                # Not acked: JetStream redelivers after ack_wait; nothing is lost.
                log.error(
                    "store write failed; will be redelivered",
                    stream=stream,
                    count=len(rows),
                    error=str(exc),
                )
                await self._background.sleep(1)
                return
            self.metrics.write_seconds.observe(time.perf_counter() - started)
            self.metrics.persisted.labels(stream).inc(len(rows))
        for msg in kept:
            await msg.ack()

    async def _write(self, rows: list[StoredMessage], msgs: list[Msg]) -> None:
        """Write a batch, telling JetStream every few seconds that it is still in hand."""
        write = asyncio.ensure_future(self._store.write(rows))
        while True:
            done, _ = await asyncio.wait((write,), timeout=PROGRESS_SECONDS)
            if done:
                write.result()  # raises what the write raised
                return
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def floor(self, stream: str) -> int:
        """The consumer's ack floor: every message at or below it is in the store."""
        try:
            info = await self._js.consumer_info(stream, subjects.PERSIST_CONSUMER)
        except NotFoundError:
            return 0  # no broker has persisted this stream incarnation yet
        return int(info.ack_floor.stream_seq) if info.ack_floor else 0

    async def _purge_loop(self) -> None:
        while await self._background.sleep(PURGE_INTERVAL_SECONDS):
            for spec in specs(self._settings):
                try:
                    await self.purge(spec.name)
                except Exception as exc:
                    log.warning("purge failed", stream=spec.name, error=repr(exc))

    async def purge(self, stream: str) -> int:
        """Drop what is both stored and older than the recovery window; returns the new first seq.

        Discard policy "new" means a full stream refuses publishes, so purging
        only what is stored keeps the streams small without ever deleting a
        message the store has not got.
        """
        floor = await self.floor(stream)
        last = int((await self._js.stream_info(stream)).state.last_seq)
        self.metrics.lag.labels(stream).set(max(0, last - floor))
        if floor == 0:
            return 0
        cutoff = datetime.datetime.fromtimestamp(
            time.time() - self._settings.recovery_window_seconds, tz=datetime.UTC
        )
        timeout = 2.0
        newer = await jsread.get_one(
            self._nc, stream, timeout, start_time=cutoff.isoformat().replace("+00:00", "Z")
        )
        first_recent = (
            int(newer.headers[subjects.HDR_SEQUENCE])
            if newer is not None and newer.headers
            else floor + 1
        )
        keep_from = min(floor + 1, first_recent)
        reply = await self._nc.request(
            f"$JS.API.STREAM.PURGE.{stream}",
            json.dumps({"seq": keep_from}).encode(),
            timeout=timeout,
        )
        answer = json.loads(reply.data)
        if "error" in answer:
            raise RuntimeError(answer["error"].get("description", "purge refused"))
        purged = int(answer.get("purged", 0))
        if purged:
            self.metrics.purged.labels(stream).inc(purged)
            log.info("purged", stream=stream, purged=purged, keep_from=keep_from)
        return keep_from
