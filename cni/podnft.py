"""The pods' nftables table `ip bgp-fabric-pods`: egress NAT (natOutgoing) and hostPorts. Pure.

    table ip bgp-fabric-pods
      set natsrc    pools with natOutgoing (interval)
      set natskip   every pool + the cluster's service ranges (interval)
      map hostport  hostIP . proto . port : podIP . containerPort   (hostIP given)
      map hostport_any       proto . port : podIP . containerPort   (hostIP empty: every node address)
      set hairpin   podIP . podIP of pods with hostPorts
      chain prerouting  nat/dstnat: to a local address -> hostport
      chain output      nat/dstnat: the node's own connections to its addresses (not 127/8) -> hostport
      chain hostport    dnat via the two maps
      chain postrouting nat/srcnat: a pod reaching its own hostPort is masqueraded (hairpin); pod
                        traffic from a natOutgoing pool to anything outside natskip is masqueraded

Rules are fixed; pods only add map/set elements, so a pod's hostPorts are a few `add element` /
`delete element` lines (independent of how many pods there are); a pool or service-range change
rewrites the table in one transaction. Only this table is ever touched: the services table
`inet bgp-fabric` and the policy table belong to others.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cni.spec import PortMapping

FAMILY, TABLE = "ip", "bgp-fabric-pods"

Element = tuple[str, str]  # (set/map name, element text)


@dataclass(frozen=True)
class HostPort:
    pod: ipaddress.IPv4Address
    mapping: PortMapping


@dataclass(frozen=True)
class Desired:
    natsrc: tuple[ipaddress.IPv4Network, ...]
    natskip: tuple[ipaddress.IPv4Network, ...]
    elements: frozenset[Element]


def collapse(nets: Iterable[ipaddress.IPv4Network]) -> tuple[ipaddress.IPv4Network, ...]:
    """Interval sets refuse overlapping elements: merge them."""
    return tuple(ipaddress.collapse_addresses(sorted(set(nets))))


def elements(hostports: Iterable[HostPort]) -> tuple[frozenset[Element], list[str]]:
    """Map/set elements of these hostPorts, and the mappings left out because another pod (the one
    with the lower address) already holds the same host address, protocol and port."""
    keys: dict[tuple[str, str], ipaddress.IPv4Address] = {}
    out: set[Element] = set()
    conflicts: list[str] = []
    for hp in sorted(hostports, key=lambda h: (int(h.pod), h.mapping.host_port, h.mapping.protocol)):
        m = hp.mapping
        name, key = (("hostport_any", f"{m.protocol} . {m.host_port}") if m.host_ip is None
                     else ("hostport", f"{m.host_ip} . {m.protocol} . {m.host_port}"))
        holder = keys.setdefault((name, key), hp.pod)
        if holder != hp.pod:
            conflicts.append(f"hostPort {m.host_ip or '*'}:{m.host_port}/{m.protocol} of pod {hp.pod} is already "
                             f"taken by pod {holder}")
            continue
        out.add((name, f"{key} : {hp.pod} . {m.container_port}"))
        out.add(("hairpin", f"{hp.pod} . {hp.pod}"))
    return frozenset(out), conflicts


def desired(nat_pools: Iterable[ipaddress.IPv4Network], all_pools: Iterable[ipaddress.IPv4Network],
            service_ranges: Iterable[ipaddress.IPv4Network], hostports: Iterable[HostPort]) -> tuple[Desired, list[str]]:
    els, conflicts = elements(hostports)
    return Desired(natsrc=collapse(nat_pools), natskip=collapse([*all_pools, *service_ranges]), elements=els), conflicts


def _set(name: str, typ: str, items: list[str], interval: bool = False) -> str:
    flags = " flags interval;" if interval else ""
    elems = f" elements = {{ {', '.join(items)} }};" if items else ""
    return f"  {name} {{ type {typ};{flags}{elems} }}"


MAPS = {
    "hostport": "map hostport", "hostport_any": "map hostport_any", "hairpin": "set hairpin",
}
TYPES = {
    "hostport": "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service",
    "hostport_any": "inet_proto . inet_service : ipv4_addr . inet_service",
    "hairpin": "ipv4_addr . ipv4_addr",
}


def render_full(d: Desired) -> str:
    """One transaction that replaces our table with exactly `d`."""
    by: dict[str, list[str]] = {k: [] for k in MAPS}
    for name, text in sorted(d.elements):
        by[name].append(text)
    lines = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}", f"table {FAMILY} {TABLE} {{",
             _set("set natsrc", "ipv4_addr", [str(n) for n in d.natsrc], interval=True),
             _set("set natskip", "ipv4_addr", [str(n) for n in d.natskip], interval=True)]
    for name, decl in MAPS.items():
        lines.append(_set(decl, TYPES[name], by[name]))
    lines += [
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        "    fib daddr type local jump hostport",
        "  }",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",  # dstnat: nft names it for prerouting only
        "    ip daddr != 127.0.0.0/8 fib daddr type local jump hostport",
        "  }",
        "  chain hostport {",
        "    dnat ip to ip daddr . meta l4proto . th dport map @hostport",
        "    dnat ip to meta l4proto . th dport map @hostport_any",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        "    ct status dnat ip saddr . ip daddr @hairpin counter masquerade",
        "    ip saddr @natsrc ip daddr != @natskip counter masquerade",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_delta(add: Iterable[Element], delete: Iterable[Element]) -> str:
    """Element changes in one transaction (deletes first); empty when nothing changes."""
    lines: list[str] = []
    for verb, els in (("delete", delete), ("add", add)):
        by: dict[str, list[str]] = {}
        for name, text in sorted(els):
            by.setdefault(name, []).append(text)
        for name, texts in by.items():
            lines.append(f"{verb} element {FAMILY} {TABLE} {name} {{ {', '.join(texts)} }}")
    return "\n".join(lines) + ("\n" if lines else "")
