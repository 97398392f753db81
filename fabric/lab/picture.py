"""The lab's picture: nodes, links, BGP sessions coloured by state, direct vs IPIP pairs (Graphviz).

`dot_source` is pure (the lab's plan, the sessions each speaker reported, which node holds which
address, how each agent routes to each other node); `render` runs Graphviz's `dot` once.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fabric.lab.kinds import LabPlan, Role
from fabric.lab.sessions import Session

DOT_TIMEOUT = 30.0

STATE_COLOURS = {"established": "#2e9e44", "down": "#d62728", "partial": "#ff8c00"}
ROLE_STYLE = {
    Role.AGENT: 'shape=box style="rounded,filled" fillcolor="#dbe9f6" color="#1f5f99"',
    Role.FRR: 'shape=box style="filled" fillcolor="#fde9c8" color="#b36b00"',
    Role.BRIDGE: 'shape=box style="filled" fillcolor="#eeeeee" color="#777777" height=0.3 fontsize=10',
    Role.HOST: 'shape=ellipse style="filled" fillcolor="#ffffff" color="#777777" fontsize=10',
    Role.POD: 'shape=ellipse style="filled" fillcolor="#f1ecf7" color="#6a4c93" fontsize=10',
}
CNI_COLOUR = "#6a4c93"
ROLE_NOTE = {Role.AGENT: "bgp-fabric", Role.FRR: "FRR", Role.BRIDGE: "switch", Role.HOST: "", Role.POD: "pod"}


@dataclass(frozen=True)
class Pair:
    """A BGP session between two lab nodes, as both ends (or one) reported it."""

    a: str
    b: str
    states: tuple[str, ...]  # each reporting end's state
    path: str = ""  # agent pairs: "direct" or "ipip" (how a's routes to b go); else ""

    @property
    def colour(self) -> str:
        up = [s == "established" for s in self.states]
        return STATE_COLOURS["established" if all(up) else "partial" if any(up) else "down"]


def pairs(plan: LabPlan, sessions: dict[str, list[Session]], owner: dict[str, str],
          paths: dict[tuple[str, str], str]) -> list[Pair]:
    """One pair per two nodes with a session; `owner`: address -> node; `paths`: (a, b) -> direct/ipip."""
    found: dict[tuple[str, str], list[str]] = {}
    for node, ss in sessions.items():
        for s in ss:
            other = owner.get(s.peer)
            if other is None or other == node:
                continue
            key = (min(node, other), max(node, other))
            found.setdefault(key, []).append(s.state)
    out = []
    for (a, b), states in sorted(found.items()):
        path = paths.get((a, b)) or paths.get((b, a)) or ""
        out.append(Pair(a, b, tuple(states), path))
    return out


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot_source(plan: LabPlan, sessions: dict[str, list[Session]], owner: dict[str, str],
               paths: dict[tuple[str, str], str], addresses: dict[str, list[str]],
               switches: frozenset[str] = frozenset()) -> str:
    """`addresses`: node -> the addresses on its lab links (shown under the name); `switches`: plain
    nodes that bridge their links (drawn as switches)."""
    topo = plan.topology
    lines = [f"graph {_q(topo.name)} {{",
             f'  graph [label={_q(f"lab {topo.name} (run {plan.run_id})")} labelloc=t fontsize=16 '
             'fontname="Helvetica" rankdir=TB nodesep=0.9 ranksep=0.8 splines=true outputorder=edgesfirst];',
             '  node [fontname="Helvetica" fontsize=11 margin="0.12,0.05"];',
             '  edge [fontname="Helvetica" fontsize=9];']
    agents = {n.name for n in plan.nodes if n.role is Role.AGENT}
    for n in plan.nodes:
        role = Role.BRIDGE if n.name in switches and n.role is Role.HOST else n.role
        parts = [n.name, ROLE_NOTE[role], " ".join(addresses.get(n.name, [])[:3])]
        label = '"' + "\\n".join(_q(x)[1:-1] for x in parts if x) + '"'  # \n: a line break in DOT
        lines.append(f"  {_q(n.name)} [label={label} {ROLE_STYLE[role]}];")
    for link in topo.links:
        lines.append(f"  {_q(link.a.node)} -- {_q(link.b.node)} [color=\"#555555\" penwidth=1.2 "
                     f"taillabel={_q(link.a.interface)} headlabel={_q(link.b.interface)} labelfontsize=8 "
                     'labelfontcolor="#555555"];')
    for n in plan.nodes:  # a pod's veth comes from its node's CNI plugin, not from a topology link
        if n.pod_of is not None:
            lines.append(f"  {_q(n.pod_of)} -- {_q(n.name)} [color={_q(CNI_COLOUR)} penwidth=1.2 "
                         f'headlabel="eth0" labelfontsize=8 labelfontcolor={_q(CNI_COLOUR)}];')
    for p in pairs(plan, sessions, owner, paths):
        mesh = p.a in agents and p.b in agents
        style = "dashed" if p.path == "ipip" else "solid" if mesh else "dotted"
        state = "/".join(sorted(set(p.states)))
        path = {"direct": ", pods direct", "ipip": ", pods through IPIP"}.get(p.path, "")
        lines.append(f"  {_q(p.a)} -- {_q(p.b)} [color={_q(p.colour)} style={style} "
                     f"penwidth={2.2 if mesh else 1.6} constraint=false "
                     f"tooltip={_q(f'BGP {p.a} - {p.b}: {state}{path}')}];")
    lines += _legend()
    lines.append("}")
    return "\n".join(lines) + "\n"


def _legend() -> list[str]:
    g, r, o = STATE_COLOURS["established"], STATE_COLOURS["down"], STATE_COLOURS["partial"]
    rows = [
        ("#555555", "━━━", "link (veth)"),
        (CNI_COLOUR, "━━━", "pod veth, made by the node's CNI plugin"),
        (g, "━━━", "BGP session Established"),
        (o, "━━━", "BGP Established on one end only"),
        (r, "━━━", "BGP session not Established"),
        ("#333333", "━━━", "between agents: pods routed directly"),
        ("#333333", "╺ ╺ ╸", "between agents: pods routed through IPIP"),
        ("#333333", "┈┈┈", "with a router (FRR, BIRD, ...)"),
    ]
    cells = "".join(f'<tr><td align="left"><font color="{c}" point-size="12"><b>{sym}</b></font></td>'
                    f'<td align="left">{text}</td></tr>' for c, sym, text in rows)
    return [f'  legend [shape=plaintext fontsize=9 label=<<table border="1" color="#bbbbbb" cellborder="0" '
            f'cellspacing="1">{cells}</table>>];',
            "  { rank=sink; legend; }"]


def render(dot_text: str, out: Path) -> str | None:
    """Write `out` (SVG) and `out`.dot; returns None, or why there is no picture."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".dot").write_text(dot_text)
    dot = shutil.which("dot")
    if dot is None:
        return "graphviz is not installed (apt-get install graphviz)"
    try:
        r = subprocess.run([dot, "-Tsvg", "-o", str(out)], input=dot_text, capture_output=True, text=True,
                           timeout=DOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"dot took longer than {DOT_TIMEOUT:.0f}s"
    if r.returncode != 0:
        return f"dot failed: {r.stderr.strip()[:200]}"
    return None
