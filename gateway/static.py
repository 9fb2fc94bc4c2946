"""The browser client, served by the gateway: /client.js and /client.d.ts.

A page on another origin imports the module with ``import ... from
"https://gateway/client.js"``; module scripts are fetched in CORS mode, so the
response says which origins may use it: those of ``edge.allowed_origins``, the
same list that guards the WebSocket handshake (any origin when it is empty).
Plain handlers, no middleware: a middleware would run for every request,
WebSocket upgrades included, and cost memory per connection.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from gateway import admission
from gateway.config import GatewayConfig

STATIC_DIR = Path(__file__).parent / "static"

# Served files and their types; read once at start-up.
FILES = {
    "client.js": "text/javascript; charset=utf-8",
    "client.d.ts": "application/typescript; charset=utf-8",
}

# Clients may use a copy for a few minutes, then check it with If-None-Match
# (a new gateway version changes the ETag).
CACHE_CONTROL = "public, max-age=300"


@dataclasses.dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    # The same bytes gzipped once at start-up (the module is mostly comments and names).
    gzipped: bytes
    content_type: str
    etag: str

    @property
    def gzip_etag(self) -> str:
        # Another representation needs another validator.
        return f'{self.etag[:-1]}-gz"'


def load(name: str, content_type: str) -> Asset:
    body = (STATIC_DIR / name).read_bytes()
    digest = hashlib.sha256(body).hexdigest()[:32]
    return Asset(body, gzip.compress(body, mtime=0), content_type, f'"{digest}"')


def accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def cors_headers(origin: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
    """``Vary: Origin`` always, since the answer depends on it; the allow header only for
    an allowed origin. Without it the browser refuses the module to the page, which is
    the refusal: the bytes themselves are public."""
    headers = {"Vary": "Origin"}
    if origin is not None and admission.origin_allowed(origin, allowed):
        headers["Access-Control-Allow-Origin"] = origin
    return headers


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    candidates = [c.strip() for c in if_none_match.split(",")]
    return "*" in candidates or etag in candidates or f"W/{etag}" in candidates


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _handler(asset: Asset, allowed: tuple[str, ...]) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        headers = cors_headers(request.headers.get("Origin"), allowed)
        headers["Vary"] = "Origin, Accept-Encoding"
        compressed = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        etag = asset.gzip_etag if compressed else asset.etag
        headers["ETag"] = etag
        headers["Cache-Control"] = CACHE_CONTROL
        headers["X-Content-Type-Options"] = "nosniff"
        if etag_matches(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = asset.content_type
        if compressed:
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=asset.gzipped, headers=headers)
        return web.Response(body=asset.body, headers=headers)

    return serve


def _preflight(allowed: tuple[str, ...]) -> Handler:
    # A plain GET needs no preflight, but a page that adds a header to its fetch does.
    async def options(request: web.Request) -> web.Response:
        headers = cors_headers(request.headers.get("Origin"), allowed)
        if "Access-Control-Allow-Origin" in headers:
            headers["Access-Control-Allow-Methods"] = "GET, HEAD, OPTIONS"
            requested = request.headers.get("Access-Control-Request-Headers")
            if requested:
                headers["Access-Control-Allow-Headers"] = requested
            headers["Access-Control-Max-Age"] = "600"
        return web.Response(status=204, headers=headers)

    return options


def add_routes(app: web.Application, config: GatewayConfig) -> None:
    """Serve the client module and its type declarations, with CORS for allowed origins."""
    allowed = config.edge.allowed_origins
    for name, content_type in FILES.items():
        asset = load(name, content_type)
        app.router.add_get(f"/{name}", _handler(asset, allowed))
        app.router.add_route("OPTIONS", f"/{name}", _preflight(allowed))
