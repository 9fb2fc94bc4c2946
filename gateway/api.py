"""The server API for backends: publish, disconnect, kick, room history.

HTTP on the gateway, authorized by one API key (``Authorization: Bearer``,
compared in constant time). Publishing goes down exactly the path a
client's frame takes; disconnects and kicks travel to every gateway over the
NATS control subjects.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from broker import subjects
from gateway import bans, durable, protocol
from gateway.errors import ErrorCode, ProtocolError
from gateway.node import Node

_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.LIMIT_EXCEEDED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}
API_ORIGIN = "api"
_CATCH_ALL = "/api/{tail:.*}"
log = structlog.get_logger("rtgate.api")
MAX_BAN_SECONDS = 366 * 86400

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: ErrorCode, message: str) -> web.Response:
    return web.json_response({"error": {"code": code.value, "message": message}}, status=status)


def add_routes(app: web.Application, node_key: web.AppKey[Node]) -> None:
    """Mount the API under /api/.

    Errors become JSON inside each handler's own wrapper and a catch-all
    route, not in a middleware: any middleware (on the app or on a
    sub-application) makes aiohttp run every WebSocket handler inside a
    wrapper frame that lives as long as the connection (~0.4 KiB each).
    """

    def guarded(handler: Callable[[web.Request, Node], Awaitable[web.StreamResponse]]) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            node = request.config_dict[node_key]
            key = node.config.server.api_key
            if not key:
                return error_response(
                    403, ErrorCode.FORBIDDEN, "the server API is disabled: set server.api_key"
                )
            header = request.headers.get("Authorization", "")
            given = header[7:].strip() if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return error_response(401, ErrorCode.UNAUTHENTICATED, "bad or missing API key")
            try:
                return await handler(request, node)
            except ProtocolError as exc:
                return error_response(_STATUS[exc.code], exc.code, exc.message)
            except web.HTTPException as exc:  # e.g. a body over the size limit
                if exc.status < 400:
                    raise
                code = ErrorCode.BAD_REQUEST if exc.status < 500 else ErrorCode.INTERNAL
                return error_response(exc.status, code, exc.reason)
            except Exception:
                log.exception("server API request failed", path=request.path)
                return error_response(500, ErrorCode.INTERNAL, "internal error")

        return wrapped

    routes = (
        ("POST", "/api/publish", publish),
        ("POST", "/api/users/{userId}/disconnect", disconnect_user),
        ("POST", "/api/rooms/{roomId}/kick", kick),
        ("GET", "/api/rooms/{roomId}/messages", room_messages),
        ("GET", "/api/rooms/{roomId}/presence", room_presence),
        ("GET", "/api/users/{userId}/presence", user_presence),
    )
    for method, path, handler in routes:
        app.router.add_route(method, path, guarded(handler))
    app.router.add_route("*", _CATCH_ALL, _no_such_endpoint)


async def _no_such_endpoint(request: web.Request) -> web.StreamResponse:
    """Backends parse every /api answer as JSON, unknown paths and methods included."""
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        _match, allowed = await resource.resolve(request)
        if allowed:  # the path exists, with other methods
            return error_response(405, ErrorCode.BAD_REQUEST, "method not allowed")
    return error_response(404, ErrorCode.BAD_REQUEST, "no such endpoint")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "the body must be a JSON object")
    return body


def _identity(body: dict[str, Any]) -> tuple[str, str]:
    user_id = body.get("userId", "server")
    username = body.get("username", user_id)
    if not protocol.is_valid_id(user_id, protocol.MAX_USER_ID) or not isinstance(username, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "userId/username must be valid ids")
    return user_id, username


def _path_id(request: web.Request, name: str, max_len: int) -> str:
    value = request.match_info[name]
    if not protocol.is_valid_id(value, max_len):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} is not a valid id")
    return value


async def publish(request: web.Request, node: Node) -> web.StreamResponse:
    """``{roomId, content}``, ``{roomId, event, data}``, ``{toUserId, content}`` or
    ``{global: true, content}``; ``userId``/``username``/``clientId`` optional."""
    body = await _body(request)
    user_id, username = _identity(body)
    client_id = protocol.client_id(body)
    max_content = node.config.limits.max_content_bytes
    if body.get("global") is True:
        target = durable.broadcast()
        data = durable.global_body(user_id, username, protocol.content(body, max_content))
    elif "toUserId" in body:
        msg = protocol.direct_message(body, max_content)
        target = durable.direct(msg.to_user_id)
        data = durable.direct_body(user_id, username, msg.to_user_id, msg.content)
    elif "event" in body:
        event = protocol.room_event({"durable": True, **body})
        target = durable.room_event(event.room_id)
        data = durable.event_body(event.room_id, event.event, event.data, user_id, username)
        if not event.durable:
            payload = durable.payload(
                {"type": "room:event", "data": data}, node.config.limits.max_frame_bytes
            )
            await node.publish_ephemeral(
                subjects.live_room_subject(event.room_id), payload, API_ORIGIN
            )
            return web.json_response({})
    else:
        chat = protocol.chat_message(body, max_content)
        target = durable.chat(chat.room_id)
        data = durable.chat_body(chat.room_id, user_id, username, chat.content)
    result = await durable.store(
        node, target, data, user_id=user_id, client_id=client_id, origin=API_ORIGIN
    )
    return web.json_response(result)


def _ban_seconds(body: dict[str, Any], default: float) -> float:
    value = body.get("banSeconds", default)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= MAX_BAN_SECONDS
    ):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"banSeconds must be a number from 0 to {MAX_BAN_SECONDS}"
        )
    return float(value)


async def disconnect_user(request: web.Request, node: Node) -> web.StreamResponse:
    """Close every connection of a user on every gateway: 1012 to come back, or 4403 and deny."""
    user_id = _path_id(request, "userId", protocol.MAX_USER_ID)
    body = await _body(request)
    # Required: a missing flag must not silently deny someone for a day.
    reconnect = body.get("reconnect")
    reason = body.get("reason", "disconnected by the server")
    if not isinstance(reconnect, bool) or not isinstance(reason, str):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "reconnect (a boolean) is required; reason must be a string"
        )
    denied_for = 0.0
    if not reconnect:
        # Until the longest token lifetime by default: the same token cannot come back.
        denied_for = _ban_seconds(body, node.config.auth.deny_seconds)
        if denied_for > 0:
            await node.put_ban(bans.user_key(user_id), denied_for, reason)
    command: dict[str, Any] = {
        "type": "disconnect",
        "reconnect": reconnect,
        "reason": reason[:100],
        "code": 1012 if reconnect else 4403,
    }
    if denied_for > 0:
        # Also in the command: the bucket watch may reach other gateways later
        # than this message, and the user must not slip back in between.
        command["deniedUntil"] = time.time() + denied_for
    await node.control(subjects.control_user_subject(user_id), command)
    return web.json_response(
        {"userId": user_id, "reconnect": reconnect, "deniedSeconds": denied_for}
    )


async def kick(request: web.Request, node: Node) -> web.StreamResponse:
    """Remove a user's connections from a room (room:removed), optionally banning a rejoin."""
    room_id = _path_id(request, "roomId", protocol.MAX_ROOM_ID)
    body = await _body(request)
    user_id = body.get("userId")
    if not protocol.is_valid_id(user_id, protocol.MAX_USER_ID):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "userId must be a valid user id")
    assert isinstance(user_id, str)
    ban = _ban_seconds(body, 0.0)
    reason = str(body.get("reason", "removed from the room"))[:100]
    if ban > 0:
        await node.put_ban(bans.room_key(room_id, user_id), ban, reason)
    command: dict[str, Any] = {"type": "kick", "roomId": room_id, "reason": reason}
    if ban > 0:
        command["banUntil"] = time.time() + ban  # see disconnect_user
    await node.control(subjects.control_user_subject(user_id), command)
    return web.json_response({"roomId": room_id, "userId": user_id, "banSeconds": ban})


def _page_query(request: web.Request, room_id: str) -> dict[str, Any]:
    """``roomId`` with ``cursor`` and ``limit`` from the query string."""
    query: dict[str, Any] = {"roomId": room_id}
    if "cursor" in request.query:
        query["cursor"] = request.query["cursor"]
    if "limit" in request.query:
        try:
            query["limit"] = int(request.query["limit"])
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "limit must be an integer") from exc
    return query


async def room_messages(request: web.Request, node: Node) -> web.StreamResponse:
    room_id = _path_id(request, "roomId", protocol.MAX_ROOM_ID)
    room, cursor, limit = protocol.history_page(_page_query(request, room_id))
    assert room is not None
    page = await node.history({"kind": "room", "id": room}, cursor, limit)
    return web.Response(text=json.dumps(page, ensure_ascii=False), content_type="application/json")


async def room_presence(request: web.Request, node: Node) -> web.StreamResponse:
    """Members of a room across every gateway, paged like the client's ``presence``."""
    room_id = _path_id(request, "roomId", protocol.MAX_ROOM_ID)
    room, cursor, limit = protocol.presence_page(_page_query(request, room_id))
    return web.json_response(await node.presence.room_page(room, cursor, limit))


async def user_presence(request: web.Request, node: Node) -> web.StreamResponse:
    """``{userId, online, username, socketCount, rooms}`` for one user."""
    user_id = _path_id(request, "userId", protocol.MAX_USER_ID)
    return web.json_response(await node.presence.ask({"op": "user", "userId": user_id}))
