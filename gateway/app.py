"""The aiohttp application: routes, the WebSocket endpoint, and lifecycle hooks."""

from __future__ import annotations

import random
import time
from typing import Any

import structlog
from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway import codec, disconnect
from gateway.auth import AuthError, Identity
from gateway.client import Client
from gateway.config import DEV_SECRET, GatewayConfig
from gateway.errors import ErrorCode
from gateway.node import Node

log = structlog.get_logger("rtgate.gateway")

NODE = web.AppKey("node", Node)

# Upper bound of the reconnect delay advertised to clients on shutdown.
RECONNECT_SPREAD_MS = 5000


def create_app(config: GatewayConfig, registry: CollectorRegistry | None = None) -> web.Application:
    app = web.Application()
    app[NODE] = Node(config, registry)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_start)
    app.on_shutdown.append(_close_sockets)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    node = app[NODE]
    if node.config.auth.secret == DEV_SECRET:
        log.warning("auth.secret is the built-in development secret: anyone can mint tokens. "
                    "Set RTGATE_AUTH__SECRET before exposing this gateway.")
    if node.config.server.dev_allow_user_param:
        log.warning("DEV MODE: server.dev_allow_user_param is on; ?user= connects without a "
                    "token. Never enable this in production.")
    await node.start()


async def _close_sockets(app: web.Application) -> None:
    # 1012 tells clients to come back after the advertised delay; spreading
    # the delays keeps them from reconnecting all at once.
    for client in list(app[NODE].hub.connections.values()):
        after_ms = random.randint(0, RECONNECT_SPREAD_MS)
        client.send({"type": "reconnect", "data": {"afterMs": after_ms}})
        client.close(disconnect.RESTART)


async def _stop(app: web.Application) -> None:
    await app[NODE].stop()


def error_response(status: int, code: ErrorCode, message: str) -> web.Response:
    return web.json_response({"error": {"code": code.value, "message": message}}, status=status)


def _handshake_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token") or None


async def websocket(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    cfg = node.config
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
    client = Client(node, ws, transport, fmt, request.remote or "?")
    node.hub.add(client)
    node.metrics.connections.inc()
    node.metrics.connections_total.labels("accepted").inc()
    started = time.monotonic()
    await client.start(identity)
    try:
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
        node.metrics.connections.dec()
        code = client.closing.code if client.closing is not None else ws.close_code
        log.info("disconnected", conn_id=client.conn_id, user_id=client.user_id or None,
                 remote=client.remote, duration=round(time.monotonic() - started, 3),
                 code=code)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body: dict[str, Any] = {"nats": node.nats_connected, "gatewayId": node.gateway_id}
    if node.nats_connected:
        return web.json_response(dict(body, status="ready"))
    return web.json_response(dict(body, status="unavailable"), status=503)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[NODE].metrics.registry
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
