"""Cluster state as the sources deliver it: nodes, services, endpoint slices (Kubernetes shapes).

Both the file source (labs) and the Kubernetes source produce a `ClusterState`. Nodes are parsed
strictly here; Services and EndpointSlices stay raw dicts so the service model can skip a bad
object with a reason while programming every good one. Pods and Namespaces are reduced to what
NetworkPolicy needs (`PodInfo`, `NamespaceInfo`, built by fabric.sources.k8s_convert), so a status
update that changes nothing of it is no change; NetworkPolicies stay raw dicts (fabric.policy.model
validates them and skips a bad one with a reason).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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


class ClusterState(Model):
    nodes: list[NodeInfo] = Field(default_factory=list)
    services: list[dict[str, Any]] = Field(default_factory=list)
    endpoint_slices: list[dict[str, Any]] = Field(default_factory=list, alias="endpointSlices")
    # The BGP custom resources, in their Kubernetes shape (metadata + spec), as the Kubernetes source
    # delivers them: the file source lets a lab change pools/peers cluster-wide without restarts.
    ip_pools: list[dict[str, Any]] = Field(default_factory=list, alias="ipPools")
    bgp_peers: list[dict[str, Any]] = Field(default_factory=list, alias="bgpPeers")
    bgp_configurations: list[dict[str, Any]] = Field(default_factory=list, alias="bgpConfigurations")
    # NetworkPolicy inputs, Kubernetes shapes (a Pod needs metadata, spec.nodeName and status.podIP(s)).
    pods: list[dict[str, Any]] = Field(default_factory=list)
    namespaces: list[dict[str, Any]] = Field(default_factory=list)
    network_policies: list[dict[str, Any]] = Field(default_factory=list, alias="networkPolicies")

    def node(self, name: str) -> NodeInfo | None:
        return next((n for n in self.nodes if n.name == name), None)


def node_address_in(n: NodeInfo, net: ipaddress.IPv4Network) -> bool:
    return n.address in net
