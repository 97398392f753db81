"""What the BGP speaker tells the agent: typed events, one per session or routing change.

`peer` is the neighbor's configured name (bgp.exabgp_config.Neighbor.name); `address` its IP.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from bgp.attributes import PathAttributes


@dataclass(frozen=True)
class PeerUp:
    peer: str
    address: IPv4Address
    gr_time: int | None  # restart time from the peer's OPEN; None when it did not advertise graceful restart
    router_id: IPv4Address | None = None  # its BGP identifier (from its OPEN)


@dataclass(frozen=True)
class PeerDown:
    peer: str
    address: IPv4Address
    reason: str
    graceful: bool  # TCP close / our ExaBGP restart: graceful restart applies. NOTIFICATION (incl. hold timer): not


@dataclass(frozen=True)
class RoutesAnnounced:
    peer: str
    next_hop: IPv4Address
    prefixes: tuple[IPv4Network, ...]
    attrs: PathAttributes | None = PathAttributes()  # the other attributes (None: not understood; not reflected)


@dataclass(frozen=True)
class RoutesWithdrawn:
    peer: str
    prefixes: tuple[IPv4Network, ...]


@dataclass(frozen=True)
class EndOfRib:
    peer: str


@dataclass(frozen=True)
class SpeakerRestarted:
    """Our ExaBGP process was (re)started: every session dropped on our side."""


BgpEvent = PeerUp | PeerDown | RoutesAnnounced | RoutesWithdrawn | EndOfRib | SpeakerRestarted
