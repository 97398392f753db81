"""Routes learned from BGP peers, with graceful restart (RFC 4724). Pure: time is always an argument.

- PeerDown(graceful) from a peer that advertised GR time T > 0: its routes turn stale and are kept
  until T has passed or until its End-of-RIB after it is back; then stale routes it did not announce
  again are removed. PeerDown(not graceful), or a peer without GR: its routes are removed at once.
- SpeakerRestarted (our ExaBGP restarted): every peer's routes turn stale, each kept for that peer's
  GR time or until its End-of-RIB; peers without GR lose them at once.
- When a peer with stale routes comes back up, its stale routes get a fresh window of its (new) GR
  time to be refreshed and closed by End-of-RIB: a peer that never sends End-of-RIB can't keep stale
  routes forever.
The agent arms one timer at `next_deadline()` and calls `expire(now)` when it fires: no polling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from bgp.attributes import PathAttributes
from bgp.events import BgpEvent, EndOfRib, PeerDown, PeerUp, RoutesAnnounced, RoutesWithdrawn, SpeakerRestarted
from bgp.reflect import Path


@dataclass
class _Learned:
    next_hop: IPv4Address
    stale: bool = False
    attrs: PathAttributes | None = PathAttributes()


@dataclass
class _PeerRib:
    gr_time: int | None = None  # from the peer's last OPEN
    up: bool = False
    address: IPv4Address | None = None  # from its last PeerUp (route reflection: the path's origin)
    router_id: IPv4Address | None = None
    routes: dict[IPv4Network, _Learned] = field(default_factory=dict)
    deadline: float | None = None  # when stale routes go, if no End-of-RIB came first


class Rib:
    def __init__(self) -> None:
        self._peers: dict[str, _PeerRib] = {}

    def _peer(self, name: str) -> _PeerRib:
        p = self._peers.get(name)
        if p is None:
            p = self._peers[name] = _PeerRib()
        return p

    def apply(self, event: BgpEvent, now: float) -> bool:
        """Fold one event in. Returns whether `routes()` changed."""
        if isinstance(event, RoutesAnnounced):
            p = self._peer(event.peer)
            changed = False
            for prefix in event.prefixes:
                old = p.routes.get(prefix)
                if old is None or old.next_hop != event.next_hop or old.attrs != event.attrs:
                    changed = True
                p.routes[prefix] = _Learned(event.next_hop, attrs=event.attrs)
            return changed
        if isinstance(event, RoutesWithdrawn):
            p = self._peer(event.peer)
            removed = [p.routes.pop(prefix, None) for prefix in event.prefixes]  # all of them: not any()
            return any(r is not None for r in removed)
        if isinstance(event, PeerUp):
            p = self._peer(event.peer)
            p.up, p.gr_time = True, event.gr_time
            # Its routes kept (graceful restart) now come from another address or router ID: every path's
            # origin changed (a reflector's ORIGINATOR_ID), so the whole set moved.
            moved = bool(p.routes) and (p.address, p.router_id) != (event.address, event.router_id)
            p.address, p.router_id = event.address, event.router_id
            if any(r.stale for r in p.routes.values()):
                window = event.gr_time or 0
                if window <= 0:  # it no longer does GR: nothing will close the stale set
                    return self._drop_stale(p) or moved
                p.deadline = now + window
            return moved
        if isinstance(event, PeerDown):
            p = self._peer(event.peer)
            p.up = False
            if event.graceful and p.gr_time:
                return self._mark_stale(p, now)
            p.deadline = None
            changed = bool(p.routes)
            p.routes.clear()
            return changed
        if isinstance(event, EndOfRib):
            p = self._peer(event.peer)
            p.deadline = None
            return self._drop_stale(p)
        if isinstance(event, SpeakerRestarted):
            changed = False
            for p in self._peers.values():
                p.up = False
                if p.gr_time:
                    changed |= self._mark_stale(p, now)
                else:
                    changed |= bool(p.routes)
                    p.routes.clear()
                    p.deadline = None
            return changed
        return False

    @staticmethod
    def _mark_stale(p: _PeerRib, now: float) -> bool:
        for r in p.routes.values():
            r.stale = True
        assert p.gr_time
        p.deadline = now + p.gr_time if p.routes else None
        return False  # stale routes are still routes

    @staticmethod
    def _drop_stale(p: _PeerRib) -> bool:
        stale = [prefix for prefix, r in p.routes.items() if r.stale]
        for prefix in stale:
            del p.routes[prefix]
        p.deadline = None
        return bool(stale)

    def expire(self, now: float) -> bool:
        """Remove stale routes whose graceful-restart window has ended. Returns whether routes changed."""
        changed = False
        for p in self._peers.values():
            if p.deadline is not None and p.deadline <= now:
                changed |= self._drop_stale(p)
        return changed

    def next_deadline(self) -> float | None:
        deadlines = [p.deadline for p in self._peers.values() if p.deadline is not None]
        return min(deadlines) if deadlines else None

    def routes(self) -> dict[IPv4Network, set[tuple[str, IPv4Address]]]:
        """Every learned route (stale ones included): prefix -> {(peer, next hop)}."""
        out: dict[IPv4Network, set[tuple[str, IPv4Address]]] = {}
        for name, p in self._peers.items():
            for prefix, r in p.routes.items():
                out.setdefault(prefix, set()).add((name, r.next_hop))
        return out

    def holders(self, prefix: IPv4Network) -> set[tuple[str, IPv4Address]]:
        """Who holds one prefix (stale included): {(peer, next hop)}. O(peers), for per-change work."""
        return {(name, r.next_hop) for name, p in self._peers.items() if (r := p.routes.get(prefix)) is not None}

    def holders_of(self, prefixes: Iterable[IPv4Network]) -> dict[IPv4Network, set[tuple[str, IPv4Address]]]:
        """holders() of many prefixes at once (those some peer holds): one call for a bulk change."""
        peers = [(name, p.routes) for name, p in self._peers.items()]
        out: dict[IPv4Network, set[tuple[str, IPv4Address]]] = {}
        for prefix in prefixes:
            h = {(name, r.next_hop) for name, routes in peers if (r := routes.get(prefix)) is not None}
            if h:
                out[prefix] = h
        return out

    def prefixes(self) -> list[IPv4Network]:
        """Every prefix some peer holds (stale included)."""
        out: set[IPv4Network] = set()
        for p in self._peers.values():
            out.update(p.routes)
        return list(out)

    def paths(self, prefix: IPv4Network) -> list[Path]:
        """Every learned route to one prefix, attributes included (stale ones too: a reflector keeps
        passing on a restarting client's routes, as it keeps using them). O(peers)."""
        out = []
        for name, p in self._peers.items():
            r = p.routes.get(prefix)
            if r is not None and p.address is not None:
                out.append(Path(name, p.address, p.router_id, r.next_hop, r.attrs))
        return out

    def attrs(self, peer: str, prefixes: Iterable[IPv4Network]) -> dict[IPv4Network, PathAttributes | None]:
        """The path attributes `peer` sent with each of `prefixes` it holds (AS_PATH loop detection)."""
        p = self._peers.get(peer)
        if p is None:
            return {}
        return {prefix: r.attrs for prefix in prefixes if (r := p.routes.get(prefix)) is not None}

    def as_paths(self) -> dict[tuple[str, IPv4Network], tuple]:
        """(peer, prefix) -> AS_PATH, for the routes that have a non-empty one (status, `fabric plan`)."""
        return {(name, prefix): r.attrs.as_path for name, p in self._peers.items() for prefix, r in p.routes.items()
                if r.attrs is not None and r.attrs.as_path}

    def peer_routes(self, peer: str) -> dict[IPv4Network, IPv4Address]:
        p = self._peers.get(peer)
        return {prefix: r.next_hop for prefix, r in p.routes.items()} if p else {}

    def counts(self) -> dict[str, dict[str, int]]:
        """Per peer: routes held and how many of them are stale (for status)."""
        return {name: {"routes": len(p.routes), "stale": sum(r.stale for r in p.routes.values())}
                for name, p in self._peers.items()}

    def forget(self, peer: str) -> bool:
        """The peer is no longer configured: drop it and its routes."""
        p = self._peers.pop(peer, None)
        return bool(p and p.routes)
