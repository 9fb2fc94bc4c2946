"""Shared by the benchmarks: child processes, /proc readings, the command-line scaffolding,
and the load generator.

The load generator is a minimal WebSocket client on raw asyncio transports
(uvloop), so that one worker process can hold thousands of connections and
count deliveries for little CPU: frames are parsed by hand, and a delivery's
latency is read from the send time the publisher wrote at the start of its
``content`` (``time.time_ns()``, the wall clock shared by every process on
the machine) without decoding the JSON.

Workers are ``multiprocessing`` processes (fork) driven over a pipe:
subscriber workers connect, wait for ``welcome``, join the room and report
``ready``, then answer ``report`` / ``final`` / ``close``; the publisher worker
joins, and on ``go`` sends chat messages at a fixed rate. Every child (servers
and workers) is stopped by :class:`Children` on exit, and asks the kernel to
SIGTERM it should the benchmark itself die.

nats-server is started with the project's own :class:`rtgate.natsserver.NatsServer`
(the binary from the venv, a free port, JetStream in a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import dataclasses
import io
import json
import multiprocessing as mp
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from array import array
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from rtgate.natsserver import NatsServer, env_without_rtgate, find_binary, free_port, wait_for_port

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SECRET = "rtgate-benchmark-secret-0123456789abcdef"
ROOM = "bench"

_PR_SET_PDEATHSIG = 1
R = TypeVar("R")
Worker = tuple[BaseProcess, Connection]


# -- processes and /proc ----------------------------------------------------------


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the process that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all threads (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as fh:
        data = fh.read()
    fields = data[data.rindex(")") + 2 :].split()
    # Fields 14 (utime) and 15 (stime) of proc(5); the list starts at field 3.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all threads."""
    user, system = cpu_times(pid)
    return user + system


def io_syscalls(pid: int) -> tuple[int, int]:
    """(read-like, write-like) system calls made so far (``syscr``/``syscw`` of /proc/<pid>/io).

    libuv writes sockets with write(2)/writev(2), which are counted here.
    """
    reads = writes = 0
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            if line.startswith("syscr:"):
                reads = int(line.split()[1])
            elif line.startswith("syscw:"):
                writes = int(line.split()[1])
    return reads, writes


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine have used so far (``/proc/stat``, every CPU):
    user, nice, system, irq, softirq and steal; not idle or iowait."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()[1:9]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_nofile(wanted: int) -> int:
    """Raise the open-files soft limit (inherited by children); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=5
    ).stdout.strip()


def revision() -> str:
    """The commit measured, marked ``+dirty`` when gateway/, broker/ or rtgate/ have changes."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "gateway", "broker", "rtgate")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


@dataclasses.dataclass(frozen=True)
class Source:
    """The rtgate code the gateways run: the working tree, or a commit exported with git."""

    tree: Path
    label: str


def source(rev: str | None, workdir: Path) -> Source:
    """``rev`` None: this checkout as it is (label ``<HEAD>+dirty`` when gateway/, broker/ or
    rtgate/ have uncommitted changes); else that commit, extracted under ``workdir``."""
    if rev is None:
        return Source(ROOT, revision())
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = workdir / f"rtgate-{commit}"
    if not dest.exists():
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    return Source(dest, commit)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def machine() -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        nats = subprocess.run(
            [find_binary(), "--version"], capture_output=True, text=True, timeout=5
        ).stdout.split()[-1]
    except (OSError, RuntimeError, subprocess.SubprocessError, IndexError):
        nats = "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": sys.version.split()[0],
        "nats_server": nats,
        "loadavg": load,
    }


# A watcher for a child that cannot ask for PR_SET_PDEATHSIG itself (nats-server, started
# by NatsServer): it does ask, and passes the SIGTERM it gets on the benchmark's death on.
_GUARD = (
    "import os, signal, sys\n"
    "pid = int(sys.argv[1])\n"
    "signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))\n"
    "signal.pause()\n"
)


class Children:
    """Every process a benchmark starts; ``stop_all`` ends them whatever happened."""

    def __init__(self, pin: bool = False) -> None:
        """``pin`` (``--pin``): servers on CPU 0, the load generator on the other CPUs."""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[BaseProcess] = []
        self.nats: list[NatsServer] = []
        self.guards: list[subprocess.Popen[bytes]] = []
        self.server_cpus = {0} if pin else None
        self.client_cpus = set(range(1, cpu_count())) if pin else None

    def popen(
        self, args: list[str], env: dict[str, str] | None, log: Path, cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        cpus = self.server_cpus

        def setup() -> None:
            die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(log, "ab") as out:
            proc = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=setup,
            )
        self.procs.append(proc)
        return proc

    @contextlib.contextmanager
    def _server_affinity(self) -> Iterator[None]:
        """This process on the server CPUs for a moment: what it starts inherits them."""
        before = os.sched_getaffinity(0)
        if self.server_cpus:
            os.sched_setaffinity(0, self.server_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)

    def start_nats(self, workdir: Path) -> NatsServer:
        """A private nats-server with JetStream on a free port (never the machine's 4222)."""
        nats = NatsServer(workdir / "nats", log_file=workdir / "nats-server.log")
        self.nats.append(nats)
        with self._server_affinity():
            nats.start()
        assert nats.proc is not None
        self.guards.append(
            subprocess.Popen(
                [sys.executable, "-c", _GUARD, str(nats.proc.pid)],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        )
        return nats

    def worker(self, target: Callable[..., None], *args: Any) -> Worker:
        ctx = mp.get_context("fork")
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child_end, *args), daemon=True)
        proc.start()
        if self.client_cpus and proc.pid is not None:
            os.sched_setaffinity(proc.pid, self.client_cpus)
        child_end.close()
        self.workers.append(proc)
        return proc, parent_end

    def end_worker(self, proc: BaseProcess, timeout: float = 5.0) -> None:
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join(3)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if proc in self.workers:
            self.workers.remove(proc)

    def stop_all(self) -> None:
        for w in list(self.workers):
            if w.is_alive():
                w.terminate()
        for w in list(self.workers):
            self.end_worker(w, 3)
        # Servers before what they depend on: the gateways (or the bare server) go
        # first, and together (SIGTERM, then SIGKILL for any still there after 8 s);
        # nats-server last.
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 8.0
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()
        for nats in self.nats:
            nats.stop()
        for guard in self.guards:
            guard.kill()  # SIGKILL: its SIGTERM handler would signal the pid again
            guard.wait()
        self.nats.clear()
        self.guards.clear()


def _wait_listening(
    port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path, ready_path: str
) -> None:
    """Until ``proc`` listens on ``port``, then one GET of ``ready_path``, which must be 200.

    aiohttp's ``run_app`` runs the startup hooks (the gateway's NATS connection) before it
    listens, so a gateway that accepts connections is ready.
    """
    try:
        wait_for_port("127.0.0.1", port, timeout, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=5) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{ready_path} answered {resp.status}")
    except (RuntimeError, OSError) as exc:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"port {port}: {exc}\n{tail}") from exc


def edge_overrides(tree: Path) -> dict[str, str]:
    """Settings of ``[edge]``, when this rtgate has them: the per-address admission limits
    are lifted (every benchmark client connects from 127.0.0.1, far beyond what one real
    address may open) and the SIGTERM drain is not spread out (so a stop is prompt)."""
    text = (tree / "gateway" / "config.py").read_text()
    if "edge: EdgeSettings" not in text:
        return {}
    out = {}
    for key in ("max_connections_per_address", "handshakes_per_second_per_address"):
        if key in text:
            out[f"RTGATE_EDGE__{key.upper()}"] = "0"
    if "drain_seconds" in text:
        out["RTGATE_EDGE__DRAIN_SECONDS"] = "0"
    return out


def gateway_env(
    nats_url: str, gateway_id: str, port: int, extra: dict[str, str], tree: Path
) -> dict[str, str]:
    env: dict[str, str] = env_without_rtgate(
        {
            "PYTHONPATH": str(tree),
            "RTGATE_NATS__URLS": nats_url,
            "RTGATE_SERVER__PORT": str(port),
            "RTGATE_SERVER__ID": gateway_id,
            "RTGATE_AUTH__SECRET": SECRET,
            "RTGATE_LOG__FORMAT": "json",
            **edge_overrides(tree),
            **extra,
        }
    )
    return env


def start_gateway(
    children: Children,
    workdir: Path,
    nats_url: str,
    gateway_id: str,
    extra_env: dict[str, str],
    src: Source,
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m gateway`` (from ``src``) as a subprocess; returns it and its ws:// URL."""
    port = free_port()
    log = workdir / f"{gateway_id}.log"
    env = gateway_env(nats_url, gateway_id, port, extra_env, src.tree)
    proc = children.popen([sys.executable, "-m", "gateway"], env, log, cwd=src.tree)
    _wait_listening(port, proc, 30, log, "/readyz")
    return proc, f"ws://127.0.0.1:{port}/ws"


def start_bare(children: Children, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = workdir / "bare.log"
    proc = children.popen(
        [sys.executable, str(BENCH_DIR / "bare_server.py"), "--port", str(port)], None, log
    )
    _wait_listening(port, proc, 30, log, "/healthz")
    return proc, f"ws://127.0.0.1:{port}/ws"


def mint_tokens(first: int, count: int, prefix: str, users: int = 0) -> list[str]:
    """Tokens for members ``first`` .. ``first + count - 1``: user ``prefix<k>``, where k is
    the member number, or the member number modulo ``users`` when that is set."""
    from gateway.auth import mint
    from gateway.config import AuthSettings

    settings = AuthSettings(secret=SECRET)
    return [
        mint(settings, f"{prefix}{i % users if users else i}") for i in range(first, first + count)
    ]


def percentile(sorted_values: list[int] | array[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[i])


# -- the command line shared by fanout.py and memory.py --------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options both benchmarks take: which targets, which code, connecting, limits, output."""
    add = parser.add_argument
    add("--workers", type=int, default=2, help="load-generator processes holding the members")
    add("--only", choices=("rtgate", "bare"), help="measure one target")
    add(
        "--rev",
        help="run the gateways from this git commit (exported to a temporary directory) "
        "instead of the working tree",
    )
    add("--connect-concurrency", type=int, default=50, help="handshakes in flight per worker")
    add("--connect-timeout", type=float, default=120.0)
    add("--timeout", type=float, help="hard limit for the whole run, seconds")
    add("--json", metavar="PATH", help="also write the results as JSON")
    add("--keep-logs", action="store_true", help="keep the server logs")


def run_benchmark(
    name: str,
    args: argparse.Namespace,
    describe: str,
    open_files: int,
    timeout: float,
    targets: dict[str, Callable[[Children, Path, argparse.Namespace], R]],
    show: Callable[[R], None],
    repeat: int = 1,
) -> list[R]:
    """What both benchmarks do around their measurements.

    A hard time limit (SIGALRM) and SIGTERM end the run through an exception, so every
    ``finally`` (and so :meth:`Children.stop_all`) runs; the open-files limit is raised;
    a temporary directory holds logs, nats-server's store and an exported ``--rev``
    (``args.source``); a header line names the machine and the code measured. Then each
    of ``targets`` (only ``--only`` when given) runs ``repeat`` times, in alternating
    order, each time with fresh :class:`Children` (pinned with ``--pin``) that are stopped
    afterwards, and ``show`` prints its result. The directory is removed unless
    ``--keep-logs`` was given or the run failed.
    """

    def on_alarm(*_: object) -> None:
        raise TimeoutError(f"benchmark exceeded its {timeout:.0f}s limit")

    def on_term(*_: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(timeout))
    limit = raise_nofile(open_files)
    if limit < open_files // 2:
        raise SystemExit(f"{name}: open-files limit {limit} is too low (wanted {open_files})")
    names = [t for t in targets if args.only in (None, t)]
    workdir = Path(tempfile.mkdtemp(prefix=f"rtgate-{name}-"))
    results: list[R] = []
    ok = False
    try:
        info = machine()
        args.source = source(args.rev, workdir)
        print(
            f"{name}: {describe}; {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
            f"nats-server {info['nats_server']}, loadavg {info['loadavg']}, "
            f"rtgate {args.source.label}",
            flush=True,
        )
        for rep in range(repeat):
            for target in names if rep % 2 == 0 else reversed(names):
                children = Children(pin=getattr(args, "pin", False))
                try:
                    result = targets[target](children, workdir, args)
                finally:
                    children.stop_all()
                results.append(result)
                show(result)
                sys.stdout.flush()
        ok = True
        return results
    finally:
        signal.alarm(0)
        if args.keep_logs or not ok:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1, default=str))


def entry(name: str, main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``: a short line and a non-zero status on Ctrl-C or timeout."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted; every child process was stopped", file=sys.stderr)
        sys.exit(130)
    except TimeoutError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(1)


def start_members(
    children: Children, spec: dict[str, Any], count: int, workers: int, timeout: float
) -> tuple[list[Worker], int, list[str]]:
    """``count`` members (from member ``spec['first']`` on, default 0) spread over ``workers``
    subscriber workers; waits until each worker reports them connected and joined.

    Returns the workers, how many members are connected, and notes on failures.
    """
    first = spec.get("first", 0)
    started: list[Worker] = []
    per, rest = divmod(count, workers)
    for w in range(workers):
        n = per + (1 if w < rest else 0)
        if n:
            started.append(children.worker(subscriber_worker, {**spec, "first": first, "count": n}))
            first += n
    connected = 0
    notes = []
    for _, pipe in started:
        ready = expect(pipe, "ready", timeout)
        connected += ready["connected"]
        if ready["failed"]:
            notes.append(f"{ready['failed']} members failed to connect: {ready['error']}")
    return started, connected, notes


def end_workers(children: Children, workers: list[Worker], timeout: float = 20.0) -> None:
    """Ask workers to close their connections, wait for them, then end the processes."""
    for _, pipe in workers:
        pipe.send(("close",))
    for proc, pipe in workers:
        if pipe.poll(timeout):
            pipe.recv()
        children.end_worker(proc)


# -- the WebSocket client ---------------------------------------------------------

_CHAT = b'{"type":"chat:message",'
_CONTENT = b'"content":"'
_ACK = b'{"type":"ack",'
_WELCOME = b'{"type":"welcome",'


class Stats:
    __slots__ = (
        "ack_errors",
        "ack_target",
        "acked",
        "all_acked",
        "closed",
        "first_error",
        "latencies_us",
        "received",
    )

    def __init__(self) -> None:
        self.received = 0
        self.latencies_us: array[int] = array("q")
        self.acked = 0
        self.ack_errors = 0
        self.closed = 0
        self.first_error = ""
        # Set once acked + ack_errors reaches ack_target (the publisher waits on it).
        self.ack_target = 0
        self.all_acked: asyncio.Event | None = None


def _mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    keys = (key * (n // 4 + 1))[:n]
    return key + (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455: every client frame is masked)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + _mask(payload)


class WsConn(asyncio.Protocol):
    """One WebSocket client connection over a raw transport."""

    def __init__(self, host: str, target: str, stats: Stats) -> None:
        self._request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Protocol: rtgate.v1.json\r\n\r\n"
        ).encode()
        self.stats = stats
        loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.welcomed: asyncio.Future[None] = loop.create_future()
        self.acks: dict[int, asyncio.Future[bytes]] = {}
        self.transport: asyncio.Transport | None = None
        self.open = False
        self._buf = b""
        self._ids = 0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self.stats.closed += 1
        self.open = False
        err = ConnectionError(f"connection lost: {exc!r}")
        futures: list[asyncio.Future[Any]] = [self.upgraded, self.welcomed, *self.acks.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: nobody may be waiting on it

    def data_received(self, data: bytes) -> None:
        if not self.open:
            buf = self._buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            self._buf = b""
            if b" 101 " not in status:
                if not self.upgraded.done():
                    self.upgraded.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.open = True
            self.upgraded.set_result(None)
            data = buf[end + 4 :]
            if not data:
                return
        self._frames(data)

    # -- frames

    def _frames(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        stats = self.stats
        while n - pos >= 2:
            length = buf[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            opcode = buf[pos] & 0x0F
            pos = end
            if opcode == 1 and buf.startswith(_CHAT, start):
                # The publisher puts time.time_ns() (19 digits) first in the content.
                i = buf.find(_CONTENT, start, end) + 11
                stats.received += 1
                stats.latencies_us.append((now - int(buf[i : i + 19])) // 1000)
            elif opcode == 1:
                self._control(buf[start:end])
            elif opcode == 0x9:  # ping: answer with the same payload
                self._write(client_frame(0xA, buf[start:end]))
            elif opcode == 0x8:
                assert self.transport is not None
                self.transport.close()
        self._buf = buf[pos:] if pos < n else b""

    def _control(self, payload: bytes) -> None:
        if payload.startswith(_ACK):
            obj = json.loads(payload)
            fut = self.acks.pop(obj.get("id"), None)
            stats = self.stats
            if obj.get("ok") is True:
                stats.acked += 1
            else:
                stats.ack_errors += 1
                if not stats.first_error:
                    stats.first_error = payload[:300].decode(errors="replace")
            if stats.all_acked is not None and stats.acked + stats.ack_errors >= stats.ack_target:
                stats.all_acked.set()
            if fut is not None and not fut.done():
                fut.set_result(payload)
        elif payload.startswith(_WELCOME) and not self.welcomed.done():
            self.welcomed.set_result(None)

    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def send(self, kind: str, data: Any) -> int:
        self._ids += 1
        body = json.dumps(
            {"type": kind, "id": self._ids, "data": data}, separators=(",", ":")
        ).encode()
        self._write(client_frame(0x1, body))
        return self._ids

    async def request(self, kind: str, data: Any, timeout: float) -> bytes:
        frame_id = self.send(kind, data)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.acks[frame_id] = fut
        return await asyncio.wait_for(fut, timeout)

    def close(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.close()


async def open_member(
    url: str, token: str, stats: Stats, room: str, timeout: float = 15.0
) -> WsConn:
    """Connect, await ``welcome``, join ``room`` and await its ack."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(
            lambda: WsConn(f"{host}:{port}", f"{parts.path}?token={token}", stats), host, port
        ),
        timeout,
    )
    try:
        await asyncio.wait_for(conn.upgraded, timeout)
        await asyncio.wait_for(conn.welcomed, timeout)
        ack = await conn.request("room:join", {"roomId": room}, timeout)
        if b'"ok":true' not in ack:
            raise ConnectionError(f"join refused: {ack[:200]!r}")
    except BaseException:
        conn.close()
        raise
    return conn


async def open_many(
    urls: list[str],
    tokens: list[str],
    stats: Stats,
    room: str,
    concurrency: int,
    rooms: int = 1,
    first: int = 0,
) -> tuple[list[WsConn], int, str]:
    """Open ``len(tokens)`` members with retries; the i-th is member ``first + i`` overall.

    Member k connects to ``urls[k % len(urls)]`` and, with ``rooms`` > 1, joins
    ``f"{room}-{k % rooms}"`` instead of ``room``.
    """
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(i: int) -> WsConn | None:
        async with sem:
            for attempt in range(4):
                try:
                    k = first + i
                    name = room if rooms == 1 else f"{room}-{k % rooms}"
                    return await open_member(urls[k % len(urls)], tokens[i], stats, name)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    if attempt == 3:
                        errors.append(repr(exc))
                    await asyncio.sleep(0.2 * (attempt + 1))
            return None

    results = await asyncio.gather(*(one(i) for i in range(len(tokens))))
    conns = [c for c in results if c is not None]
    return conns, len(tokens) - len(conns), errors[0] if errors else ""


# -- workers ----------------------------------------------------------------------


def _worker_setup() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # Forked: drop the parent's handlers, so SIGTERM simply ends the worker.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    die_with_parent()


class _Commands:
    """Commands from the parent's pipe, read inside the event loop."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(pipe.fileno(), self._readable)

    def send(self, message: Any) -> None:
        """Reply to the parent. The loop made the pipe non-blocking; a big reply needs it
        blocking (the parent reads it promptly)."""
        os.set_blocking(self.pipe.fileno(), True)
        try:
            self.pipe.send(message)
        finally:
            os.set_blocking(self.pipe.fileno(), False)

    def _readable(self) -> None:
        try:
            while self.pipe.poll():
                self.queue.put_nowait(self.pipe.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            self.queue.put_nowait(("exit",))

    async def next(self) -> Any:
        return await self.queue.get()


async def _close_all(commands: _Commands, conns: list[WsConn]) -> None:
    """Close every connection, give the closes a moment, and tell the parent."""
    for c in conns:
        c.close()
    await asyncio.sleep(0.2)
    with contextlib.suppress(OSError):
        commands.send(("closed", None))


def subscriber_worker(pipe: Connection, spec: dict[str, Any]) -> None:
    """Hold ``spec['count']`` members of the room; count what they receive."""
    _worker_setup()
    import uvloop

    uvloop.run(_subscriber_main(pipe, spec))


def _summary(stats: Stats, conns: list[WsConn], with_latencies: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "received": stats.received,
        "closed": stats.closed,
        "open": sum(1 for c in conns if c.open),
        "ack_errors": stats.ack_errors,
        "first_error": stats.first_error,
        "cpu": cpu_seconds(os.getpid()),
    }
    if with_latencies:
        out["latencies_us"] = stats.latencies_us.tobytes()
    return out


async def _subscriber_main(pipe: Connection, spec: dict[str, Any]) -> None:
    stats = Stats()
    commands = _Commands(pipe)
    tokens = mint_tokens(
        spec["first"], spec["count"], spec.get("user_prefix", "sub"), spec.get("users", 0)
    )
    started = time.monotonic()
    conns, failed, error = await open_many(
        spec["urls"],
        tokens,
        stats,
        spec["room"],
        spec.get("concurrency", 50),
        spec.get("rooms", 1),
        spec["first"],
    )
    commands.send(
        (
            "ready",
            {
                "connected": len(conns),
                "failed": failed,
                "error": error,
                "seconds": time.monotonic() - started,
            },
        )
    )
    while True:
        cmd = await commands.next()
        if cmd[0] == "report":
            commands.send(("report", _summary(stats, conns, False)))
        elif cmd[0] == "final":
            commands.send(("final", _summary(stats, conns, True)))
        elif cmd[0] == "reset":
            stats.received = 0
            stats.latencies_us = array("q")
            commands.send(("reset", None))
        elif cmd[0] in ("close", "exit"):
            await _close_all(commands, conns)
            return


def publisher_worker(pipe: Connection, spec: dict[str, Any]) -> None:
    """``spec['publishers']`` members that send chat messages on ``go``."""
    _worker_setup()
    import uvloop

    uvloop.run(_publisher_main(pipe, spec))


async def _publisher_main(pipe: Connection, spec: dict[str, Any]) -> None:
    stats = Stats()
    commands = _Commands(pipe)
    count = spec["publishers"]
    tokens = mint_tokens(0, count, "pub")
    conns, failed, error = await open_many(spec["urls"], tokens, stats, spec["room"], count)
    commands.send(("ready", {"connected": len(conns), "failed": failed, "error": error}))
    stats.acked = stats.ack_errors = 0
    loop = asyncio.get_running_loop()
    while True:
        cmd = await commands.next()
        if cmd[0] == "go":
            _, rate, duration, size = cmd
            total = int(rate * duration)
            interval = 1.0 / rate
            room = spec["room"]
            stats.ack_target = total
            stats.all_acked = asyncio.Event()
            t0 = loop.time()
            for i in range(total):
                delay = t0 + i * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                content = f"{time.time_ns()}:{i}:".ljust(size, "x")
                conns[i % len(conns)].send("chat:message", {"roomId": room, "content": content})
            elapsed = loop.time() - t0
            if stats.acked + stats.ack_errors < total:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stats.all_acked.wait(), 10)
            commands.send(
                (
                    "published",
                    {
                        "sent": total,
                        "acked": stats.acked,
                        "ack_errors": stats.ack_errors,
                        "first_error": stats.first_error,
                        "seconds": elapsed,
                        "closed": stats.closed,
                    },
                )
            )
        elif cmd[0] in ("close", "exit"):
            await _close_all(commands, conns)
            return


def expect(pipe: Connection, kind: str, timeout: float) -> Any:
    """The next message from a worker, which must be ``kind``."""
    if not pipe.poll(timeout):
        raise TimeoutError(f"worker did not answer {kind!r} within {timeout}s")
    got, payload = pipe.recv()
    if got != kind:
        raise RuntimeError(f"worker answered {got!r}, expected {kind!r}")
    return payload
