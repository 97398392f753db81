"""Desired nftables state for NetworkPolicy, kept up to date per change. Pure (no kernel, no clock).

The shape (rendered by fabric.policy.nft, simulated by fabric.policy.datapath):

- one address set per distinct pod selector in use, `sel-<hash>` = the IPs of the pods it selects. A
  selector is (scope, podSelector) with scope = one namespace (a policy's own pods, a peer without
  namespaceSelector) or a namespaceSelector. Policies that use the same selector share its set;
- one set per container port name in use, `port-<name>` = (pod IP . protocol . port) of every pod that
  has a port of that name (named ports resolve on the destination pod);
- per policy and direction one chain, `pol-in-<hash>` / `pol-out-<hash>`: one rule per peer and protocol
  that accepts;
- per namespace and direction one chain, `ns-in-<ns>` / `ns-out-<ns>`: `ip daddr @<target set> jump
  pol-in-<hash>` for each policy of the namespace, then drop;
- two verdict maps, `ingress-pods` / `egress-pods`: pod IP -> `jump ns-in-<ns>` for the pods of THIS node that a
  policy isolates in that direction.

So a pod add, delete or label change is set and map elements only; a policy change rewrites its own
chains and its namespace's dispatch chain (and set elements of the pods its selectors gain or lose).
Each change records what it touched (`dirty`), and the reconciler diffs just those keys.

Selector matching is indexed (scope -> label pair -> selectors) so a pod change looks at the selectors
that could match it, not at every policy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Union

from fabric.inputs import NAMESPACE_NAME_LABEL, NamespaceInfo, PodInfo
from fabric.policy.model import IPBlock, Policy, PodPeer, Selector

DIRECTIONS = ("ingress", "egress")
MAPS = {"ingress": "ingress-pods", "egress": "egress-pods"}  # verdict maps: pod IP -> jump its namespace chain
_SHORT = {"ingress": "in", "egress": "out"}
_DNS_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")

# (scope kind, scope value, pod selector): "ns" + namespace name, or "nss" + a namespaceSelector.
SelKey = tuple[str, Union[str, Selector], Selector]
PortElem = tuple[str, str, int]  # (ip, protocol, port)


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def set_name(sk: SelKey) -> str:
    return "sel-" + _h(repr(sk))


def port_set_name(name: str) -> str:
    return "port-" + name  # names are IANA_SVC_NAME (validated), valid nft identifiers


def policy_chain(key: str, direction: str) -> str:
    return f"pol-{_SHORT[direction]}-{_h(key)}"


def ns_chain(ns: str, direction: str) -> str:
    return f"ns-{_SHORT[direction]}-" + (ns if _DNS_LABEL.match(ns) else _h(ns))


@dataclass(frozen=True)
class PeerRule:
    """Accept when the peer (saddr for ingress, daddr for egress) and the port match.

    peer_set / cidr+excepts: the peer condition (both None: any peer). ports: (protocol, ranges), empty
    ranges = any port of the protocol; named: (protocol, port set) matched on daddr . l4proto . dport.
    ports and named both empty/None: any protocol. `origin`: (policy key, direction, rule index)."""

    peer_set: str | None
    cidr: ipaddress.IPv4Network | None
    excepts: tuple[ipaddress.IPv4Network, ...]
    protocol: str | None
    ranges: tuple[tuple[int, int], ...]
    named: str | None
    origin: tuple[str, str, int]


@dataclass(frozen=True)
class JumpRule:
    """In a namespace chain: packets of pods in `target_set` go through `chain` (a policy's chain)."""

    target_set: str
    chain: str
    policy: str


Rule = Union[PeerRule, JumpRule]


@dataclass
class Dirty:
    """What changed since the last take: set/map elements by key, whole sets and chains by name."""

    elems: dict[str, set] = field(default_factory=dict)  # set or map name -> elements / map keys touched
    sets: set[str] = field(default_factory=set)  # sets created or deleted
    chains: set[str] = field(default_factory=set)  # chains created, rewritten or deleted

    def __bool__(self) -> bool:
        return bool(self.sets or self.chains or any(self.elems.values()))

    def elem(self, name: str, key: object) -> None:
        self.elems.setdefault(name, set()).add(key)


@dataclass
class _Sel:
    name: str
    refs: int = 0
    ips: dict[str, int] = field(default_factory=dict)  # ip -> number of member pods holding it
    members: set[str] = field(default_factory=set)  # pod keys
    targets: list[int] = field(default_factory=lambda: [0, 0])  # policies using it as target, per direction


class _ScopeIndex:
    """Pod selectors of one scope, findable from a pod's labels."""

    def __init__(self) -> None:
        self.anchored: dict[tuple[str, str], set[Selector]] = {}
        self.free: set[Selector] = set()

    def add(self, sel: Selector) -> None:
        a = sel.anchor()
        (self.anchored.setdefault(a, set()) if a else self.free).add(sel)

    def discard(self, sel: Selector) -> None:
        a = sel.anchor()
        bucket = self.anchored.get(a, set()) if a else self.free
        bucket.discard(sel)
        if a and not bucket:
            self.anchored.pop(a, None)

    def __bool__(self) -> bool:
        return bool(self.anchored or self.free)

    def matching(self, labels: Mapping[str, str]) -> Iterable[Selector]:
        for sel in self.free:
            if sel.matches(labels):
                yield sel
        for kv in labels.items():
            for sel in self.anchored.get(kv, ()):
                if sel.matches(labels):
                    yield sel


class PolicyState:
    """The desired table for one node (`node=None`: every pod counts as local, for `explain`)."""

    def __init__(self, node: str | None) -> None:
        self.node = node
        self.pods: dict[str, PodInfo] = {}
        self.pods_by_ns: dict[str, set[str]] = {}
        self.namespaces: dict[str, NamespaceInfo] = {}
        self.policies: dict[str, Policy] = {}
        # desired kernel objects
        self.sets: dict[str, set] = {}  # name -> elements (ips, or (ip, proto, port) for port sets)
        self.chains: dict[str, tuple[Rule, ...]] = {}
        self.maps: dict[str, dict[str, str]] = {d: {} for d in DIRECTIONS}  # direction -> ip -> ns chain
        self.dirty = Dirty()
        # bookkeeping
        self._sels: dict[SelKey, _Sel] = {}
        self._pod_sels: dict[str, set[SelKey]] = {}
        self._scopes: dict[tuple[str, object], _ScopeIndex] = {}
        self._nss_refs: dict[Selector, int] = {}  # namespaceSelectors in use
        self._nss_of_ns: dict[str, set[Selector]] = {}  # namespace -> namespaceSelectors matching it
        self._ports: dict[str, dict[PortElem, int]] = {}  # port name -> elements of every pod
        self._port_refs: dict[str, int] = {}
        self._ns_policies: dict[tuple[str, str], set[str]] = {}  # (direction, ns) -> policy keys
        self._map_owner: dict[tuple[str, str], str] = {}  # (direction, ip) -> pod key

    # ---- inputs ----------------------------------------------------------------------------------
    def take_dirty(self) -> Dirty:
        d, self.dirty = self.dirty, Dirty()
        return d

    def is_local(self, pod: PodInfo) -> bool:
        return self.node is None or pod.node == self.node

    def ns_labels(self, ns: str) -> Mapping[str, str]:
        info = self.namespaces.get(ns)
        return info.labels if info is not None else {NAMESPACE_NAME_LABEL: ns}

    def set_pod(self, key: str, pod: PodInfo | None) -> None:
        new = pod if pod is not None and pod.enforceable else None
        old = self.pods.get(key)
        if old == new:
            return
        if old is not None:
            self._remove_pod(key, old)
        if new is not None:
            self._add_pod(key, new)

    def set_namespace(self, name: str, info: NamespaceInfo | None) -> None:
        before = self.ns_labels(name)
        if info is None:
            self.namespaces.pop(name, None)
        else:
            self.namespaces[name] = info
        after = self.ns_labels(name)
        if before == after:
            return
        old = self._nss_of_ns.get(name, set())
        new = {s for s in self._nss_refs if s.matches(after)}
        self._nss_of_ns[name] = new
        lost, gained = old - new, new - old
        for key in self.pods_by_ns.get(name, ()):
            pod = self.pods[key]
            for sk in [sk for sk in self._pod_sels.get(key, ()) if sk[0] == "nss" and sk[1] in lost]:
                self._leave(sk, key, pod)
            for nss in gained:
                for sel in self._scopes.get(("nss", nss), _ScopeIndex()).matching(pod.labels):
                    self._join(("nss", nss, sel), key, pod)

    def set_policy(self, key: str, policy: Policy | None) -> None:
        old = self.policies.get(key)
        if old == policy:
            return
        # Take the new references first, so a selector both versions use is never dropped and rebuilt.
        if policy is not None:
            self.policies[key] = policy
            self._use_policy(policy, +1)
        if old is not None:
            if policy is None:
                del self.policies[key]
            self._use_policy(old, -1)
        for d in DIRECTIONS:
            self._ns_member(d, old, policy, key)
            chain = policy_chain(key, d)
            rules = self._policy_rules(policy, d) if policy is not None and policy.rules(d) is not None else None
            self._set_chain(chain, rules)

    # ---- pods ------------------------------------------------------------------------------------
    def _add_pod(self, key: str, pod: PodInfo) -> None:
        self.pods[key] = pod
        self.pods_by_ns.setdefault(pod.namespace, set()).add(key)
        self._pod_sels[key] = set()
        for sk in self._matching(pod):
            self._join(sk, key, pod)
        for name, proto, port in pod.ports:
            for ip in pod.ips:
                self._port_elem(name, (ip, proto, port), +1)
        if self.is_local(pod):
            self._isolation(key)

    def _remove_pod(self, key: str, pod: PodInfo) -> None:
        del self.pods[key]  # first: leaving its selectors then re-judges no isolation
        for sk in list(self._pod_sels.get(key, ())):
            self._leave(sk, key, pod)
        self._pod_sels.pop(key, None)
        for name, proto, port in pod.ports:
            for ip in pod.ips:
                self._port_elem(name, (ip, proto, port), -1)
        for d in DIRECTIONS:
            for ip in pod.ips:
                if self._map_owner.get((d, ip)) == key:
                    self._set_map(d, ip, None, key)
        keys = self.pods_by_ns[pod.namespace]
        keys.discard(key)
        if not keys:
            del self.pods_by_ns[pod.namespace]

    def _matching(self, pod: PodInfo) -> Iterable[SelKey]:
        own = self._scopes.get(("ns", pod.namespace))
        if own:
            for sel in own.matching(pod.labels):
                yield "ns", pod.namespace, sel
        for nss in self._nss_for(pod.namespace):
            for sel in self._scopes.get(("nss", nss), _ScopeIndex()).matching(pod.labels):
                yield "nss", nss, sel

    def _nss_for(self, ns: str) -> set[Selector]:
        found = self._nss_of_ns.get(ns)
        if found is None:
            labels = self.ns_labels(ns)
            found = self._nss_of_ns[ns] = {s for s in self._nss_refs if s.matches(labels)}
        return found

    def _join(self, sk: SelKey, key: str, pod: PodInfo) -> None:
        sel = self._sels[sk]
        if key in sel.members:
            return
        sel.members.add(key)
        self._pod_sels.setdefault(key, set()).add(sk)
        for ip in pod.ips:
            n = sel.ips.get(ip, 0)
            sel.ips[ip] = n + 1
            if n == 0:
                self.sets[sel.name].add(ip)
                self.dirty.elem(sel.name, ip)
        if (sel.targets[0] or sel.targets[1]) and self.is_local(pod):
            self._isolation(key)

    def _leave(self, sk: SelKey, key: str, pod: PodInfo) -> None:
        sel = self._sels[sk]
        if key not in sel.members:
            return
        sel.members.discard(key)
        self._pod_sels[key].discard(sk)
        for ip in pod.ips:
            n = sel.ips[ip] - 1
            if n:
                sel.ips[ip] = n
            else:
                del sel.ips[ip]
                self.sets[sel.name].discard(ip)
                self.dirty.elem(sel.name, ip)
        # No isolation re-judgement here: target selectors are namespace-scoped, so a pod leaves one only
        # when it goes (its map entries go with it) or the selector's last policy went (done there).

    def _isolation(self, key: str) -> None:
        """Point the maps at the pod's namespace chains for each direction a policy isolates it in."""
        pod = self.pods.get(key)
        if pod is None:
            return
        sks = self._pod_sels.get(key, ())
        for i, d in enumerate(DIRECTIONS):
            isolated = any(self._sels[sk].targets[i] for sk in sks)
            for ip in pod.ips:
                self._set_map(d, ip, ns_chain(pod.namespace, d) if isolated else None, key)

    def _set_map(self, d: str, ip: str, chain: str | None, owner: str) -> None:
        m = self.maps[d]
        if chain is None:
            if self._map_owner.get((d, ip)) not in (None, owner):
                return  # another pod holds this address (a transient duplicate): leave its entry
            self._map_owner.pop((d, ip), None)
            if m.pop(ip, None) is not None:
                self.dirty.elem(MAPS[d], ip)
        else:
            self._map_owner[(d, ip)] = owner
            if m.get(ip) != chain:
                m[ip] = chain
                self.dirty.elem(MAPS[d], ip)

    def _port_elem(self, name: str, elem: PortElem, delta: int) -> None:
        elems = self._ports.setdefault(name, {})
        n = elems.get(elem, 0) + delta
        if n:
            elems[elem] = n
        else:
            elems.pop(elem, None)
            if not elems:
                del self._ports[name]
        if (n == 0 or (n == 1 and delta > 0)) and name in self._port_refs:
            s = self.sets[port_set_name(name)]
            (s.add if n else s.discard)(elem)
            self.dirty.elem(port_set_name(name), elem)

    # ---- selectors -------------------------------------------------------------------------------
    def _acquire(self, sk: SelKey) -> _Sel:
        sel = self._sels.get(sk)
        if sel is not None:
            sel.refs += 1
            return sel
        sel = self._sels[sk] = _Sel(set_name(sk), refs=1)
        self.sets[sel.name] = set()
        self.dirty.sets.add(sel.name)
        kind, scope, podsel = sk
        if kind == "nss":
            assert isinstance(scope, Selector)
            if self._nss_refs.get(scope, 0) == 0:
                for ns in set(self.pods_by_ns) | set(self._nss_of_ns):
                    if scope.matches(self.ns_labels(ns)):
                        self._nss_for(ns).add(scope)
            self._nss_refs[scope] = self._nss_refs.get(scope, 0) + 1
            namespaces = [ns for ns in self.pods_by_ns if scope in self._nss_for(ns)]
        else:
            namespaces = [scope] if scope in self.pods_by_ns else []
        self._scopes.setdefault((kind, scope), _ScopeIndex()).add(podsel)
        for ns in namespaces:
            for key in self.pods_by_ns[ns]:
                pod = self.pods[key]
                if podsel.matches(pod.labels):
                    self._join(sk, key, pod)
        return sel

    def _release(self, sk: SelKey) -> None:
        sel = self._sels[sk]
        sel.refs -= 1
        if sel.refs:
            return
        for key in list(sel.members):
            self._leave(sk, key, self.pods[key])
        assert not sel.ips
        del self._sels[sk]
        del self.sets[sel.name]
        self.dirty.sets.add(sel.name)
        self.dirty.elems.pop(sel.name, None)
        kind, scope, podsel = sk
        idx = self._scopes[(kind, scope)]
        idx.discard(podsel)
        if not idx:
            del self._scopes[(kind, scope)]
        if kind == "nss":
            assert isinstance(scope, Selector)
            self._nss_refs[scope] -= 1
            if not self._nss_refs[scope]:
                del self._nss_refs[scope]
                for found in self._nss_of_ns.values():
                    found.discard(scope)

    @staticmethod
    def peer_key(peer: PodPeer) -> SelKey:
        if peer.namespaces is None:
            assert peer.namespace is not None
            return "ns", peer.namespace, peer.pods
        return "nss", peer.namespaces, peer.pods

    def _use_policy(self, p: Policy, delta: int) -> None:
        target: SelKey = ("ns", p.namespace, p.pod_selector)
        keys = [target] + [self.peer_key(peer) for d in DIRECTIONS for r in p.rules(d) or ()
                           for peer in r.peers or () if isinstance(peer, PodPeer)]
        if delta > 0:
            for sk in keys:
                self._acquire(sk)
            for name in p.port_names():
                self._use_port(name, +1)
        sel = self._sels[target]
        for i, d in enumerate(DIRECTIONS):
            if p.rules(d) is not None:
                before = bool(sel.targets[i])
                sel.targets[i] += delta
                if before != bool(sel.targets[i]):
                    for key in list(sel.members):
                        if self.is_local(self.pods[key]):
                            self._isolation(key)
        if delta < 0:
            for sk in keys:
                self._release(sk)
            for name in p.port_names():
                self._use_port(name, -1)

    def _use_port(self, name: str, delta: int) -> None:
        n = self._port_refs.get(name, 0) + delta
        set_ = port_set_name(name)
        if n and name not in self._port_refs:
            self.sets[set_] = set(self._ports.get(name, {}))
            self.dirty.sets.add(set_)
        elif not n:
            del self.sets[set_]
            self.dirty.sets.add(set_)
            self.dirty.elems.pop(set_, None)
        if n:
            self._port_refs[name] = n
        else:
            self._port_refs.pop(name, None)

    # ---- chains ----------------------------------------------------------------------------------
    def _set_chain(self, name: str, rules: tuple[Rule, ...] | None) -> None:
        if rules is None:
            if self.chains.pop(name, None) is not None:
                self.dirty.chains.add(name)
        elif self.chains.get(name) != rules:
            self.chains[name] = rules
            self.dirty.chains.add(name)

    def _ns_member(self, d: str, old: Policy | None, new: Policy | None, key: str) -> None:
        touched = set()
        if old is not None and old.rules(d) is not None:
            self._ns_policies.get((d, old.namespace), set()).discard(key)
            touched.add(old.namespace)
        if new is not None and new.rules(d) is not None:
            self._ns_policies.setdefault((d, new.namespace), set()).add(key)
            touched.add(new.namespace)
        for ns in touched:
            keys = sorted(self._ns_policies.get((d, ns), ()))
            if not keys:
                self._ns_policies.pop((d, ns), None)
            rules = tuple(JumpRule(set_name(("ns", ns, self.policies[k].pod_selector)), policy_chain(k, d), k)
                          for k in keys)
            self._set_chain(ns_chain(ns, d), rules or None)

    def _policy_rules(self, p: Policy, d: str) -> tuple[Rule, ...]:
        out: list[Rule] = []
        for i, rule in enumerate(p.rules(d) or ()):
            origin = (p.key, d, i)
            peers: list[tuple[str | None, ipaddress.IPv4Network | None, tuple]] = []
            for peer in (rule.peers if rule.peers is not None else (None,)):
                if peer is None:
                    peers.append((None, None, ()))
                elif isinstance(peer, IPBlock):
                    if peer.cidr is not None:  # an IPv6 block matches no IPv4 packet: no rule
                        peers.append((None, peer.cidr, peer.excepts))
                else:
                    peers.append((set_name(self.peer_key(peer)), None, ()))
            ports: list[tuple[str | None, tuple[tuple[int, int], ...], str | None]] = []
            if not rule.ports:
                ports.append((None, (), None))
            by_proto: dict[str, list[tuple[int, int]] | None] = {}
            for pm in rule.ports:
                if isinstance(pm.port, str):
                    ports.append((pm.protocol, (), port_set_name(pm.port)))
                elif pm.port is None:
                    by_proto[pm.protocol] = None  # the whole protocol
                elif by_proto.get(pm.protocol, []) is not None:
                    by_proto.setdefault(pm.protocol, []).append((pm.port, pm.end_port or pm.port))  # type: ignore[union-attr]
            for proto, ranges in sorted(by_proto.items()):
                ports.append((proto, tuple(sorted(set(ranges))) if ranges else (), None))
            for peer_set, cidr, excepts in peers:
                for proto, ranges, named in ports:
                    out.append(PeerRule(peer_set, cidr, excepts, proto, ranges, named, origin))
        return tuple(out)
