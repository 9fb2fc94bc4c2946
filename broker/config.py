"""The broker's configuration: one typed object, passed down from start-up."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from broker import settings
from broker.settings import (
    LogSettings,
    NatsSettings,
    PresenceSettings,
    StreamSettings,
    require,
)


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerSettings:
    id: str = ""
    # HTTP for /healthz, /readyz and /metrics.
    host: str = "127.0.0.1"
    port: int = 8090
    # Where embedded state lives (the SQLite store).
    state_dir: str = "./state"

    # false: serve history only, while other replicas persist.
    persist: bool = True

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "broker.port must be 0..65535")


STORE_BACKENDS = ("sqlite", "postgres")
# The SQLite file in broker.state_dir when store.sqlite_path is empty.
SQLITE_FILE_NAME = "rtgate.sqlite3"


@dataclasses.dataclass(frozen=True, slots=True)
class StoreSettings:
    # "sqlite": one file, one broker. "postgres": needed for several replicas.
    backend: str = "sqlite"
    # Empty means <broker.state_dir>/rtgate.sqlite3.
    sqlite_path: str = ""
    # libpq-style URL, e.g. postgresql://rtgate:secret@db:5432/rtgate.
    postgres_dsn: str = ""
    # Connections per broker process.
    postgres_pool_size: int = 4

    def __post_init__(self) -> None:
        require(
            self.backend in STORE_BACKENDS, f"store.backend must be {' or '.join(STORE_BACKENDS)}"
        )
        require(
            self.backend != "postgres" or bool(self.postgres_dsn),
            "store.postgres_dsn must be set when store.backend is postgres",
        )
        # A DSN nothing uses is a half-done switch to PostgreSQL: the broker
        # would quietly keep writing to SQLite.
        require(
            self.backend == "postgres" or not self.postgres_dsn,
            "store.postgres_dsn is set but store.backend is sqlite; "
            'set store.backend = "postgres" or remove the DSN',
        )
        require(self.postgres_pool_size >= 1, "store.postgres_pool_size must be >= 1")


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerConfig:
    broker: BrokerSettings = BrokerSettings()
    store: StoreSettings = StoreSettings()
    nats: NatsSettings = NatsSettings()
    streams: StreamSettings = StreamSettings()
    presence: PresenceSettings = PresenceSettings()
    log: LogSettings = LogSettings()

    @property
    def broker_id(self) -> str:
        return self.broker.id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def sqlite_file(self) -> Path:
        """Where the SQLite store lives (whether or not it is the backend in use)."""
        if self.store.sqlite_path:
            return Path(self.store.sqlite_path)
        return Path(self.broker.state_dir) / SQLITE_FILE_NAME


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> BrokerConfig:
    return settings.load(BrokerConfig, path, env)
