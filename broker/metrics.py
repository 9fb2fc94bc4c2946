"""Metrics both tiers export: the fill level of the JetStream streams."""

from __future__ import annotations

from collections.abc import Callable

import structlog
from nats.js import JetStreamContext
from nats.js.api import StreamInfo
from prometheus_client import CollectorRegistry, Gauge

from broker.background import Background
from broker.settings import StreamSettings
from broker.streams import specs

log = structlog.get_logger("rtgate.streams")

# A stream this full refuses publishes soon: warn well before.
FILL_WARNING = 0.8


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Gauge(
            "rtgate_stream_bytes", "Bytes stored in a stream", ["stream"], registry=registry
        )
        self.messages = Gauge(
            "rtgate_stream_messages", "Messages stored in a stream", ["stream"], registry=registry
        )
        self.fill = Gauge(
            "rtgate_stream_fill_ratio",
            "Stream bytes over max_bytes (1.0 refuses publishes)",
            ["stream"],
            registry=registry,
        )

    async def poll(
        self,
        js: JetStreamContext,
        settings: StreamSettings,
        is_connected: Callable[[], bool],
        background: Background,
        on_info: Callable[[StreamInfo], None] | None = None,
    ) -> None:
        """Refresh the gauges every ``stats_interval_seconds`` until the owner stops."""
        warned: set[str] = set()
        while not background.stopping:
            if is_connected():
                for spec in specs(settings):
                    try:
                        info = await js.stream_info(spec.name)
                    except Exception as exc:  # a missed sample is not worth more than a line
                        log.debug("stream info failed", stream=spec.name, error=repr(exc))
                        continue
                    if on_info is not None:
                        on_info(info)
                    used = info.state.bytes
                    ratio = used / spec.max_bytes if spec.max_bytes > 0 else 0.0
                    self.bytes.labels(spec.name).set(used)
                    self.messages.labels(spec.name).set(info.state.messages)
                    self.fill.labels(spec.name).set(ratio)
                    if ratio >= FILL_WARNING and spec.name not in warned:
                        warned.add(spec.name)
                        log.warning(
                            "stream nearly full; publishes will be refused when full",
                            stream=spec.name,
                            bytes=used,
                            max_bytes=spec.max_bytes,
                        )
                    elif ratio < FILL_WARNING:
                        warned.discard(spec.name)
            await background.sleep(settings.stats_interval_seconds)
