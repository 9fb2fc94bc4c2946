"""The aiohttp application: routes, the WebSocket endpoint, and lifecycle hooks."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import structlog
from aiohttp import WSMsgType, web
from aiohttp.web_runner import GracefulExit
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway import admission, api, codec, demo, static
from gateway.api import error_response
from gateway.auth import AuthError, Identity
from gateway.client import Client
from gateway.config import DEV_SECRET, GatewayConfig
from gateway.errors import ErrorCode
from gateway.node import Node
from rtgate.sdnotify import Notifier

log = structlog.get_logger("rtgate.gateway")

NODE = web.AppKey("node", Node)
HANDLE_SIGNALS = web.AppKey("handle_signals", bool)
NOTIFIER = web.AppKey("notifier", Notifier)


def create_app(
    config: GatewayConfig,
    registry: CollectorRegistry | None = None,
    *,
    handle_signals: bool = False,
    notifier: Notifier | None = None,
) -> web.Application:
    """``handle_signals``: SIGTERM drains (the process's own server, not tests).

    ``notifier`` is told STOPPING when SIGTERM starts the drain (systemd).
    """
    app = web.Application()
    app[NODE] = Node(config, registry)
    app[HANDLE_SIGNALS] = handle_signals
    app[NOTIFIER] = notifier or Notifier(None)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    api.add_routes(app, NODE)
    static.add_routes(app, config)
    if config.server.dev_demo:
        demo.add_routes(app, config)
    app.on_startup.append(_start)
    app.on_shutdown.append(_close_sockets)
    app.on_cleanup.append(_stop)
    return app


def create_metrics_app(app: web.Application) -> web.Application:
    """The observability endpoints of ``app``'s gateway alone, for server.metrics_port.

    A separate application on its own listener (rather than routing by port
    inside one app) keeps /ws and the API off the metrics port without a
    middleware; it shares the gateway's node, and the node's lifecycle stays
    with the main app.
    """
    metrics_app = web.Application()
    metrics_app[NODE] = app[NODE]
    metrics_app.router.add_get("/healthz", healthz)
    metrics_app.router.add_get("/readyz", readyz)
    metrics_app.router.add_get("/metrics", metrics)
    metrics_app.router.add_get("/stats", stats)
    return metrics_app


async def _start(app: web.Application) -> None:
    node = app[NODE]
    hmac = any(a.startswith("HS") for a in node.config.auth.algorithms)
    if hmac and node.config.auth.secret == DEV_SECRET:
        log.warning(
            "auth.secret is the built-in development secret: anyone can mint tokens. "
            "Set RTGATE_AUTH__SECRET before exposing this gateway."
        )
    if node.config.server.dev_allow_user_param:
        log.warning(
            "DEV MODE: server.dev_allow_user_param is on; ?user= connects without a "
            "token. Never enable this in production."
        )
    await node.start()
    if app[HANDLE_SIGNALS]:
        loop = asyncio.get_running_loop()
        notifier = app[NOTIFIER]

        def drain() -> None:
            # systemd shows the unit "deactivating" from here, not at exit.
            notifier.stopping("draining")
            node.begin_drain()

        # Replaces aiohttp's own SIGTERM handler, which would stop at once.
        loop.add_signal_handler(signal.SIGTERM, drain)
        # Rotated keys are picked up by the file watch too; SIGHUP is immediate.
        loop.add_signal_handler(signal.SIGHUP, node.auth.reload_keys)

        def exit_after_drain() -> None:
            loop.call_soon(_graceful_exit)

        node.on_drained = exit_after_drain


def _graceful_exit() -> None:
    # How aiohttp's own signal handler ends run_app: cleanup hooks then run.
    raise GracefulExit()


async def _close_sockets(app: web.Application) -> None:
    # Whoever is still connected (no drain, or a second signal cut it short).
    node = app[NODE]
    for client in list(node.hub.connections.values()):
        node.tell_to_reconnect(client)


async def _stop(app: web.Application) -> None:
    await app[NODE].stop()


def _handshake_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token") or None


def _admit(request: web.Request, node: Node, address: str) -> web.Response | None:
    """Edge checks before the upgrade; a refusal is an HTTP status with a JSON body."""
    edge = node.config.edge
    if node.draining:
        node.metrics.connections_total.labels("draining").inc()
        return error_response(503, ErrorCode.UNAVAILABLE, "gateway is draining; reconnect")
    if not admission.origin_allowed(request.headers.get("Origin"), edge.allowed_origins):
        node.metrics.connections_total.labels("bad_origin").inc()
        return error_response(403, ErrorCode.FORBIDDEN, "origin not allowed")
    refused = node.addresses.admit(address, time.monotonic())
    if refused is not None:
        node.metrics.connections_total.labels("address_limited").inc()
        return error_response(429, ErrorCode.RATE_LIMITED, refused)
    return None


async def websocket(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    cfg = node.config
    # Every X-Forwarded-For line: a proxy may add its own line instead of appending.
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", [])) or None
    address = admission.client_address(request.remote or "?", forwarded, node.trusted_proxies)
    refusal = _admit(request, node, address)
    if refusal is not None:
        return refusal
    identity: Identity | None = None
    token = _handshake_token(request)
    try:
        if token is not None:
            identity = node.auth.verify(token)
        elif cfg.server.dev_allow_user_param and request.query.get("user"):
            identity = node.auth.dev_identity(request.query["user"])
    except AuthError as exc:
        node.metrics.connections_total.labels("unauthorized").inc()
        return error_response(401, ErrorCode.UNAUTHENTICATED, str(exc))
    if identity is not None and node.bans.denied(identity.user_id, time.time()) is not None:
        node.metrics.connections_total.labels("denied").inc()
        return error_response(
            403,
            ErrorCode.FORBIDDEN,
            "this user has been disconnected by the server and may not reconnect yet",
        )
    if identity is None and node.unauthenticated >= cfg.edge.max_unauthenticated:
        node.metrics.connections_total.labels("unauthenticated_limit").inc()
        return error_response(
            503,
            ErrorCode.LIMIT_EXCEEDED,
            "too many unauthenticated connections; authenticate in the handshake or retry later",
        )

    ws = web.WebSocketResponse(
        protocols=tuple(codec.SUBPROTOCOLS.values()),
        max_msg_size=cfg.limits.max_frame_bytes,
        heartbeat=cfg.server.heartbeat_seconds,
        compress=cfg.server.compression,
        timeout=cfg.server.close_timeout_seconds,
        decode_text=False,
    )
    if not ws.can_prepare(request).ok:
        return error_response(400, ErrorCode.BAD_REQUEST, "expected a WebSocket upgrade")
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the peer left during the handshake
        return ws
    fmt = codec.from_subprotocol(ws.ws_protocol)
    client = Client(node, ws, transport, fmt, address)
    node.hub.add(client)
    node.addresses.opened(address)
    node.metrics.connections.inc()
    node.metrics.connections_total.labels("accepted").inc()
    started = time.monotonic()
    try:
        await client.start(identity)
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                await client.receive(msg.data, False)
            elif msg.type is WSMsgType.TEXT:
                await client.receive(msg.data, True)
            elif msg.type is WSMsgType.ERROR:
                # aiohttp has already sent the close (1009 for an oversized frame).
                client.record_close(getattr(msg.data, "code", None) or ws.close_code)
    finally:
        client.finish()
        node.addresses.closed(address)
        node.metrics.connections.dec()
        closing = client.closing
        log.info(
            "disconnected",
            conn_id=client.conn_id,
            user_id=client.user_id or None,
            remote=address,
            duration=round(time.monotonic() - started, 3),
            code=closing.code if closing is not None else ws.close_code,
            reason=closing.reason if closing is not None else "closed by client",
        )
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body: dict[str, Any] = {"nats": node.nats_connected, "gatewayId": node.gateway_id}
    if node.draining:
        return web.json_response(dict(body, status="draining"), status=503)
    if node.nats_connected:
        return web.json_response(dict(body, status="ready"))
    return web.json_response(dict(body, status="unavailable"), status=503)


async def stats(request: web.Request) -> web.Response:
    """The tutorial's getHealth: a quick look without a metrics stack."""
    return web.json_response(request.app[NODE].stats())


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[NODE].metrics.registry
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
