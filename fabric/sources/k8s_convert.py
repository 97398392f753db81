"""Pure conversion of Kubernetes API objects (JSON dicts) into what the Store holds.

- Node -> fabric.inputs.NodeInfo (InternalIP, spec.podCIDRs or spec.podCIDR, labels, ASN annotation);
  a Node that can't be used raises `SkipObject` with the reason.
- Everything else stays a dict in API JSON shape, normalised so that the same object read by a list
  and by a watch compares equal (the Store drops no-op changes by equality): kind/apiVersion are always
  set, and fields that change on every write without meaning anything to us are removed
  (metadata.resourceVersion, metadata.managedFields, the kubectl last-applied annotation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fabric.config import format_errors
from fabric.inputs import NodeInfo

ASN_ANNOTATION = "bgp-fabric.io/asn"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@dataclass(frozen=True)
class KindInfo:
    kind: str
    api_version: str
    namespaced: bool


KIND_INFO: dict[str, KindInfo] = {k.kind: k for k in (
    KindInfo("Node", "v1", False),
    KindInfo("Service", "v1", True),
    KindInfo("EndpointSlice", "discovery.k8s.io/v1", True),
    KindInfo("BGPConfiguration", "bgp-fabric.io/v1", False),
    KindInfo("BGPPeer", "bgp-fabric.io/v1", False),
    KindInfo("IPPool", "bgp-fabric.io/v1", False),
)}


class SkipObject(Exception):
    """This object can't be used; the message says why (logged, the object is not recorded)."""


def key_of(kind: str, obj: dict[str, Any]) -> str:
    md = obj.get("metadata") or {}
    name = md.get("name")
    if not isinstance(name, str) or not name:
        raise SkipObject(f"{kind}: object without metadata.name")
    if KIND_INFO[kind].namespaced:
        return f"{md.get('namespace') or 'default'}/{name}"
    return name


def normalize(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["kind"], out["apiVersion"] = kind, KIND_INFO[kind].api_version
    md = out.setdefault("metadata", {})
    md.pop("resourceVersion", None)
    md.pop("managedFields", None)
    ann = md.get("annotations")
    if isinstance(ann, dict) and LAST_APPLIED in ann:
        ann = {k: v for k, v in ann.items() if k != LAST_APPLIED}
        if ann:
            md["annotations"] = ann
        else:
            md.pop("annotations")
    return out


def node_info(obj: dict[str, Any]) -> NodeInfo:
    """A Node as NodeInfo, or SkipObject naming the field that makes it unusable."""
    md = obj.get("metadata") or {}
    name = md.get("name") or "?"
    spec = obj.get("spec") or {}
    addrs = (obj.get("status") or {}).get("addresses") or []
    internal = [a.get("address") for a in addrs if isinstance(a, dict) and a.get("type") == "InternalIP"]
    # Dual-stack nodes list an IPv6 InternalIP too; the fabric's underlay is IPv4.
    v4 = [a for a in internal if isinstance(a, str) and ":" not in a]
    if not v4:
        raise SkipObject(f"Node/{name}: status.addresses: no IPv4 InternalIP")
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    if not isinstance(cidrs, list):
        raise SkipObject(f"Node/{name}: spec.podCIDRs: must be a list")
    cidrs = [c for c in cidrs if not (isinstance(c, str) and ":" in c)]  # IPv6 pod ranges: not ours
    data: dict[str, Any] = {"name": name, "address": v4[0], "podCIDRs": cidrs,
                            "labels": md.get("labels") or {}}
    asn = (md.get("annotations") or {}).get(ASN_ANNOTATION)
    if asn is not None:
        if not (isinstance(asn, str) and asn.strip().isdigit()):
            raise SkipObject(f"Node/{name}: annotation {ASN_ANNOTATION}: {asn!r} is not a number")
        data["asn"] = int(asn)
    try:
        return NodeInfo.model_validate(data)
    except ValidationError as e:
        fields = {"address": "status.addresses[InternalIP]", "podCIDRs": "spec.podCIDRs",
                  "asn": f"annotation {ASN_ANNOTATION}"}
        problems = []
        for line in format_errors(e):
            field, _, reason = line.partition(": ")
            head = field.split(".")[0]
            problems.append(f"{fields.get(head, field)}{field[len(head):] if head in fields else ''}: {reason}")
        raise SkipObject(f"Node/{name}: " + "; ".join(problems)) from None


def convert(kind: str, obj: dict[str, Any]) -> tuple[str, Any]:
    """(Store key, Store value) for one API object; SkipObject if it can't be used."""
    key = key_of(kind, obj)
    if kind == "Node":
        return key, node_info(obj)
    return key, normalize(kind, obj)
