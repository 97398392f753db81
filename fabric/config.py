"""The agent's configuration: pydantic v2 models loaded from YAML (camelCase keys, unknown keys rejected).

One file configures a node agent: who this node is, the cluster's BGP settings, IP pools, external
peers, what to advertise, the service proxy, timers, and where cluster state comes from (a YAML file
for labs, or the Kubernetes API). Validation errors are reported one line per problem as
`path.to.field: reason` by `load()` / `ConfigError`; nothing here touches the network or kernel.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic.alias_generators import to_camel

from ipip.model import IPIPMode  # the route model owns the enum; the config re-exports it

# libyaml's C loader when PyYAML has it (cluster files with thousands of services re-parse on change).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

PRIVATE_ASN_RANGES = ((64512, 65534), (4200000000, 4294967294))


class ConfigError(Exception):
    """A configuration that can't be used. `problems` are `path: reason` lines, one per problem."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__("\n".join(problems))


def _net(v: Any) -> ipaddress.IPv4Network:
    if isinstance(v, ipaddress.IPv4Network):
        return v
    if not isinstance(v, str):
        raise ValueError("must be a CIDR string like 10.244.0.0/16")
    try:
        return ipaddress.IPv4Network(v, strict=True)
    except ValueError as e:
        raise ValueError(f"not a valid IPv4 CIDR ({e})") from None


def _iface(v: Any) -> ipaddress.IPv4Interface:
    if isinstance(v, ipaddress.IPv4Interface):
        return v
    if not isinstance(v, str) or "/" not in v:
        raise ValueError("must be an address with its prefix, like 10.0.1.11/24 (the prefix decides 'same subnet')")
    try:
        iface = ipaddress.IPv4Interface(v)
    except ValueError as e:
        raise ValueError(f"not a valid IPv4 address/prefix ({e})") from None
    return iface


def _addr(v: Any) -> ipaddress.IPv4Address:
    if isinstance(v, ipaddress.IPv4Address):
        return v
    if not isinstance(v, str):
        raise ValueError("must be an IPv4 address string")
    try:
        return ipaddress.IPv4Address(v)
    except ValueError as e:
        raise ValueError(f"not a valid IPv4 address ({e})") from None


def _before(fn):
    from pydantic import BeforeValidator
    return BeforeValidator(fn)


CIDR = Annotated[ipaddress.IPv4Network, _before(_net)]
IfaceAddr = Annotated[ipaddress.IPv4Interface, _before(_iface)]
Address = Annotated[ipaddress.IPv4Address, _before(_addr)]


def _asn(v: int) -> int:
    if not 1 <= v <= 4294967294:
        raise ValueError("ASN must be between 1 and 4294967294")
    return v


ASN = Annotated[int, Field(strict=True), AfterValidator(_asn)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class Pool(Model):
    """An IP pool pods take addresses from (Calico's IPPool). ipipMode decides encapsulation."""

    cidr: CIDR
    ipip_mode: IPIPMode = IPIPMode.CROSS_SUBNET
    nat_outgoing: bool = True
    disabled: bool = False
    # The prefix length of each node's pod CIDR in this pool (Calico's block size). Node pod CIDRs come
    # from Kubernetes' node IPAM (kube-controller-manager --node-cidr-mask-size); one of another length
    # is reported (status, log once): it still works, but the cluster's IPAM and this pool disagree.
    block_size: int | None = Field(default=None, ge=20, le=32)

    @model_validator(mode="after")
    def _block(self) -> "Pool":
        if self.block_size is not None and self.block_size < self.cidr.prefixlen:
            raise ValueError(f"blockSize: /{self.block_size} blocks don't fit in {self.cidr}")
        return self


class ClusterSettings(Model):
    asn: ASN = 64512
    allow_public_asn: bool = False
    mesh: bool = True  # full node-to-node mesh (Calico's nodeToNodeMeshEnabled)

    @model_validator(mode="after")
    def _private(self) -> "ClusterSettings":
        if not self.allow_public_asn and not any(lo <= self.asn <= hi for lo, hi in PRIVATE_ASN_RANGES):
            raise ValueError(f"asn {self.asn} is not private (64512-65534, 4200000000-4294967294); "
                             "set allowPublicAsn: true to use it")
        return self


class NodeSettings(Model):
    """This node. `address` carries its prefix: the prefix decides which peers share the subnet."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    address: IfaceAddr
    pod_cidrs: list[CIDR] = Field(default_factory=list, alias="podCIDRs")
    interface: str | None = Field(default=None, max_length=15)  # underlay device; default: holder of address
    asn: ASN | None = None  # per-node ASN override (Calico's node.spec.bgp.asNumber)
    route_reflector_cluster_id: Address | None = None  # this node reflects routes (else its Node label may say so)


class PrefixFilter(Model):
    """Import/export filter: accept prefixes inside `allow` (with optional length bounds), minus `deny`."""

    allow: list[CIDR] = Field(default_factory=list)
    deny: list[CIDR] = Field(default_factory=list)
    max_length: int | None = Field(default=None, ge=0, le=32)


class ImportFilter(PrefixFilter):
    """A peer's import filter. Whatever allow says, a default route and prefixes inside the node's own
    subnet or covering a node address are refused unless opted in here (they would take over the
    node's own routing); an opted-in route is installed at dataplane.externalRouteMetric, so the node's
    own default / connected routes still win. A route whose AS_PATH holds our ASN is a loop and refused
    (RFC 4271 9.1.2) unless it is there at most `allowOwnAsn` times (FRR's allowas-in: e.g. another
    cluster or site in the same private ASN behind this peer). Prefixes inside what this node announces
    itself are refused always."""

    allow_default_route: bool = False
    allow_node_networks: bool = False
    allow_own_asn: int = Field(default=0, ge=0, le=10)


NextHopPolicy = Literal["connected", "peer", "any"]


class Peer(Model):
    """An external BGP peer (a ToR router, a route reflector)."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    address: Address
    asn: ASN
    port: int = Field(default=179, ge=1, le=65535)
    password: str | None = Field(default=None, min_length=1, max_length=80, repr=False)
    multihop: int | None = Field(default=None, ge=1, le=255)
    source_address: Address | None = None
    passive: bool = False
    route_reflector_client: bool = False
    max_prefixes: int | None = Field(default=None, ge=1)
    # Which next hops are used (FRR's checks): connected = on a connected network (default for
    # single-hop eBGP), peer = only the peer's own address, any = resolved through the underlay's
    # routes (default for iBGP and multihop eBGP).
    next_hop: NextHopPolicy | None = None
    import_filter: ImportFilter | None = Field(default=None, alias="import")
    export_filter: PrefixFilter | None = Field(default=None, alias="export")
    node_selector: dict[str, str] = Field(default_factory=dict)

    def next_hop_policy(self, local_as: int) -> NextHopPolicy:
        if self.next_hop is not None:
            return self.next_hop
        return "connected" if self.asn != local_as and self.multihop is None else "any"


class Advertise(Model):
    pod_cidrs: bool = Field(default=True, alias="podCIDRs")
    service_cluster_ips: list[CIDR] = Field(default_factory=list, alias="serviceClusterIPs")
    service_external_ips: list[CIDR] = Field(default_factory=list, alias="serviceExternalIPs")
    service_load_balancer_ips: list[CIDR] = Field(default_factory=list, alias="serviceLoadBalancerIPs")
    communities: list[str] = Field(default_factory=list)

    @field_validator("communities")
    @classmethod
    def _communities(cls, v: list[str]) -> list[str]:
        for c in v:
            parts = c.split(":")
            if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
                raise ValueError(f"community {c!r} must be 'ASN:VALUE' (standard) or 'ASN:X:Y' (large)")
            if len(parts) == 2 and not all(int(p) <= 65535 for p in parts):
                raise ValueError(f"community {c!r}: standard community parts must be <= 65535")
        return v


Scheduler = Literal["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh"]


class ServiceSettings(Model):
    enabled: bool = True
    scheduler: Scheduler = "rr"
    device: str = Field(default="fabric-svc", max_length=15)  # dummy device holding service IPs
    node_port_addresses: list[CIDR] = Field(default_factory=list)  # empty: the node's own IPs
    masquerade_all: bool = False
    cluster_cidr: list[CIDR] = Field(default_factory=list)  # pod ranges, for "traffic from outside" checks
    command_timeout: Annotated[float, Field(gt=0, le=600)] = 30.0  # an nft / conntrack run is killed after this


class Timers(Model):
    hold_time: int = Field(default=90, ge=3, le=65535)
    keepalive: int | None = Field(default=None, ge=1, le=21845)  # default: holdTime / 3
    graceful_restart_time: int = Field(default=120, ge=0, le=4095)  # 12 bits on the wire (RFC 4724)
    connect_retry: int = Field(default=5, ge=1, le=3600)
    resync_interval: Seconds = 90.0
    min_sync_interval: Annotated[float, Field(ge=0, le=60)] = 0.0

    @model_validator(mode="after")
    def _keepalive(self) -> "Timers":
        if self.keepalive is not None and self.keepalive * 3 > self.hold_time:
            raise ValueError(f"keepalive {self.keepalive} must be at most holdTime/3 ({self.hold_time // 3})")
        return self

    @property
    def keepalive_time(self) -> int:
        return self.keepalive if self.keepalive is not None else max(1, self.hold_time // 3)


class FileSource(Model):
    kind: Literal["file"] = "file"
    path: str = Field(min_length=1)  # YAML with nodes, services, endpointSlices (Kubernetes shapes)


class KubernetesSource(Model):
    kind: Literal["kubernetes"] = "kubernetes"
    kubeconfig: str | None = None  # default: in-cluster
    node_name_env: str = "NODE_NAME"


class Paths(Model):
    run_dir: str = "/run/bgp-fabric"  # ExaBGP config, sockets, status
    exabgp: str | None = None  # another ExaBGP executable (run as `EXE CONFIG`); default: bgp.exabgp_launch


class Dataplane(Model):
    route_protocol: int = Field(default=80, ge=5, le=254)  # RTPROT owner mark of our routes
    route_table: int = Field(default=254, ge=1, le=4294967295)
    tunnel_device: str = Field(default="tunl0", max_length=15)
    underlay_mtu: int | None = Field(default=None, ge=576, le=65535)  # default: read from the device
    # Metric of routes learned from external peers outside every pool: higher than the node's own
    # routes (0 for static/connected, 100/600 NetworkManager, 1024 networkd), so those always win.
    external_route_metric: int = Field(default=4096, ge=1, le=4294967295)


class NetworkPolicySettings(Model):
    # Enforce Kubernetes NetworkPolicy on this node (nftables table `inet bgp-fabric-policy`). Off: the
    # table is never written (run another policy engine instead).
    enabled: bool = True


class Cni(Model):
    """Pod networking through the CNI plugin (docs/cni.md). Off by default: the DaemonSet's ConfigMap
    turns it on; labs turn it on per node with their own folders."""

    enabled: bool = False
    network: str = Field(default="bgp-fabric", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")  # conflist `name`
    conf_dir: str = "/etc/cni/net.d"  # where the runtime reads network configurations
    conf_file: str = Field(default="10-bgp-fabric.conflist", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\.conflist$")
    socket: str = Field(default="/run/bgp-fabric/cni/cni.sock", max_length=107)  # the plugin's way to the agent
    state_dir: str = "/var/lib/bgp-fabric/cni"  # IPAM: one file per pod address (on disk: survives reboots)
    route_protocol: int = Field(default=81, ge=5, le=254)  # RTPROT mark of the pods' /32 host routes


class Health(Model):
    listen: str | None = Field(default="0.0.0.0:9099", pattern=r"^[0-9.]*:[0-9]{1,5}$")  # /healthz, /readyz; null: off
    # /healthz fails while a stage's run has gone on longer than this (and until one of its runs succeeds)
    stage_timeout: float = Field(default=20.0, gt=0, le=3600)


class AgentConfig(Model):
    node: NodeSettings
    cluster: ClusterSettings = ClusterSettings()
    pools: list[Pool] = Field(default_factory=list)
    peers: list[Peer] = Field(default_factory=list)
    advertise: Advertise = Advertise()
    services: ServiceSettings = ServiceSettings()
    timers: Timers = Timers()
    source: FileSource | KubernetesSource = Field(discriminator="kind")
    paths: Paths = Paths()
    dataplane: Dataplane = Dataplane()
    health: Health = Health()
    network_policy: NetworkPolicySettings = NetworkPolicySettings()
    cni: Cni = Cni()

    @model_validator(mode="after")
    def _consistent(self) -> "AgentConfig":
        problems: list[str] = []
        if self.cni.route_protocol == self.dataplane.route_protocol:
            problems.append(f"cni.routeProtocol: {self.cni.route_protocol} is dataplane.routeProtocol too; pod "
                            "host routes need their own mark (the route reconciler owns the other)")
        names = [p.name for p in self.peers]
        for n in {n for n in names if names.count(n) > 1}:
            problems.append(f"peers: duplicate peer name {n!r}")
        # One address may be two peers for disjoint sets of nodes (a per-rack anycast ToR address): which one a
        # node peers with is judged per node (fabric.bgp_desired). With the same nodeSelector they clash on
        # every node that selects either.
        for i, a in enumerate(self.peers):
            for b in self.peers[i + 1:]:
                if a.address == b.address and a.node_selector == b.node_selector:
                    problems.append(f"peers: duplicate peer address {a.address} ({a.name!r}, {b.name!r}) with the same "
                                    "nodeSelector")
        cidrs = [p.cidr for p in self.pools]
        for i, a in enumerate(cidrs):
            for b in cidrs[i + 1:]:
                if a.overlaps(b):
                    problems.append(f"pools: {a} overlaps {b}")
        enabled = [p.cidr for p in self.pools if not p.disabled]
        if self.pools:
            for c in self.node.pod_cidrs:
                if not any(c.subnet_of(e) for e in enabled):
                    problems.append(f"node.podCIDRs: {c} is outside every enabled pool (other nodes would "
                                    "refuse the route)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def format_errors(err: ValidationError) -> list[str]:
    """One `path.to.field: reason` line per problem (aliases as written in YAML)."""
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in ("file", "kubernetes")
                                                          and e["loc"][0] == "source")) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{loc}: {msg}")
    return lines


def parse(data: Any, source: str = "config") -> AgentConfig:
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping, got {type(data).__name__}"], source)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e), source) from None


def load_yaml(path: str | Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError([f"(file): cannot read {path}: {e.strerror or e}"], str(path)) from None
    if text.lstrip().startswith("{"):
        # JSON is YAML; parsed as JSON it is ~20x faster (big generated cluster files in labs).
        try:
            return json.loads(text)
        except ValueError:
            pass  # not strict JSON after all: let YAML parse it (and report errors)
    try:
        return yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"(yaml {where}): {problem}"], str(path)) from None
    except (ValueError, RecursionError) as e:  # yaml raises these on pathological input
        raise ConfigError([f"(yaml): {e}"], str(path)) from None


def load(path: str | Path) -> AgentConfig:
    """Load and validate an agent config file. Raises ConfigError with one line per problem."""
    return parse(load_yaml(path), str(path))
