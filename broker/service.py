"""The broker service: provisions the streams and serves health and metrics.

Persistence and presence consume what gateways publish; they join this
service in later issues. What is here already is the lifecycle they plug into.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from nats.aio.client import Client as Nats
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from broker import natsconn, streams
from broker.background import Background
from broker.config import BrokerConfig
from broker.metrics import StreamMetrics

log = structlog.get_logger("rtgate.broker")


class Broker:
    def __init__(self, config: BrokerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.broker_id = config.broker_id
        self.registry = registry or CollectorRegistry()
        self.nats_connected = Gauge("rtgate_broker_nats_connected",
                                    "1 when the NATS connection is up", registry=self.registry)
        self.stream_metrics = StreamMetrics(self.registry)
        self.epochs: dict[str, str] = {}
        self._nc: Nats | None = None
        self.background = Background()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def start(self) -> None:
        self._nc = await natsconn.connect(
            self.config.nats, f"rtgate-broker {self.broker_id}",
            on_disconnected=self._down, on_reconnected=self._up)
        self.nats_connected.set(1)
        await self._provision()
        self.background.spawn(self.stream_metrics.poll(
            self._nc.jetstream(), self.config.streams, lambda: self.connected, self.background))
        log.info("broker started", broker_id=self.broker_id, epochs=self.epochs)

    async def stop(self) -> None:
        await self.background.stop()
        await natsconn.close(self._nc)
        log.info("broker stopped", broker_id=self.broker_id)

    async def _provision(self) -> None:
        assert self._nc is not None
        infos = await streams.ensure_streams(self._nc.jetstream(), self.config.streams)
        self.epochs = {name: streams.epoch_of(info) for name, info in infos.items()}

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
    if broker.connected:
        return web.json_response(dict(body, status="ready"))
    return web.json_response(dict(body, status="unavailable"), status=503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[BROKER].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
