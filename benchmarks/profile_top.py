"""Summarise a py-spy speedscope profile: the functions with the most self and total time.

py-spy records only samples in which a thread was running Python code (not waiting in
epoll), so the shares below are shares of the process's busy time. Self time is where
the sample's innermost Python frame was (C code, such as a socket write or the json
encoder, is charged to the Python function that called it); total time counts a function
once per sample it appears anywhere in. ``--group`` adds self time by package.

Run: ``.venv/bin/python benchmarks/profile_top.py gw1.speedscope.json [--top 10]``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

# Where a file belongs, first match wins: a package inside site-packages, the project's
# own packages, the standard library.
_GROUPS = (
    ("site-packages/nats/", "nats-py"),
    ("site-packages/aiohttp/", "aiohttp"),
    ("site-packages/prometheus_client/", "prometheus_client"),
    ("site-packages/structlog/", "structlog"),
    ("site-packages/uvloop/", "uvloop"),
    ("site-packages/msgpack/", "msgpack"),
    ("/gateway/", "gateway"),
    ("/broker/", "broker"),
    ("/json/", "json (stdlib)"),
    ("/asyncio/", "asyncio (stdlib)"),
)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/rtgate-"):
        i = path.find(marker)
        if i >= 0:
            rest = path[i + len(marker) :]
            return rest if marker == "site-packages/" else rest.split("/", 1)[-1]
    i = path.find("/lib/python3")
    return path[i + len("/lib/") :] if i >= 0 else path


def group(path: str) -> str:
    for marker, name in _GROUPS:
        if marker in path:
            return name
    return "other stdlib" if "/lib/python3" in path else "other"


def load(paths: list[Path]) -> tuple[list[list[str]], list[float], dict[str, str]]:
    """Every sample's stack (outermost first) as function names, its weight, and each
    function's file."""
    stacks: list[list[str]] = []
    weights: list[float] = []
    files: dict[str, str] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        names = []
        for frame in doc["shared"]["frames"]:
            file = frame.get("file") or "?"
            name = f"{frame['name']} ({_short(file)})"
            files[name] = file
            names.append(name)
        for profile in doc["profiles"]:
            for sample, weight in zip(profile["samples"], profile["weights"], strict=True):
                stacks.append([names[i] for i in sample])
                weights.append(weight)
    return stacks, weights, files


# What a sample of a gateway was doing, by the first of these functions found anywhere
# in its stack (so the fan-out callback wins over the nats-py task that runs it).
PHASES = (
    ("fan-out of a message from NATS (Hub on_message: parse, encode, queue)", ("on_message",)),
    ("PubAck handling (Publisher._on_reply)", ("Publisher._on_reply",)),
    ("ack to the publisher (Client._on_stored)", ("Client._on_stored",)),
    ("inbound frame (Client.receive: decode, validate, publish)", ("Client.receive",)),
    ("socket writes to clients (Flusher._flush)", ("Flusher._flush", "Writer.flush")),
    ("nats-py flusher task (writes to NATS)", ("Client._flusher",)),
    ("nats-py subscription task, outside the callback", ("Subscription._wait_for_msgs",)),
    ("nats-py read loop and parser", ("Client._read_loop", "Parser.parse")),
    ("aiohttp reading and parsing WebSocket frames", ("data_received", "WebSocketReader")),
    ("aiohttp per-message receive", ("WebSocketResponse.receive", "__anext__")),
)
# Libraries whose cost is spread over every phase: their inclusive share.
SPREAD = ("prometheus_client", "structlog", "json (stdlib)")


def phases(stacks: list[list[str]], weights: list[float], files: dict[str, str]) -> None:
    by_phase: Counter[str] = Counter()
    spread: Counter[str] = Counter()
    total = sum(weights) or 1.0
    for stack, weight in zip(stacks, weights, strict=True):
        names = set(stack)
        for label, markers in PHASES:
            if any(m in name for name in names for m in markers):
                by_phase[label] += weight
                break
        else:
            # The loop's own frame: aiohttp's run_app before, rtgate.cli._run_loop since.
            if stack and stack[-1].startswith(("run_app ", "_run_loop ")):
                by_phase["event loop itself (uvloop, charged to the run loop)"] += weight
            else:
                by_phase["other, or a stack cut short"] += weight
        for package in {group(files[name]) for name in stack} & set(SPREAD):
            spread[package] += weight
    print("\nwhere the time goes, by phase")
    for label, weight in by_phase.most_common():
        print(f"  {100 * weight / total:5.1f}%  {label}")
    print("\nlibraries, inclusive, across all phases")
    for package, weight in spread.most_common():
        print(f"  {100 * weight / total:5.1f}%  {package}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profiles", nargs="+", type=Path, help="py-spy --format speedscope files")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--group", action="store_true", help="self time by package as well")
    parser.add_argument(
        "--phases", action="store_true", help="an rtgate gateway's time by phase of a message"
    )
    args = parser.parse_args()
    stacks, weights, files = load(args.profiles)
    total_weight = sum(weights) or 1.0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, weight in zip(stacks, weights, strict=True):
        if stack:
            own[stack[-1]] += weight
        for name in set(stack):
            inclusive[name] += weight
    print(f"{len(stacks)} samples from {', '.join(p.name for p in args.profiles)}")
    # The entry points (runpy, main, run_app) are in every sample: not worth a row each.
    everywhere = [n for n, w in inclusive.items() if w >= 0.995 * total_weight]
    for name in everywhere:
        del inclusive[name]
    if everywhere:
        print(f"in every sample, left out of the totals: {', '.join(sorted(everywhere))}")
    for title, counts in (("self", own), ("total", inclusive)):
        print(f"\ntop {args.top} by {title} time")
        for name, weight in counts.most_common(args.top):
            print(f"  {100 * weight / total_weight:5.1f}%  {name}")
    if args.group:
        by_group: Counter[str] = Counter()
        for name, weight in own.items():
            by_group[group(files[name])] += weight
        print("\nself time by package")
        for name, weight in by_group.most_common():
            print(f"  {100 * weight / total_weight:5.1f}%  {name}")
    if args.phases:
        phases(stacks, weights, files)


if __name__ == "__main__":
    main()
