"""Typed configuration: one TOML file, every key overridable from the environment.

Both services describe their configuration as frozen dataclasses of sections
(``[nats]``, ``[streams]`` ...). ``load`` reads the TOML file named by
``--config`` or ``RTGATE_CONFIG``, applies ``RTGATE_<SECTION>__<KEY>``
overrides and validates every value against the field's type, so a typo or a
bad value stops start-up with a message naming the key instead of surfacing
as a strange failure hours later.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "RTGATE_"
CONFIG_ENV = "RTGATE_CONFIG"

T = TypeVar("T")

# Sections of every rtgate service. A service skips the others' sections, so
# one file or one environment can serve both; any other name is a typo.
ALL_SECTIONS = frozenset(
    {"server", "auth", "limits", "edge", "nats", "streams", "log", "broker", "store", "presence"}
)


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""


@dataclasses.dataclass(frozen=True, slots=True)
class NatsSettings:
    # Several URLs may be given for a cluster; the client picks and fails over.
    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = ""
    connect_timeout: float = 2.0
    # -1 retries forever: a service should outlive a NATS restart.
    max_reconnect_attempts: int = -1
    reconnect_time_wait: float = 1.0
    # How long a publish waits for its JetStream PubAck before the client is
    # told "unavailable".
    ack_timeout: float = 5.0
    request_timeout: float = 2.0
    # Credentials: at most one of user/password, token, an NKey seed file or
    # a creds file (JWT + seed, decentralized auth), as the server expects.
    user: str = ""
    password: str = ""
    token: str = ""
    nkey_seed_file: str = ""
    creds_file: str = ""
    # TLS: a CA to verify the server by (else the system's CAs, when the URLs
    # say tls:// or the server requires TLS), and a client certificate and key
    # for servers that verify clients.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def __post_init__(self) -> None:
        # A half-set pair would connect without the credential the operator
        # meant to give and fail later as a puzzling authorization violation.
        require(
            bool(self.user) == bool(self.password),
            "nats.user and nats.password must be set together",
        )
        require(
            bool(self.tls_cert_file) == bool(self.tls_key_file),
            "nats.tls_cert_file and nats.tls_key_file must be set together",
        )
        methods = [
            name
            for name, value in (
                ("user/password", self.user),
                ("token", self.token),
                ("nkey_seed_file", self.nkey_seed_file),
                ("creds_file", self.creds_file),
            )
            if value
        ]
        require(
            len(methods) <= 1,
            f"nats: set only one of user/password, token, nkey_seed_file and creds_file "
            f"(got {', '.join(methods)})",
        )

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamSettings:
    # A full stream refuses publishes (discard "new"): nothing the broker has
    # not stored is ever deleted to make room.
    rooms_max_bytes: int = 1024 * 1024 * 1024
    direct_max_bytes: int = 256 * 1024 * 1024
    global_max_bytes: int = 64 * 1024 * 1024
    # Far above any tolerated broker outage.
    max_age_seconds: float = 24 * 3600.0
    duplicate_window_seconds: float = 120.0
    replicas: int = 1
    # How often stream fill levels are read for the metrics.
    stats_interval_seconds: float = 5.0
    # What a reconnecting client can recover from the streams: messages newer
    # than this, at most this many per room. The broker purges only what it
    # has stored and what is older than the window.
    recovery_window_seconds: float = 120.0
    recovery_max_messages: int = 1000


PRESENCE_POLICIES = ("all", "shared-rooms")


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceSettings:
    """Presence, read by both tiers: the timing must agree between them."""

    # Gateways report and the broker runs the presence service; false on
    # either side turns presence off there (queries answer "unavailable").
    enabled: bool = True
    # Gateways heartbeat this often; one missing this many is declared dead.
    heartbeat_seconds: float = 5.0
    missed_heartbeats: int = 3
    # A user whose last connection ends and who returns within this causes no
    # offline/online and no left/joined.
    grace_seconds: float = 5.0
    # Who may query and watch whom: "all", or "shared-rooms" (users who share
    # a room with the asker; yourself always).
    visibility: str = "shared-rooms"
    # Who may send direct:message to whom, by the same membership view.
    direct_messages: str = "all"
    # Users one connection may watch with presence:subscribe.
    max_watched: int = 100
    # Gateways: how often they check what their watchers were told against the
    # presence service (events are at most once); 0 checks only after a NATS
    # reconnect or a takeover.
    recheck_seconds: float = 30.0
    # Broker: the lease that makes one presence service active; a standby takes
    # over within about this long after the active one dies.
    lease_ttl_seconds: int = 6
    # Broker: how often the active service saves its state (when it changed)
    # for the next one to continue from.
    snapshot_interval_seconds: float = 1.0
    # Broker: after taking over, how long gateways have to send their state
    # before queries are answered.
    settle_seconds: float = 1.0

    def __post_init__(self) -> None:
        require(self.heartbeat_seconds > 0, "presence.heartbeat_seconds must be > 0")
        require(self.missed_heartbeats >= 1, "presence.missed_heartbeats must be >= 1")
        require(self.grace_seconds >= 0, "presence.grace_seconds must be >= 0")
        require(
            self.recheck_seconds == 0 or self.recheck_seconds >= 1,
            "presence.recheck_seconds must be 0 (off) or >= 1",
        )
        require(
            self.visibility in PRESENCE_POLICIES,
            f"presence.visibility must be {' or '.join(PRESENCE_POLICIES)}",
        )
        require(
            self.direct_messages in PRESENCE_POLICIES,
            f"presence.direct_messages must be {' or '.join(PRESENCE_POLICIES)}",
        )
        require(1 <= self.max_watched <= 10000, "presence.max_watched must be 1..10000")
        require(self.lease_ttl_seconds >= 2, "presence.lease_ttl_seconds must be >= 2")
        require(
            self.snapshot_interval_seconds > 0, "presence.snapshot_interval_seconds must be > 0"
        )
        require(self.settle_seconds >= 0, "presence.settle_seconds must be >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "info"
    # "auto" is JSON lines when stderr is not a TTY, readable console otherwise.
    format: str = "auto"

    def __post_init__(self) -> None:
        require(
            self.level.lower() in ("debug", "info", "warning", "error"),
            "log.level must be debug, info, warning or error",
        )
        require(
            self.format in ("auto", "json", "console"), "log.format must be auto, json or console"
        )


def load(
    cls: type[T], path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> T:
    """Build ``cls`` (a dataclass of section dataclasses) from file and environment."""
    environ = os.environ if env is None else env
    if path is None:
        path = environ.get(CONFIG_ENV) or None
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with Path(path).open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    own = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    raw = {k: v for k, v in raw.items() if k in own or k not in ALL_SECTIONS}
    _apply_env(cls, raw, environ)
    return _build(cls, raw, "")


def _apply_env(cls: type[Any], raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    sections = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == CONFIG_ENV:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in sections:
            if section in ALL_SECTIONS:
                continue
            raise ConfigError(f"{name}: unknown section [{section}]")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        # Strings from the environment are parsed by _coerce against the field type.
        table[key] = _EnvValue(value)


class _EnvValue(str):
    """A raw string from the environment, to be parsed into the field's type."""


def _build(cls: type[T], raw: Mapping[str, Any], where: str) -> T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(f"{where}{k}" for k in unknown)
        raise ConfigError(f"unknown config key: {names}")
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{key}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(hint, value, key)
    try:
        obj = cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return obj


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    env = isinstance(value, _EnvValue)
    try:
        if hint is bool:
            if env:
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if env:
                return int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ValueError
        if hint is float:
            if env:
                return float(value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise ValueError
        if hint is str:
            if isinstance(value, str):
                return str(value)
            raise ValueError
        if origin is tuple:
            if env:
                items: list[Any] = [s.strip() for s in value.split(",") if s.strip()]
            elif isinstance(value, list):
                items = value
            else:
                raise ValueError
            (item_hint, _ellipsis) = typing.get_args(hint)
            return tuple(_coerce(item_hint, _EnvValue(i) if env else i, key) for i in items)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if env and value == "":
                return None
            return _coerce(args[0], value, key)
    except ValueError:
        pass
    raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def require(condition: bool, message: str) -> None:
    """Raise ValueError (turned into ConfigError) when a cross-field check fails."""
    if not condition:
        raise ValueError(message)
