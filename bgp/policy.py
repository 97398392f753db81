"""Import filters for learned routes. Pure: prefixes in, (accepted, rejections with reasons) out.
`filter_verdict` is also what an external peer's export filter applies to our announcements.

Mesh peers (other nodes) may only give us pod routes: prefixes inside an enabled pool, never one of
our own pod CIDRs, never a prefix that covers a node address (that would hijack the underlay), never
a default route. External peers: never a prefix this node announces itself (inside its own announced
ranges: the route came back, and the node serves those addresses itself), never a route whose AS_PATH
holds our own ASN (RFC 4271 9.1.2 loop detection, as every router does; `allow_own_asn` N accepts up to
N occurrences, FRR's `allowas-in N`), then the same node checks as mesh routes — no default route,
nothing inside the node's own subnet, nothing covering a node address — unless the peer opts in
(`allow_default` / `allow_node_networks`), then their `PrefixFilter` (allow/deny/maxLength) and
`maxPrefixes`.

maxPrefixes choice: the session is kept; prefixes beyond the limit are rejected (reason
"max-prefixes N exceeded") and the routes already accepted stay. Tearing the session down (what many
routers do) would also drop the good routes and flap; rejecting the excess bounds what we install
while the rejection log tells the operator. New prefixes are taken in address order so a replay of
the same updates accepts the same set.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Protocol

from bgp.attributes import PathAttributes


class Pool(Protocol):
    """What import policy needs of an IP pool (fabric.config.Pool satisfies it)."""

    @property
    def cidr(self) -> IPv4Network: ...
    @property
    def disabled(self) -> bool: ...


class PrefixFilter(Protocol):
    """allow/deny/maxLength of a peer's filter (fabric.config.PrefixFilter satisfies it)."""

    @property
    def allow(self) -> list[IPv4Network]: ...
    @property
    def deny(self) -> list[IPv4Network]: ...
    @property
    def max_length(self) -> int | None: ...


class Reason(str):
    """Why a prefix was refused: the text, plus `code`, a short fixed name of the rule (metrics label,
    status summary). A str, so it reads and compares as the text."""

    code: str

    def __new__(cls, code: str, text: str) -> "Reason":
        r = super().__new__(cls, text)
        r.code = code
        return r


# Every code a rejection can carry (bounded: they label metrics).
REASON_CODES = ("default-route", "covers-node-address", "own-pod-cidr", "outside-pools", "node-subnet",
                "filter-denied", "filter-not-allowed", "filter-max-length", "max-prefixes", "pod-cidr-from-ebgp",
                "next-hop-unusable", "own-prefix", "as-path-loop")


def code_of(reason: str) -> str:
    return getattr(reason, "code", "other")


@dataclass(frozen=True)
class Rejection:
    prefix: IPv4Network
    reason: str  # a Reason (its .code names the rule)

    @property
    def code(self) -> str:
        return code_of(self.reason)


MASK32 = 0xFFFFFFFF


def addr_key(p: IPv4Network) -> tuple[int, int]:
    """Address order as integers (IPv4Network's own ordering, without its costly comparisons)."""
    return int(p.network_address), p.prefixlen


def span(p: IPv4Network) -> tuple[int, int]:
    """The first and last address of `p` as integers: subnet_of / overlaps become two comparisons
    (ipaddress builds a broadcast address object per network for them)."""
    lo = int(p.network_address)
    return lo, lo | (MASK32 >> p.prefixlen)


def spans(nets: Iterable[IPv4Network]) -> tuple[tuple[int, int, IPv4Network], ...]:
    return tuple((*span(n), n) for n in nets)


def _sorted(prefixes: Iterable[IPv4Network]) -> list[IPv4Network]:
    return sorted(set(prefixes), key=addr_key)


def _covered_span(sorted_ints: list[int], lo: int, hi: int) -> IPv4Address | None:
    i = bisect_left(sorted_ints, lo)
    return IPv4Address(sorted_ints[i]) if i < len(sorted_ints) and sorted_ints[i] <= hi else None


def _covered(sorted_ints: list[int], prefix: IPv4Network) -> IPv4Address | None:
    """The lowest address of `sorted_ints` inside `prefix`: one bisect instead of a loop over nodes."""
    return _covered_span(sorted_ints, *span(prefix))


def own_asn_count(attrs: PathAttributes | None, asn: int) -> int:
    """How many times `asn` is in a route's AS_PATH (AS_SET members count too)."""
    if attrs is None:
        return 0
    return sum(1 if x == asn else 0 if isinstance(x, int) else x.count(asn) for x in attrs.as_path)


def _path_text(attrs: PathAttributes) -> str:
    return " ".join(str(x) if isinstance(x, int) else "{" + ",".join(map(str, x)) + "}" for x in attrs.as_path)


def filter_verdict(f: PrefixFilter | None, prefix: IPv4Network) -> str | None:
    """None when a peer's import or export filter passes `prefix`, else why not. Without a filter
    everything passes; an empty allow list allows every prefix (deny and maxLength still apply)."""
    if f is None:
        return None
    return _SpanFilter(f).verdict(*span(prefix), prefix.prefixlen)


class _SpanFilter:
    """A PrefixFilter with its prefixes as integer spans (built once per policy, used per prefix)."""

    __slots__ = ("deny", "allow", "max_length")

    def __init__(self, f: PrefixFilter) -> None:
        self.deny = spans(f.deny)
        self.allow = spans(f.allow)
        self.max_length = f.max_length

    def verdict(self, lo: int, hi: int, plen: int) -> str | None:
        for dlo, dhi, d in self.deny:
            if dlo <= lo and hi <= dhi:
                return Reason("filter-denied", f"denied by {d}")
        if self.allow and not any(alo <= lo and hi <= ahi for alo, ahi, _ in self.allow):
            return Reason("filter-not-allowed", "not inside an allowed prefix")
        if self.max_length is not None and plen > self.max_length:
            return Reason("filter-max-length", f"longer than maxLength {self.max_length}")
        return None


@dataclass(frozen=True)
class MeshImportPolicy:
    pools: tuple[Pool, ...]
    own_pod_cidrs: tuple[IPv4Network, ...]
    node_addresses: tuple[IPv4Address, ...]
    _node_ints: list[int] = field(init=False, repr=False, compare=False)
    _own: tuple = field(init=False, repr=False, compare=False)
    _pools: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_node_ints", sorted({int(a) for a in self.node_addresses}))
        object.__setattr__(self, "_own", spans(self.own_pod_cidrs))
        object.__setattr__(self, "_pools", spans(p.cidr for p in self.pools if not p.disabled))

    def check(self, prefix: IPv4Network) -> str | None:
        """None when accepted, else why not."""
        plen = prefix.prefixlen
        if plen == 0:
            return Reason("default-route", "default route")
        lo = int(prefix.network_address)
        hi = lo | (MASK32 >> plen)
        addr = _covered_span(self._node_ints, lo, hi)
        if addr is not None:
            return Reason("covers-node-address", f"covers node address {addr}")
        for olo, ohi, own in self._own:
            if lo <= ohi and olo <= hi:
                return Reason("own-pod-cidr", f"overlaps this node's pod CIDR {own}")
        for plo, phi, _ in self._pools:
            if plo <= lo and hi <= phi:
                return None
        return Reason("outside-pools", "not inside an enabled IP pool")

    def filter(self, prefixes: Iterable[IPv4Network]) -> tuple[list[IPv4Network], list[Rejection]]:
        accepted: list[IPv4Network] = []
        rejected: list[Rejection] = []
        for p in _sorted(prefixes):
            why = self.check(p)
            if why is None:
                accepted.append(p)
            else:
                rejected.append(Rejection(p, why))
        return accepted, rejected


@dataclass(frozen=True)
class ExternalImportPolicy:
    prefix_filter: PrefixFilter | None
    max_prefixes: int | None = None
    node_addresses: tuple[IPv4Address, ...] = ()
    node_networks: tuple[IPv4Network, ...] = ()  # this node's own subnet(s)
    allow_default: bool = False
    allow_node_networks: bool = False
    own_asn: int | None = None  # ours: a route with it in its AS_PATH came back (a loop)
    allow_own_asn: int = 0  # ... unless it is there at most this many times (FRR's allowas-in)
    own_prefixes: tuple[IPv4Network, ...] = ()  # what this node announces itself: never taken back
    _node_ints: list[int] = field(init=False, repr=False, compare=False)
    _own: tuple = field(init=False, repr=False, compare=False)
    _nets: tuple = field(init=False, repr=False, compare=False)
    _filter: "_SpanFilter | None" = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_node_ints", sorted({int(a) for a in self.node_addresses}))
        object.__setattr__(self, "_own", spans(self.own_prefixes))
        object.__setattr__(self, "_nets", spans(self.node_networks))
        object.__setattr__(self, "_filter", _SpanFilter(self.prefix_filter) if self.prefix_filter is not None else None)

    def check(self, prefix: IPv4Network, attrs: PathAttributes | None = None) -> str | None:
        """None when accepted, else why not. `attrs`: the route's path attributes (its AS_PATH)."""
        return self._check(prefix, self._loop(attrs))

    def _loop(self, attrs: PathAttributes | None) -> str | None:
        """Why a route with these attributes is refused whatever its prefix (an AS_PATH loop), or None."""
        if self.own_asn is not None and attrs is not None:
            n = own_asn_count(attrs, self.own_asn)
            if n > self.allow_own_asn:
                more = f" {n} times" if n > 1 else ""
                return Reason("as-path-loop", f"AS_PATH {_path_text(attrs)} holds our AS {self.own_asn}{more}: a loop "
                                              f"(RFC 4271 9.1.2; set import.allowOwnAsn to accept)")
        return None

    def _check(self, prefix: IPv4Network, loop: str | None) -> str | None:
        plen = prefix.prefixlen
        lo = int(prefix.network_address)
        hi = lo | (MASK32 >> plen)
        for olo, ohi, own in self._own:
            if olo <= lo and hi <= ohi:
                return Reason("own-prefix", f"inside {own}, which this node announces itself (never taken back)")
        if loop is not None:
            return loop
        if plen == 0 and not self.allow_default:
            return Reason("default-route", "default route (the node's own default route comes first; set "
                                           "import.allowDefaultRoute to install it behind the node's own)")
        if not self.allow_node_networks and plen > 0:
            for nlo, nhi, net in self._nets:
                if nlo <= lo and hi <= nhi:
                    return Reason("node-subnet", f"inside the node's own subnet {net} (set import.allowNodeNetworks "
                                                 "to accept it)")
            addr = _covered_span(self._node_ints, lo, hi)
            if addr is not None:
                return Reason("covers-node-address", f"covers node address {addr} (set import.allowNodeNetworks "
                                                     "to accept it)")
        return self._filter.verdict(lo, hi, plen) if self._filter is not None else None

    def filter(self, prefixes: Iterable[IPv4Network], held: Iterable[IPv4Network] = (),
               attrs: Mapping[IPv4Network, PathAttributes | None] | None = None
               ) -> tuple[list[IPv4Network], list[Rejection]]:
        """`held`: prefixes already accepted from this peer (they count against maxPrefixes); `attrs`:
        each prefix's path attributes as learned (absent: none known)."""
        held_set = set(held)
        count = len(held_set)
        accepted: list[IPv4Network] = []
        rejected: list[Rejection] = []
        loops: dict[int, str | None] = {id(None): None}  # by id(attrs): one verdict per UPDATE's attributes
        for p in _sorted(prefixes):
            a = attrs.get(p) if attrs else None
            k = id(a)
            if k in loops:
                loop = loops[k]
            else:
                loop = loops[k] = self._loop(a)
            why = self._check(p, loop)
            if why is None and p not in held_set and self.max_prefixes is not None and count >= self.max_prefixes:
                why = Reason("max-prefixes", f"max-prefixes {self.max_prefixes} exceeded")
            if why is None:
                accepted.append(p)
                if p not in held_set:
                    held_set.add(p)
                    count += 1
            else:
                rejected.append(Rejection(p, why))
        return accepted, rejected


class RejectionLog:
    """Remembers which (peer, prefix, reason) were already reported, so each is logged once."""

    def __init__(self, limit: int = 100_000) -> None:
        self._seen: set[tuple[str, IPv4Network, str]] = set()
        self._limit = limit

    def new(self, peer: str, rejections: Iterable[Rejection]) -> list[Rejection]:
        """The rejections not reported before (and records them)."""
        fresh: list[Rejection] = []
        for r in rejections:
            key = (peer, r.prefix, r.reason)
            if key in self._seen:
                continue
            if len(self._seen) >= self._limit:  # bounded memory: start over rather than grow forever
                self._seen.clear()
            self._seen.add(key)
            fresh.append(r)
        return fresh

    def forget_peer(self, peer: str) -> None:
        self._seen = {k for k in self._seen if k[0] != peer}
