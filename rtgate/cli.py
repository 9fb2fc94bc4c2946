"""`rtgate`: run a gateway, a broker, the whole system for development, or mint a token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import re
import secrets
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.settings import ConfigError
from gateway.config import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS
from rtgate.sdnotify import Notifier

if TYPE_CHECKING:
    from aiohttp import web

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (examples: 90, 30m, 1h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _instance(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"bad instance {text!r} (a number >= 0)")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"bad port {text!r} (1 to 65535)")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rtgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("gateway", help="run one WebSocket gateway")
    p.add_argument("--config", help="TOML config file (default: $RTGATE_CONFIG)")
    p.add_argument(
        "--instance",
        type=_instance,
        metavar="N",
        help="instance N of this host's gateways (systemd passes %%i): id "
        "<server.id or hostname>-N, metrics on server.metrics_port + N",
    )

    p = sub.add_parser("broker", help="run the broker service")
    p.add_argument("--config", help="TOML config file (default: $RTGATE_CONFIG)")

    p = sub.add_parser("dev", help="run NATS, a gateway and the broker locally")
    p.add_argument("--state-dir", default=".rtgate", help="where NATS and the broker keep data")
    p.add_argument("--nats-url", help="use this NATS instead of starting one")
    p.add_argument("--port", type=_port, default=8080, help="gateway port (default 8080)")
    p.add_argument("--broker-port", type=_port, default=8090, help="broker HTTP port")
    p.add_argument("--user", default="alice", help="user of the printed dev token")

    p = sub.add_parser(
        "token", help="mint a JWT: HS with the configured secret, or RS/ES with --private-key"
    )
    p.add_argument("--config", help="TOML config file (default: $RTGATE_CONFIG)")
    p.add_argument("--user", required=True, help="user id (sub)")
    p.add_argument("--name", help="display name")
    p.add_argument("--ttl", type=parse_duration, default=3600.0, help="lifetime, e.g. 1h")
    p.add_argument("--rooms", type=_patterns, help="rooms it may join, e.g. 'lobby,team-*'")
    p.add_argument(
        "--publish",
        type=_patterns,
        help="rooms it may post to (default: as --rooms; '' for receive-only)",
    )
    p.add_argument("--admin", action="store_true", help="may broadcast to everyone")
    p.add_argument(
        "--private-key",
        metavar="FILE",
        help="sign with this PEM private key (RSA or EC P-256/P-384) instead of the secret",
    )
    p.add_argument(
        "--kid", help="key id for the header; RS/ES tokens need one the gateway's JWKS has"
    )
    p.add_argument(
        "--alg",
        choices=PUBLIC_KEY_ALGORITHMS + HMAC_ALGORITHMS,
        help="signing algorithm (default: RS256 for an RSA key, ES256 for P-256, "
        "ES384 for P-384; else the first HS in auth.algorithms)",
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "gateway":
            _run_gateway(args.config, args.instance)
        elif args.command == "broker":
            _run_broker(args.config)
        elif args.command == "dev":
            sys.exit(_run_dev(args))
        elif args.command == "token":
            _token(args)
    except ConfigError as exc:
        print(f"rtgate: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _tls_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    if not cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"server.tls_cert_file / server.tls_key_file ({cert_file}, {key_file}): {exc}"
        ) from exc
    return ctx


@dataclasses.dataclass
class _Listen:
    """One listener: the app and where it listens."""

    app: web.Application
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    reuse_port: bool = False
    handle_signals: bool = False


async def _run(listeners: list[_Listen], notifier: Notifier, status: str) -> None:
    """aiohttp's run_app for several listeners, telling systemd once all of them listen.

    The first listener's app owns the service (its startup connects NATS, its
    cleanup stops it); the others only serve its endpoints.
    """
    from aiohttp import web

    runners: list[web.AppRunner] = []
    watchdog: asyncio.Task[None] | None = None
    try:
        for listen in listeners:
            runner = web.AppRunner(
                listen.app,
                handle_signals=listen.handle_signals,
                access_log=None,
                shutdown_timeout=5,
            )
            # Appended once set up: as in run_app, a failed startup is not cleaned up.
            await runner.setup()
            runners.append(runner)
            # reuse_port=None rather than False: aiohttp's own default.
            site = web.TCPSite(
                runner,
                listen.host,
                listen.port,
                ssl_context=listen.ssl_context,
                reuse_port=listen.reuse_port or None,
            )
            await site.start()
        # Startup connected NATS (or raised) and every socket listens: ready.
        notifier.ready(status)
        watchdog = asyncio.ensure_future(notifier.run_watchdog())
        await asyncio.Event().wait()  # until cancelled: SIGTERM, SIGINT or drained
    finally:
        if notifier.sent_ready:
            notifier.stopping("stopping")
        # The main app last: its endpoints answer (draining) until it is gone.
        for runner in reversed(runners):
            await runner.cleanup()
        if watchdog is not None:
            watchdog.cancel()


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """What web.run_app does around its coroutine: SIGTERM/drain end it by GracefulExit.

    Not asyncio.run: its shutdown waits for the default executor's threads,
    and a broker stop then hung on a store thread (tried; the process test
    timed out)."""
    from aiohttp.web_runner import GracefulExit

    loop = asyncio.new_event_loop()
    task = loop.create_task(main)
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(task)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
        finally:
            rest = asyncio.all_tasks(loop)
            for other in rest:
                other.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _serve(app_factory: str, config_path: str | None, instance: int | None = None) -> None:
    from nats.errors import NoServersError

    from broker import logs
    from broker.natsconn import NatsAuthError, NatsVersionError
    from broker.store import StoreError
    from broker.streams import StreamError

    notifier = Notifier.from_env()
    if app_factory == "gateway":
        from gateway import config as gconfig
        from gateway.app import create_app as gateway_app
        from gateway.app import create_metrics_app

        gcfg = gconfig.load(config_path)
        if instance is not None:
            gcfg = gcfg.for_instance(instance)
        logs.configure(gcfg.log, "gateway")
        server = gcfg.server
        app = gateway_app(gcfg, handle_signals=True, notifier=notifier)
        listeners = [
            _Listen(
                app,
                server.host,
                server.port,
                _tls_context(server.tls_cert_file, server.tls_key_file),
                server.reuse_port,
                handle_signals=True,
            )
        ]
        if server.metrics_port:
            listeners.append(_Listen(create_metrics_app(app), server.host, server.metrics_port))
        status = f"gateway {gcfg.gateway_id} on {server.host}:{server.port}"
        nats_urls = gcfg.nats.urls
    else:
        from broker import config as bconfig
        from broker.service import create_app as broker_app

        bcfg = bconfig.load(config_path)
        logs.configure(bcfg.log, "broker")
        app = broker_app(bcfg)
        listeners = [_Listen(app, bcfg.broker.host, bcfg.broker.port, handle_signals=True)]
        status = f"broker {bcfg.broker_id} on {bcfg.broker.host}:{bcfg.broker.port}"
        nats_urls = bcfg.nats.urls
    _use_uvloop()
    try:
        _run_loop(_run(listeners, notifier, status))
    except (NatsVersionError, NatsAuthError, StreamError, StoreError) as exc:
        print(f"rtgate {app_factory}: {exc}", file=sys.stderr)
        sys.exit(2)
    except NoServersError:
        print(
            f"rtgate {app_factory}: cannot reach NATS at {', '.join(nats_urls)}; is "
            "nats-server running with JetStream? (rtgate dev starts one)",
            file=sys.stderr,
        )
        sys.exit(1)
    except OSError as exc:
        print(f"rtgate {app_factory}: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)


def _run_gateway(config_path: str | None, instance: int | None = None) -> None:
    _serve("gateway", config_path, instance)


def _run_broker(config_path: str | None) -> None:
    _serve("broker", config_path)


def _token(args: argparse.Namespace) -> None:
    from gateway import config as gconfig
    from gateway.auth import mint

    cfg = gconfig.load(args.config)
    if args.private_key is None and cfg.auth.secret == gconfig.DEV_SECRET:
        print(
            "rtgate token: warning: signed with the built-in development secret; a gateway "
            "with any other auth.secret (rtgate dev makes its own: set RTGATE_AUTH__SECRET "
            "as it prints) refuses this token",
            file=sys.stderr,
        )
    pem: str | None = None
    if args.private_key is not None:
        try:
            pem = Path(args.private_key).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"rtgate token: cannot read {args.private_key}: {exc}", file=sys.stderr)
            sys.exit(2)
        if not args.kid:
            print(
                "rtgate token: warning: no --kid; the gateway refuses RS/ES tokens without one",
                file=sys.stderr,
            )
    try:
        token = mint(
            cfg.auth,
            args.user,
            name=args.name,
            ttl_seconds=args.ttl,
            rooms=args.rooms,
            publish=args.publish,
            admin=args.admin,
            private_key=pem,
            kid=args.kid,
            algorithm=args.alg,
        )
    except ValueError as exc:
        print(f"rtgate token: {exc}", file=sys.stderr)
        sys.exit(2)
    print(token)


def _wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout}s")
        time.sleep(0.1)


def _port_in_use(port: int) -> bool:
    """Whether another process listens on 127.0.0.1:``port`` (as the children bind
    it). Other refusals (a privileged port) are left to the child to report."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _run_dev(args: argparse.Namespace) -> int:
    from gateway.auth import mint
    from gateway.config import AuthSettings
    from rtgate.natsserver import NatsServer, env_without_rtgate

    # Checked first: readiness is polled over HTTP, and another process on a
    # port (another rtgate dev) would answer for a child that failed to bind.
    for option, port in (("--port", args.port), ("--broker-port", args.broker_port)):
        if _port_in_use(port):
            print(
                f"rtgate dev: port {port} is in use (another rtgate dev?); choose another "
                f"with {option}",
                file=sys.stderr,
            )
            return 2
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    secret_file = state / "dev-secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(32))
        secret_file.chmod(0o600)
    secret = secret_file.read_text().strip()

    nats: NatsServer | None = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if args.nats_url:
            nats_url = args.nats_url
        else:
            nats = NatsServer(state / "nats", log_file=state / "nats-server.log")
            nats.start()
            nats_url = nats.url
        env = env_without_rtgate(
            {
                "RTGATE_NATS__URLS": nats_url,
                "RTGATE_AUTH__SECRET": secret,
                "RTGATE_SERVER__PORT": str(args.port),
                "RTGATE_SERVER__ID": "dev-gateway-1",
                "RTGATE_BROKER__PORT": str(args.broker_port),
                "RTGATE_BROKER__STATE_DIR": str(state / "broker"),
                "RTGATE_BROKER__ID": "dev-broker-1",
                # The demo page at / and its /dev/token: this is a local development run.
                "RTGATE_SERVER__DEV_DEMO": "true",
            }
        )
        for name in ("broker", "gateway"):
            proc = subprocess.Popen([sys.executable, "-m", name], env=env, stdin=subprocess.DEVNULL)
            children.append((name, proc))
        _wait_ready(f"http://127.0.0.1:{args.broker_port}/readyz", 20, children[0][1])
        _wait_ready(f"http://127.0.0.1:{args.port}/readyz", 20, children[1][1])
        token = mint(
            AuthSettings(secret=secret),
            args.user,
            name=args.user.capitalize(),
            ttl_seconds=7 * 86400,
        )
        print(_banner(args, nats_url, token, secret), flush=True)
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    print(
                        f"rtgate dev: {name} exited with {proc.returncode}; stopping",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"rtgate dev: {exc}", file=sys.stderr)
        return 1
    finally:
        for _name, proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in children:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if nats is not None:
            nats.stop()
        print("rtgate dev: stopped", file=sys.stderr)


def _banner(args: argparse.Namespace, nats_url: str, token: str, secret: str) -> str:
    ws = f"ws://127.0.0.1:{args.port}/ws"
    return "\n".join(
        [
            "",
            "rtgate is running",
            f"  demo        http://127.0.0.1:{args.port}/  (chat page: open it in two windows "
            "as two names)",
            f"  WebSocket   {ws}",
            f"  dev token   {token}",
            f"              (user {args.user!r}, valid 7 days; connect to {ws}?token=<token>)",
            f"  more tokens RTGATE_AUTH__SECRET={secret} {_self_command()} token --user bob "
            "--name Bob",
            f"  metrics     http://127.0.0.1:{args.port}/metrics (gateway), "
            f"http://127.0.0.1:{args.broker_port}/metrics (broker)",
            f"  NATS        {nats_url}",
            f"  state       {Path(args.state_dir).resolve()}",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


def _self_command() -> str:
    """How this rtgate was started, to repeat in a hint (a venv's bin is often not
    on PATH)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "rtgate"
    if Path(argv0).name == "rtgate" and "/" in argv0:
        return shlex.quote(argv0)
    return "rtgate"


if __name__ == "__main__":
    main()
