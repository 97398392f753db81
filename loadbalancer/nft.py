"""The nftables side of the proxy, as text for `nft -f -`. Pure: renders, never runs nft.

One table, `inet bgp-fabric`. Rules are fixed; services only add elements to named sets, so a
change to one service is a few `add element` / `delete element` lines (cost independent of the
number of services), and a full sync replaces the whole table in one transaction.

- input (filter, before IPVS at LOCAL_IN): a LoadBalancer VIP:port with loadBalancerSourceRanges
  accepts only sources inside them (and this node's own addresses); others are dropped.
- postrouting (nat, after IPVS has DNAT'ed to a real server):
  - hairpin: a pod reaching its own service and being picked itself is masqueraded, so the reply
    comes back through IPVS instead of going straight back to itself;
  - masq: NodePort / ExternalIP / LB virtual servers with externalTrafficPolicy Cluster are
    masqueraded so replies from a backend on another node return through this node. ETP Local
    virtual servers are not in the set: the backend sees the client's own address;
  - cluster: ClusterIP traffic is masqueraded when it comes from outside the cluster CIDRs (or from
    the node itself, or always with masqueradeAll), as kube-proxy does.
nft can't look `ct original proto-dst` up in a set (its type depends on the protocol), so the
decision is taken before IPVS rewrites the destination: prerouting/output chains set mark bit
0x4000 on packets to those virtual servers, and postrouting masquerades marked packets.
"""

from __future__ import annotations

from collections.abc import Iterable

from loadbalancer.types import NftElement

TABLE = "bgp-fabric"
MASQ_MARK = 0x4000  # the bit kube-proxy uses for "masquerade this"; outside Calico's 0xffff0000
FAMILY = "inet"

SET_TYPES = {
    "cluster": "ipv4_addr . inet_proto . inet_service",
    "masq": "ipv4_addr . inet_proto . inet_service",
    "hairpin": "ipv4_addr . inet_proto . inet_service . ipv4_addr",
    "lbranges": "ipv4_addr . inet_proto . inet_service",
    "lballow": "ipv4_addr . inet_proto . inet_service . ipv4_addr",
}
INTERVAL_SETS = {"lballow"}


def element_text(el: NftElement) -> str:
    _, values = el
    return " . ".join(v.lower() if isinstance(v, str) and v in ("TCP", "UDP", "SCTP") else str(v) for v in values)


def _by_set(elements: Iterable[NftElement]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in SET_TYPES}
    for el in elements:
        out[el[0]].append(element_text(el))
    for v in out.values():
        v.sort()
    return out


def render_full(elements: Iterable[NftElement], *, cluster_cidrs: Iterable[str] = (), node_addresses: Iterable[str] = (),
                masquerade_all: bool = False) -> str:
    """One transaction that replaces our table with exactly these rules and elements."""
    sets = _by_set(elements)
    cidrs = sorted(cluster_cidrs)
    nodes = sorted(node_addresses)
    lines = [f"table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}", f"table {FAMILY} {TABLE} {{"]
    for name, typ in SET_TYPES.items():
        flags = " flags interval;" if name in INTERVAL_SETS else ""
        elems = f" elements = {{ {', '.join(sets[name])} }};" if sets[name] else ""
        lines.append(f"  set {name} {{ type {typ};{flags}{elems} }}")
    lines.append("  set clustercidrs { type ipv4_addr; flags interval;"
                 + (f" elements = {{ {', '.join(cidrs)} }};" if cidrs else "") + " }")
    lines.append("  set nodeaddrs { type ipv4_addr;" + (f" elements = {{ {', '.join(nodes)} }};" if nodes else "") + " }")
    vs = "ip daddr . meta l4proto . th dport"
    mark = f"meta mark set meta mark | {MASQ_MARK:#x}"
    lines += [
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f"    {vs} @lbranges ip saddr != @nodeaddrs {vs} . ip saddr != @lballow counter drop",
        "  }",
        # Before IPVS rewrites the destination, remember (packet mark) which connections to masquerade.
        "  chain mark-in {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f"    {vs} @masq {mark}",
    ]
    if masquerade_all:
        lines.append(f"    {vs} @cluster {mark}")
    elif cidrs:
        lines.append(f"    {vs} @cluster ip saddr != @clustercidrs {mark}")
    lines += [
        "  }",
        "  chain mark-out {",  # connections the node itself opens to a service
        "    type filter hook output priority mangle; policy accept;",
        f"    {vs} @masq {mark}",
        f"    {vs} @cluster {mark}",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        "    ip daddr . meta l4proto . th dport . ip saddr @hairpin counter masquerade",
        f"    meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} meta mark set meta mark & {0xFFFFFFFF ^ MASQ_MARK:#x} counter masquerade",
    ]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def render_delta(add: Iterable[NftElement], delete: Iterable[NftElement]) -> str:
    """Element changes for one transaction (deletes first). Empty string when nothing changes."""
    lines: list[str] = []
    for verb, els in (("delete", delete), ("add", add)):
        for name, texts in _by_set(els).items():
            if texts:
                lines.append(f"{verb} element {FAMILY} {TABLE} {name} {{ {', '.join(texts)} }}")
    return "\n".join(lines) + ("\n" if lines else "")


def rule_count(table_text: str) -> int:
    """Rules in a rendered table: the lines inside chains other than their `type ... hook` line."""
    n, in_chain = 0, False
    for line in table_text.splitlines():
        t = line.strip()
        if t.startswith("chain "):
            in_chain = True
        elif t == "}":
            in_chain = False
        elif in_chain and t and not t.startswith("type "):
            n += 1
    return n
