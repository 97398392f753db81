"""Cluster objects as the sources record them (both the file source and the Kubernetes source).

Nodes are parsed strictly into `NodeInfo` here; Services, EndpointSlices and the custom resources
stay raw dicts so each consumer can skip a bad object with a reason while using every good one.
Pods and Namespaces are reduced to what NetworkPolicy needs (`PodInfo`, `NamespaceInfo`, built by
fabric.sources.k8s_convert), so a status update that changes nothing of it is no change;
NetworkPolicies stay raw dicts (fabric.policy.model validates them and skips a bad one with a reason).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pydantic import Field

from fabric.config import CIDR, Address, ASN, Model


class NodeInfo(Model):
    """Another node of the cluster (or this one): name, underlay address, pod CIDRs."""

    name: str = Field(min_length=1, max_length=253)
    address: Address
    pod_cidrs: list[CIDR] = Field(default_factory=list, alias="podCIDRs")
    asn: ASN | None = None
    labels: dict[str, str] = Field(default_factory=dict)


# Set by the API server on every Namespace (Kubernetes >= 1.21); the file source sets it too.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
TERMINAL_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class PodInfo:
    """What NetworkPolicy needs of a Pod. `ports`: (name, protocol, containerPort) of its named ports."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str = ""  # spec.nodeName; "" while unscheduled
    ips: tuple[str, ...] = ()  # IPv4 addresses from status.podIPs / status.podIP
    phase: str = ""
    host_network: bool = False
    ports: tuple[tuple[str, str, int], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def enforceable(self) -> bool:
        """A pod that policies select and match: has its own address, is not finished (its IP may be reused)."""
        return bool(self.ips) and not self.host_network and self.phase not in TERMINAL_PHASES


@dataclass(frozen=True)
class NamespaceInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


def node_address_in(n: NodeInfo, net: ipaddress.IPv4Network) -> bool:
    return n.address in net
