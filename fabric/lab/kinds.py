"""What each topology node becomes locally: an FRR router, a bgp-fabric agent, a switch or a plain host.

Pure decisions over the parsed topology (files are read — FRR's `daemons`, the agent's config —
but no namespace, link or process is touched). The runner builds exactly what `plan()` returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import yaml

from fabric.lab.clab import Node, Topology, TopologyError
from fabric.lab.pods import POD_LABEL, conflist_path

FRR_CONF = "/etc/frr/frr.conf"
FRR_DAEMONS = "/etc/frr/daemons"
AGENT_CONF = "/etc/bgp-fabric/config.yaml"
AGENT_RUN_DIR_DEFAULT = "/run/bgp-fabric"
# FRR daemons started when the node binds no `daemons` file (zebra always runs first).
DEFAULT_FRR_DAEMONS = ("bgpd", "staticd")
KNOWN_FRR_DAEMONS = ("bgpd", "ospfd", "ospf6d", "ripd", "ripngd", "isisd", "pimd", "pim6d", "ldpd", "nhrpd", "eigrpd",
                     "babeld", "sharpd", "pbrd", "bfdd", "fabricd", "vrrpd", "pathd", "staticd")


class Role(str, Enum):
    FRR = "frr"
    AGENT = "agent"
    BRIDGE = "bridge"  # kind: bridge → a namespace whose interfaces are enslaved to one Linux bridge
    POD = "pod"  # label bgp-fabric.io/node: NODE → a pod on that agent node, networked by its CNI plugin
    HOST = "host"  # plain namespace (linux kind: alpine, busybox, netshoot, ...)


def role_of(node: Node) -> Role:
    if POD_LABEL in node.labels:
        return Role.POD
    image = node.image.lower()
    if "bgp-fabric" in image:
        return Role.AGENT
    if "frr" in image:
        return Role.FRR
    if node.kind in ("bridge", "ovs-bridge"):
        return Role.BRIDGE
    return Role.HOST


@dataclass(frozen=True)
class FrrSpec:
    config: Path  # frr.conf on the host
    daemons: tuple[str, ...]  # besides zebra (and mgmtd when this FRR has it), in start order
    profile: str | None = None  # `frr defaults X` from frr.conf, passed to the daemons as -F X
    bgp: bool = True  # frr.conf has `router bgp` (else the node is a plain router: no sessions to check)


@dataclass(frozen=True)
class AgentSpec:
    config: Path
    run_dir: Path
    conflist: Path | None = None  # where the agent writes its CNI conflist (cni.enabled)

    @property
    def status(self) -> Path:
        return self.run_dir / "status.json"


@dataclass(frozen=True)
class NodePlan:
    node: Node
    role: Role
    netns: str
    frr: FrrSpec | None = None
    agent: AgentSpec | None = None
    pod_of: str | None = None  # a pod: the agent node whose CNI plugin gives it its network

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def speaks_bgp(self) -> bool:
        return self.agent is not None or (self.frr is not None and self.frr.bgp)


@dataclass(frozen=True)
class LabPlan:
    topology: Topology
    run_id: str
    nodes: tuple[NodePlan, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def by_name(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    def netns(self, name: str) -> str:
        return self.by_name(name).netns


def netns_name(lab: str, run_id: str, node: str) -> str:
    """`<lab>-<run>-<node>`: the lab's name for people, the run id so two runs never collide."""
    return f"{lab}-{run_id}-{node}"


def plan(topology: Topology, run_id: str) -> LabPlan:
    """Decide each node's role and what it needs. Raises TopologyError naming the node's field."""
    problems: list[str] = []
    nodes: list[NodePlan] = []
    for node in topology.nodes:
        role = role_of(node)
        where = f"topology.nodes.{node.name}"
        ns = netns_name(topology.name, run_id, node.name)
        if role is Role.FRR:
            nodes.append(NodePlan(node, role, ns, frr=_frr_spec(node, where, problems)))
        elif role is Role.AGENT:
            nodes.append(NodePlan(node, role, ns, agent=_agent_spec(node, where, problems)))
        elif role is Role.POD:
            nodes.append(NodePlan(node, role, ns, pod_of=node.labels[POD_LABEL]))
        else:
            nodes.append(NodePlan(node, role, ns))
    by_name = {n.name: n for n in nodes}
    for n in nodes:
        if n.pod_of is None:
            continue
        host = by_name.get(n.pod_of)
        where = f"topology.nodes.{n.name}.labels.{POD_LABEL}"
        if host is None or host.role is not Role.AGENT:
            problems.append(f"{where}: {n.pod_of!r} is not a bgp-fabric node of this topology")
        elif host.agent is not None and host.agent.conflist is None:
            problems.append(f"{where}: the agent of {n.pod_of!r} does not serve pods (set cni.enabled: true in its config)")
    run_dirs: dict[Path, str] = {}
    for n in nodes:
        if n.agent is not None:
            other = run_dirs.setdefault(n.agent.run_dir, n.name)
            if other != n.name:
                problems.append(f"topology.nodes.{n.name}.binds: agent paths.runDir {n.agent.run_dir} is also "
                                f"used by node {other!r}; give each agent node its own runDir")
    if problems:
        raise TopologyError(problems, str(topology.path))
    return LabPlan(topology, run_id, tuple(nodes), topology.notes)


def _frr_spec(node: Node, where: str, problems: list[str]) -> FrrSpec | None:
    conf = node.bind_for(FRR_CONF)
    if conf is None or not conf.is_file():
        problems.append(f"{where}.binds: an FRR node needs a bind of its frr.conf to {FRR_CONF}")
        return None
    daemons: tuple[str, ...] = DEFAULT_FRR_DAEMONS
    dfile = node.bind_for(FRR_DAEMONS)
    if dfile is not None and dfile.is_file():
        try:
            daemons = parse_daemons(dfile.read_text())
        except ValueError as e:
            problems.append(f"{where}.binds: {dfile}: {e}")
    try:
        profile = frr_profile(conf.read_text())
    except OSError as e:
        problems.append(f"{where}.binds: cannot read {conf}: {e.strerror or e}")
        return None
    bgp = "bgpd" in daemons and has_router_bgp(conf.read_text())
    return FrrSpec(config=conf, daemons=daemons, profile=profile, bgp=bgp)


def parse_daemons(text: str) -> tuple[str, ...]:
    """The daemons an FRR `daemons` file turns on (`bgpd=yes`), zebra and mgmtd left out (always run)."""
    on: list[str] = []
    for line in text.splitlines():
        m = re.match(r"^\s*([a-z0-9]+d)\s*=\s*(\S+)", line)
        if not m or m.group(2).strip("\"'").lower() not in ("yes", "true", "1"):
            continue
        d = m.group(1)
        if d in ("zebra", "mgmtd", "watchfrr"):
            continue
        if d not in KNOWN_FRR_DAEMONS:
            raise ValueError(f"unknown FRR daemon {d!r}")
        on.append(d)
    # staticd carries `ip route` lines of frr.conf; FRR's own init starts it whenever zebra runs.
    if "staticd" not in on:
        on.append("staticd")
    return tuple(on)


def has_router_bgp(conf_text: str) -> bool:
    return re.search(r"^\s*router bgp\b", conf_text, re.M) is not None


def frr_profile(conf_text: str) -> str | None:
    m = re.search(r"^\s*frr defaults (\S+)", conf_text, re.M)
    return m.group(1) if m else None


def _agent_spec(node: Node, where: str, problems: list[str]) -> AgentSpec | None:
    conf = node.bind_for(AGENT_CONF)
    if conf is None or not conf.is_file():
        problems.append(f"{where}.binds: a bgp-fabric node needs a bind of its config to {AGENT_CONF}")
        return None
    try:
        data = yaml.safe_load(conf.read_text())
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"{where}.binds: cannot read agent config {conf}: {str(e).splitlines()[0]}")
        return None
    return AgentSpec(config=conf, run_dir=agent_run_dir(data, conf), conflist=conflist_path(data, conf))


def agent_run_dir(config_data: object, config_path: Path) -> Path:
    """The agent's `paths.runDir` (relative to its config file), where it writes status.json."""
    run_dir = AGENT_RUN_DIR_DEFAULT
    if isinstance(config_data, dict):
        paths = config_data.get("paths")
        if isinstance(paths, dict) and isinstance(paths.get("runDir"), str) and paths["runDir"]:
            run_dir = paths["runDir"]
    p = Path(run_dir)
    return p if p.is_absolute() else (config_path.parent / p).resolve()
