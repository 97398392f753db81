"""The policy table as `nft -f` text: a full replacement, or a delta. Pure: renders, never runs nft.

Table `inet bgp-fabric-policy` (ours alone; `inet bgp-fabric` is the service proxy's). Base chains, all
`policy accept`, so a packet no map entry isolates passes untouched:

- egress-forward / ingress-forward (forward): pod to pod, pod to elsewhere, elsewhere to pod;
- egress-output / ingress-output (output): what IPVS forwards after rewriting a service address to a
  backend (IPVS sends NAT'ed packets through LOCAL_OUT, not forward), so service traffic is judged on the
  backend. ingress-output first accepts what this node itself sends (`fib saddr type local`: kubelet
  probes, the agent, hostNetwork pods);
- egress-input (input, priority 200: after IPVS took service traffic at LOCAL_IN): a pod talking to the
  node's own addresses.

Each base chain accepts replies (`ct direction reply`) and related packets (ICMP errors) of connections
whose first packet passed; every other packet is judged, so a connection a change now denies stops at
its next packet, and one that stays allowed never notices a change. An `accept` ends only its own base
chain: egress and ingress are separate base chains, and a packet must pass both. The node's own traffic
(BGP, API server, health) never matches: no node address is in a map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fabric.policy.delta import Plan
from fabric.policy.state import MAPS, JumpRule, PolicyState, Rule

TABLE = "bgp-fabric-policy"
FAMILY = "inet"
INPUT_PRIORITY = 200  # after IPVS at LOCAL_IN (priority 98/99), which steals service traffic first
IP_TYPE = "ipv4_addr"
PORT_TYPE = "ipv4_addr . inet_proto . inet_service"
_SAFE = re.compile(r"[^A-Za-z0-9./_\[\] -]")

BASE_CHAINS = (
    ("egress-forward", "forward", "filter", "saddr", "egress", False),
    ("ingress-forward", "forward", "filter", "daddr", "ingress", False),
    ("egress-output", "output", "filter", "saddr", "egress", False),
    ("ingress-output", "output", "filter", "daddr", "ingress", True),
    ("egress-input", "input", str(INPUT_PRIORITY), "saddr", "egress", False),
)


def comment(text: str) -> str:
    return '"' + _SAFE.sub("_", text)[:120] + '"'


def set_type(name: str) -> str:
    return PORT_TYPE if name.startswith("port-") else IP_TYPE


def element(e: object) -> str:
    if isinstance(e, tuple):
        ip, proto, port = e
        return f"{ip} . {str(proto).lower()} . {port}"
    return str(e)


def map_element(ip: str, chain: str) -> str:
    return f"{ip} : jump {chain}"


def rule_text(r: Rule, direction: str) -> str:
    if isinstance(r, JumpRule):
        addr = "daddr" if direction == "ingress" else "saddr"
        return f"ip {addr} @{r.target_set} jump {r.chain}"
    peer = "saddr" if direction == "ingress" else "daddr"
    parts: list[str] = []
    if r.peer_set is not None:
        parts.append(f"ip {peer} @{r.peer_set}")
    if r.cidr is not None:
        parts.append(f"ip {peer} {r.cidr}")
        if r.excepts:
            parts.append(f"ip {peer} != {{ {', '.join(map(str, r.excepts))} }}")
    if r.protocol is not None:
        parts.append(f"meta l4proto {r.protocol.lower()}")
        if r.ranges:
            ports = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in r.ranges)
            parts.append(f"th dport {{ {ports} }}")
    if r.named is not None:
        parts.append(f"ip daddr . meta l4proto . th dport @{r.named}")
    key, d, i = r.origin
    parts.append(f"accept comment {comment(f'{key} {d}[{i}]')}")
    return " ".join(parts)


def chain_direction(name: str) -> str:
    return "ingress" if name.startswith(("ns-in-", "pol-in-")) else "egress"


def chain_rules(name: str, rules: Iterable[Rule]) -> list[str]:
    d = chain_direction(name)
    lines = [rule_text(r, d) for r in rules]
    if name.startswith("ns-"):
        lines.append("drop")  # isolated, and no policy of the namespace allowed it
    return lines


def _elements(elems: Iterable[object]) -> str:
    return ", ".join(sorted(element(e) for e in elems))


def _map_elements(m: dict[str, str]) -> str:
    return ", ".join(map_element(ip, c) for ip, c in sorted(m.items()))


def _chain_order(names: Iterable[str]) -> list[str]:
    """Policy chains before the namespace chains that jump to them."""
    return sorted(names, key=lambda n: (not n.startswith("pol-"), n))


def render_full(state: PolicyState) -> str:
    """One transaction that replaces our table with exactly the desired state."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"table {t}", f"delete table {t}", f"table {t} {{"]
    for name in sorted(state.sets):
        elems = state.sets[name]
        lines.append(f"  set {name} {{ type {set_type(name)};" + (f" elements = {{ {_elements(elems)} }};" if elems else "") + " }")
    for name in _chain_order(state.chains):
        lines.append(f"  chain {name} {{")
        lines += [f"    {r}" for r in chain_rules(name, state.chains[name])]
        lines.append("  }")
    for d, mname in MAPS.items():
        m = state.maps[d]
        lines.append(f"  map {mname} {{ type {IP_TYPE} : verdict;" + (f" elements = {{ {_map_elements(m)} }};" if m else "") + " }")
    for name, hook, prio, addr, d, from_node in BASE_CHAINS:
        lines += [f"  chain {name} {{", f"    type filter hook {hook} priority {prio}; policy accept;",
                  "    ct direction reply accept", "    ct state related accept"]
        if from_node:
            lines.append("    fib saddr type local accept")
        lines += [f"    ip {addr} vmap @{MAPS[d]}", "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_delta(plan: Plan) -> str:
    """One incremental transaction. Order: new sets and (empty) chains; set elements; chain rewrites
    (policy chains before the namespace chains that jump to them); map elements (their namespace
    chains exist by now); then chains that went (flushed first, jumpers before targets) and last the
    sets that went (no rule refers to them any more)."""
    t = f"{FAMILY} {TABLE}"
    out: list[str] = []
    for name in sorted(plan.new_sets):
        out.append(f"add set {t} {name} {{ type {set_type(name)}; }}")
    for name in _chain_order(plan.new_chains):
        out.append(f"add chain {t} {name}")
    for name, elems in sorted(plan.set_del.items()):
        out.append(f"delete element {t} {name} {{ {_elements(elems)} }}")
    for name, elems in sorted(plan.set_add.items()):
        out.append(f"add element {t} {name} {{ {_elements(elems)} }}")
    for name in _chain_order(plan.chains):
        out.append(f"flush chain {t} {name}")
        out += [f"add rule {t} {name} {r}" for r in chain_rules(name, plan.chains[name])]
    for mname, ips in sorted(plan.map_del.items()):
        out.append(f"delete element {t} {mname} {{ {', '.join(sorted(ips))} }}")
    for mname, m in sorted(plan.map_add.items()):
        out.append(f"add element {t} {mname} {{ {_map_elements(m)} }}")
    for name in sorted(plan.del_chains, key=lambda n: (not n.startswith("ns-"), n)):  # jumpers first
        out.append(f"flush chain {t} {name}")
    for name in sorted(plan.del_chains, key=lambda n: (not n.startswith("ns-"), n)):
        out.append(f"delete chain {t} {name}")
    for name in sorted(plan.del_sets):
        out.append(f"delete set {t} {name}")
    return "\n".join(out) + ("\n" if out else "")
