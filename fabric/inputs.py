"""Cluster state as the sources deliver it: nodes, services, endpoint slices (Kubernetes shapes).

Both the file source (labs) and the Kubernetes source produce a `ClusterState`. Nodes are parsed
strictly here; Services and EndpointSlices stay raw dicts so the service model can skip a bad
object with a reason while programming every good one.
"""

from __future__ import annotations

import ipaddress
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


class ClusterState(Model):
    nodes: list[NodeInfo] = Field(default_factory=list)
    services: list[dict[str, Any]] = Field(default_factory=list)
    endpoint_slices: list[dict[str, Any]] = Field(default_factory=list, alias="endpointSlices")
    # The BGP custom resources, in their Kubernetes shape (metadata + spec), as the Kubernetes source
    # delivers them: the file source lets a lab change pools/peers cluster-wide without restarts.
    ip_pools: list[dict[str, Any]] = Field(default_factory=list, alias="ipPools")
    bgp_peers: list[dict[str, Any]] = Field(default_factory=list, alias="bgpPeers")
    bgp_configurations: list[dict[str, Any]] = Field(default_factory=list, alias="bgpConfigurations")

    def node(self, name: str) -> NodeInfo | None:
        return next((n for n in self.nodes if n.name == name), None)


def node_address_in(n: NodeInfo, net: ipaddress.IPv4Network) -> bool:
    return n.address in net
