"""The broker service: provisions the streams, persists them, serves history,
runs the presence service, and serves health and metrics."""

from __future__ import annotations

import structlog
from aiohttp import web
from nats.aio.client import Client as Nats
from nats.js.api import StreamInfo
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from broker import natsconn, streams
from broker.background import Background
from broker.config import BrokerConfig
from broker.history import History
from broker.lease import Lease, LeaseHeld
from broker.metrics import StreamMetrics
from broker.persist import Persister
from broker.presence import PresenceService
from broker.store import Store, StoreError, open_store

log = structlog.get_logger("rtgate.broker")


class Broker:
    def __init__(self, config: BrokerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.broker_id = config.broker_id
        self.registry = registry or CollectorRegistry()
        self.nats_connected = Gauge(
            "rtgate_broker_nats_connected",
            "1 when the NATS connection is up",
            registry=self.registry,
        )
        self.stream_metrics = StreamMetrics(self.registry)
        self.epochs: dict[str, str] = {}
        self._nc: Nats | None = None
        self.store: Store | None = None
        self._lease: Lease | None = None
        self.persister: Persister | None = None
        self.history: History | None = None
        self.presence: PresenceService | None = None
        self.background = Background()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def ready(self) -> bool:
        lease_ok = self._lease is None or not self._lease.lost
        return self.connected and self.store is not None and lease_ok

    async def start(self) -> None:
        self._nc = await natsconn.connect(
            self.config.nats,
            f"rtgate-broker {self.broker_id}",
            on_disconnected=self._down,
            on_reconnected=self._up,
        )
        self.nats_connected.set(1)
        await self._provision()
        self.background.spawn(
            self.stream_metrics.poll(
                self._nc.jetstream(),
                self.config.streams,
                lambda: self.connected,
                self.background,
                self._on_stream_info,
            )
        )
        self.store = await open_store(self.config)
        if self.config.store.backend == "sqlite" and self.config.broker.persist:
            # One SQLite file serves one broker: a second replica would persist
            # half the messages into a file nobody else reads.
            self._lease = Lease(self._nc, "persist-sqlite", self.broker_id)
            try:
                await self._lease.acquire()
            except LeaseHeld as exc:
                raise StoreError(
                    f"another broker ({exc}) already persists to SQLite on this NATS; "
                    'several broker replicas need store.backend = "postgres"'
                ) from None
            self.background.spawn(self._lease.keep(self.background))
        self.persister = Persister(
            self._nc, self.store, self.config.streams, self.epochs, self.background, self.registry
        )
        if self.config.broker.persist:
            self.persister.start()
        self.history = History(
            self._nc, self.store, self.persister, self.epochs, self.config.nats.request_timeout
        )
        await self.history.serve()
        if self.config.presence.enabled:
            self.presence = PresenceService(
                self._nc,
                self.config.presence,
                self.broker_id,
                self.registry,
                self.config.streams.replicas,
                self.config.nats.request_timeout,
            )
            self.presence.start()
        log.info("broker started", broker_id=self.broker_id, epochs=self.epochs)

    async def stop(self) -> None:
        if self.presence is not None:
            await self.presence.stop()
        await self.background.stop()
        if self._lease is not None:
            await self._lease.release()
        # Draining answers the history requests already queued: the store stays open for them.
        await natsconn.close(self._nc)
        if self.store is not None:
            await self.store.close()
        log.info("broker stopped", broker_id=self.broker_id)

    async def _provision(self) -> None:
        assert self._nc is not None
        infos = await streams.ensure_streams(self._nc.jetstream(), self.config.streams)
        for info in infos.values():
            self._on_stream_info(info)

    def _on_stream_info(self, info: StreamInfo) -> None:
        # Updated in place: the persister and history hold this same mapping.
        name = info.config.name
        if name is not None:
            self.epochs[name] = streams.epoch_of(info)

    async def _down(self) -> None:
        self.nats_connected.set(0)

    async def _up(self) -> None:
        try:
            await self._provision()
        except Exception as exc:
            log.error("stream provisioning after reconnect failed", error=repr(exc))
        self.nats_connected.set(1)


BROKER = web.AppKey("broker", Broker)


def create_app(config: BrokerConfig, registry: CollectorRegistry | None = None) -> web.Application:
    app = web.Application()
    app[BROKER] = Broker(config, registry)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    await app[BROKER].start()


async def _stop(app: web.Application) -> None:
    await app[BROKER].stop()


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    broker = request.app[BROKER]
    body = {"nats": broker.connected, "brokerId": broker.broker_id}
    if broker.ready:
        return web.json_response(dict(body, status="ready"))
    return web.json_response(dict(body, status="unavailable"), status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[BROKER].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
