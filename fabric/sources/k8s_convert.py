"""Pure conversion of Kubernetes API objects (JSON dicts) into what the Store holds.

- Node -> fabric.inputs.NodeInfo (InternalIP, spec.podCIDRs or spec.podCIDR, labels, ASN annotation);
  a Node that can't be used raises `SkipObject` with the reason.
- Pod -> fabric.inputs.PodInfo (labels, node, IPv4 pod IPs, phase, hostNetwork, named container ports),
  Namespace -> fabric.inputs.NamespaceInfo (labels, always with kubernetes.io/metadata.name): only what
  NetworkPolicy reads, so the many status writes of a pod's life are no-op changes in the Store.
- Everything else stays a dict in API JSON shape, normalised so that the same object read by a list
  and by a watch compares equal (the Store drops no-op changes by equality): kind/apiVersion are always
  set, and fields that change on every write without meaning anything to us are removed
  (metadata.resourceVersion, metadata.managedFields, the kubectl last-applied annotation).
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fabric.config import format_errors
from fabric.inputs import NAMESPACE_NAME_LABEL, NamespaceInfo, NodeInfo, PodInfo

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
    KindInfo("Pod", "v1", True),
    KindInfo("Namespace", "v1", False),
    KindInfo("NetworkPolicy", "networking.k8s.io/v1", True),
)}
PROTOCOLS = ("TCP", "UDP", "SCTP")


class SkipObject(Exception):
    """This object can't be used; the message says why (logged, the object is not recorded)."""


def key_of(kind: str, obj: dict[str, Any]) -> str:
    md = obj.get("metadata") or {}
    if not isinstance(md, dict):
        raise SkipObject(f"{kind}: metadata: must be a mapping")
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


def _labels(where: str, md: dict[str, Any]) -> dict[str, str]:
    labels = md.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise SkipObject(f"{where}: metadata.labels: must map strings to strings")
    return dict(labels)


def _list(where: str, field: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SkipObject(f"{where}: {field}: must be a list")
    return value


def _ipv4(value: Any) -> str | None:
    if not isinstance(value, str) or ":" in value:
        return None  # IPv6 (dual stack): the fabric is IPv4
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        return None


def pod_info(obj: dict[str, Any]) -> PodInfo:
    """A Pod as PodInfo, or SkipObject naming the field that makes it unusable."""
    md = obj.get("metadata") or {}
    ns, name = md.get("namespace") or "default", md.get("name") or "?"
    where = f"Pod/{ns}/{name}"
    spec, status = obj.get("spec"), obj.get("status")
    spec, status = {} if spec is None else spec, {} if status is None else status
    if not isinstance(spec, dict) or not isinstance(status, dict):
        raise SkipObject(f"{where}: spec/status: must be mappings")
    raw_ips = [p.get("ip") for p in _list(where, "status.podIPs", status.get("podIPs")) if isinstance(p, dict)] \
        or [status.get("podIP")]
    ips: list[str] = []
    for raw in raw_ips:
        if raw in (None, ""):
            continue
        ip = _ipv4(raw)
        if ip is None and not (isinstance(raw, str) and ":" in raw):
            raise SkipObject(f"{where}: status.podIPs: {raw!r} is not an IP address")
        if ip is not None and ip not in ips:
            ips.append(ip)
    ports: set[tuple[str, str, int]] = set()
    for i, c in enumerate(_list(where, "spec.containers", spec.get("containers"))):
        if not isinstance(c, dict):
            raise SkipObject(f"{where}: spec.containers[{i}]: must be a mapping")
        for j, port in enumerate(_list(where, f"spec.containers[{i}].ports", c.get("ports"))):
            if not isinstance(port, dict) or not port.get("name"):
                continue  # only named ports matter to policies; numbers are matched on the wire
            pname, proto, num = port.get("name"), port.get("protocol") or "TCP", port.get("containerPort")
            if not isinstance(pname, str) or proto not in PROTOCOLS or isinstance(num, bool) \
                    or not isinstance(num, int) or not 1 <= num <= 65535:
                raise SkipObject(f"{where}: spec.containers[{i}].ports[{j}]: needs a name, a protocol of "
                                 f"{'/'.join(PROTOCOLS)} and a containerPort 1-65535")
            ports.add((pname, proto, num))
    node = spec.get("nodeName") or ""
    phase = status.get("phase") or ""
    if not isinstance(node, str) or not isinstance(phase, str):
        raise SkipObject(f"{where}: spec.nodeName/status.phase: must be strings")
    return PodInfo(namespace=ns, name=name, labels=_labels(where, md), node=node, ips=tuple(ips), phase=phase,
                   host_network=spec.get("hostNetwork") is True, ports=tuple(sorted(ports)))


def namespace_info(obj: dict[str, Any]) -> NamespaceInfo:
    md = obj.get("metadata") or {}
    name = md.get("name") or "?"
    labels = _labels(f"Namespace/{name}", md)
    labels[NAMESPACE_NAME_LABEL] = name  # the API server enforces it; the file source gets it too
    return NamespaceInfo(name=name, labels=labels)


def convert(kind: str, obj: dict[str, Any]) -> tuple[str, Any]:
    """(Store key, Store value) for one API object; SkipObject if it can't be used."""
    key = key_of(kind, obj)
    if kind == "Node":
        return key, node_info(obj)
    if kind == "Pod":
        return key, pod_info(obj)
    if kind == "Namespace":
        return key, namespace_info(obj)
    return key, normalize(kind, obj)
