"""BGP path attributes as we keep them: read from ExaBGP's JSON, written back as ExaBGP's command words. Pure.

Kept (what a route reflector passes on unchanged, RFC 4456): ORIGIN, AS_PATH (sequences and sets),
MED, LOCAL_PREF, communities (standard and large), ATOMIC_AGGREGATE, ORIGINATOR_ID and CLUSTER_LIST.
Other attributes (extended communities, AGGREGATOR, unknown optional ones) are not carried.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

ORIGINS = ("igp", "egp", "incomplete")  # preference order (RFC 4271 9.1.2.2 c)


@dataclass(frozen=True)
class PathAttributes:
    origin: str = "igp"
    as_path: tuple[int | tuple[int, ...], ...] = ()  # an ASN, or a tuple of ASNs for an AS_SET
    med: int | None = None
    local_pref: int | None = None
    communities: tuple[str, ...] = ()  # "ASN:VALUE" (standard) or "A:B:C" (large)
    atomic_aggregate: bool = False
    originator_id: IPv4Address | None = None
    cluster_list: tuple[IPv4Address, ...] = ()

    @property
    def as_path_length(self) -> int:
        """RFC 4271 9.1.2.2 a: an AS_SET counts as one, whatever its size."""
        return len(self.as_path)

    def words(self) -> list[str]:
        """ExaBGP's `announce attributes` words for these attributes (next hop and NLRI not included)."""
        out = [f"origin {self.origin}"]
        if self.as_path:
            parts = [f"( {' '.join(str(a) for a in x)} )" if isinstance(x, tuple) else str(x) for x in self.as_path]
            out.append(f"as-path [ {' '.join(parts)} ]")
        if self.med is not None:
            out.append(f"med {self.med}")
        if self.local_pref is not None:
            out.append(f"local-preference {self.local_pref}")
        std = [c for c in self.communities if c.count(":") == 1]
        large = [c for c in self.communities if c.count(":") == 2]
        if std:
            out.append(f"community [ {' '.join(std)} ]")
        if large:
            out.append(f"large-community [ {' '.join(large)} ]")
        if self.atomic_aggregate:
            out.append("atomic-aggregate")
        if self.originator_id is not None:
            out.append(f"originator-id {self.originator_id}")
        if self.cluster_list:
            out.append(f"cluster-list [ {' '.join(str(c) for c in self.cluster_list)} ]")
        return out


def _as_path(value: Any) -> tuple[int | tuple[int, ...], ...]:
    """ExaBGP 5: {"0": {"element": "as-sequence", "value": [65000]}, ...} (confederation segments skipped:
    RFC 5065 leaves them out of the path length and they never leave a confederation)."""
    if isinstance(value, list):  # older encoders: a plain list of ASNs
        return tuple(int(a) for a in value)
    out: list[int | tuple[int, ...]] = []
    for _, seg in sorted(value.items(), key=lambda kv: int(kv[0])):
        kind, asns = seg["element"], [int(a) for a in seg["value"]]
        if kind == "as-sequence":
            out.extend(asns)
        elif kind == "as-set":
            out.append(tuple(asns))
    return tuple(out)


def from_exabgp(attrs: dict[str, Any]) -> PathAttributes:
    """The `attribute` object of an ExaBGP JSON update. Raises KeyError/ValueError/TypeError on a shape
    we don't understand (the caller reports the message, it never takes the speaker down)."""
    origin = str(attrs.get("origin", "igp")).lower()
    if origin not in ORIGINS:
        raise ValueError(f"origin {origin!r}")
    comms = [f"{int(a)}:{int(b)}" for a, b in attrs.get("community", [])]
    comms += [f"{int(a)}:{int(b)}:{int(c)}" for a, b, c in attrs.get("large-community", [])]
    med, lp = attrs.get("med"), attrs.get("local-preference")
    oid = attrs.get("originator-id")
    return PathAttributes(
        origin=origin,
        as_path=_as_path(attrs.get("as-path", {})),
        med=int(med) if med is not None else None,
        local_pref=int(lp) if lp is not None else None,
        communities=tuple(comms),
        atomic_aggregate=bool(attrs.get("atomic-aggregate", False)),
        originator_id=IPv4Address(oid) if oid is not None else None,
        cluster_list=tuple(IPv4Address(c) for c in attrs.get("cluster-list", [])),
    )
