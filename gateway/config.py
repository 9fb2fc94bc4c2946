"""The gateway's configuration: one typed object, passed down from start-up."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping

from broker import settings
from broker.settings import (
    ConfigError,
    LogSettings,
    NatsSettings,
    PresenceSettings,
    StreamSettings,
    require,
)
from gateway import admission

DEV_SECRET = "rtgate-insecure-dev-secret-change-me"


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSettings:
    # Unique per process; names its control subject and shows in welcome.
    id: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    # WebSocket ping interval; a peer that does not answer is closed.
    heartbeat_seconds: float = 25.0
    # How long a close handshake may wait for the peer before the socket is cut.
    close_timeout_seconds: float = 3.0
    # permessage-deflate. Off: it costs ~3x CPU per delivery and ~90 KiB per
    # connection. When on, it is offered to clients but fan-out frames are
    # still sent uncompressed (see docs/operations.md).
    compression: bool = False
    # Development only: accept ?user=NAME without a token. Logged loudly.
    dev_allow_user_param: bool = False
    # Key for the server API (/api/...): Authorization: Bearer <key>. Empty disables it.
    api_key: str = ""
    # Development only (rtgate dev turns it on): the demo chat page at / and
    # GET /dev/token?user=NAME, which mints a token for anyone. Logged loudly.
    dev_demo: bool = False
    # SO_REUSEPORT: several gateway processes (one per core) share server.port
    # and the kernel spreads connections among them.
    reuse_port: bool = False
    # > 0: /metrics, /healthz, /readyz and /stats are also served (plain HTTP)
    # on this port plus the instance number, so each process behind a shared
    # port can be scraped on its own. 0: only on server.port.
    metrics_port: int = 0
    # Native TLS (wss://, https://) when both are set: PEM certificate chain and key.
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "server.port must be 0..65535")
        require(0 <= self.metrics_port <= 65535, "server.metrics_port must be 0..65535")
        require(
            self.metrics_port == 0 or self.metrics_port != self.port,
            "server.metrics_port must differ from server.port",
        )
        require(
            bool(self.tls_cert_file) == bool(self.tls_key_file),
            "server.tls_cert_file and server.tls_key_file must be set together",
        )
        require(self.heartbeat_seconds > 0, "server.heartbeat_seconds must be > 0")


# Tokens signed with the shared secret.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
# Tokens signed with a private key, verified with a public key from auth.jwks_file.
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384")


@dataclasses.dataclass(frozen=True, slots=True)
class AuthSettings:
    # HS shared secret. The built-in default is for local development only.
    secret: str = DEV_SECRET
    algorithms: tuple[str, ...] = ("HS256",)
    issuer: str = ""
    audience: str = ""
    leeway_seconds: float = 0.0
    # A connection without a token in the handshake must send "auth" within this.
    timeout_seconds: float = 5.0
    # Rooms a token without a "rooms" claim may join (glob patterns).
    default_rooms: tuple[str, ...] = ("*",)
    # "auth:expiring" is sent this long before the token expires (0: never).
    expiring_notice_seconds: float = 60.0
    # A user disconnected with reconnect=false is denied this long by default:
    # as long as the longest token you issue, so the same token cannot return.
    deny_seconds: float = 86400.0
    # JWKS file ({"keys": [...]}) of public keys for RS/ES tokens; "" = none.
    jwks_file: str = ""
    # How often the JWKS file is checked for changes (0: only on SIGHUP).
    jwks_check_seconds: float = 2.0

    def __post_init__(self) -> None:
        require(bool(self.algorithms), "auth.algorithms must not be empty")
        supported = HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS
        for alg in self.algorithms:
            require(alg.lower() != "none", "auth.algorithms must never contain 'none'")
            require(
                alg in supported,
                f"auth.algorithms: {alg} is not supported ({', '.join(supported)})",
            )
        hmac = any(a in HMAC_ALGORITHMS for a in self.algorithms)
        public = any(a in PUBLIC_KEY_ALGORITHMS for a in self.algorithms)
        require(
            not hmac or bool(self.secret),
            "auth.secret must not be empty when auth.algorithms has an HS algorithm",
        )
        require(
            not public or bool(self.jwks_file),
            "auth.jwks_file must be set when auth.algorithms has an RS or ES algorithm",
        )
        # A key file nothing reads is a half-done rotation or a typo in algorithms.
        require(
            public or not self.jwks_file,
            "auth.jwks_file is set but auth.algorithms has no RS or ES algorithm",
        )
        require(self.timeout_seconds > 0, "auth.timeout_seconds must be > 0")
        require(self.expiring_notice_seconds >= 0, "auth.expiring_notice_seconds must be >= 0")
        require(self.deny_seconds >= 0, "auth.deny_seconds must be >= 0")
        require(self.jwks_check_seconds >= 0, "auth.jwks_check_seconds must be >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class LimitSettings:
    max_frame_bytes: int = 64 * 1024
    rate_per_second: float = 20.0
    rate_burst: int = 50
    max_rooms: int = 100
    max_content_bytes: int = 4096
    # Bad frames in a row before the connection is closed with 1007.
    max_bad_frames: int = 10
    # Outbound queue per connection; bytes include what the transport still holds.
    outbox_frames: int = 1024
    outbox_bytes: int = 4 * 1024 * 1024
    # chat:typing forwarded per user per room per second (coalesced, latest wins).
    typing_per_second: float = 2.0
    # Messages one resume may replay across all its channels.
    resume_budget: int = 5000

    def __post_init__(self) -> None:
        require(self.max_frame_bytes >= 1024, "limits.max_frame_bytes must be >= 1024")
        require(self.rate_per_second > 0, "limits.rate_per_second must be > 0")
        require(self.rate_burst >= 1, "limits.rate_burst must be >= 1")
        require(self.max_rooms >= 1, "limits.max_rooms must be >= 1")
        require(self.max_content_bytes >= 1, "limits.max_content_bytes must be >= 1")
        require(self.max_bad_frames >= 1, "limits.max_bad_frames must be >= 1")
        require(self.outbox_frames >= 1, "limits.outbox_frames must be >= 1")
        require(
            self.outbox_bytes >= self.max_frame_bytes,
            "limits.outbox_bytes must be >= limits.max_frame_bytes",
        )
        require(self.typing_per_second > 0, "limits.typing_per_second must be > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class EdgeSettings:
    # Browser Origins allowed to open a WebSocket (glob patterns, e.g.
    # "https://*.example.com"). Empty allows any origin: set it in production
    # against cross-site WebSocket hijacking. Handshakes without Origin
    # (non-browser clients) are always allowed.
    allowed_origins: tuple[str, ...] = ()
    # Peers whose X-Forwarded-For is believed (addresses or CIDRs of your proxies).
    trusted_proxies: tuple[str, ...] = ()
    # Per client address (0: unlimited); refused with HTTP 429 before the upgrade.
    max_connections_per_address: int = 1000
    handshakes_per_second_per_address: float = 20.0
    handshake_burst_per_address: int = 40
    # Connections that have not authenticated yet, per gateway (HTTP 503 beyond).
    max_unauthenticated: int = 10000
    # Connections per user per gateway; the next is closed with 4429.
    max_connections_per_user: int = 20
    # SIGTERM: clients are told to reconnect and closed, spread over this window.
    drain_seconds: float = 10.0
    # Upper bound of the random delay each draining client is told to wait.
    reconnect_jitter_ms: int = 1000

    def __post_init__(self) -> None:
        try:
            admission.parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise ValueError(f"edge.trusted_proxies: {exc}") from exc
        require(
            self.max_connections_per_address >= 0, "edge.max_connections_per_address must be >= 0"
        )
        require(
            self.handshakes_per_second_per_address >= 0,
            "edge.handshakes_per_second_per_address must be >= 0",
        )
        require(
            self.handshake_burst_per_address >= 1, "edge.handshake_burst_per_address must be >= 1"
        )
        require(self.max_unauthenticated >= 1, "edge.max_unauthenticated must be >= 1")
        require(self.max_connections_per_user >= 1, "edge.max_connections_per_user must be >= 1")
        require(self.drain_seconds >= 0, "edge.drain_seconds must be >= 0")
        require(self.reconnect_jitter_ms >= 0, "edge.reconnect_jitter_ms must be >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    edge: EdgeSettings = EdgeSettings()
    nats: NatsSettings = NatsSettings()
    streams: StreamSettings = StreamSettings()
    presence: PresenceSettings = PresenceSettings()
    log: LogSettings = LogSettings()

    @property
    def gateway_id(self) -> str:
        return self.server.id or f"{socket.gethostname()}-{os.getpid()}"

    def for_instance(self, instance: int) -> GatewayConfig:
        """The config of instance N of a host's gateways (``rtgate gateway --instance N``).

        Its id is ``<server.id or hostname>-N`` (stable across restarts, unlike
        the pid default) and its metrics listener ``server.metrics_port + N``.
        """
        if instance < 0:
            raise ConfigError(f"--instance must be >= 0, got {instance}")
        metrics_port = self.server.metrics_port
        if metrics_port > 0:
            metrics_port += instance
            if metrics_port > 65535 or metrics_port == self.server.port:
                raise ConfigError(
                    f"server.metrics_port + instance ({metrics_port}) must be "
                    "a free port other than server.port"
                )
        server = dataclasses.replace(
            self.server,
            id=f"{self.server.id or socket.gethostname()}-{instance}",
            metrics_port=metrics_port,
        )
        return dataclasses.replace(self, server=server)


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    return settings.load(GatewayConfig, path, env)
