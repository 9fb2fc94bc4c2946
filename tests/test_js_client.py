"""The browser client (gateway/static/client.js): its Node test suite against real
processes, and how the gateway serves it.

``test_node_suite`` starts a nats-server, a broker and four gateway processes and runs
``node --test`` in js/ with their URLs in the environment. Two gateways serve most tests;
one is there to be killed (failover) and one to be stopped with SIGSTOP (ack timeout),
each by the node test that owns it, through the PIDs passed along.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import SECRET, GatewayFactory
from tests.procs import Procs
from tests.test_processes import _wait_http

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "js"
STATIC = ROOT / "gateway" / "static"
NODE_TIMEOUT = 120


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript client's tests need Node.js 20 or later")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    if major < 20:
        pytest.skip(f"node {version} is too old: the tests need Node.js 20 or later")
    return node


def _install_dev_dependencies() -> None:
    """``npm ci`` once (it needs the npm registry); later runs reuse js/node_modules."""
    if (JS_DIR / "node_modules" / "ws").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot install the tests' dev dependency 'ws'")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"npm ci failed in js/:\n{result.stdout}\n{result.stderr}")


def test_node_suite(procs: Procs, tmp_path: Path) -> None:
    """Unit tests of the pure parts, the client against a scripted server, and the
    client against the gateways below (request/ack, typed errors, ack timeout,
    unsubscribe, offline queue, failover with resume, token refresh, msgpack)."""
    node = _node()
    _install_dev_dependencies()
    # Started together, then waited for: each takes about a second to come up.
    _, broker_port = procs.broker("b1", wait=False)
    gateways = {name: procs.gateway(name, wait=False) for name in ("gw1", "gw2", "victim", "stall")}
    for port in (broker_port, *(port for _, port in gateways.values())):
        _wait_http(f"http://127.0.0.1:{port}/readyz")

    def url(name: str) -> str:
        return f"ws://127.0.0.1:{gateways[name][1]}/ws"

    env = dict(
        os.environ,
        RTGATE_TEST_URLS=f"{url('gw1')},{url('gw2')}",
        RTGATE_TEST_GATEWAY_IDS="gw1,gw2",
        RTGATE_TEST_SECRET=SECRET,
        RTGATE_TEST_VICTIM_URL=url("victim"),
        RTGATE_TEST_VICTIM_PID=str(gateways["victim"][0].pid),
        RTGATE_TEST_VICTIM_ID="victim",
        RTGATE_TEST_STALL_URL=url("stall"),
        RTGATE_TEST_STALL_PID=str(gateways["stall"][0].pid),
    )
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", "--test-timeout=30000", "test/"],
        cwd=JS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
    )
    output = f"{result.stdout}\n{result.stderr}"
    if result.returncode != 0:
        pytest.fail(f"node --test failed (exit {result.returncode}):\n{output}", pytrace=False)
    # The gateway suites skip themselves without the environment above: not here.
    assert "# SKIP" not in result.stdout, output
    assert "# fail 0" in result.stdout, output


# -- how the gateway serves the module ------------------------------------------------

ALLOWED = ("https://app.example.com", "https://*.example.org")


async def _get(
    session: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    # aiohttp would ask for gzip and inflate it unseen: ask for it only where checked.
    headers.setdefault("Accept-Encoding", "identity")
    async with session.get(url, headers=headers, auto_decompress=False) as resp:
        return resp, await resp.read()


async def test_client_js_is_served_with_cors_for_allowed_origins(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(edge={"allowed_origins": ALLOWED})
    module = (STATIC / "client.js").read_bytes()
    async with aiohttp.ClientSession() as session:
        for origin in ("https://app.example.com", "https://chat.example.org"):
            resp, body = await _get(session, gw.http("/client.js"), Origin=origin)
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert resp.headers["Access-Control-Allow-Origin"] == origin
            assert resp.headers["Vary"] == "Origin, Accept-Encoding"
            assert resp.headers["ETag"].startswith('"')
            assert "max-age" in resp.headers["Cache-Control"]
            assert body == module

        # Another origin gets the bytes but no permission: the browser refuses the import.
        resp, _ = await _get(session, gw.http("/client.js"), Origin="https://evil.example.net")
        assert resp.status == 200
        assert "Access-Control-Allow-Origin" not in resp.headers
        assert resp.headers["Vary"] == "Origin, Accept-Encoding"
        # Same-origin pages and non-browser clients send no Origin.
        resp, _ = await _get(session, gw.http("/client.js"))
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers

        resp, body = await _get(session, gw.http("/client.d.ts"), Origin="https://app.example.com")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/typescript; charset=utf-8"
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert body == (STATIC / "client.d.ts").read_bytes()

        etag = resp.headers["ETag"]
        resp, body = await _get(session, gw.http("/client.d.ts"), **{"If-None-Match": etag})
        assert resp.status == 304 and body == b""
        assert resp.headers["ETag"] == etag

        # Compressed for clients that take gzip, under its own ETag.
        resp, body = await _get(
            session, gw.http("/client.js"), **{"Accept-Encoding": "gzip, deflate, br"}
        )
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(body) == module and len(body) < len(module) / 2
        assert resp.headers["ETag"] not in (etag, "")

        async with session.options(
            gw.http("/client.js"),
            headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"},
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            assert "GET" in resp.headers["Access-Control-Allow-Methods"]
        async with session.options(
            gw.http("/client.js"),
            headers={"Origin": "https://evil.example.net", "Access-Control-Request-Method": "GET"},
        ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_client_js_allows_every_origin_when_none_are_configured(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    async with aiohttp.ClientSession() as session:
        resp, _ = await _get(session, gw.http("/client.js"), Origin="https://anywhere.test")
        assert resp.headers["Access-Control-Allow-Origin"] == "https://anywhere.test"
        # The same patterns guard the WebSocket: an origin allowed here may also connect.
        async with session.ws_connect(gw.url, headers={"Origin": "https://anywhere.test"}):
            pass
