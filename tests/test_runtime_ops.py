"""Running for real: systemd notify, several gateways on one port, native TLS, NATS auth.

Every test runs real `rtgate` processes (and real nats-server processes where
NATS is configured with credentials or TLS); nothing about the bus is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

from broker.settings import ConfigError
from gateway import config as gconfig
from rtgate import cli, sdnotify
from rtgate.natsserver import find_binary, free_port, wait_for_port
from tests import certs
from tests.conftest import token
from tests.procs import Procs
from tests.test_processes import _get, _wait_http

# --- systemd notify -------------------------------------------------------------------------


class NotifySocket:
    """The datagram socket systemd would own; ``NOTIFY_SOCKET`` names it for the child."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            # Abstract (Linux): "@name" in NOTIFY_SOCKET, a leading NUL when bound.
            name = f"rtgate-test-{secrets.token_hex(6)}"
            self.sock.bind(b"\0" + name.encode())
            self.env = "@" + name
        else:
            self.sock.bind(str(path))
            self.env = str(path)

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        """The next datagram as its KEY=VALUE fields."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def until(self, key: str, timeout: float = 20.0) -> tuple[dict[str, str], list[dict[str, str]]]:
        """Read datagrams until one has ``key``; that one, and all read before it."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, str]] = []
        while True:
            fields = self.next(max(0.01, deadline - time.monotonic()))
            if key in fields:
                return fields, seen
            seen.append(fields)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def test_sdnotify_environment() -> None:
    """What the notifier makes of systemd's variables (no socket needed)."""
    assert sdnotify.socket_address("@abc") == b"\0abc"
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.watchdog_interval({}, 10) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000"}, 10) == 2.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "10"}, 10) == 2.0
    # Meant for another process (systemd's main pid is a wrapper): no pings from us.
    assert (
        sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "11"}, 10) is None
    )
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "bad"}, 10) is None
    off = sdnotify.Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not off.enabled and off.watchdog_seconds is None and not off.notify("READY=1")


def test_sdnotify_sends_once_to_a_path_socket(tmp_path: Path) -> None:
    sock = NotifySocket(tmp_path / "notify")
    try:
        notifier = sdnotify.Notifier.from_env({"NOTIFY_SOCKET": sock.env})
        notifier.ready("up")
        notifier.ready("again")  # READY is sent once
        notifier.stopping()
        first, second = sock.next(2), sock.next(2)
        assert first["READY"] == "1" and first["STATUS"] == "up"
        assert first["MAINPID"] == str(os.getpid())
        assert second == {"STOPPING": "1"}
    finally:
        sock.close()


@pytest.mark.parametrize("service", ["gateway", "broker"])
def test_notify_ready_watchdog_stopping(
    procs: Procs, notify_socket: NotifySocket, service: str
) -> None:
    """READY=1 once it listens with NATS up; WATCHDOG=1 pings; STOPPING=1 on SIGTERM."""
    port = free_port()
    env = {"NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "200000"}
    if service == "gateway":
        proc = procs.spawn(
            "gw",
            "gateway",
            RTGATE_SERVER__PORT=str(port),
            RTGATE_SERVER__ID="gw-notify",
            RTGATE_EDGE__DRAIN_SECONDS="0.5",
            **env,
        )
    else:
        proc = procs.spawn(
            "broker",
            "broker",
            RTGATE_BROKER__PORT=str(port),
            RTGATE_BROKER__ID="broker-notify",
            RTGATE_BROKER__STATE_DIR=str(procs.tmp_path / "state"),
            **env,
        )
    ready, before = notify_socket.until("READY", timeout=30)
    assert before == []  # nothing, not even a watchdog ping, before READY
    assert ready["MAINPID"] == str(proc.pid)
    # Ready means listening and connected: /readyz answers 200 at once.
    assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    pings = [notify_socket.next(5) for _ in range(3)]
    assert pings == [{"WATCHDOG": "1"}] * 3
    proc.send_signal(signal.SIGTERM)
    stopping, _ = notify_socket.until("STOPPING", timeout=10)
    assert stopping["STOPPING"] == "1"
    assert proc.wait(20) == 0


# --- many gateways on one port ---------------------------------------------------------------


async def test_two_instances_share_a_port(procs: Procs) -> None:
    """--instance 0 and 1 with reuse_port on one port; each its own id and metrics port."""
    port, metrics_base = free_port(), free_port()
    while metrics_base + 1 == port:
        metrics_base = free_port()
    env = {
        "RTGATE_SERVER__ID": "host-a",
        "RTGATE_SERVER__PORT": str(port),
        "RTGATE_SERVER__REUSE_PORT": "true",
        "RTGATE_SERVER__METRICS_PORT": str(metrics_base),
        "RTGATE_EDGE__HANDSHAKES_PER_SECOND_PER_ADDRESS": "0",
    }
    for n in (0, 1):
        procs.spawn(f"gw{n}", "gateway", "--instance", str(n), **env)
    for n in (0, 1):
        stats = json.loads(_wait_http(f"http://127.0.0.1:{metrics_base + n}/stats"))
        assert stats["gatewayId"] == f"host-a-{n}"
    # Only the observability endpoints on the metrics port.
    assert _get(f"http://127.0.0.1:{metrics_base}/ws")[0] == 404
    status, body = _get(f"http://127.0.0.1:{metrics_base + 1}/metrics")
    assert status == 200 and "rtgate_" in body

    # The kernel spreads connections to the shared port over both processes.
    async with aiohttp.ClientSession() as session:
        sockets = []
        try:
            for i in range(24):
                ws = await session.ws_connect(f"ws://127.0.0.1:{port}/ws?token={token(f'user{i}')}")
                welcome = json.loads((await ws.receive(timeout=10)).data)
                assert welcome["type"] == "welcome"
                sockets.append(ws)
            per_instance = [
                json.loads(_get(f"http://127.0.0.1:{metrics_base + n}/stats")[1])["connections"]
                for n in (0, 1)
            ]
            assert sum(per_instance) == 24
            assert min(per_instance) > 0, per_instance
        finally:
            for ws in sockets:
                await ws.close()


def test_instance_config() -> None:
    cfg = gconfig.GatewayConfig(server=gconfig.ServerSettings(id="web1", metrics_port=9100))
    three = cfg.for_instance(3)
    assert three.gateway_id == "web1-3" and three.server.metrics_port == 9103
    # Without a metrics port nothing extra listens, whatever the instance.
    assert gconfig.GatewayConfig().for_instance(2).server.metrics_port == 0
    assert gconfig.GatewayConfig().for_instance(2).gateway_id == f"{socket.gethostname()}-2"
    with pytest.raises(ConfigError):
        cfg.for_instance(-1)
    with pytest.raises(SystemExit):
        cli.main(["gateway", "--instance", "x"])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RTGATE_SERVER__TLS_CERT_FILE": "a.pem"}, "server.tls_cert_file and server.tls_key_file"),
        ({"RTGATE_NATS__USER": "u"}, "nats.user and nats.password"),
        ({"RTGATE_NATS__TLS_KEY_FILE": "k.pem"}, "nats.tls_cert_file and nats.tls_key_file"),
        ({"RTGATE_NATS__TOKEN": "t", "RTGATE_NATS__CREDS_FILE": "x.creds"}, "only one of"),
        ({"RTGATE_SERVER__METRICS_PORT": "8080"}, "must differ from server.port"),
    ],
)
def test_half_set_settings_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        gconfig.load(None, env)


# --- native TLS ------------------------------------------------------------------------------


async def test_gateway_native_tls(procs: Procs, notify_socket: NotifySocket) -> None:
    """wss:// and https:// with a self-signed certificate made here."""
    key = certs.key()
    cert_file, key_file = certs.write(procs.tmp_path, "gateway", certs.cert("localhost", key), key)
    port = free_port()
    procs.spawn(
        "gw-tls",
        "gateway",
        RTGATE_SERVER__PORT=str(port),
        RTGATE_SERVER__ID="gw-tls",
        RTGATE_SERVER__TLS_CERT_FILE=cert_file,
        RTGATE_SERVER__TLS_KEY_FILE=key_file,
        NOTIFY_SOCKET=notify_socket.env,
    )
    notify_socket.until("READY", timeout=30)  # listening, NATS connected
    trust = ssl.create_default_context(cafile=cert_file)
    async with aiohttp.ClientSession() as session:
        # Plain HTTP on a TLS port is refused: TLS is not optional once configured.
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                await resp.read()
        async with session.get(f"https://127.0.0.1:{port}/readyz", ssl=trust) as resp:
            assert resp.status == 200
        ws = await session.ws_connect(
            f"wss://127.0.0.1:{port}/ws?token={token('alice')}", ssl=trust
        )
        welcome = json.loads((await ws.receive(timeout=10)).data)
        assert welcome["type"] == "welcome"
        await ws.close()
        # A client that does not trust the certificate cannot connect.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.ws_connect(f"wss://127.0.0.1:{port}/ws", ssl=ssl.create_default_context())


def test_gateway_tls_files_missing(procs: Procs) -> None:
    proc = procs.spawn(
        "gw-badtls",
        "gateway",
        RTGATE_SERVER__PORT=str(free_port()),
        RTGATE_SERVER__TLS_CERT_FILE=str(procs.tmp_path / "none.crt"),
        RTGATE_SERVER__TLS_KEY_FILE=str(procs.tmp_path / "none.key"),
    )
    assert proc.wait(20) == 2
    assert "server.tls_cert_file" in (procs.tmp_path / "gw-badtls.log").read_text()


# --- NATS credentials and TLS ----------------------------------------------------------------


def _nkeys() -> Any:
    # A runtime dependency of rtgate for nkey_seed_file and creds_file (nats-py's
    # optional one); imported here so the other tests run even without it.
    import nkeys  # type: ignore[import-untyped]  # no stubs

    return nkeys


class ConfiguredNats:
    """nats-server -c FILE on free ports with JetStream: for auth and TLS setups."""

    def __init__(self, tmp_path: Path, name: str, body: str) -> None:
        self.port = free_port()
        store = tmp_path / f"{name}-js"
        conf = tmp_path / f"{name}.conf"
        conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'server_name: "{name}"\n'
            f'jetstream {{ store_dir: "{store}" }}\n' + body
        )
        self.log = tmp_path / f"{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(conf)], stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        wait_for_port("127.0.0.1", self.port, 10, self.proc)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nats_servers() -> Iterator[list[ConfiguredNats]]:
    started: list[ConfiguredNats] = []
    yield started
    for server in started:
        server.stop()


def _gateway_against(
    procs: Procs, server: ConfiguredNats, name: str, **env: str
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = procs.spawn(
        name,
        "gateway",
        RTGATE_NATS__URLS=server.url,
        RTGATE_SERVER__PORT=str(port),
        RTGATE_SERVER__ID=name,
        **env,
    )
    return proc, port


def _connects(procs: Procs, server: ConfiguredNats, name: str, **env: str) -> None:
    proc, port = _gateway_against(procs, server, name, **env)
    body = json.loads(_wait_http(f"http://127.0.0.1:{port}/readyz"))
    assert body["nats"] is True
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def _refused(procs: Procs, server: ConfiguredNats, name: str, expect: str, **env: str) -> None:
    """Wrong settings: the gateway exits 2 at once naming the cause, not retrying forever."""
    proc, _ = _gateway_against(procs, server, name, **env)
    assert proc.wait(20) == 2
    log = (procs.tmp_path / f"{name}.log").read_text()
    # One line on stderr says why (the rest of the log is JSON lines).
    reason = [line for line in log.splitlines() if line.startswith("rtgate gateway: ")]
    assert len(reason) == 1, log
    assert expect.lower() in reason[0].lower(), reason[0]


def test_nats_user_password_and_token(
    procs: Procs, tmp_path: Path, nats_servers: list[ConfiguredNats]
) -> None:
    users = ConfiguredNats(
        tmp_path,
        "users",
        "authorization { users = [\n"
        '  { user: "rtgate-gateway", password: "gw-secret" }\n'
        '  { user: "rtgate-broker", password: "br-secret" }\n]}\n',
    )
    nats_servers.append(users)
    _connects(
        procs,
        users,
        "gw-user",
        RTGATE_NATS__USER="rtgate-gateway",
        RTGATE_NATS__PASSWORD="gw-secret",
    )
    _refused(
        procs,
        users,
        "gw-badpass",
        "Authorization Violation",
        RTGATE_NATS__USER="rtgate-gateway",
        RTGATE_NATS__PASSWORD="wrong",
    )
    _refused(procs, users, "gw-anon", "Authorization Violation")
    # The broker connects with the same settings code.
    broker_port = free_port()
    broker = procs.spawn(
        "broker-user",
        "broker",
        RTGATE_NATS__URLS=users.url,
        RTGATE_NATS__USER="rtgate-broker",
        RTGATE_NATS__PASSWORD="br-secret",
        RTGATE_BROKER__PORT=str(broker_port),
        RTGATE_BROKER__ID="broker-user",
        RTGATE_BROKER__STATE_DIR=str(tmp_path / "broker-state"),
    )
    _wait_http(f"http://127.0.0.1:{broker_port}/readyz")
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(20) == 0

    tokens = ConfiguredNats(tmp_path, "token", 'authorization { token: "s3cret-token" }\n')
    nats_servers.append(tokens)
    _connects(procs, tokens, "gw-token", RTGATE_NATS__TOKEN="s3cret-token")
    _refused(procs, tokens, "gw-badtoken", "Authorization Violation", RTGATE_NATS__TOKEN="not-it")


def test_nats_nkey(procs: Procs, tmp_path: Path, nats_servers: list[ConfiguredNats]) -> None:
    # rtgate needs it for nkey_seed_file and creds_file (nats-py's optional dependency).
    nkeys = _nkeys()

    def user_seed(name: str) -> tuple[Path, str]:
        seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
        path = tmp_path / f"{name}.nk"
        path.write_bytes(seed + b"\n")
        path.chmod(0o600)
        return path, nkeys.from_seed(bytearray(seed)).public_key.decode()

    good, public = user_seed("good")
    other, _ = user_seed("other")
    server = ConfiguredNats(
        tmp_path, "nkey", f'authorization {{ users = [{{ nkey: "{public}" }}] }}\n'
    )
    nats_servers.append(server)
    _connects(procs, server, "gw-nkey", RTGATE_NATS__NKEY_SEED_FILE=str(good))
    _refused(
        procs,
        server,
        "gw-othernkey",
        "Authorization Violation",
        RTGATE_NATS__NKEY_SEED_FILE=str(other),
    )
    _refused(
        procs,
        server,
        "gw-nonkey",
        "nkey_seed_file",
        RTGATE_NATS__NKEY_SEED_FILE=str(tmp_path / "missing.nk"),
    )


def test_nats_tls_with_client_certificates(
    procs: Procs, tmp_path: Path, nats_servers: list[ConfiguredNats]
) -> None:
    ca_key = certs.key()
    ca = certs.cert("rtgate test CA", ca_key, ca=True)
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_key, client_key = certs.key(), certs.key()
    server_cert, server_keyf = certs.write(
        tmp_path, "nats", certs.cert("127.0.0.1", server_key, issuer=(ca, ca_key)), server_key
    )
    client_cert, client_keyf = certs.write(
        tmp_path,
        "client",
        certs.cert("rtgate-gateway", client_key, issuer=(ca, ca_key), server=False),
        client_key,
    )
    other_key = certs.key()
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(
        certs.cert("another CA", other_key, ca=True).public_bytes(serialization.Encoding.PEM)
    )

    server = ConfiguredNats(
        tmp_path,
        "tls",
        (
            f'tls {{ cert_file: "{server_cert}"\n key_file: "{server_keyf}"\n'
            f' ca_file: "{ca_file}"\n verify: true\n timeout: 2 }}\n'
        ),
    )
    nats_servers.append(server)
    _connects(
        procs,
        server,
        "gw-tls",
        RTGATE_NATS__TLS_CA_FILE=str(ca_file),
        RTGATE_NATS__TLS_CERT_FILE=client_cert,
        RTGATE_NATS__TLS_KEY_FILE=client_keyf,
    )
    # The server's certificate is not from the CA we were told to trust.
    _refused(
        procs,
        server,
        "gw-wrongca",
        "certificate verify failed",
        RTGATE_NATS__TLS_CA_FILE=str(other_ca),
        RTGATE_NATS__TLS_CERT_FILE=client_cert,
        RTGATE_NATS__TLS_KEY_FILE=client_keyf,
    )
    # No client certificate: the server (verify: true) refuses the handshake.
    _refused(procs, server, "gw-nocert", "", RTGATE_NATS__TLS_CA_FILE=str(ca_file))
    _refused(
        procs,
        server,
        "gw-badfile",
        "nats TLS files",
        RTGATE_NATS__TLS_CA_FILE=str(tmp_path / "missing.crt"),
    )


def _keypair(nkeys: Any, prefix: int) -> tuple[bytes, str]:
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed)).public_key.decode()


def _jwt(nkeys: Any, claims: dict[str, Any], signer_seed: bytes) -> str:
    """A NATS JWT (what `nsc` makes): ed25519-nkey signed by the issuer's seed."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {"iat": int(time.time()), **claims}
    digest = hashlib.sha256(json.dumps(claims).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = nkeys.from_seed(bytearray(signer_seed)).sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{b64(signature)}"


def test_nats_creds_file(procs: Procs, tmp_path: Path, nats_servers: list[ConfiguredNats]) -> None:
    """Operator (JWT) mode: an operator, an account with JetStream, a user's .creds file."""
    nkeys = _nkeys()

    op_seed, op_pub = _keypair(nkeys, nkeys.PREFIX_BYTE_OPERATOR)
    _sys_seed, sys_pub = _keypair(nkeys, nkeys.PREFIX_BYTE_ACCOUNT)
    acc_seed, acc_pub = _keypair(nkeys, nkeys.PREFIX_BYTE_ACCOUNT)
    stranger_seed, stranger_pub = _keypair(nkeys, nkeys.PREFIX_BYTE_ACCOUNT)
    unlimited = {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
    }
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    operator = _jwt(
        nkeys,
        {
            "iss": op_pub,
            "sub": op_pub,
            "name": "test-operator",
            "nats": {"type": "operator", "version": 2, "system_account": sys_pub},
        },
        op_seed,
    )
    account = _jwt(
        nkeys,
        {
            "iss": op_pub,
            "sub": acc_pub,
            "name": "rtgate",
            "nats": {"type": "account", "version": 2, "limits": {**unlimited, **jetstream}},
        },
        op_seed,
    )
    system = _jwt(
        nkeys,
        {
            "iss": op_pub,
            "sub": sys_pub,
            "name": "SYS",
            "nats": {"type": "account", "version": 2, "limits": unlimited},
        },
        op_seed,
    )

    def creds(name: str, account_seed: bytes, account_pub: str) -> Path:
        user_seed, user_pub = _keypair(nkeys, nkeys.PREFIX_BYTE_USER)
        user = _jwt(
            nkeys,
            {
                "iss": account_pub,
                "sub": user_pub,
                "name": name,
                "nats": {
                    "type": "user",
                    "version": 2,
                    "pub": {},
                    "sub": {},
                    "subs": -1,
                    "data": -1,
                    "payload": -1,
                },
            },
            account_seed,
        )
        path = tmp_path / f"{name}.creds"
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user}\n------END NATS USER JWT------\n"
            f"\n-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        path.chmod(0o600)
        return path

    server = ConfiguredNats(
        tmp_path,
        "operator",
        (
            f"operator: {operator}\nsystem_account: {sys_pub}\nresolver: MEMORY\n"
            f"resolver_preload: {{\n  {acc_pub}: {account}\n  {sys_pub}: {system}\n}}\n"
        ),
    )
    nats_servers.append(server)
    _connects(
        procs,
        server,
        "gw-creds",
        RTGATE_NATS__CREDS_FILE=str(creds("rtgate-gateway", acc_seed, acc_pub)),
    )
    # Signed by an account this server does not know.
    _refused(
        procs,
        server,
        "gw-stranger",
        "Authorization Violation",
        RTGATE_NATS__CREDS_FILE=str(creds("stranger", stranger_seed, stranger_pub)),
    )
    _refused(
        procs,
        server,
        "gw-nocreds",
        "creds_file",
        RTGATE_NATS__CREDS_FILE=str(tmp_path / "missing.creds"),
    )
