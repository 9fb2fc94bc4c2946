"""A real nginx (the Debian package) in front of two gateway processes, with the
shipped config/nginx.conf (only its upstream servers and listen address
changed): clients chat across gateways through it, one gateway is killed, and
its client comes back through nginx to the other one and resumes without
losing or repeating a message."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rtgate.client import Backoff, Client
from rtgate.natsserver import free_port, wait_for_port
from tests.conftest import token
from tests.natsconf import substitute
from tests.procs import Procs
from tests.test_client import Events

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "nginx.conf"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
FAST = Backoff(base=0.05, cap=0.3)

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install -y nginx)"
)


def nginx_config(tmp_path: Path, port: int, gateways: list[int]) -> Path:
    """config/nginx.conf with our gateways and port, inside a minimal main config
    whose logs and temporary files are all in tmp_path."""
    shipped = SHIPPED.read_text()
    # Our gateways in place of the example ones, with the shipped options.
    options = set(re.findall(r"^    server 10\.0\.0\.\d+:8080(.*);$", shipped, re.MULTILINE))
    assert len(options) == 1, options
    servers = "".join(f"    server 127.0.0.1:{gw}{next(iter(options))};\n" for gw in gateways)
    site = substitute(
        shipped,
        [
            (r"^(    server 10\.0\.0\.\d+:8080.*;\n)+", servers),
            (r"^    listen 80;$", f"    listen 127.0.0.1:{port};"),
        ],
    )
    (tmp_path / "rtgate.conf").write_text(site)
    main = f"""
worker_processes 1;
error_log {tmp_path}/nginx-error.log info;
{"user root;" if os.geteuid() == 0 else ""}
events {{ worker_connections 1024; }}
http {{
    access_log {tmp_path}/nginx-access.log;
    client_body_temp_path {tmp_path}/nginx-body;
    proxy_temp_path {tmp_path}/nginx-proxy;
    fastcgi_temp_path {tmp_path}/nginx-fastcgi;
    uwsgi_temp_path {tmp_path}/nginx-uwsgi;
    scgi_temp_path {tmp_path}/nginx-scgi;
    include {tmp_path}/rtgate.conf;
}}
"""
    conf = tmp_path / "nginx.conf"
    conf.write_text(main)
    return conf


def start_nginx(conf: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    """Check the config with ``nginx -t``, then run nginx in the foreground, as a plain
    process of the test (no daemon, no system paths: -e and pid go to tmp_path)."""
    assert NGINX is not None
    check = subprocess.run(
        [
            NGINX,
            "-t",
            "-c",
            str(conf),
            "-e",
            str(tmp_path / "nginx-t.log"),
            "-g",
            f"pid {tmp_path}/nginx-t.pid;",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    with (tmp_path / "nginx.out").open("ab") as out:
        return subprocess.Popen(
            [
                NGINX,
                "-c",
                str(conf),
                "-e",
                str(tmp_path / "nginx-error.log"),
                "-g",
                f"daemon off; pid {tmp_path}/nginx.pid;",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_clients_through_nginx_survive_a_gateway_kill(
    procs: Procs, tmp_path: Path, clients: list[Client]
) -> None:
    # nginx's loopback address is a trusted proxy: its X-Forwarded-For is believed.
    # A short drain, so the deploy below takes a second.
    edge: dict[str, Any] = {
        "RTGATE_EDGE__TRUSTED_PROXIES": "127.0.0.1",
        "RTGATE_EDGE__DRAIN_SECONDS": "1",
        "RTGATE_EDGE__RECONNECT_JITTER_MS": "200",
    }
    gateways = {gw: procs.gateway(gw, **edge) for gw in ("gw1", "gw2")}
    port = free_port()
    conf = nginx_config(tmp_path, port, [p for _, p in gateways.values()])
    nginx = start_nginx(conf, tmp_path)
    try:
        wait_for_port("127.0.0.1", port, 10, nginx)
        url = f"ws://127.0.0.1:{port}/ws"
        # Only the WebSocket and the client module are public.
        assert _get(f"http://127.0.0.1:{port}/client.js") == 200
        assert _get(f"http://127.0.0.1:{port}/metrics") == 404
        assert _get(f"http://127.0.0.1:{port}/api/publish") == 403

        alice = Client(
            url, token=token("alice"), backoff=FAST, headers={"X-Forwarded-For": "203.0.113.7"}
        )
        bob = Client(url, token=token("bob"), backoff=FAST)
        clients.extend((alice, bob))
        events, b_events = Events(alice), Events(bob)
        a_gw = (await alice.connect())["gatewayId"]
        b_gw = (await bob.connect())["gatewayId"]
        # least_conn: the second socket goes to the gateway without one.
        assert {a_gw, b_gw} == {"gw1", "gw2"}
        for c in (alice, bob):
            await c.join("lobby")
        # The gateway saw the client's address through nginx, not nginx's.
        log = (tmp_path / f"{a_gw}.log").read_text()
        assert re.search(r'"remote": "203\.0\.113\.7".*"event": "connected"', log), log

        # Chat across the two gateways.
        for i in range(3):
            await bob.send_message("lobby", f"b{i}")
        await events.count("chat:message", 3)
        await alice.send_message("lobby", "a-first")
        await b_events.next("chat:message", where=lambda d: d["content"] == "a-first")

        # Alice's gateway dies under her sends.
        sends = [asyncio.ensure_future(alice.send_message("lobby", f"a{i}")) for i in range(10)]
        await b_events.next("chat:message", where=lambda d: d["content"] == "a2")
        gateways[a_gw][0].send_signal(signal.SIGKILL)
        lost = await events.next("disconnect")
        assert lost["code"] == 1006 and lost["willReconnect"] is True
        # While she is away, bob goes on writing.
        for i in range(3, 13):
            await bob.send_message("lobby", f"b{i}")
        # Same URL, so nginx: it skips the dead gateway and hands her to bob's.
        welcome = await events.next("connect", where=lambda d: d["gatewayId"] == b_gw)
        assert welcome["gatewayId"] == b_gw
        recovered = await events.next("recovered", where=lambda d: d["roomId"] == "lobby")
        assert recovered["recovered"] is True and recovered["missed"] >= 10
        stored = await asyncio.gather(*sends)
        assert [m["content"] for m in stored] == [f"a{i}" for i in range(10)]
        last = await bob.send_message("lobby", "b13")
        await events.next("chat:message", where=lambda d: d["id"] == last["id"])
        mine = await alice.send_message("lobby", "a-last")
        await b_events.next("chat:message", where=lambda d: d["id"] == mine["id"])

        # Nothing lost, nothing twice, in order, on both sides.
        got = [d for k, d in events.seen if k in ("chat:message", "chat:message:sent")]
        assert [d["content"] for d in got if d["userId"] == "bob"] == [f"b{i}" for i in range(14)]
        assert [d["content"] for d in got if d["userId"] == "alice"] == [
            "a-first",
            *[f"a{i}" for i in range(10)],
            "a-last",
        ]
        assert len({d["id"] for d in got}) == len(got)
        offsets = [d["offset"] for d in got]
        assert offsets == sorted(offsets)
        b_got = [d["content"] for k, d in b_events.seen if k == "chat:message"]
        assert b_got == ["a-first", *[f"a{i}" for i in range(10)], "a-last"]

        # A deploy: the dead gateway comes back on its port, then the other one
        # is stopped (SIGTERM: it drains, answering handshakes 503, which nginx
        # retries elsewhere). Both clients move through nginx to the new one.
        procs.gateway(a_gw, port=gateways[a_gw][1], **edge)
        gateways[b_gw][0].send_signal(signal.SIGTERM)
        await b_events.next("reconnect")
        moved = [
            (await events.count("connect", 3, timeout=15))[-1],
            (await b_events.count("connect", 2, timeout=15))[-1],
        ]
        assert [m["gatewayId"] for m in moved] == [a_gw, a_gw]
        assert gateways[b_gw][0].wait(15) == 0
        after = await bob.send_message("lobby", "after-deploy")
        await events.next("chat:message", where=lambda d: d["id"] == after["id"])
        got = [d for k, d in events.seen if k in ("chat:message", "chat:message:sent")]
        assert len({d["id"] for d in got}) == len(got)
        assert [d["content"] for d in got if d["userId"] == "bob"] == [
            *[f"b{i}" for i in range(14)],
            "after-deploy",
        ]
    finally:
        nginx.terminate()
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
