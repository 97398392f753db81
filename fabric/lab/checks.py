"""The optional checks file next to a topology: `labs/<name>.checks.yml` (format in labs/README.md).

    timeout: 60                      # seconds to wait for every BGP session to be Established
    sessions: {min: 8}               # at least 8 Established sessions, counted on every speaker
    pings:
      - {from: pod-a1, to: 10.244.3.10}     # or to: pod-b1 (a pod node: its CNI address)
    tcp:
      - {from: pod-a1, to: 10.244.3.10, port: 8080, serve: pod-b1}
    routes:
      - {node: node-a1, prefix: 10.244.3.0/24, via: 10.0.2.11, kind: ipip}
    commands:
      - {node: tor, run: "vtysh -c 'show bgp summary'", expect: Established}
    metrics:
      - {node: node-a1, metric: bgp_fabric_routes_programmed, labels: {kind: ipip}, value: 2}
    faults:
      - {kill: {node: node-b1}, probe: {from: pod-a1, to: 10.244.3.10, rate: 50}, maxLoss: 0}

Pure: parsing and validation against the topology's node names.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fabric.config import format_errors
from fabric.lab.clab import Topology, TopologyError, read_yaml
from fabric.lab.kinds import Role, role_of
from fabric.lab.pods import POD_LABEL

TOPOLOGY_SUFFIXES = (".clab.yml", ".clab.yaml", ".yml", ".yaml")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def _ip(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be an IPv4 address string")
    try:
        return str(ipaddress.IPv4Address(v))
    except ValueError as e:
        raise ValueError(f"not a valid IPv4 address ({e})") from None


def _dest(v: Any) -> str:
    """A destination: an IPv4 address, or the name of a pod node (its CNI address, known once the lab runs)."""
    if not isinstance(v, str):
        raise ValueError("must be an IPv4 address or a pod's node name")
    try:
        return str(ipaddress.IPv4Address(v))
    except ValueError:
        if v and not v[0].isdigit():
            return v
        raise ValueError(f"{v!r} is not a valid IPv4 address (nor a pod's node name)") from None


Seconds = Annotated[float, Field(gt=0, le=3600)]


class Ping(_Model):
    src: str = Field(alias="from", min_length=1)
    to: str
    count: int = Field(default=1, ge=1, le=100)  # echo replies that must come back in one attempt
    timeout: Seconds = 20.0  # keep retrying until this many seconds have passed

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, v: Any) -> str:
        return _dest(v)

    def label(self) -> str:
        return f"ping {self.src} -> {self.to}" + (f" x{self.count}" if self.count > 1 else "")


class Tcp(_Model):
    src: str = Field(alias="from", min_length=1)
    to: str
    port: int = Field(ge=1, le=65535)
    serve: str | None = None  # node where the runner starts a listener for this check
    timeout: Seconds = 20.0

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, v: Any) -> str:
        return _dest(v)

    def label(self) -> str:
        return f"tcp {self.src} -> {self.to}:{self.port}"


class Http(_Model):
    """N HTTP GETs to a service address; each backend in `serve` answers with its own node name.
    Passes when every request is answered and the answers came from exactly `expect` (default: all
    of `serve`) — e.g. an IPVS rr service spreading over backends in both racks."""

    src: str = Field(alias="from", min_length=1)
    to: str
    port: int = Field(ge=1, le=65535)
    serve: list[str] = Field(min_length=1)  # nodes that run the backend (on `backend_port`)
    backend_port: int = Field(default=8080, ge=1, le=65535, alias="backendPort")
    requests: int = Field(default=6, ge=1, le=1000)
    expect: list[str] | None = None
    spread: bool = True  # every expected backend must answer; false: any of them may answer each request
    timeout: Seconds = 30.0

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, v: Any) -> str:
        return _dest(v)

    def label(self) -> str:
        return f"http {self.src} -> {self.to}:{self.port} x{self.requests}"


class SessionCount(_Model):
    min: int = Field(ge=0)


RouteKind = Literal["direct", "ipip", "blackhole", "ecmp"]


class Route(_Model):
    """A route the node's kernel must hold (main table, exact prefix), or must not hold (`absent`).
    `via`/`dev` must match one of its next hops; `kind`: direct (one next hop, not a tunnel), ipip
    (every next hop through an ipip device), blackhole, ecmp (several next hops)."""

    node: str = Field(min_length=1)
    prefix: str
    via: str | None = None
    dev: str | None = Field(default=None, min_length=1, max_length=15)
    kind: RouteKind | None = None
    absent: bool = False
    timeout: Seconds = 20.0

    @field_validator("prefix", mode="before")
    @classmethod
    def _prefix(cls, v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError("must be an IPv4 prefix string like 10.244.3.0/24")
        try:
            return str(ipaddress.IPv4Network(v))
        except ValueError as e:
            raise ValueError(f"not a valid IPv4 prefix ({e})") from None

    @field_validator("via", mode="before")
    @classmethod
    def _via(cls, v: Any) -> str | None:
        return None if v is None else _ip(v)

    @model_validator(mode="after")
    def _shape(self) -> "Route":
        if self.absent and (self.via or self.dev or self.kind):
            raise ValueError("absent: true takes no via/dev/kind (the prefix must not be there at all)")
        if self.kind == "blackhole" and (self.via or self.dev):
            raise ValueError("a blackhole route has no via/dev")
        return self

    def label(self) -> str:
        what = " ".join(f"{k} {v}" for k, v in (("via", self.via), ("dev", self.dev), ("kind", self.kind)) if v)
        return f"route {self.node}: {self.prefix}" + (" absent" if self.absent else f" {what}".rstrip())


class Command(_Model):
    """A command run in a node's namespace (`sh -c`), retried until it exits with `exit` and its output
    (stdout and stderr) matches every regular expression of `expect`. FRR nodes get a `vtysh` that
    talks to their own daemons; agent nodes get FABRIC_CONFIG (so `fabric status` needs no -c)."""

    node: str = Field(min_length=1)
    run: str = Field(min_length=1)
    expect: list[str] = Field(default_factory=list)
    exit: int = Field(default=0, ge=0, le=255)
    timeout: Seconds = 20.0

    @field_validator("expect", mode="before")
    @classmethod
    def _expect(cls, v: Any) -> list[str]:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list):
            raise ValueError("must be a regular expression or a list of them")
        for e in items:
            try:
                re.compile(e)
            except (re.error, TypeError) as err:
                raise ValueError(f"{e!r} is not a regular expression ({err})") from None
        return items

    def label(self) -> str:
        return f"command {self.node}: {self.run}"


class Metric(_Model):
    """A value of an agent node's /metrics (its health listener), read in the node's namespace and parsed
    with Prometheus' text parser: the sum of the samples named `metric` whose labels include `labels`
    must equal `value` (or be at least `min`). Retried until `timeout`."""

    node: str = Field(min_length=1)
    metric: str = Field(pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
    labels: dict[str, str] = Field(default_factory=dict)
    value: float | None = None
    min: float | None = None
    timeout: Seconds = 20.0

    @model_validator(mode="after")
    def _one(self) -> "Metric":
        if (self.value is None) == (self.min is None):
            raise ValueError("needs exactly one of value, min")
        return self

    def label(self) -> str:
        sel = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        want = f"== {self.value:g}" if self.value is not None else f">= {self.min:g}"
        return f"metric {self.node}: {self.metric}" + (f"{{{sel}}}" if sel else "") + f" {want}"


class Probe(_Model):
    """Pings from a node at `rate` per second during a fault: loss, longest outage, when traffic is back."""

    src: str = Field(alias="from", min_length=1)
    to: str
    rate: int = Field(default=50, ge=1, le=200)

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, v: Any) -> str:
        return _dest(v)


class Kill(_Model):
    """kill -9 an agent (the runner starts it again after `restartAfter` seconds, as a DaemonSet would)
    or its ExaBGP (the agent respawns it)."""

    node: str = Field(min_length=1)
    process: Literal["agent", "exabgp"] = "agent"
    restart_after: Annotated[float, Field(ge=0, le=600)] = Field(default=1.0, alias="restartAfter")


class Restart(_Model):
    """SIGTERM an agent and start it again; or restart an FRR router (every daemon stopped, started
    again after `down` seconds, its config loaded again)."""

    node: str = Field(min_length=1)
    down: Annotated[float, Field(ge=0, le=600)] = 0.0


class LinkFlap(_Model):
    node: str = Field(min_length=1)
    interface: str = Field(min_length=1, max_length=15)
    down: Annotated[float, Field(gt=0, le=600)] = 2.0


class Fault(_Model):
    """One fault (exactly one of kill / restart / link), a loss probe, and what must hold after it."""

    name: str | None = Field(default=None, min_length=1, max_length=80)
    kill: Kill | None = None
    restart: Restart | None = None
    link: LinkFlap | None = None
    probe: Probe
    timeout: Seconds = 90.0  # convergence deadline after the fault
    max_loss: int | None = Field(default=None, ge=0, alias="maxLoss")  # probe packets; none: report only

    @model_validator(mode="after")
    def _one_action(self) -> "Fault":
        given = [k for k in ("kill", "restart", "link") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("needs exactly one of kill, restart, link"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    @property
    def node(self) -> str:
        action = self.kill or self.restart or self.link
        assert action is not None
        return action.node

    def label(self) -> str:
        if self.name:
            return self.name
        if self.kill is not None:
            return f"kill -9 {self.kill.process} on {self.kill.node}"
        if self.restart is not None:
            return f"restart {self.restart.node}" + (f" ({self.restart.down:g}s down)" if self.restart.down else "")
        assert self.link is not None
        return f"link {self.link.node}:{self.link.interface} down {self.link.down:g}s"


class Checks(_Model):
    timeout: Seconds = 60.0  # convergence: every BGP session Established within this time
    sessions: SessionCount | None = None
    pings: list[Ping] = Field(default_factory=list)
    tcp: list[Tcp] = Field(default_factory=list)
    http: list[Http] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    commands: list[Command] = Field(default_factory=list)
    metrics: list[Metric] = Field(default_factory=list)
    faults: list[Fault] = Field(default_factory=list)


def path_for(topology_path: Path) -> Path:
    """`labs/two-racks.clab.yml` → `labs/two-racks.checks.yml` (same folder, same stem)."""
    name = topology_path.name
    for suffix in TOPOLOGY_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return topology_path.with_name(f"{name}.checks.yml")


def _is_ip(v: str) -> bool:
    try:
        ipaddress.IPv4Address(v)
        return True
    except ValueError:
        return False


def parse(data: Any, topology: Topology, source: str = "checks") -> Checks:
    """Validate a checks mapping; node names must exist in `topology`. Raises TopologyError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TopologyError([f"(top level): must be a mapping, got {type(data).__name__}"], source)
    try:
        checks = Checks.model_validate(data)
    except ValidationError as e:
        raise TopologyError(format_errors(e), source) from None
    problems = []
    names = {n.name for n in topology.nodes}
    pods = {n.name for n in topology.nodes if POD_LABEL in n.labels}
    for kind, items in (("pings", checks.pings), ("tcp", checks.tcp), ("http", checks.http)):
        for i, c in enumerate(items):
            if not _is_ip(c.to) and c.to not in pods:
                problems.append(f"{kind}[{i}].to: {c.to!r} is neither an IPv4 address nor a pod node "
                                f"(label {POD_LABEL}) of the topology")
            if c.src not in names:
                problems.append(f"{kind}[{i}].from: node {c.src!r} is not defined in the topology")
            serve = getattr(c, "serve", None)
            for j, sv in enumerate(serve if isinstance(serve, list) else [serve] if serve else []):
                if sv not in names:
                    where = f"{kind}[{i}].serve" + (f"[{j}]" if isinstance(serve, list) else "")
                    problems.append(f"{where}: node {sv!r} is not defined in the topology")
            for j, e in enumerate(getattr(c, "expect", None) or []):
                if e not in (serve or []):
                    problems.append(f"{kind}[{i}].expect[{j}]: {e!r} is not one of serve")
    for kind, items in (("routes", checks.routes), ("commands", checks.commands), ("metrics", checks.metrics)):
        for i, c in enumerate(items):
            if c.node not in names:
                problems.append(f"{kind}[{i}].node: node {c.node!r} is not defined in the topology")
            elif kind == "metrics" and role_of(topology.node(c.node)) is not Role.AGENT:  # type: ignore[arg-type]
                problems.append(f"metrics[{i}].node: {c.node} is not a bgp-fabric node (no /metrics)")
    for i, f in enumerate(checks.faults):
        action = "kill" if f.kill else "restart" if f.restart else "link"
        if f.node not in names:
            problems.append(f"faults[{i}].{action}.node: node {f.node!r} is not defined in the topology")
        elif f.link is not None and not any(own.interface == f.link.interface for own, _ in topology.links_of(f.node)):
            problems.append(f"faults[{i}].link.interface: {f.node} has no link on {f.link.interface!r}")
        else:
            role = role_of(topology.node(f.node))  # type: ignore[arg-type]
            if f.kill is not None and role is not Role.AGENT:
                problems.append(f"faults[{i}].kill.node: {f.node} is a {role.value} node; kill needs a bgp-fabric node")
            if f.restart is not None and role not in (Role.AGENT, Role.FRR):
                problems.append(f"faults[{i}].restart.node: {f.node} is a {role.value} node; restart needs a "
                                "bgp-fabric or FRR node")
        if not _is_ip(f.probe.to) and f.probe.to not in pods:
            problems.append(f"faults[{i}].probe.to: {f.probe.to!r} is neither an IPv4 address nor a pod node "
                            f"(label {POD_LABEL}) of the topology")
        if f.probe.src not in names:
            problems.append(f"faults[{i}].probe.from: node {f.probe.src!r} is not defined in the topology")
    if problems:
        raise TopologyError(problems, source)
    return checks


def load_for(topology: Topology, path: Path | None = None) -> tuple[Checks, Path | None]:
    """The checks in `path`, else next to `topology` (defaults when there is no such file), and the file used."""
    if path is not None:
        return parse(read_yaml(path), topology, str(path)), path
    p = path_for(topology.path)
    if not p.exists():
        return Checks(), None
    return parse(read_yaml(p), topology, str(p)), p
