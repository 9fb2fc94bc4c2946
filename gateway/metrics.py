"""The gateway's Prometheus metrics, on a registry owned by the app (no globals).

Per-delivery counts (frames and bytes sent) are plain integers on the
``Flusher`` read at scrape time: a prometheus counter increment per delivery
would cost more than the delivery's own bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from broker.metrics import StreamMetrics
from gateway.protocol import CLIENT_TYPES

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _SentCollector(Collector):
    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self._read = read

    def collect(self) -> Iterable[CounterMetricFamily]:
        frames, sent = self._read()
        yield CounterMetricFamily("rtgate_frames_sent", "Frames written to sockets", value=frames)
        yield CounterMetricFamily("rtgate_bytes_sent", "Bytes written to sockets", value=sent)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections = Gauge(
            "rtgate_connections", "Open WebSocket connections", registry=registry
        )
        # Not "rtgate_connections_total": in the OpenMetrics model that name is the
        # counter family "rtgate_connections" and would clash with the gauge.
        self.connections_total = Counter(
            "rtgate_handshakes_total",
            "WebSocket handshakes by outcome",
            ["outcome"],
            registry=registry,
        )
        self.frames_received = Counter(
            "rtgate_frames_received_total", "Frames received by type", ["type"], registry=registry
        )
        # Label children resolved once: labels() is a locked dict lookup per call.
        self.frames_by_type = {
            kind: self.frames_received.labels(kind)
            for kind in (*CLIENT_TYPES, "unknown", "invalid")
        }
        self.bytes_received = Counter(
            "rtgate_bytes_received_total", "Bytes received from sockets", registry=registry
        )
        self.errors = Counter(
            "rtgate_errors_total", "Errors sent to clients by code", ["code"], registry=registry
        )
        self.slow_consumers = Counter(
            "rtgate_slow_consumer_disconnects_total",
            "Connections closed with 1013 because their queue overflowed",
            registry=registry,
        )
        self.nats_connected = Gauge(
            "rtgate_nats_connected", "1 when the NATS connection is up", registry=registry
        )
        self.rooms_subscribed = Gauge(
            "rtgate_rooms_subscribed",
            "Rooms with a NATS subscription on this gateway",
            registry=registry,
        )
        self.publish_latency = Histogram(
            "rtgate_publish_latency_seconds",
            "Durable frame in to JetStream PubAck",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.fanout_latency = Histogram(
            "rtgate_fanout_latency_seconds",
            "NATS message in to socket write",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.closes = Counter(
            "rtgate_closes_total",
            "Connections closed by the gateway, by close code",
            ["code"],
            registry=registry,
        )
        self.recoveries = Counter(
            "rtgate_recoveries_total",
            "Channel recoveries on join or resume, by result",
            ["result"],
            registry=registry,
        )
        self.recovered_messages = Counter(
            "rtgate_recovered_messages_total",
            "Messages replayed to recovering clients",
            registry=registry,
        )
        self.gaps_filled = Counter(
            "rtgate_gap_messages_total",
            "Stored messages the gateway read from the stream because republish missed them",
            registry=registry,
        )
        self.presence_corrected = Counter(
            "rtgate_presence_corrections",
            "user:online/offline told to watchers by a check: the event was missed",
            registry=registry,
        )
        self.presence_fenced = Counter(
            "rtgate_presence_fenced",
            "Presence messages dropped: from a replaced presence service (older fencing token)",
            registry=registry,
        )
        self.streams = StreamMetrics(registry)

    def watch_sent(self, read: Callable[[], tuple[int, int]]) -> None:
        self.registry.register(_SentCollector(read))
