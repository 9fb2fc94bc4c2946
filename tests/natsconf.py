"""nats-server processes run from the shipped config files (config/nats-*.conf).

The tests test the files operators install: each file is copied with only
its addresses, ports and store directory replaced (free ports, tmp_path), and
every replacement must hit exactly once, so a file whose shape drifted fails
here instead of silently testing something else.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rtgate.natsserver import env_without_rtgate, find_binary, free_port, wait_for_port

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
SINGLE = CONFIG_DIR / "nats-server.conf"
CLUSTER = CONFIG_DIR / "nats-cluster.conf"

GATEWAY_USER = "rtgate-gateway"
BROKER_USER = "rtgate-broker"
BACKEND_USER = "rtgate-backend"
PASSWORDS = {
    GATEWAY_USER: "gw-pass-0123456789",
    BROKER_USER: "broker-pass-0123456789",
    BACKEND_USER: "backend-pass-0123456789",
}
# The environment the config files read the passwords from.
PASSWORD_ENV = {
    "RTGATE_NATS_GATEWAY_PASSWORD": PASSWORDS[GATEWAY_USER],
    "RTGATE_NATS_BROKER_PASSWORD": PASSWORDS[BROKER_USER],
    "RTGATE_NATS_BACKEND_PASSWORD": PASSWORDS[BACKEND_USER],
}
ROUTE_PASSWORD = "route-pass-0123456789"

VIOLATION = re.compile(r"(Publish|Subscription) Violation.*")


def substitute(text: str, replacements: Iterable[tuple[str, str]]) -> str:
    """Apply each (regex, replacement) exactly once."""
    for pattern, repl in replacements:
        # A function, so the replacement is taken literally (paths, passwords).
        def literal(_match: re.Match[str], value: str = repl) -> str:
            return value

        text, n = re.subn(pattern, literal, text, flags=re.MULTILINE)
        assert n == 1, f"{pattern!r} matched {n} times in the shipped config"
    return text


def user_env(user: str) -> dict[str, Any]:
    """What an rtgate service needs to log in as ``user``."""
    return {"RTGATE_NATS__USER": user, "RTGATE_NATS__PASSWORD": PASSWORDS[user]}


class ConfiguredNats:
    """One nats-server started with ``-c`` on a generated copy of a shipped file."""

    def __init__(
        self, name: str, conf: Path, port: int, monitor_port: int, log: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.conf = conf
        self.port = port
        self.monitor_port = monitor_port
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(self.conf)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for_port("127.0.0.1", self.port, timeout, self.proc)

    def kill(self) -> None:
        """SIGKILL: a node that crashes, not one that shuts down politely."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def monitor(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2
        ) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body

    def violations(self) -> list[str]:
        """Permission violations the server logged (denied publishes and subscriptions)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [m.group(0) for m in VIOLATION.finditer(text)]


def single_node(tmp_path: Path, env: dict[str, str] | None = None) -> ConfiguredNats:
    """config/nats-server.conf on free ports with its store in tmp_path (not started)."""
    port, monitor = free_port(), free_port()
    text = substitute(
        SINGLE.read_text(),
        [
            (r"^listen: 127\.0\.0\.1:4222$", f"listen: 127.0.0.1:{port}"),
            (r"^http: 127\.0\.0\.1:8222$", f"http: 127.0.0.1:{monitor}"),
            (r'^  store_dir: "\./state/nats"$', f'  store_dir: "{tmp_path / "nats-store"}"'),
        ],
    )
    conf = tmp_path / "nats-server.conf"
    conf.write_text(text)
    return ConfiguredNats(
        "nats",
        conf,
        port,
        monitor,
        tmp_path / "nats.log",
        env_without_rtgate({**PASSWORD_ENV, **(env or {})}),
    )


def cluster(tmp_path: Path, size: int = 3) -> list[ConfiguredNats]:
    """config/nats-cluster.conf for ``size`` nodes on loopback (not started).

    One file serves every node in a deployment (the server name comes from the
    environment); here the nodes share one host, so each also gets its own
    ports and store directory.
    """
    ports = [(free_port(), free_port(), free_port()) for _ in range(size)]
    routes = ", ".join(
        f"nats-route://rtgate-route:{ROUTE_PASSWORD}@127.0.0.1:{p[1]}" for p in ports
    )
    nodes = []
    for i, (client, route, monitor) in enumerate(ports, start=1):
        text = substitute(
            CLUSTER.read_text(),
            [
                (r"^listen: 0\.0\.0\.0:4222$", f"listen: 127.0.0.1:{client}"),
                (r"^http: 127\.0\.0\.1:8222$", f"http: 127.0.0.1:{monitor}"),
                (
                    r'^  store_dir: "/var/lib/nats-server/jetstream"$',
                    f'  store_dir: "{tmp_path / f"nats-{i}-store"}"',
                ),
                (r"^  listen: 0\.0\.0\.0:6222$", f"  listen: 127.0.0.1:{route}"),
            ],
        )
        conf = tmp_path / f"nats-{i}.conf"
        conf.write_text(text)
        env = env_without_rtgate(
            {
                **PASSWORD_ENV,
                "RTGATE_NATS_SERVER_NAME": f"rtgate-nats-{i}",
                "RTGATE_NATS_ROUTE_PASSWORD": ROUTE_PASSWORD,
                "RTGATE_NATS_ROUTES": f"[{routes}]",
            }
        )
        nodes.append(
            ConfiguredNats(f"nats-{i}", conf, client, monitor, tmp_path / f"nats-{i}.log", env)
        )
    return nodes


def wait_for_meta_leader(nodes: list[ConfiguredNats], timeout: float = 20.0) -> str:
    """Block until every node reports the same JetStream meta leader (polled: the
    servers announce it only in their monitoring endpoint)."""
    deadline = time.monotonic() + timeout
    while True:
        leaders = set()
        for node in nodes:
            try:
                meta = node.monitor("/jsz").get("meta_cluster") or {}
            except (OSError, urllib.error.URLError, ValueError):
                meta = {}
            leaders.add(meta.get("leader") or "")
        if len(leaders) == 1 and "" not in leaders:
            return leaders.pop()
        assert time.monotonic() < deadline, f"no common meta leader: {leaders}"
        time.sleep(0.1)
