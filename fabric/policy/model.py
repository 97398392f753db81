"""NetworkPolicy objects as typed values, validated as the Kubernetes API defines them. Pure.

`parse_policy(obj)` turns a networking.k8s.io/v1 NetworkPolicy dict into a `Policy`, or raises
`PolicyError` with one `field: reason` line per problem (the object is then skipped and reported;
every other policy stays enforced). Every field of the v1 spec is implemented or rejected: nothing is
accepted and ignored.

Semantics carried here (the rest is in fabric.policy.evaluate, the spec evaluator):
- policyTypes absent: Ingress, plus Egress when spec.egress has at least one rule (API defaulting);
- a rule's `from`/`to` absent or empty: every peer; `ports` absent or empty: every port and protocol;
- `ingress`/`egress` absent or empty with that type: the selected pods are isolated, nothing allowed;
- a peer with podSelector only: pods of the policy's namespace; namespaceSelector only: every pod of the
  matching namespaces; both: the matching pods of the matching namespaces; ipBlock: addresses (cidr minus
  except), pods or not;
- a port is a number, a number range (endPort) or a container port name (resolved on the destination pod);
  protocol TCP (default), UDP or SCTP. An IPv6 ipBlock matches no (IPv4) packet.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

PROTOCOLS = ("TCP", "UDP", "SCTP")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # IANA_SVC_NAME, as the API validates it


class PolicyError(Exception):
    """A NetworkPolicy that can't be enforced; `problems` are `field: reason` lines."""

    def __init__(self, key: str, problems: list[str]) -> None:
        super().__init__(f"NetworkPolicy {key}: " + "; ".join(problems))
        self.key = key
        self.problems = problems


@dataclass(frozen=True, order=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True, order=True)
class Selector:
    """A LabelSelector: every matchLabels pair and every requirement must hold. Empty: everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.requirements

    def anchor(self) -> tuple[str, str] | None:
        """One label pair every match must carry (for indexing), if the selector has one."""
        if self.match_labels:
            return self.match_labels[0]
        for r in self.requirements:
            if r.operator == "In" and len(r.values) == 1:
                return r.key, r.values[0]
        return None

    def text(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels]
        for r in self.requirements:
            vals = ",".join(r.values)
            parts.append({"In": f"{r.key} in ({vals})", "NotIn": f"{r.key} notin ({vals})", "Exists": r.key,
                          "DoesNotExist": f"!{r.key}"}[r.operator])
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True, order=True)
class PodPeer:
    """Pods matching `pods` in the namespace `namespace` (no namespaceSelector) or in namespaces matching
    `namespaces`."""

    namespace: str | None
    namespaces: Selector | None
    pods: Selector

    def text(self) -> str:
        where = f"namespace {self.namespace}" if self.namespaces is None else f"namespaces {self.namespaces.text()}"
        return f"pods {self.pods.text()} in {where}"


@dataclass(frozen=True, order=True)
class IPBlock:
    cidr: ipaddress.IPv4Network | None  # None: an IPv6 block, which matches no IPv4 packet
    excepts: tuple[ipaddress.IPv4Network, ...] = ()

    def contains(self, ip: ipaddress.IPv4Address) -> bool:
        return self.cidr is not None and ip in self.cidr and not any(ip in e for e in self.excepts)

    def text(self) -> str:
        if self.cidr is None:
            return "ipBlock (IPv6, matches no IPv4 packet)"
        return f"ipBlock {self.cidr}" + (f" except {', '.join(map(str, self.excepts))}" if self.excepts else "")


Peer = Union[PodPeer, IPBlock]


@dataclass(frozen=True, order=True)
class PortMatch:
    """`port` None: every port of the protocol; an int (with `end_port` for a range) or a port name."""

    protocol: str
    port: int | str | None = None
    end_port: int | None = None

    def text(self) -> str:
        if self.port is None:
            return f"{self.protocol} (any port)"
        return f"{self.protocol} {self.port}" + (f"-{self.end_port}" if self.end_port is not None else "")


@dataclass(frozen=True)
class Rule:
    """peers None: every peer (from/to absent or empty); ports empty: every port and protocol."""

    peers: tuple[Peer, ...] | None
    ports: tuple[PortMatch, ...] = ()


@dataclass(frozen=True)
class Policy:
    namespace: str
    name: str
    pod_selector: Selector
    ingress: tuple[Rule, ...] | None  # None: the policy does not cover ingress
    egress: tuple[Rule, ...] | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rules(self, direction: str) -> tuple[Rule, ...] | None:
        return self.ingress if direction == "ingress" else self.egress

    def port_names(self) -> set[str]:
        return {p.port for d in (self.ingress, self.egress) for r in d or () for p in r.ports if isinstance(p.port, str)}


# ---------------------------------------------------------------------------------------------
# Parsing

_SPEC_KEYS = {"podSelector", "policyTypes", "ingress", "egress"}
_PEER_KEYS = {"podSelector", "namespaceSelector", "ipBlock"}


class _Parser:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, where: str, why: str) -> None:
        self.problems.append(f"{where}: {why}")

    def mapping(self, where: str, value: Any, keys: set[str]) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(where, "must be a mapping")
            return None
        for k in sorted(set(value) - keys, key=str):
            self.bad(f"{where}.{k}", "unknown field")
        return value

    def listing(self, where: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.bad(where, "must be a list")
            return []
        return value

    def selector(self, where: str, value: Any) -> Selector:
        m = self.mapping(where, value, {"matchLabels", "matchExpressions"})
        if m is None:
            return Selector()
        labels = m.get("matchLabels") or {}
        pairs: list[tuple[str, str]] = []
        if not isinstance(labels, dict):
            self.bad(f"{where}.matchLabels", "must map strings to strings")
        else:
            for k, v in labels.items():
                if not isinstance(k, str) or not isinstance(v, str) or not k:
                    self.bad(f"{where}.matchLabels", f"{k!r}: {v!r}: keys and values must be strings")
                else:
                    pairs.append((k, v))
        reqs: list[Requirement] = []
        for i, e in enumerate(self.listing(f"{where}.matchExpressions", m.get("matchExpressions"))):
            w = f"{where}.matchExpressions[{i}]"
            e = self.mapping(w, e, {"key", "operator", "values"})
            if e is None:
                continue
            key, op, values = e.get("key"), e.get("operator"), e.get("values")
            if not isinstance(key, str) or not key:
                self.bad(f"{w}.key", "required string")
                continue
            if op not in OPERATORS:
                self.bad(f"{w}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}")
                continue
            vals = self.listing(f"{w}.values", values)
            if not all(isinstance(v, str) for v in vals):
                self.bad(f"{w}.values", "must be strings")
                continue
            if op in ("In", "NotIn") and not vals:
                self.bad(f"{w}.values", f"must not be empty for {op}")
                continue
            if op in ("Exists", "DoesNotExist") and vals:
                self.bad(f"{w}.values", f"must be empty for {op}")
                continue
            reqs.append(Requirement(key, op, tuple(sorted(set(vals)))))
        return Selector(tuple(sorted(set(pairs))), tuple(sorted(set(reqs))))

    def ip_block(self, where: str, value: Any) -> IPBlock | None:
        m = self.mapping(where, value, {"cidr", "except"})
        if m is None:
            return None
        cidr = m.get("cidr")
        if not isinstance(cidr, str):
            self.bad(f"{where}.cidr", "required string")
            return None
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            self.bad(f"{where}.cidr", f"{cidr!r} is not a CIDR")
            return None
        excepts: list[ipaddress.IPv4Network] = []
        for i, e in enumerate(self.listing(f"{where}.except", m.get("except"))):
            try:
                en = ipaddress.ip_network(e, strict=False) if isinstance(e, str) else None
            except ValueError:
                en = None
            if en is None:
                self.bad(f"{where}.except[{i}]", f"{e!r} is not a CIDR")
            elif en.version != net.version or not en.subnet_of(net) or en == net:  # type: ignore[arg-type]
                self.bad(f"{where}.except[{i}]", f"{e} must be a strict subset of {net}")
            elif isinstance(en, ipaddress.IPv4Network):
                excepts.append(en)
        if not isinstance(net, ipaddress.IPv4Network):
            return IPBlock(None)
        return IPBlock(net, tuple(sorted(set(excepts))))

    def peer(self, where: str, value: Any, namespace: str) -> Peer | None:
        m = self.mapping(where, value, _PEER_KEYS)
        if m is None:
            return None
        present = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if m.get(k) is not None]
        if not present:
            self.bad(where, "must set podSelector, namespaceSelector or ipBlock")
            return None
        if "ipBlock" in present:
            if len(present) > 1:
                self.bad(where, "ipBlock can't be combined with podSelector or namespaceSelector")
                return None
            return self.ip_block(f"{where}.ipBlock", m["ipBlock"])
        pods = self.selector(f"{where}.podSelector", m.get("podSelector"))
        if "namespaceSelector" in present:
            return PodPeer(None, self.selector(f"{where}.namespaceSelector", m["namespaceSelector"]), pods)
        return PodPeer(namespace, None, pods)

    def port(self, where: str, value: Any) -> PortMatch | None:
        m = self.mapping(where, value, {"protocol", "port", "endPort"})
        if m is None:
            return None
        proto = m.get("protocol") or "TCP"
        if proto not in PROTOCOLS:
            self.bad(f"{where}.protocol", f"{proto!r} is not one of {', '.join(PROTOCOLS)}")
            return None
        port, end = m.get("port"), m.get("endPort")
        if isinstance(port, bool) or isinstance(end, bool):
            self.bad(where, "port and endPort must be numbers or a port name")
            return None
        if isinstance(port, str) and port.isdigit():
            port = int(port)  # an int-or-string given as a string of digits (YAML quoting)
        if port is None:
            if end is not None:
                self.bad(f"{where}.endPort", "needs a numeric port")
                return None
            return PortMatch(proto)
        if isinstance(port, str):
            if not SVC_NAME.match(port) or len(port) > 15:
                self.bad(f"{where}.port", f"{port!r} is neither a number nor a port name (IANA_SVC_NAME)")
                return None
            if end is not None:
                self.bad(f"{where}.endPort", "can't be used with a named port")
                return None
            return PortMatch(proto, port)
        if not isinstance(port, int) or not 1 <= port <= 65535:
            self.bad(f"{where}.port", f"{port!r} must be 1-65535 or a port name")
            return None
        if end is not None and (not isinstance(end, int) or not port <= end <= 65535):
            self.bad(f"{where}.endPort", f"{end!r} must be a number from port ({port}) to 65535")
            return None
        return PortMatch(proto, port, end if end != port else None)

    def rules(self, where: str, value: Any, peers_key: str, namespace: str) -> tuple[Rule, ...]:
        out: list[Rule] = []
        for i, r in enumerate(self.listing(where, value)):
            w = f"{where}[{i}]"
            m = self.mapping(w, r, {peers_key, "ports"})
            if m is None:
                continue
            raw_peers = self.listing(f"{w}.{peers_key}", m.get(peers_key))
            peers = [self.peer(f"{w}.{peers_key}[{j}]", p, namespace) for j, p in enumerate(raw_peers)]
            ports = [self.port(f"{w}.ports[{j}]", p) for j, p in enumerate(self.listing(f"{w}.ports", m.get("ports")))]
            out.append(Rule(tuple(p for p in peers if p is not None) if raw_peers else None,
                            tuple(p for p in ports if p is not None)))
        return tuple(out)


def parse_policy(obj: Any) -> Policy:
    """A NetworkPolicy dict as a `Policy`; PolicyError naming every bad field."""
    md = obj.get("metadata") if isinstance(obj, dict) else None
    md = md if isinstance(md, dict) else {}
    ns, name = md.get("namespace") or "default", md.get("name")
    key = f"{ns}/{name or '?'}"
    p = _Parser()
    if not isinstance(name, str) or not name or not isinstance(ns, str):
        p.bad("metadata.name", "required")
    spec = p.mapping("spec", obj.get("spec") if isinstance(obj, dict) else None, _SPEC_KEYS)
    if spec is None or p.problems:
        raise PolicyError(key, p.problems)
    if "podSelector" not in spec:
        p.bad("spec.podSelector", "required (an empty selector {} selects every pod of the namespace)")
    pod_selector = p.selector("spec.podSelector", spec.get("podSelector"))
    types = p.listing("spec.policyTypes", spec.get("policyTypes"))
    for t in types:
        if t not in ("Ingress", "Egress"):
            p.bad("spec.policyTypes", f"{t!r} is not Ingress or Egress")
    ingress = p.rules("spec.ingress", spec.get("ingress"), "from", ns)
    egress = p.rules("spec.egress", spec.get("egress"), "to", ns)
    if not types:
        types = ["Ingress"] + (["Egress"] if egress else [])
    if p.problems:
        raise PolicyError(key, p.problems)
    return Policy(ns, name, pod_selector, ingress if "Ingress" in types else None,
                  egress if "Egress" in types else None)
