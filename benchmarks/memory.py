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
import time
from pathlib import Path
from typing import Any

import loadgen
from loadgen import Children, Worker, rss_kib

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
) -> tuple[list[Worker], int, float]:
    """Open ``count`` members in ``args.workers`` processes; returns them, connected, seconds."""
    started = time.monotonic()
    spec = {
        "urls": [url],
        "first": first,
        "room": "idle",
        "rooms": args.rooms,
        "concurrency": args.connect_concurrency,
        "user_prefix": "idle",
        "users": args.users,
    }
    workers, connected, notes = loadgen.start_members(
        children, spec, count, args.workers, args.connect_timeout
    )
    for note in notes:
        print(f"  NOTE {note}")
    return workers, connected, time.monotonic() - started


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
    loadgen.end_workers(children, warm)
    base = _settle(pid, args.settle)
    workers, connected, seconds = _open(children, url, args.connections, args, 0)
    opened = _settle(pid, args.settle)
    loadgen.end_workers(children, workers)
    closed = _settle(pid, args.settle)
    churn = []
    for cycle in range(args.churn):
        workers, _, _ = _open(children, url, args.connections, args, 1_000_000 * (cycle + 1))
        loadgen.end_workers(children, workers)
        churn.append(_settle(pid, 1.0))
    return MemResult(
        target, args.connections, connected, round(seconds, 2), start, base, opened, closed, churn
    )


def run_rtgate(children: Children, workdir: Path, args: argparse.Namespace) -> MemResult:
    nats = children.start_nats(workdir)
    gw, url = loadgen.start_gateway(children, workdir, nats.url, "mem-gw1", {}, args.source)
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
    add = parser.add_argument
    add("--connections", type=int, default=2000)
    add("--rooms", type=int, default=1, help="spread them over this many rooms (1: all in one)")
    add("--users", type=int, default=0, help="distinct users (default 0: one per connection)")
    add("--warmup", type=int, default=100, help="connections opened and closed before the baseline")
    add("--settle", type=float, default=2.0, help="seconds before reading RSS")
    add("--churn", type=int, default=3, help="extra open/close cycles")
    loadgen.add_common_arguments(parser)
    args = parser.parse_args()
    describe = (
        f"{args.connections} idle connections in {args.rooms} room(s), "
        f"{args.users or args.connections} user(s)"
    )
    results = loadgen.run_benchmark(
        "memory",
        args,
        describe,
        args.connections * 2 + 1024,
        args.timeout or 300.0,
        {"rtgate": run_rtgate, "bare": run_bare},
        print_result,
    )
    if len(results) == 2:
        rt, bare = results
        print(
            f"=== rtgate / bare: {rt.per_connection_kib:.1f} / {bare.per_connection_kib:.1f} KiB "
            f"per connection = {rt.per_connection_kib / bare.per_connection_kib:.2f}x; "
            f"rtgate adds {rt.per_connection_kib - bare.per_connection_kib:.1f} KiB"
        )
    loadgen.write_json(args.json, {"args": vars(args), "results": [r.as_dict() for r in results]})


if __name__ == "__main__":
    loadgen.entry("memory", main)
