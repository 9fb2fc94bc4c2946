"""Who may open a WebSocket at all (sans-I/O): origins, client addresses, per-address limits.

Everything here runs before the upgrade, so a refusal is a plain HTTP status
with a JSON body and costs the gateway no WebSocket state.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
from collections.abc import Iterable

from gateway.ratelimit import TokenBucket

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs or plain addresses; raises ValueError naming a bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"not an address or network: {value!r}") from exc
    return tuple(networks)


def _in(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy.

    Behind trusted proxies, ``X-Forwarded-For`` is read from the right and the
    first address that is not itself a trusted proxy is the client: entries to
    its left were written by the client and may be forged.
    """
    if not forwarded_for or not _in(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def origin_allowed(origin: str | None, patterns: tuple[str, ...]) -> bool:
    """Browsers always send Origin on a WebSocket handshake; other clients need not."""
    if origin is None or not patterns:
        return True
    return any(fnmatch.fnmatchcase(origin.lower(), p.lower()) for p in patterns)


@dataclasses.dataclass(slots=True)
class _Address:
    connections: int
    handshakes: TokenBucket
    seen: float


class AddressLimits:
    """Open connections and handshake rate per client address."""

    def __init__(
        self, max_connections: int, handshakes_per_second: float, handshake_burst: int
    ) -> None:
        self._max_connections = max_connections
        self._rate = handshakes_per_second
        self._burst = handshake_burst
        self._addresses: dict[str, _Address] = {}

    def admit(self, address: str, now: float) -> str | None:
        """Record a handshake; the reason it is refused, or None to let it through."""
        entry = self._addresses.get(address)
        if entry is None:
            entry = _Address(0, TokenBucket(self._rate, self._burst, now), now)
            self._addresses[address] = entry
        entry.seen = now
        if self._rate > 0 and not entry.handshakes.take(now):
            return "too many handshakes from this address, slow down"
        if self._max_connections > 0 and entry.connections >= self._max_connections:
            return "too many connections from this address"
        return None

    def opened(self, address: str) -> None:
        entry = self._addresses.get(address)
        if entry is not None:
            entry.connections += 1

    def closed(self, address: str) -> None:
        entry = self._addresses.get(address)
        if entry is not None and entry.connections > 0:
            entry.connections -= 1

    def sweep(self, now: float, idle: float) -> None:
        """Forget addresses with no connections that have been quiet for ``idle`` seconds."""
        stale = [
            a for a, e in self._addresses.items() if e.connections == 0 and now - e.seen >= idle
        ]
        for address in stale:
            del self._addresses[address]

    def connections(self, address: str) -> int:
        entry = self._addresses.get(address)
        return entry.connections if entry is not None else 0

    def __len__(self) -> int:
        return len(self._addresses)
