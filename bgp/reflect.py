"""Route reflection (RFC 4456), pure: which learned route a reflector passes on, to whom, with what.

A reflector has a cluster ID; its iBGP neighbors are clients or non-clients. Per prefix it picks one
best path among the iBGP paths it learned (eBGP-learned routes are not reflected: each node peers with
its ToR itself) and reflects it:
- learned from a client: to every other iBGP neighbor, clients and non-clients;
- learned from a non-client: to the clients only.
The reflected route keeps its next hop and every attribute, gets ORIGINATOR_ID (when absent: the BGP
identifier of the neighbor it came from) and our cluster ID in front of its CLUSTER_LIST.
Loop prevention on the way in: a route whose CLUSTER_LIST holds our cluster ID, or whose ORIGINATOR_ID
is our own router ID, came back to us and is dropped (neither reflected nor used).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Mapping

from bgp.announce import Announcement
from bgp.attributes import ORIGINS, PathAttributes

DEFAULT_LOCAL_PREF = 100


@dataclass(frozen=True)
class Reflector:
    cluster_id: IPv4Address
    router_id: IPv4Address
    clients: frozenset[str]  # neighbor names that are our route-reflector clients
    non_clients: frozenset[str]  # other iBGP neighbors (other reflectors, of our cluster or not)

    @property
    def ibgp(self) -> frozenset[str]:
        return self.clients | self.non_clients


@dataclass(frozen=True)
class Path:
    """One learned route to a prefix."""

    peer: str  # neighbor name
    peer_address: IPv4Address
    peer_router_id: IPv4Address | None  # its BGP identifier (from its OPEN); None: unknown
    next_hop: IPv4Address
    attrs: PathAttributes | None  # None: attributes we could not read (such a path is never reflected)


def looped(attrs: PathAttributes, cluster_id: IPv4Address | None, router_id: IPv4Address) -> str | None:
    """Why a received route must be dropped (RFC 4456 8), or None."""
    if cluster_id is not None and cluster_id in attrs.cluster_list:
        return f"its CLUSTER_LIST holds our cluster ID {cluster_id}"
    if attrs.originator_id == router_id:
        return f"its ORIGINATOR_ID is our router ID {router_id}"
    return None


def _rank(p: Path) -> tuple:
    """Smaller is better: RFC 4271 9.1.2.2 (local pref, AS path, origin, MED: one AS, all iBGP here),
    then RFC 4456 9 (shorter CLUSTER_LIST, ORIGINATOR_ID as the router ID), then the peer's address."""
    a = p.attrs
    assert a is not None
    router_id = a.originator_id or p.peer_router_id or p.peer_address
    return (-(a.local_pref if a.local_pref is not None else DEFAULT_LOCAL_PREF), a.as_path_length,
            ORIGINS.index(a.origin), a.med or 0, len(a.cluster_list), int(router_id), int(p.peer_address))


def best(paths: Iterable[Path]) -> Path | None:
    return min(paths, key=_rank, default=None)


def reflect(r: Reflector, prefix: IPv4Network, paths: Iterable[Path]) -> Announcement | None:
    """What we announce for `prefix` as a reflector (None: nothing). `paths`: every route learned for it."""
    usable = [p for p in paths if p.peer in r.ibgp and p.attrs is not None
              and looped(p.attrs, r.cluster_id, r.router_id) is None]
    b = best(usable)
    if b is None:
        return None
    targets = (r.ibgp if b.peer in r.clients else r.clients) - {b.peer}
    if not targets:
        return None
    assert b.attrs is not None
    attrs = replace(b.attrs, originator_id=b.attrs.originator_id or b.peer_router_id or b.peer_address,
                    cluster_list=(r.cluster_id, *b.attrs.cluster_list))
    return Announcement(prefix, b.next_hop, neighbors=frozenset(targets), path=attrs)


def reflect_all(r: Reflector, learned: Mapping[IPv4Network, Iterable[Path]]) -> dict[IPv4Network, Announcement]:
    out: dict[IPv4Network, Announcement] = {}
    for prefix, paths in learned.items():
        a = reflect(r, prefix, paths)
        if a is not None:
            out[prefix] = a
    return out
