"""The learned-route RIB shared by the event loop (BGP events fold in) and the routes stage's worker
(reads it while computing routes): bgp.rib.Rib behind one lock. Reads copy under the lock, so a
reader never sees a half-applied event."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address, IPv4Network

from collections.abc import Iterable

from bgp.attributes import PathAttributes
from bgp.events import BgpEvent
from bgp.reflect import Path
from bgp.rib import Rib


class SharedRib:
    def __init__(self) -> None:
        self._rib = Rib()
        self._lock = threading.Lock()

    def apply(self, event: BgpEvent, now: float) -> bool:
        with self._lock:
            return self._rib.apply(event, now)

    def expire(self, now: float) -> bool:
        with self._lock:
            return self._rib.expire(now)

    def next_deadline(self) -> float | None:
        with self._lock:
            return self._rib.next_deadline()

    def routes(self) -> dict[IPv4Network, set[tuple[str, IPv4Address]]]:
        with self._lock:
            return self._rib.routes()

    def holders(self, prefix: IPv4Network) -> set[tuple[str, IPv4Address]]:
        with self._lock:
            return self._rib.holders(prefix)

    def holders_of(self, prefixes: Iterable[IPv4Network]) -> dict[IPv4Network, set[tuple[str, IPv4Address]]]:
        with self._lock:
            return self._rib.holders_of(prefixes)

    def attrs(self, peer: str, prefixes: Iterable[IPv4Network]) -> dict[IPv4Network, PathAttributes | None]:
        with self._lock:
            return self._rib.attrs(peer, prefixes)

    def as_paths(self) -> dict[tuple[str, IPv4Network], tuple]:
        with self._lock:
            return self._rib.as_paths()

    def paths(self, prefix: IPv4Network) -> list[Path]:
        with self._lock:
            return self._rib.paths(prefix)

    def prefixes(self) -> list[IPv4Network]:
        with self._lock:
            return self._rib.prefixes()

    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return self._rib.counts()

    def forget(self, peer: str) -> bool:
        with self._lock:
            return self._rib.forget(peer)
