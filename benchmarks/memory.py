"""Memory per idle authenticated connection: one rtgate gateway against the bare aiohttp server.

For each server (one ``python -m gateway`` on a private nats-server, then
benchmarks/bare_server.py): warm up with a few connections (so lazily
imported code and first-use caches are not charged to the connections), read
the server's RSS (``VmRSS`` in ``/proc/<pid>/status``), open ``--connections``
WebSockets from separate worker processes (each authenticated with a JWT in
the query string, ``welcome`` received, ``room:join`` acked), let them idle
for ``--settle`` seconds, read RSS again and divide the growth by the number
of connections. Then close them all, and with ``--churn`` repeat open/close
cycles to watch for growth that is never given back.

Run: ``.venv/bin/python benchmarks/memory.py --connections 2000``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loadgen
from loadgen import Children, expect, rss_kib

TARGET_KIB = 20.0


@dataclasses.dataclass
class MemResult:
    target: str
    connections: int
    connected: int
    connect_seconds: float
    rss_start_kib: int
    rss_base_kib: int
    rss_open_kib: int
    rss_closed_kib: int
    churn_kib: list[int]

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_open_kib - self.rss_base_kib) / max(1, self.connected)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["per_connection_kib"] = round(self.per_connection_kib, 2)
        return d


def _open(
    children: Children, url: str, count: int, args: argparse.Namespace, first: int
) -> tuple[list[tuple[Any, Any]], int, float]:
    """Open ``count`` members in ``args.workers`` processes; returns them, connected, seconds."""
    started = time.monotonic()
    workers = []
    per, rest = divmod(count, args.workers)
    for w in range(args.workers):
        n = per + (1 if w < rest else 0)
        if n == 0:
            continue
        spec = {
            "urls": [url],
            "first": first,
            "count": n,
            "room": "idle",
            "rooms": args.rooms,
            "concurrency": args.connect_concurrency,
            "user_prefix": "idle",
            "users": args.users,
        }
        first += n
        workers.append(children.worker(loadgen.subscriber_worker, spec))
    connected = 0
    for _, pipe in workers:
        ready = expect(pipe, "ready", args.connect_timeout)
        connected += ready["connected"]
        if ready["failed"]:
            print(f"  NOTE {ready['failed']} connections failed: {ready['error']}")
    return workers, connected, time.monotonic() - started


def _close(children: Children, workers: list[tuple[Any, Any]]) -> None:
    for _, pipe in workers:
        pipe.send(("close",))
    for proc, pipe in workers:
        if pipe.poll(20):
            pipe.recv()
        children.end_worker(proc)


def _settle(pid: int, seconds: float) -> int:
    """Wait, then the RSS (the last of a few samples, once it stops moving)."""
    deadline = time.monotonic() + seconds
    rss = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        rss = rss_kib(pid)
    return rss


def measure(
    target: str, pid: int, url: str, children: Children, args: argparse.Namespace
) -> MemResult:
    start = rss_kib(pid)
    warm, _, _ = _open(children, url, args.warmup, args, 10_000_000)
    _close(children, warm)
    base = _settle(pid, args.settle)
    workers, connected, seconds = _open(children, url, args.connections, args, 0)
    opened = _settle(pid, args.settle)
    _close(children, workers)
    closed = _settle(pid, args.settle)
    churn = []
    for cycle in range(args.churn):
        workers, _, _ = _open(children, url, args.connections, args, 1_000_000 * (cycle + 1))
        _close(children, workers)
        churn.append(_settle(pid, 1.0))
    return MemResult(
        target, args.connections, connected, round(seconds, 2), start, base, opened, closed, churn
    )


def run_rtgate(children: Children, workdir: Path, args: argparse.Namespace) -> MemResult:
    _, nats_url = loadgen.start_nats(children, workdir)
    gw, url = loadgen.start_gateway(children, workdir, nats_url, "mem-gw1", {}, args.source)
    return measure("rtgate gateway", gw.pid, url, children, args)


def run_bare(children: Children, workdir: Path, args: argparse.Namespace) -> MemResult:
    bare, url = loadgen.start_bare(children, workdir)
    return measure("bare aiohttp", bare.pid, url, children, args)


def print_result(r: MemResult) -> None:
    verdict = ""
    if r.target != "bare aiohttp":
        met = "met" if r.per_connection_kib <= TARGET_KIB else "NOT met"
        verdict = f"  (target <= {TARGET_KIB:.0f} KiB: {met})"
    print(
        f"--- {r.target}: {r.connected}/{r.connections} idle authenticated connections "
        f"(opened in {r.connect_seconds:.1f}s)"
    )
    print(
        f"  RSS             at start {r.rss_start_kib} KiB, after warm-up {r.rss_base_kib} KiB, "
        f"with the connections {r.rss_open_kib} KiB, after closing them {r.rss_closed_kib} KiB"
    )
    print(f"  per connection  {r.per_connection_kib:.1f} KiB{verdict}")
    if r.churn_kib:
        growth = r.churn_kib[-1] - r.rss_closed_kib
        print(
            f"  churn           RSS after each open/close cycle of {r.connections}: "
            f"{', '.join(map(str, r.churn_kib))} KiB ({growth:+d} KiB over the cycles)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument(
        "--rooms",
        type=int,
        default=1,
        help="spread the connections over this many rooms (1: all in one)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=0,
        help="distinct users the connections authenticate as (default 0: one user each)",
    )
    parser.add_argument("--workers", type=int, default=2, help="client worker processes")
    parser.add_argument(
        "--warmup", type=int, default=100, help="connections opened and closed before the baseline"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    parser.add_argument("--churn", type=int, default=3, help="extra open/close cycles")
    parser.add_argument("--only", choices=("rtgate", "bare"))
    parser.add_argument(
        "--rev",
        help="run the gateway from this git commit (exported to a temporary directory) "
        "instead of the working tree",
    )
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit, seconds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()

    targets: list[tuple[str, Callable[[Children, Path, argparse.Namespace], MemResult]]] = [
        ("rtgate", run_rtgate),
        ("bare", run_bare),
    ]
    if args.only:
        targets = [t for t in targets if t[0] == args.only]

    def on_alarm(*_: object) -> None:
        raise TimeoutError(f"benchmark exceeded its {args.timeout:.0f}s limit")

    def on_term(*_: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(args.timeout))
    limit = loadgen.raise_nofile(args.connections * 2 + 1024)
    if limit < args.connections + 256:
        parser.error(f"open-files limit {limit} is too low for {args.connections} connections")
    workdir = Path(tempfile.mkdtemp(prefix="rtgate-memory-"))
    info = loadgen.machine()
    args.source = loadgen.source(args.rev, workdir)
    print(
        f"memory: {args.connections} idle connections in {args.rooms} room(s), "
        f"{args.users or args.connections} user(s); "
        f"{info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"loadavg {info['loadavg']}, rtgate {args.source.label}",
        flush=True,
    )
    results: list[MemResult] = []
    ok = False
    try:
        for _name, run in targets:
            children = Children()
            try:
                result = run(children, workdir, args)
            finally:
                children.stop_all()
            results.append(result)
            print_result(result)
            sys.stdout.flush()
        ok = True
    finally:
        signal.alarm(0)
        if args.keep_logs or not ok:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(results) == 2:
        rt, bare = results
        print(
            f"=== rtgate / bare: {rt.per_connection_kib:.1f} / {bare.per_connection_kib:.1f} KiB "
            f"per connection = {rt.per_connection_kib / bare.per_connection_kib:.2f}x; "
            f"rtgate adds {rt.per_connection_kib - bare.per_connection_kib:.1f} KiB"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "results": [r.as_dict() for r in results]},
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("memory: interrupted; every child process was stopped", file=sys.stderr)
        sys.exit(130)
    except TimeoutError as exc:
        print(f"memory: {exc}", file=sys.stderr)
        sys.exit(1)
