"""The broker's configuration: one typed object, passed down from start-up."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping

from broker import settings
from broker.settings import LogSettings, NatsSettings, StreamSettings, require


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerSettings:
    id: str = ""
    # HTTP for /healthz, /readyz and /metrics.
    host: str = "127.0.0.1"
    port: int = 8090
    # Where embedded state lives (SQLite store, from the persistence issue on).
    state_dir: str = "./state"

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "broker.port must be 0..65535")


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerConfig:
    broker: BrokerSettings = BrokerSettings()
    nats: NatsSettings = NatsSettings()
    streams: StreamSettings = StreamSettings()
    log: LogSettings = LogSettings()

    @property
    def broker_id(self) -> str:
        return self.broker.id or f"{socket.gethostname()}-{os.getpid()}"


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> BrokerConfig:
    return settings.load(BrokerConfig, path, env)
