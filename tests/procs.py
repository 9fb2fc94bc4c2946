"""Real rtgate processes for tests that kill, pause or restart them.

Configured through the environment, as deployed ones are; each process's
output goes to ``<tmp_path>/<name>.log``, kept with the test's other output.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from rtgate.natsserver import env_without_rtgate, free_port
from tests.conftest import FAST_PRESENCE, SECRET
from tests.test_processes import RTGATE, _wait_http


class Procs:
    def __init__(self, nats_url: str, tmp_path: Path) -> None:
        self.nats_url = nats_url
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "RTGATE_NATS__URLS": self.nats_url,
            "RTGATE_AUTH__SECRET": SECRET,
            "RTGATE_LOG__FORMAT": "json",
            "RTGATE_NATS__RECONNECT_TIME_WAIT": "0.2",
        }
        env.update({f"RTGATE_PRESENCE__{k.upper()}": str(v) for k, v in FAST_PRESENCE.items()})
        env.update(extra)
        return env_without_rtgate(env)

    def spawn(self, name: str, command: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """``rtgate <command> <args>``, its output in ``<name>.log``."""
        with (self.tmp_path / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [*RTGATE, command, *args],
                env=self.env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.started.append(proc)
        return proc

    def broker(
        self, broker_id: str, persist: bool = True, wait: bool = True, **env: str
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        proc = self.spawn(
            broker_id,
            "broker",
            RTGATE_BROKER__ID=broker_id,
            RTGATE_BROKER__PORT=str(port),
            RTGATE_BROKER__STATE_DIR=str(self.tmp_path / broker_id),
            RTGATE_BROKER__PERSIST=str(persist).lower(),
            **env,
        )
        if wait:
            _wait_http(f"http://127.0.0.1:{port}/readyz")
        return proc, port

    def gateway(
        self, gateway_id: str, port: int | None = None, wait: bool = True, **env: str
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = port or free_port()
        # Every test client comes from 127.0.0.1: no per-address handshake limit.
        proc = self.spawn(
            gateway_id,
            "gateway",
            RTGATE_SERVER__ID=gateway_id,
            RTGATE_SERVER__PORT=str(port),
            RTGATE_EDGE__HANDSHAKES_PER_SECOND_PER_ADDRESS="0",
            **env,
        )
        if wait:
            _wait_http(f"http://127.0.0.1:{port}/readyz")
        return proc, port

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # one may still be stopped
                proc.kill()
                proc.wait()
