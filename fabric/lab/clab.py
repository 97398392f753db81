"""containerlab topology files, read into plain typed values (no kernel, no processes).

Reads the part of the containerlab format a namespace lab needs: `name`, `topology.defaults`,
`topology.kinds`, `topology.nodes` (kind, image, exec, binds, env, labels, sysctls) and
`topology.links` (brief `endpoints: ["a:eth1", "b:eth1"]` or extended `{node, interface}` form).
Node settings merge like containerlab's: defaults < kinds[kind] < node. Bind sources are resolved
against the topology file's folder. Every problem is reported as `path.to.field: reason` through
`TopologyError`, never as a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Names become namespace names, FRR pathspaces and socket paths: keep them plain and short.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_LAB_NAME = 24
MAX_NODE_NAME = 32
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_IFNAME = 15  # IFNAMSIZ - 1

NODE_KEYS = {"kind", "image", "exec", "binds", "env", "labels", "sysctls"}
# containerlab node keys that mean something only to Docker; accepted and ignored (with a note).
IGNORED_NODE_KEYS = {
    "group", "type", "startup-config", "startup-delay", "enforce-startup-config", "suppress-startup-config",
    "license", "mgmt-ipv4", "mgmt-ipv6", "ports", "cmd", "entrypoint", "user", "network-mode", "cpu",
    "cpu-set", "memory", "publish", "extras", "wait-for", "dns", "certificate", "healthcheck", "env-files",
    "image-pull-policy", "runtime", "aliases", "devices", "cap-add", "shm-size", "auto-remove", "restart-policy",
    "stages", "config", "components",
}
TOP_KEYS = {"name", "topology", "prefix", "mgmt", "settings"}
TOPOLOGY_KEYS = {"nodes", "links", "kinds", "defaults", "groups"}
LINK_KEYS = {"endpoints", "type", "mtu", "labels", "vars"}
# Endpoint "nodes" that containerlab treats specially; they would reach outside the lab.
SPECIAL_ENDPOINT_NODES = {"host", "mgmt-net", "macvlan"}


class TopologyError(Exception):
    """A topology (or checks) file that can't be used: one `path: reason` line per problem."""

    def __init__(self, problems: list[str], source: str = "topology"):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


@dataclass(frozen=True)
class Bind:
    host: Path  # absolute, resolved against the topology's folder
    target: str  # path inside the node ("container")
    options: str = ""  # e.g. "ro"


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    image: str = ""
    exec: tuple[str, ...] = ()
    binds: tuple[Bind, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)

    def bind_for(self, target: str) -> Path | None:
        """Host path bound at `target`, also when a parent folder of `target` is bound."""
        for b in self.binds:
            if b.target.rstrip("/") == target:
                return b.host
        for b in self.binds:
            prefix = b.target.rstrip("/") + "/"
            if target.startswith(prefix):
                return b.host / target[len(prefix):]
        return None


@dataclass(frozen=True)
class Endpoint:
    node: str
    interface: str

    def __str__(self) -> str:
        return f"{self.node}:{self.interface}"


@dataclass(frozen=True)
class Link:
    a: Endpoint
    b: Endpoint
    mtu: int | None = None


@dataclass(frozen=True)
class Topology:
    name: str
    path: Path  # the topology file (absolute)
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    notes: tuple[str, ...] = ()  # things accepted but ignored by the local runner

    @property
    def folder(self) -> Path:
        return self.path.parent

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def links_of(self, name: str) -> list[tuple[Endpoint, Endpoint]]:
        """(own endpoint, other endpoint) for each link touching node `name`."""
        out = []
        for link in self.links:
            if link.a.node == name:
                out.append((link.a, link.b))
            if link.b.node == name:
                out.append((link.b, link.a))
        return out


def load(path: str | Path) -> Topology:
    """Read and validate a containerlab topology file. Raises TopologyError naming each bad field."""
    p = Path(path).resolve()
    data = read_yaml(p)
    return parse(data, p)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise TopologyError([f"cannot read the file: {e.strerror or e}"], str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TopologyError([f"(yaml {where}): {problem}"], str(path)) from None
    except (ValueError, RecursionError) as e:
        raise TopologyError([f"(yaml): {e}"], str(path)) from None


class _Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.notes: list[str] = []

    def add(self, where: str, reason: str) -> None:
        self.lines.append(f"{where}: {reason}")


def parse(data: Any, path: Path) -> Topology:
    """Validate already-loaded YAML `data` of the topology file at `path` (binds resolve against its folder)."""
    pr = _Problems()
    src = str(path)
    if not isinstance(data, dict):
        raise TopologyError([f"(top level): must be a mapping, got {type(data).__name__}"], src)
    for k in data:
        if k not in TOP_KEYS:
            pr.add(str(k), f"unknown key (expected one of {', '.join(sorted(TOP_KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        pr.add("name", "required: the lab's name (a string)")
        name = "lab"
    elif not NAME_RE.match(name) or len(name) > MAX_LAB_NAME:
        pr.add("name", f"{name!r} must be letters, digits, '-', '_' or '.' (at most {MAX_LAB_NAME} characters)")
    topo = data.get("topology")
    if not isinstance(topo, dict):
        pr.add("topology", "required: a mapping with `nodes` (and usually `links`)")
        raise TopologyError(pr.lines, src)
    for k in topo:
        if k not in TOPOLOGY_KEYS:
            pr.add(f"topology.{k}", f"unknown key (expected one of {', '.join(sorted(TOPOLOGY_KEYS))})")

    defaults = _mapping(topo.get("defaults"), "topology.defaults", pr)
    kinds_raw = _mapping(topo.get("kinds"), "topology.kinds", pr)
    kinds = {}
    for kname, kval in kinds_raw.items():
        kinds[str(kname)] = _mapping(kval, f"topology.kinds.{kname}", pr)
        _check_node_keys(kinds[str(kname)], f"topology.kinds.{kname}", pr)
    _check_node_keys(defaults, "topology.defaults", pr)

    nodes_raw = topo.get("nodes")
    if not isinstance(nodes_raw, dict) or not nodes_raw:
        pr.add("topology.nodes", "required: a mapping of node name to node settings")
        nodes_raw = {}
    nodes: list[Node] = []
    for nname, nval in nodes_raw.items():
        where = f"topology.nodes.{nname}"
        nname = str(nname)
        if not NAME_RE.match(nname) or len(nname) > MAX_NODE_NAME:
            pr.add(where, f"node name must be letters, digits, '-', '_' or '.' (at most {MAX_NODE_NAME} characters)")
        if nval is None:
            nval = {}
        if not isinstance(nval, dict):
            pr.add(where, f"must be a mapping, got {type(nval).__name__}")
            continue
        _check_node_keys(nval, where, pr)
        node = _node(nname, nval, defaults, kinds, path.parent, where, pr)
        if node is not None:
            nodes.append(node)

    links = _links(topo.get("links"), {n.name for n in nodes} | {str(n) for n in nodes_raw}, pr)
    if pr.lines:
        raise TopologyError(pr.lines, src)
    return Topology(name=name, path=path, nodes=tuple(nodes), links=tuple(links), notes=tuple(pr.notes))


def _mapping(v: Any, where: str, pr: _Problems) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        pr.add(where, f"must be a mapping, got {type(v).__name__}")
        return {}
    return v


def _check_node_keys(d: dict, where: str, pr: _Problems) -> None:
    for k in d:
        if k in NODE_KEYS:
            continue
        if k in IGNORED_NODE_KEYS:
            pr.notes.append(f"{where}.{k}: ignored by the namespace runner")
        else:
            pr.add(f"{where}.{k}", f"unknown key (the runner understands {', '.join(sorted(NODE_KEYS))})")


def _node(name: str, raw: dict, defaults: dict, kinds: dict[str, dict], folder: Path, where: str,
          pr: _Problems) -> Node | None:
    kind = raw.get("kind", defaults.get("kind", "linux"))
    if not isinstance(kind, str) or not kind:
        pr.add(f"{where}.kind", "must be a string such as linux")
        kind = "linux"
    layers = [defaults, kinds.get(kind, {}), raw]

    def last(key: str) -> tuple[Any, str]:
        for layer, lw in zip(reversed(layers), [where, f"topology.kinds.{kind}", "topology.defaults"]):
            if key in layer:
                return layer[key], f"{lw}.{key}"
        return None, f"{where}.{key}"

    image, iw = last("image")
    if image is None:
        image = ""
    elif not isinstance(image, str):
        pr.add(iw, "must be a string (an image name)")
        image = ""

    exec_raw, ew = last("exec")
    execs: list[str] = []
    if exec_raw is not None:
        if isinstance(exec_raw, str):
            exec_raw = [exec_raw]
        if not isinstance(exec_raw, list):
            pr.add(ew, "must be a list of commands")
        else:
            for i, c in enumerate(exec_raw):
                if not isinstance(c, str) or not c.strip():
                    pr.add(f"{ew}[{i}]", "must be a non-empty command string")
                else:
                    execs.append(c)

    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    sysctls: dict[str, str] = {}
    for key, into in (("env", env), ("labels", labels), ("sysctls", sysctls)):
        for layer, lw in zip(layers, ["topology.defaults", f"topology.kinds.{kind}", where]):
            v = layer.get(key)
            if v is None:
                continue
            if not isinstance(v, dict):
                pr.add(f"{lw}.{key}", "must be a mapping of name to value")
                continue
            for k, val in v.items():
                if isinstance(val, (dict, list)) or val is None:
                    pr.add(f"{lw}.{key}.{k}", "must be a plain value (string or number)")
                    continue
                into[str(k)] = str(val).lower() if isinstance(val, bool) else str(val)
    for k in env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            pr.add(f"{where}.env.{k}", "not a valid environment variable name")
    for k in sysctls:
        if not re.match(r"^[a-z0-9_]+(\.[A-Za-z0-9_-]+)+$", k):
            pr.add(f"{where}.sysctls.{k}", "not a sysctl name like net.ipv4.ip_forward")

    binds: dict[str, Bind] = {}  # by target: a node's bind replaces a kind's/default's at the same target
    for layer, lw in zip(layers, ["topology.defaults", f"topology.kinds.{kind}", where]):
        v = layer.get("binds")
        if v is None:
            continue
        if not isinstance(v, list):
            pr.add(f"{lw}.binds", "must be a list of 'host-path:node-path[:ro]' strings")
            continue
        for i, b in enumerate(v):
            bind = _bind(b, folder, f"{lw}.binds[{i}]", pr)
            if bind is not None:
                binds[bind.target] = bind
    return Node(name=name, kind=kind, image=image, exec=tuple(execs), binds=tuple(binds.values()), env=env,
                labels=labels, sysctls=sysctls)


def _bind(b: Any, folder: Path, where: str, pr: _Problems) -> Bind | None:
    if not isinstance(b, str) or b.count(":") not in (1, 2):
        pr.add(where, "must be 'host-path:node-path' or 'host-path:node-path:ro'")
        return None
    parts = b.split(":")
    host, target = parts[0], parts[1]
    opts = parts[2] if len(parts) == 3 else ""
    if not host or not target.startswith("/"):
        pr.add(where, f"{b!r}: need a host path and an absolute node path")
        return None
    hp = Path(host).expanduser()
    hp = (hp if hp.is_absolute() else folder / hp).resolve()
    if not hp.exists():
        pr.add(where, f"{host!r} does not exist (looked for {hp})")
        return None
    return Bind(host=hp, target=target, options=opts)


def _links(raw: Any, node_names: set[str], pr: _Problems) -> list[Link]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        pr.add("topology.links", "must be a list of links")
        return []
    links: list[Link] = []
    seen: dict[tuple[str, str], str] = {}
    for i, item in enumerate(raw):
        where = f"topology.links[{i}]"
        if not isinstance(item, dict):
            pr.add(where, "must be a mapping with `endpoints`")
            continue
        for k in item:
            if k not in LINK_KEYS:
                pr.add(f"{where}.{k}", "unknown key (expected endpoints, and optionally type, mtu)")
        ltype = item.get("type", "veth")
        if ltype != "veth":
            pr.add(f"{where}.type", f"{ltype!r}: only veth links are supported")
            continue
        mtu = item.get("mtu")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535):
            pr.add(f"{where}.mtu", "must be an integer between 68 and 65535")
            mtu = None
        eps_raw = item.get("endpoints")
        if not isinstance(eps_raw, list) or len(eps_raw) != 2:
            pr.add(f"{where}.endpoints", "must be a list of exactly two 'node:interface' endpoints")
            continue
        eps: list[Endpoint] = []
        for j, e in enumerate(eps_raw):
            ep = _endpoint(e, f"{where}.endpoints[{j}]", node_names, pr)
            if ep is not None:
                key = (ep.node, ep.interface)
                if key in seen:
                    pr.add(f"{where}.endpoints[{j}]", f"interface {ep} is already used by {seen[key]}")
                    continue
                seen[key] = where
                eps.append(ep)
        if len(eps) == 2:
            links.append(Link(eps[0], eps[1], mtu))
    return links


def _endpoint(e: Any, where: str, node_names: set[str], pr: _Problems) -> Endpoint | None:
    if isinstance(e, dict):
        node, iface = e.get("node"), e.get("interface")
        extra = set(e) - {"node", "interface", "mac"}
        if extra:
            pr.add(where, f"unknown key(s) {', '.join(sorted(map(str, extra)))} (expected node, interface)")
            return None
    elif isinstance(e, str) and e.count(":") == 1:
        node, iface = e.split(":")
    else:
        pr.add(where, f"{e!r} must be 'node:interface' like 'node-a1:eth1'")
        return None
    if not isinstance(node, str) or not isinstance(iface, str) or not node or not iface:
        pr.add(where, f"{e!r} must name a node and an interface")
        return None
    if node in SPECIAL_ENDPOINT_NODES and node not in node_names:
        pr.add(where, f"'{node}:' endpoints (outside the lab) are not supported by the namespace runner")
        return None
    if node not in node_names:
        pr.add(where, f"node {node!r} is not defined")
        return None
    if not IFNAME_RE.match(iface) or len(iface) > MAX_IFNAME or iface == "lo":
        pr.add(where, f"interface {iface!r} must be a Linux interface name (at most {MAX_IFNAME} characters, not lo)")
        return None
    return Endpoint(node, iface)
