"""The demo chat page and dev tokens, for `rtgate dev` only (server.dev_demo).

GET /            the demo page (gateway/static/demo/index.html)
GET /demo/NAME   its assets (demo.css, demo.js)
GET /dev/token   ?user=NAME -> {"token": ...}, signed with the gateway's own secret

/dev/token hands a token to anyone who asks, for any user: it exists so that the
demo works without an identity provider, and must never be on in production.
The page itself imports the client from /client.js (gateway/static.py).
"""

from __future__ import annotations

from pathlib import Path

import structlog
from aiohttp import web

from gateway.api import error_response
from gateway.auth import mint
from gateway.config import GatewayConfig
from gateway.errors import ErrorCode
from gateway.protocol import MAX_USER_ID, is_valid_id

log = structlog.get_logger("rtgate.gateway")

DEMO_DIR = Path(__file__).parent / "static" / "demo"
# Long enough for a demo session; the page asks for a new one on 4401 anyway.
TOKEN_TTL_SECONDS = 3600.0
_TYPES = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# So that a page reload after editing a file picks the edit up.
_NO_CACHE = {"Cache-Control": "no-cache"}


def add_routes(app: web.Application, config: GatewayConfig) -> None:
    """Serve the demo at / and mint dev tokens at /dev/token."""
    auth = config.auth

    async def page(request: web.Request) -> web.StreamResponse:
        return _file(DEMO_DIR / "index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        # Only files directly in the demo directory, by an exact listing: no path
        # from the URL ever reaches the filesystem.
        files = {p.name: p for p in DEMO_DIR.iterdir() if p.is_file()}
        path = files.get(name)
        if path is None or path.suffix not in _TYPES:
            return error_response(404, ErrorCode.BAD_REQUEST, "no such demo file")
        return _file(path)

    async def dev_token(request: web.Request) -> web.StreamResponse:
        user = request.query.get("user", "")
        if not is_valid_id(user, MAX_USER_ID):
            return error_response(
                400,
                ErrorCode.BAD_REQUEST,
                f"user must be 1 to {MAX_USER_ID} printable characters without whitespace",
            )
        try:
            token = mint(auth, user, ttl_seconds=TOKEN_TTL_SECONDS)
        except ValueError as exc:  # no HS algorithm configured: nothing to sign with
            return error_response(503, ErrorCode.UNAVAILABLE, f"cannot mint dev tokens: {exc}")
        return web.json_response({"token": token}, headers=_NO_CACHE)

    app.router.add_get("/", page)
    app.router.add_get("/demo/{name}", asset)
    app.router.add_get("/dev/token", dev_token)

    async def warn(app: web.Application) -> None:
        log.warning(
            "DEV MODE: server.dev_demo is on; GET /dev/token mints a token for any "
            "user without checking anything. Never enable this in production."
        )

    app.on_startup.append(warn)


def _file(path: Path) -> web.Response:
    return web.Response(
        body=path.read_bytes(),
        content_type=_TYPES[path.suffix],
        charset="utf-8" if path.suffix != ".png" else None,
        headers=_NO_CACHE,
    )
