"""The CLI and the services as real processes: rtgate dev, gateway, broker, token."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import websockets

from rtgate.natsserver import NatsServer, env_without_rtgate, free_port

RTGATE = [sys.executable, "-m", "rtgate.cli"]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _wait_http(url: str, want: int = 200, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status, body = _get(url)
        if status == want:
            return body
        assert time.monotonic() < deadline, f"{url} gave {status}, wanted {want}"
        time.sleep(0.05)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_token_command_mints_a_verifiable_token() -> None:
    env = env_without_rtgate({"RTGATE_AUTH__SECRET": "s" * 32})
    out = subprocess.run(
        [
            *RTGATE,
            "token",
            "--user",
            "alice",
            "--name",
            "Alice",
            "--ttl",
            "2h",
            "--rooms",
            "lobby,team-*",
            "--publish",
            "",
            "--admin",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    claims = jwt.decode(out, "s" * 32, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["name"] == "Alice" and claims["admin"] is True
    assert claims["rooms"] == ["lobby", "team-*"] and claims["publish"] == []
    assert 7190 <= claims["exp"] - claims["iat"] <= 7200


def test_config_error_stops_start_up_naming_the_key() -> None:
    env = env_without_rtgate({"RTGATE_LIMITS__MAX_ROOMZ": "3"})
    result = subprocess.run(
        [*RTGATE, "gateway"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "limits.max_roomz" in result.stderr


def test_gateway_and_broker_processes_serve_and_stop_cleanly(
    tmp_path: Path, nats_server: NatsServer, procs: list[subprocess.Popen[str]]
) -> None:
    gw_port, br_port = free_port(), free_port()
    env = env_without_rtgate(
        {
            "RTGATE_NATS__URLS": nats_server.url,
            "RTGATE_SERVER__PORT": str(gw_port),
            "RTGATE_SERVER__ID": "proc-gw",
            "RTGATE_BROKER__PORT": str(br_port),
            "RTGATE_AUTH__SECRET": "p" * 32,
            "RTGATE_LOG__FORMAT": "json",
        }
    )
    gateway = subprocess.Popen([*RTGATE, "gateway"], env=env, stderr=subprocess.PIPE, text=True)
    broker = subprocess.Popen([*RTGATE, "broker"], env=env, stderr=subprocess.PIPE, text=True)
    procs.extend([gateway, broker])
    _wait_http(f"http://127.0.0.1:{gw_port}/readyz")
    _wait_http(f"http://127.0.0.1:{br_port}/readyz")
    metrics = _wait_http(f"http://127.0.0.1:{br_port}/metrics")
    assert "rtgate_broker_nats_connected 1.0" in metrics
    metrics = _wait_http(f"http://127.0.0.1:{gw_port}/metrics")
    assert "rtgate_nats_connected 1.0" in metrics

    import asyncio

    from gateway.auth import mint
    from gateway.config import AuthSettings

    tok = mint(AuthSettings(secret="p" * 32), "alice")

    async def session() -> tuple[list[dict[str, object]], int | None]:
        frames = []
        async with websockets.connect(f"ws://127.0.0.1:{gw_port}/ws?token={tok}") as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            gateway.send_signal(signal.SIGTERM)
            try:
                while True:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            except websockets.ConnectionClosed as exc:
                return frames, exc.rcvd.code if exc.rcvd else None

    frames, code = asyncio.run(session())
    assert code == 1012
    assert [f["type"] for f in frames] == ["reconnect"]
    after = frames[0]["data"]["afterMs"]  # type: ignore[index]
    assert isinstance(after, int) and 0 <= after <= 5000
    assert gateway.wait(15) == 0
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(15) == 0
    logs = broker.stderr.read() if broker.stderr else ""
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(entry["event"] == "broker stopped" for entry in lines)


def test_rtgate_dev_runs_the_whole_system(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    port, broker_port = free_port(), free_port()
    dev = subprocess.Popen(
        [
            *RTGATE,
            "dev",
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            str(port),
            "--broker-port",
            str(broker_port),
        ],
        env=env_without_rtgate({}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    procs.append(dev)
    assert dev.stdout is not None
    banner = ""
    deadline = time.monotonic() + 40
    while "Ctrl-C" not in banner:
        line = dev.stdout.readline()
        assert line or dev.poll() is None, f"rtgate dev exited: {banner}"
        banner += line
        assert time.monotonic() < deadline, banner
    token = re.search(r"dev token\s+(\S+)", banner)
    url = re.search(r"WebSocket\s+(\S+)", banner)
    assert token and url and f":{port}/ws" in url.group(1)
    assert f"http://127.0.0.1:{port}/metrics" in banner
    # The demo chat page and the browser client it imports.
    assert f"demo        http://127.0.0.1:{port}/ " in banner
    status, page = _get(f"http://127.0.0.1:{port}/")
    assert status == 200 and "/client.js" in page
    assert _get(f"http://127.0.0.1:{port}/client.js")[0] == 200

    import asyncio

    async def chat() -> dict[str, object]:
        async with websockets.connect(f"{url.group(1)}?token={token.group(1)}") as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "room:join", "id": 1, "data": "lobby"}))
            assert json.loads(await ws.recv())["ok"] is True
            await ws.send(
                json.dumps(
                    {
                        "type": "chat:message",
                        "id": 2,
                        "data": {"roomId": "lobby", "content": "hello"},
                    }
                )
            )
            frames = [json.loads(await ws.recv()) for _ in range(2)]
            return next(f for f in frames if f["type"] == "ack")

    ack = asyncio.run(chat())
    assert ack["ok"] is True
    # The banner's "more tokens" line runs as printed, and its token is accepted.
    hint = re.search(r"more tokens (RTGATE_AUTH__SECRET=\S+) (.+)", banner)
    assert hint, banner
    secret_env, command = hint.group(1), hint.group(2).split()
    assert command[0].endswith("rtgate") and command[1:] == [
        "token",
        "--user",
        "bob",
        "--name",
        "Bob",
    ]
    minted = subprocess.run(
        [*RTGATE, *command[1:]],
        env=env_without_rtgate({"RTGATE_AUTH__SECRET": secret_env.split("=", 1)[1]}),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert minted.stderr == ""  # no warning: not the built-in secret

    async def bob_welcome() -> dict[str, object]:
        async with websockets.connect(f"{url.group(1)}?token={minted.stdout.strip()}") as ws:
            return dict(json.loads(await ws.recv()))

    welcome = asyncio.run(bob_welcome())
    assert welcome["type"] == "welcome"
    # Ctrl-C stops every child.
    os.killpg(dev.pid, signal.SIGINT)
    assert dev.wait(30) == 0
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 0
    assert _get(f"http://127.0.0.1:{broker_port}/healthz")[0] == 0


def test_rtgate_dev_refuses_a_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        done = subprocess.run(
            [
                *RTGATE,
                "dev",
                "--state-dir",
                str(tmp_path / "state"),
                "--port",
                str(free_port()),
                "--broker-port",
                str(busy),
            ],
            env=env_without_rtgate({}),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2
    assert f"port {busy} is in use" in done.stderr and "--broker-port" in done.stderr
    assert "rtgate is running" not in done.stdout
    assert not (tmp_path / "state").exists()  # nothing was started


def test_token_command_warns_about_the_built_in_secret() -> None:
    done = subprocess.run(
        [*RTGATE, "token", "--user", "bob"],
        env=env_without_rtgate({}),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert done.stdout.count(".") == 2  # a token all the same
    assert "built-in development secret" in done.stderr
