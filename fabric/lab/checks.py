"""The optional checks file next to a topology: `labs/<name>.checks.yml` (format in labs/README.md).

    timeout: 60                      # seconds to wait for every BGP session to be Established
    sessions: {min: 8}               # at least 8 Established sessions, counted on every speaker
    pings:
      - {from: pod-a1, to: 10.244.3.10}
    tcp:
      - {from: pod-a1, to: 10.244.3.10, port: 8080, serve: pod-b1}

Pure: parsing and validation against the topology's node names.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fabric.config import format_errors
from fabric.lab.clab import Topology, TopologyError, read_yaml

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


Seconds = Annotated[float, Field(gt=0, le=3600)]


class Ping(_Model):
    src: str = Field(alias="from", min_length=1)
    to: str
    count: int = Field(default=1, ge=1, le=100)  # echo replies that must come back in one attempt
    timeout: Seconds = 20.0  # keep retrying until this many seconds have passed

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, v: Any) -> str:
        return _ip(v)

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
        return _ip(v)

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
        return _ip(v)

    def label(self) -> str:
        return f"http {self.src} -> {self.to}:{self.port} x{self.requests}"


class SessionCount(_Model):
    min: int = Field(ge=0)


class Checks(_Model):
    timeout: Seconds = 60.0  # convergence: every BGP session Established within this time
    sessions: SessionCount | None = None
    pings: list[Ping] = Field(default_factory=list)
    tcp: list[Tcp] = Field(default_factory=list)
    http: list[Http] = Field(default_factory=list)


def path_for(topology_path: Path) -> Path:
    """`labs/two-racks.clab.yml` → `labs/two-racks.checks.yml` (same folder, same stem)."""
    name = topology_path.name
    for suffix in TOPOLOGY_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return topology_path.with_name(f"{name}.checks.yml")


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
    for kind, items in (("pings", checks.pings), ("tcp", checks.tcp), ("http", checks.http)):
        for i, c in enumerate(items):
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
    if problems:
        raise TopologyError(problems, source)
    return checks


def load_for(topology: Topology) -> tuple[Checks, Path | None]:
    """The checks next to `topology` (defaults when there is no such file) and the file used."""
    p = path_for(topology.path)
    if not p.exists():
        return Checks(), None
    return parse(read_yaml(p), topology, str(p)), p
