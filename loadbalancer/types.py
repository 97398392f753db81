"""Typed desired state of the service proxy: IPVS virtual/real servers, nftables elements, health checks.

Plain frozen values, no I/O. Addresses are IPv4 dotted strings; protocols are "TCP", "UDP", "SCTP".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class ProxySettings(Protocol):
    """The service settings the proxy needs (fabric.config.ServiceSettings satisfies it)."""

    @property
    def device(self) -> str: ...
    @property
    def scheduler(self) -> str: ...
    @property
    def node_port_addresses(self) -> Sequence[ipaddress.IPv4Network]: ...
    @property
    def masquerade_all(self) -> bool: ...
    @property
    def cluster_cidr(self) -> Sequence[ipaddress.IPv4Network]: ...
    @property
    def command_timeout(self) -> float: ...


class ObjectStore(Protocol):
    """Read access to current cluster objects by kind and key (fabric.tracker.Store satisfies it)."""

    def get(self, kind: str, key: str) -> Any: ...
    def snapshot(self, kind: str) -> dict[str, Any]: ...


class ChangeSet(Protocol):
    """Which keys changed per kind since the last sync (fabric.tracker.Changes satisfies it)."""

    full: bool

    def of(self, kind: str) -> set[str]: ...

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}

# IPVS service flags (include/uapi/linux/ip_vs.h). PERSISTENT follows `persistence`; HASHED is the kernel's.
SVC_F_PERSISTENT, SVC_F_HASHED, SVC_F_ONEPACKET = 0x1, 0x2, 0x4
SVC_F_SCHED1, SVC_F_SCHED2, SVC_F_SCHED3 = 0x8, 0x10, 0x20
SVC_F_SCHED_FALLBACK = SVC_F_SCHED1  # IP_VS_SVC_F_SCHED_SH_FALLBACK == IP_VS_SVC_F_SCHED_MH_FALLBACK
SVC_F_SCHED_PORT = SVC_F_SCHED2  # IP_VS_SVC_F_SCHED_SH_PORT == IP_VS_SVC_F_SCHED_MH_PORT (never set, see services.md)
SVC_F_OPTIONS = SVC_F_ONEPACKET | SVC_F_SCHED1 | SVC_F_SCHED2 | SVC_F_SCHED3  # what VirtualServer.flags holds
# sh and mh hash a client onto one destination; without the fallback flag a client hashed onto a weight-0
# (terminating) destination is refused although others are ready (ipvsadm's `-b sh-fallback` / `mh-fallback`).
SCHED_FLAGS = {"sh": SVC_F_SCHED_FALLBACK, "mh": SVC_F_SCHED_FALLBACK}


def flag_names(scheduler: str, flags: int) -> list[str]:
    names = {SVC_F_ONEPACKET: "ops", SVC_F_SCHED1: "flag-1", SVC_F_SCHED2: "flag-2", SVC_F_SCHED3: "flag-3"}
    if scheduler in ("sh", "mh"):
        names.update({SVC_F_SCHED_FALLBACK: f"{scheduler}-fallback", SVC_F_SCHED_PORT: f"{scheduler}-port"})
    return [n for bit, n in sorted(names.items()) if flags & bit]

VSKey = tuple[str, str, int]  # (proto, vip, port)
RealKey = tuple[str, int]  # (address, port)


@dataclass(frozen=True, order=True)
class RealServer:
    addr: str
    port: int
    weight: int = 1  # 0 = terminating: existing connections drain, no new ones

    @property
    def key(self) -> RealKey:
        return (self.addr, self.port)


@dataclass(frozen=True)
class VirtualServer:
    proto: str
    addr: str
    port: int
    scheduler: str
    persistence: int = 0  # seconds of ClientIP affinity; 0 = none
    reals: tuple[RealServer, ...] = ()  # sorted by (addr, port)
    flags: int = -1  # IPVS flags of SVC_F_OPTIONS; -1 (default): the ones the scheduler needs (SCHED_FLAGS)

    def __post_init__(self) -> None:
        if self.flags == -1:
            object.__setattr__(self, "flags", SCHED_FLAGS.get(self.scheduler, 0))

    @property
    def key(self) -> VSKey:
        return (self.proto, self.addr, self.port)

    def real_map(self) -> dict[RealKey, RealServer]:
        return {r.key: r for r in self.reals}

    def same_options(self, other: "VirtualServer") -> bool:
        return (self.scheduler == other.scheduler and self.persistence == other.persistence
                and self.flags == other.flags)

    def options_text(self) -> str:
        """`rr`, `sh sh-fallback persistent 60`: the scheduler and options as ipvsadm shows them."""
        return " ".join([self.scheduler, *flag_names(self.scheduler, self.flags)]
                        + ([f"persistent {self.persistence}"] if self.persistence else []))

    def __str__(self) -> str:
        reals = ", ".join(f"{r.addr}:{r.port} w{r.weight}" for r in self.reals) or "no endpoints"
        return f"{self.proto} {self.addr}:{self.port} {self.options_text()} -> {reals}"


# nftables elements, each a tuple rendered into one named set of `table inet bgp-fabric`.
#   masq:      (vip, proto, port)          NodePort/External/LB VS with ETP=Cluster: masquerade, replies return here
#   cluster:   (vip, proto, port)          ClusterIP VS: masquerade traffic from outside the cluster CIDR / the node
#   hairpin:   (ep, proto, port, ep)       pod -> its own service -> itself: masquerade so the reply comes back
#   lbranges:  (vip, proto, port)          LB VS restricted by loadBalancerSourceRanges
#   lballow:   (vip, proto, port, cidr)    allowed source ranges for it
NftElement = tuple[str, tuple]


@dataclass(frozen=True)
class HealthCheck:
    port: int
    service: str  # "ns/name"
    local_endpoints: int


@dataclass(frozen=True)
class ServiceState:
    """Everything one Service asks of this node."""

    key: str
    virtual_servers: tuple[VirtualServer, ...] = ()
    addresses: frozenset[str] = frozenset()  # bound on the dummy device
    nft: frozenset[NftElement] = frozenset()
    health_check: HealthCheck | None = None
    udp_vips: frozenset[tuple[str, int]] = frozenset()  # (vip, port): conntrack to flush for removed UDP endpoints
    why: tuple[str, ...] = ()  # how the inputs became this state (for explain)
    warnings: tuple[str, ...] = ()  # malformed slice entries skipped (the rest of the service is programmed)


@dataclass(frozen=True)
class ServiceError:
    key: str
    reason: str


@dataclass(frozen=True)
class NodeContext:
    """What the model needs to know about this node and the proxy settings."""

    node_name: str
    node_addresses: tuple[str, ...]
    node_port_addresses: tuple[str, ...]  # node addresses inside nodePortAddresses (or all of them)
    default_scheduler: str = "rr"
    masquerade_all: bool = False
    cluster_cidrs: tuple[str, ...] = field(default_factory=tuple)
