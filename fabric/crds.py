"""bgp-fabric.io/v1 custom resources -> the agent's AgentConfig (pure: no I/O, no clock).

The CRDs (manifests/crds/) carry what the config file's `cluster`, `advertise`, `timers`, `peers` and
`pools` sections carry, so every object is validated by the same pydantic models (fabric.config) as
the file, and then all of them together by `AgentConfig` (duplicate peers, overlapping pools).

- BGPConfiguration: only the object named `default` is used (as Calico). Its fields override the
  base config: asNumber, nodeToNodeMesh, serviceClusterIPs / serviceExternalIPs /
  serviceLoadBalancerIPs (CIDR lists), communities, gracefulRestartTime, holdTime, keepaliveTime.
- BGPPeer: one external peer named after the object. `password.secretKeyRef {name, key}` is resolved
  through the `secret(name, key)` callable the caller passes (the Kubernetes source's `read_secret`).
- IPPool: cidr, ipipMode, natOutgoing, disabled, blockSize (the length nodes' pod CIDRs in it should have:
  a node whose pod CIDR differs is reported, fabric.stages.config).
- Peers from the CRDs are added to those of the base config file. Pools: once any IPPool object
  exists, the IPPools ARE the pools (as in Calico, where the file's pool is only the bootstrap
  default, like CALICO_IPV4POOL_CIDR); otherwise the file's pools apply. So an IPPool edit (e.g.
  ipipMode) takes effect cluster-wide instead of clashing with the file's copy of the same CIDR.

A bad object gives a `Problem` (`Kind/name: field: reason`, fields as written in the object) and the
LAST GOOD version of that object stays in effect (none if it never was good). `CrdConfig` keeps those
versions between calls, and hands the raw good objects out (`good_objects()`) so the agent can persist
them: `seed()` restores them after a restart, so a bad object met at start still has its last good
version (an IPPool with host bits at restart must not empty the pools and remove every pod route).

BGPPeer `spec.nodeSelector` syntax (which nodes peer with it; label equality only):
  empty / absent / `all()`                      every node
  `rack == 'r1' && zone == "a"`                 Calico-style: `key == 'value'` terms joined by `&&`
  `rack=r1,zone=a`                              Kubernetes-style: `key=value` pairs joined by `,`
Keys and values follow Kubernetes label syntax. Anything else (`!=`, `in`, `has()`, `||`) is rejected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from fabric.config import (Advertise, AgentConfig, ClusterSettings, Peer, Pool, Timers, format_errors)

GROUP = "bgp-fabric.io"
API_VERSION = f"{GROUP}/v1"
DEFAULT_CONFIGURATION = "default"
KINDS = ("BGPConfiguration", "BGPPeer", "IPPool")

SecretReader = Callable[[str, str], str]  # (secret name, key) -> value; raises with a reason

_LABEL_KEY = (r"(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*/)?"
              r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_CALICO_TERM = re.compile(rf"^\s*({_LABEL_KEY})\s*==\s*(?:'({_LABEL_VALUE})'|\"({_LABEL_VALUE})\")\s*$")
_K8S_TERM = re.compile(rf"^\s*({_LABEL_KEY})\s*=\s*({_LABEL_VALUE})\s*$")


@dataclass(frozen=True)
class Problem:
    """One reason an object was not (fully) used. `obj` is the object, for a Kubernetes Event."""

    kind: str
    name: str
    field: str
    reason: str
    obj: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}: {self.field}: {self.reason}"


class _Invalid(Exception):
    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems  # (field, reason)
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))


def parse_node_selector(text: str) -> dict[str, str]:
    """Parse the selector syntax above into label equalities ({} = every node). ValueError says why."""
    s = text.strip()
    if s in ("", "all()"):
        return {}
    if "==" in s:
        terms, pattern, example = s.split("&&"), _CALICO_TERM, "key == 'value' && key2 == 'value2'"
    else:
        terms, pattern, example = s.split(","), _K8S_TERM, "key=value,key2=value2"
    out: dict[str, str] = {}
    for term in terms:
        m = pattern.match(term)
        if m is None:
            raise ValueError(f"{term.strip()!r} is not a label equality (accepted: all(), {example})")
        key = m.group(1)
        value = next((g for g in m.groups()[1:] if g is not None), "")
        if len(key.rsplit("/", 1)[-1]) > 63 or len(value) > 63:
            raise ValueError(f"{term.strip()!r}: label names and values are at most 63 characters")
        if out.get(key, value) != value:
            raise ValueError(f"label {key!r} is required to equal two different values")
        out[key] = value
    return out


# ---- per-object mapping ----------------------------------------------------------------------------

def _validate(model: type[BaseModel], data: dict[str, Any], fields: Mapping[str, str], top: str = "spec") -> Any:
    """model.model_validate(data); errors as (object field, reason) using `fields` (config key -> object
    path); an error about the whole model (a cross-field check) is reported at `top`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for line in format_errors(e):
            loc, _, reason = line.partition(": ")
            head, _, rest = loc.partition(".")
            path = top if head == "(top level)" else fields.get(head, f"spec.{head}")
            problems.append((f"{path}.{rest}" if rest else path, reason))
        raise _Invalid(problems) from None


def _spec(obj: Mapping[str, Any], allowed: set[str]) -> dict[str, Any]:
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise _Invalid([("spec", "must be an object")])
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise _Invalid([(f"spec.{k}", "unknown field") for k in unknown])
    return dict(spec)


@dataclass(frozen=True)
class _Configuration:
    cluster: ClusterSettings
    advertise: Advertise
    timers: Timers


_BGPCONF_FIELDS = {"asNumber": "asn", "nodeToNodeMesh": "mesh", "allowPublicASN": "allowPublicAsn",
                   "serviceClusterIPs": "serviceClusterIPs", "serviceExternalIPs": "serviceExternalIPs",
                   "serviceLoadBalancerIPs": "serviceLoadBalancerIPs", "communities": "communities",
                   "gracefulRestartTime": "gracefulRestartTime", "holdTime": "holdTime",
                   "keepaliveTime": "keepalive"}


def _bgp_configuration(obj: Mapping[str, Any], base: AgentConfig) -> _Configuration:
    spec = _spec(obj, set(_BGPCONF_FIELDS))
    cluster = base.cluster.model_dump(by_alias=True)
    advertise = base.advertise.model_dump(by_alias=True, mode="json")
    timers = base.timers.model_dump(by_alias=True)
    for k, v in spec.items():
        target = _BGPCONF_FIELDS[k]
        if k in ("asNumber", "nodeToNodeMesh", "allowPublicASN"):
            cluster[target] = v
        elif k in ("gracefulRestartTime", "holdTime", "keepaliveTime"):
            timers[target] = v
        else:
            advertise[target] = v
    back = {v: f"spec.{k}" for k, v in _BGPCONF_FIELDS.items()}
    problems: list[tuple[str, str]] = []
    parsed: list[Any] = []
    for model, data, top in ((ClusterSettings, cluster, "spec.asNumber"), (Advertise, advertise, "spec"),
                             (Timers, timers, "spec.keepaliveTime")):
        try:
            parsed.append(_validate(model, data, back, top))
        except _Invalid as e:
            problems += e.problems
    if problems:
        raise _Invalid(problems)
    return _Configuration(*parsed)


_PEER_SPEC = {"peerIP", "asNumber", "port", "password", "nodeSelector", "multihop", "import", "export",
              "maxPrefixes", "routeReflectorClient", "passive", "sourceAddress", "nextHop"}
_PEER_FIELDS = {"name": "metadata.name", "address": "spec.peerIP", "asn": "spec.asNumber",
                "multihop": "spec.multihop.ttl", "password": "spec.password.secretKeyRef"}


def _secret_ref(spec: Mapping[str, Any]) -> tuple[str, str] | None:
    pw = spec.get("password")
    if pw is None:
        return None
    ref = pw.get("secretKeyRef") if isinstance(pw, dict) else None
    if not isinstance(ref, dict) or set(pw) != {"secretKeyRef"}:
        raise _Invalid([("spec.password", "must be {secretKeyRef: {name, key}}")])
    name, key = ref.get("name"), ref.get("key")
    problems = [(f"spec.password.secretKeyRef.{f}", "required, a non-empty string")
                for f, v in (("name", name), ("key", key)) if not isinstance(v, str) or not v]
    if set(ref) - {"name", "key"}:
        problems += [(f"spec.password.secretKeyRef.{k}", "unknown field") for k in sorted(set(ref) - {"name", "key"})]
    if problems:
        raise _Invalid(problems)
    return str(name), str(key)


def _bgp_peer(obj: Mapping[str, Any], name: str, secret: SecretReader | None) -> Peer:
    spec = _spec(obj, _PEER_SPEC)
    problems: list[tuple[str, str]] = []
    for req in ("peerIP", "asNumber"):
        if req not in spec:
            problems.append((f"spec.{req}", "required"))
    data: dict[str, Any] = {"name": name}
    for k, v in spec.items():
        if k == "peerIP":
            data["address"] = v
        elif k == "asNumber":
            data["asn"] = v
        elif k == "multihop":
            if not isinstance(v, dict) or set(v) - {"ttl"}:
                problems.append(("spec.multihop", "must be {ttl: 1-255}"))
            else:
                data["multihop"] = v.get("ttl", 2)  # no ttl given: two hops, the usual loopback peering
        elif k == "nodeSelector":
            if not isinstance(v, str):
                problems.append(("spec.nodeSelector", "must be a string"))
            else:
                try:
                    data["nodeSelector"] = parse_node_selector(v)
                except ValueError as e:
                    problems.append(("spec.nodeSelector", str(e)))
        elif k != "password":
            data[k] = v
    try:
        ref = _secret_ref(spec)
    except _Invalid as e:
        problems += e.problems
        ref = None
    if problems:
        raise _Invalid(problems)
    if ref is not None:
        if secret is None:
            raise _Invalid([("spec.password.secretKeyRef", "no way to read Secrets here")])
        try:
            data["password"] = secret(*ref)
        except Exception as e:  # noqa: BLE001 - the reader's own error says which secret/key failed
            raise _Invalid([("spec.password.secretKeyRef", str(e) or type(e).__name__)]) from None
    return _validate(Peer, data, _PEER_FIELDS)


_POOL_SPEC = {"cidr", "ipipMode", "natOutgoing", "disabled", "blockSize"}


def _ip_pool(obj: Mapping[str, Any]) -> Pool:
    spec = _spec(obj, _POOL_SPEC)
    if "cidr" not in spec:
        raise _Invalid([("spec.cidr", "required")])
    block = spec.pop("blockSize", None)
    pool = _validate(Pool, spec, {})
    if block is not None:
        if not isinstance(block, int) or isinstance(block, bool) or not 20 <= block <= 32:
            raise _Invalid([("spec.blockSize", "must be an integer from 20 to 32")])
        if block < pool.cidr.prefixlen:
            raise _Invalid([("spec.blockSize", f"/{block} blocks don't fit in {pool.cidr}")])
        pool = pool.model_copy(update={"block_size": block})
    return pool


# ---- folding everything together --------------------------------------------------------------------

def _name(obj: Mapping[str, Any]) -> str | None:
    md = obj.get("metadata")
    name = md.get("name") if isinstance(md, dict) else None
    return name if isinstance(name, str) and name else None


class CrdConfig:
    """Effective config = base config + CRD objects, keeping each object's last good version."""

    def __init__(self) -> None:
        self._good: dict[tuple[str, str], Any] = {}
        self._good_raw: dict[tuple[str, str], Mapping[str, Any]] = {}

    def seed(self, base: AgentConfig, objects: Mapping[str, Mapping[str, Mapping[str, Any]]],
             secret: SecretReader | None = None) -> list[str]:
        """Last good objects of a previous run (kind -> name -> object): each that still parses becomes
        the last good version of its object. Returns the ones that did not (reasons)."""
        bad = []
        for kind, objs in objects.items():
            for name, obj in objs.items():
                try:
                    if kind == "IPPool":
                        value = _ip_pool(obj)
                    elif kind == "BGPPeer":
                        value = _bgp_peer(obj, name, secret)
                    elif kind == "BGPConfiguration":
                        value = _bgp_configuration(obj, base)
                    else:
                        continue
                except _Invalid as e:
                    bad.append(f"{kind}/{name}: {e}")
                    continue
                self._good[(kind, name)] = value
                self._good_raw[(kind, name)] = obj
        return bad

    def good_objects(self) -> dict[str, dict[str, Mapping[str, Any]]]:
        """The raw objects whose last version in effect is good: kind -> name -> object."""
        out: dict[str, dict[str, Mapping[str, Any]]] = {k: {} for k in KINDS}
        for (kind, name), obj in self._good_raw.items():
            out[kind][name] = obj
        return out

    def effective(self, base: AgentConfig, objects: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  secret: SecretReader | None = None) -> tuple[AgentConfig, list[Problem]]:
        """`objects`: kind -> name -> object (as the Store holds them). Returns (config, problems)."""
        problems: list[Problem] = []
        seen: set[tuple[str, str]] = set()

        def parse(kind: str, key: str, obj: Mapping[str, Any], fn: Callable[[], Any]) -> Any:
            name = _name(obj) or key
            seen.add((kind, name))
            try:
                value = fn()
            except _Invalid as e:
                kept = self._good.get((kind, name))
                suffix = "" if kept is None else " (keeping its last good version)"
                problems.extend(Problem(kind, name, f, r + suffix, obj) for f, r in e.problems)
                return kept
            self._good[(kind, name)] = value
            self._good_raw[(kind, name)] = obj
            return value

        # BGPConfiguration
        conf: _Configuration | None = None
        for key, obj in sorted((objects.get("BGPConfiguration") or {}).items()):
            name = _name(obj) or key
            if name != DEFAULT_CONFIGURATION:
                problems.append(Problem("BGPConfiguration", name, "metadata.name",
                                        f"ignored: only the object named {DEFAULT_CONFIGURATION!r} is used", obj))
                continue
            conf = parse("BGPConfiguration", key, obj, lambda obj=obj: _bgp_configuration(obj, base))

        # IPPools: each checked alone, then against the pools accepted before it (in name order).
        pools = [] if objects.get("IPPool") else list(base.pools)
        for key, obj in sorted((objects.get("IPPool") or {}).items()):
            pool = parse("IPPool", key, obj, lambda obj=obj: _ip_pool(obj))
            if pool is None:
                continue
            name = _name(obj) or key
            clash = next((p for p in pools if p.cidr.overlaps(pool.cidr)), None)
            if clash is not None:
                problems.append(Problem("IPPool", name, "spec.cidr",
                                        f"{pool.cidr} overlaps pool {clash.cidr}; not used", obj))
                continue
            pools.append(pool)

        peers = list(base.peers)
        for key, obj in sorted((objects.get("BGPPeer") or {}).items()):
            name = _name(obj) or key
            peer = parse("BGPPeer", key, obj, lambda obj=obj, name=name: _bgp_peer(obj, name, secret))
            if peer is None:
                continue
            # One address for peers of disjoint node sets (a per-rack anycast ToR) is fine: each node judges
            # the peers that select it (fabric.bgp_desired). The same selector clashes on every node.
            clash = next((p for p in peers if p.name == peer.name or
                          (p.address == peer.address and p.node_selector == peer.node_selector)), None)
            if clash is not None:
                if clash.name == peer.name:
                    what, why = "metadata.name", f"same name as peer {clash.name!r} ({clash.address})"
                else:
                    what, why = "spec.peerIP", (f"same address and nodeSelector as peer {clash.name!r} "
                                                f"({clash.address})")
                problems.append(Problem("BGPPeer", name, what, f"{why}; not used", obj))
                continue
            peers.append(peer)

        # Objects that are gone lose their last good version.
        for k in [k for k in self._good if k not in seen]:
            del self._good[k]
            self._good_raw.pop(k, None)

        fields = {name: getattr(base, name) for name in AgentConfig.model_fields}
        fields.update(pools=pools, peers=peers)
        if conf is not None:
            fields.update(cluster=conf.cluster, advertise=conf.advertise, timers=conf.timers)
        try:
            return AgentConfig.model_validate(fields), problems
        except ValidationError as e:  # the per-object checks above should make this unreachable
            problems += [Problem("AgentConfig", "effective", *line.split(": ", 1)) for line in format_errors(e)]
            return base, problems


def secret_refs(objects: Mapping[str, Mapping[str, Any]]) -> set[tuple[str, str]]:
    """The (secret name, key) pairs BGPPeers refer to: what the Role's resourceNames must allow."""
    out = set()
    for obj in objects.values():
        spec = obj.get("spec") if isinstance(obj, dict) else None
        try:
            ref = _secret_ref(spec) if isinstance(spec, dict) else None
        except _Invalid:
            ref = None
        if ref:
            out.add(ref)
    return out
