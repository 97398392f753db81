"""What we announce, and the ExaBGP commands that move from one announced set to another. Pure.

Commands are grouped: every prefix with the same attributes and the same target neighbors goes in
bulk `announce attributes ... nlri P1 P2 ...` lines (CHUNK prefixes each), withdraws likewise
(`withdraw attributes nlri ...`). A neighbor subset is written as ExaBGP's selector
`neighbor A , neighbor B <command>`; no selector means every configured neighbor.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Literal, Mapping

from bgp.attributes import PathAttributes

CHUNK = 500


@dataclass(frozen=True)
class Announcement:
    prefix: IPv4Network
    next_hop: IPv4Address | Literal["self"]
    communities: tuple[str, ...] = ()  # "ASN:VALUE" (standard) or "A:B:C" (large)
    local_pref: int | None = None
    med: int | None = None
    neighbors: frozenset[str] | None = None  # None: every neighbor
    path: PathAttributes | None = None  # a reflected route's attributes, passed on whole (bgp.reflect)

    def attributes(self) -> str:
        parts = [f"next-hop {self.next_hop}"]
        if self.path is not None:
            return " ".join(parts + self.path.words())
        std = [c for c in self.communities if c.count(":") == 1]
        large = [c for c in self.communities if c.count(":") == 2]
        if std:
            parts.append(f"community [ {' '.join(std)} ]")
        if large:
            parts.append(f"large-community [ {' '.join(large)} ]")
        if self.local_pref is not None:
            parts.append(f"local-preference {self.local_pref}")
        if self.med is not None:
            parts.append(f"med {self.med}")
        return " ".join(parts)


def _targets(a: Announcement, names: frozenset[str]) -> frozenset[str]:
    return names if a.neighbors is None else a.neighbors & names


def _selector(targets: frozenset[str], all_names: frozenset[str] | None, addresses: Mapping[str, IPv4Address]
              ) -> str:
    if targets == all_names:
        return ""
    addrs = sorted(addresses[t] for t in targets)
    return " , ".join(f"neighbor {a}" for a in addrs) + " "


def _emit(groups: dict[tuple[str, str], list[IPv4Network]], verb: str) -> list[str]:
    out: list[str] = []
    for (selector, attrs), prefixes in sorted(groups.items()):
        prefixes.sort(key=lambda p: (p.network_address, p.prefixlen))
        for i in range(0, len(prefixes), CHUNK):
            nlri = " ".join(str(p) for p in prefixes[i:i + CHUNK])
            middle = f"{attrs} " if attrs else ""
            out.append(f"{selector}{verb} attributes {middle}nlri {nlri}")
    return out


def diff_commands(old: Mapping[IPv4Network, Announcement], new: Mapping[IPv4Network, Announcement],
                  addresses: Mapping[str, IPv4Address], only: frozenset[str] | None = None) -> list[str]:
    """Commands taking ExaBGP from announcing `old` to announcing `new`: withdraws first, then announces.

    `addresses`: configured neighbor name -> address. `only`: restrict to these neighbors (used to
    replay the whole set to one neighbor that just came up: diff_commands({}, desired, ..., only={X})).
    """
    names = frozenset(addresses) if only is None else frozenset(addresses) & only
    all_names = frozenset(addresses) if only is None else None  # a replay always names its neighbors
    withdraw: dict[tuple[str, str], list[IPv4Network]] = {}
    announce: dict[tuple[str, str], list[IPv4Network]] = {}
    for prefix in old.keys() | new.keys():
        a_old, a_new = old.get(prefix), new.get(prefix)
        if a_old == a_new:  # the common case on a periodic sync: nothing to say
            continue
        t_old = _targets(a_old, names) if a_old else frozenset()
        t_new = _targets(a_new, names) if a_new else frozenset()
        gone = t_old - t_new
        if gone:
            withdraw.setdefault((_selector(gone, all_names, addresses), ""), []).append(prefix)
        if a_new is None or not t_new:
            continue
        send = t_new if (a_old is None or a_old.attributes() != a_new.attributes()) else t_new - t_old
        if send:
            announce.setdefault((_selector(send, all_names, addresses), a_new.attributes()), []).append(prefix)
    return _emit(withdraw, "withdraw") + _emit(announce, "announce")
