"""ServiceProxy: the service proxy the agent drives (replaces kube-proxy, IPVS mode).

    proxy = ServiceProxy(settings, node_name, ["10.0.1.11"], netns=None)
    plan = proxy.plan(store, store.take())   # first call: full diff against one kernel dump
    result = proxy.apply(plan)               # errors per service; never raises for one bad object
    plan = proxy.resync()                    # periodic: one dump + full diff repairs drift
    print(proxy.explain("10.96.0.10"))

Incremental by construction: a changed Service, or a changed EndpointSlice (mapped to its Service
through an index kept here), recomputes only that Service; its previous desired state (cached per
service) is diffed against the new one, so one endpoint change costs the same with 10 or 10,000
services. Shared things (an address on the dummy device used by two services, an nft element two
services need) are reference-counted per service.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from loadbalancer import ipvs_kernel as k
from loadbalancer.health import HealthServers
from loadbalancer.model import build_service, slice_service_key
from loadbalancer.nft import render_delta, render_full
from loadbalancer.plan import Plan, diff_virtual_servers
from loadbalancer.types import (ChangeSet as Changes, HealthCheck, NftElement, NodeContext, ObjectStore as Store,
                               ProxySettings as ServiceSettings, ServiceError, ServiceState, VirtualServer, VSKey)


@dataclass
class ApplyResult:
    errors: dict[str, list[str]] = field(default_factory=dict)  # service (or "(node)") -> problems
    kernel_ops: int = 0
    warnings: list[str] = field(default_factory=list)  # node-level limits (e.g. no nftables in this kernel)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        if self.ok:
            return f"applied {self.kernel_ops} change(s)"
        return "\n".join([f"applied {self.kernel_ops} change(s) with errors:"]
                         + [f"  {s}: {e}" for s, es in sorted(self.errors.items()) for e in es])


def node_context(settings: ServiceSettings, node_name: str, node_addresses: Sequence[str]) -> NodeContext:
    addrs = tuple(str(ipaddress.IPv4Address(a.split("/")[0])) for a in node_addresses)
    nets = settings.node_port_addresses
    np = tuple(a for a in addrs if not nets or any(ipaddress.IPv4Address(a) in n for n in nets))
    return NodeContext(node_name, addrs, np, settings.scheduler, settings.masquerade_all,
                       tuple(str(c) for c in settings.cluster_cidr))


def _refs_change(refs: dict, old: dict[str, Iterable], new: dict[str, Iterable]) -> tuple[dict, set, set]:
    """Replace each listed service's items in a refcount map {item: {services}}, touching only those items.

    Returns (updates: {item: new service set, empty = drop}, items that appear, items that disappear).
    """
    upd: dict = {}
    for svc, items in old.items():
        for i in items:
            upd.setdefault(i, set(refs.get(i, ()))).discard(svc)
    for svc, items in new.items():
        for i in items:
            upd.setdefault(i, set(refs.get(i, ()))).add(svc)
    added = {i for i, v in upd.items() if v and not refs.get(i)}
    removed = {i for i, v in upd.items() if not v and refs.get(i)}
    return upd, added, removed


def _apply_refs(refs: dict, upd: dict) -> None:
    for i, v in upd.items():
        if v:
            refs[i] = v
        else:
            refs.pop(i, None)


class ServiceProxy:
    ERROR_NODE = "(node)"

    def __init__(self, settings: ServiceSettings, node_name: str, node_addresses: Sequence[str],
                 netns: str | None = None, *, health_bind: str = "0.0.0.0") -> None:
        self.settings = settings
        self.ctx = node_context(settings, node_name, node_addresses)
        self.netns = netns
        self._kernel: k.KernelAdapter | None = None
        self._health: HealthServers | None = None
        self._health_bind = health_bind
        self._states: dict[str, ServiceState] = {}
        self._errors: dict[str, str] = {}
        self._vs_owner: dict[VSKey, str] = {}
        self._addr_refs: dict[str, set[str]] = {}
        self._nft_refs: dict[NftElement, set[str]] = {}
        self._slice_svc: dict[str, str] = {}
        self._svc_slices: dict[str, set[str]] = {}
        self._slice_errors: dict[str, str] = {}  # slice -> why it belongs to no service
        self._conflicted: set[str] = set()  # services refused because another owns one of their VSs
        self._synced = False  # the kernel has been compared with desired at least once

    # -- kernel access (lazy: planning alone never opens anything) -----------------------------

    @property
    def kernel(self) -> k.KernelAdapter:
        if self._kernel is None:
            self._kernel = k.KernelAdapter(self.netns, self.settings.device)
        return self._kernel

    def close(self) -> None:
        if self._health is not None:
            self._health.close()
        if self._kernel is not None:
            self._kernel.close()

    # -- planning -----------------------------------------------------------------------------

    def _index_slice(self, store: Store, slice_key: str) -> set[str]:
        """Update slice -> service index for one slice; returns the services affected."""
        affected = set()
        old = self._slice_svc.pop(slice_key, None)
        if old is not None:
            self._svc_slices.get(old, set()).discard(slice_key)
            affected.add(old)
        obj = store.get("EndpointSlice", slice_key)
        new, why = slice_service_key(obj) if obj is not None else (None, None)
        if why:
            self._slice_errors[slice_key] = why
        else:
            self._slice_errors.pop(slice_key, None)
        if new is not None:
            self._slice_svc[slice_key] = new
            self._svc_slices.setdefault(new, set()).add(slice_key)
            affected.add(new)
        return affected

    def _compute(self, store: Store, key: str) -> ServiceState | ServiceError | None:
        svc = store.get("Service", key)
        if svc is None:
            return None
        slices = [s for s in (store.get("EndpointSlice", sk) for sk in sorted(self._svc_slices.get(key, ())))
                  if isinstance(s, dict)]
        if not isinstance(svc, dict):
            return ServiceError(key, "not a mapping")
        return build_service(svc, slices, self.ctx)

    def plan(self, store: Store, changes: Changes) -> Plan:
        """What to change for these changes. The first call (and changes.full) compares with the kernel."""
        full = changes.full or not self._synced
        if full:
            self._slice_svc.clear()
            self._svc_slices.clear()
            self._slice_errors.clear()
            for sk in store.snapshot("EndpointSlice"):
                self._index_slice(store, sk)
            affected = set(store.snapshot("Service")) | set(self._states) | set(self._errors)
        else:
            affected = set(changes.of("Service"))
            for sk in changes.of("EndpointSlice"):
                affected |= self._index_slice(store, sk)
            affected |= self._conflicted
        results = {key: self._compute(store, key) for key in sorted(affected)}
        plan = self._plan_services(results)
        if full:
            return self._full_plan(plan)
        return plan

    def _plan_services(self, results: dict[str, ServiceState | ServiceError | None]) -> Plan:
        plan = Plan()
        claimed: dict[VSKey, str] = {}

        def owner(vk: VSKey) -> str | None:
            if vk in claimed:
                return claimed[vk]
            o = self._vs_owner.get(vk)  # a service being recomputed here only owns what it claims again
            return None if o is None or o in results else o

        new_states: dict[str, ServiceState | None] = {}
        # A virtual server claimed by two services stays with its current owner, else goes to the first by key.
        for key, r in sorted(results.items(), key=lambda kv: (kv[0] not in self._states, kv[0])):
            if isinstance(r, ServiceError):
                plan.errors[key] = r.reason
                r = None
            elif isinstance(r, ServiceState):
                clash = next(((v.key, o) for v in r.virtual_servers if (o := owner(v.key)) not in (None, key)), None)
                if clash:
                    (proto, ip, port), other = clash
                    plan.errors[key] = f"virtual server {ip}:{port}/{proto} already belongs to service {other}"
                    r = None
                else:
                    claimed.update({v.key: key for v in r.virtual_servers})
            new_states[key] = r
            plan.services[key] = r
        old_vs = {v.key: v for key in results for v in (self._states[key].virtual_servers if key in self._states else ())}
        new_vs = {v.key: v for s in new_states.values() if s for v in s.virtual_servers}
        diff_virtual_servers(plan, old_vs, new_vs)
        plan.owners = {vk: claimed.get(vk) or self._vs_owner.get(vk, "?") for vk in old_vs.keys() | new_vs.keys()}
        _, add, rem = _refs_change(self._addr_refs, {s: self._states[s].addresses for s in results if s in self._states},
                                   {s: st.addresses for s, st in new_states.items() if st})
        plan.addr_add, plan.addr_delete = sorted(add), sorted(rem)
        _, plan.nft_add, plan.nft_delete = _refs_change(
            self._nft_refs, {s: self._states[s].nft for s in results if s in self._states},
            {s: st.nft for s, st in new_states.items() if st})
        old_hc = {s: self._states[s].health_check for s in results if s in self._states}
        new_hc = {s: (st.health_check if st else None) for s, st in new_states.items()}
        if any(old_hc.get(s) != new_hc.get(s) for s in results):
            hcs = {h.port: h for s, st in self._states.items() if s not in results and (h := st.health_check)}
            hcs.update({h.port: h for h in new_hc.values() if h})
            plan.health = hcs
        return plan

    def _full_plan(self, services_plan: Plan) -> Plan:
        """Desired (the committed states updated by `services_plan`) against one kernel dump."""
        states = {s: st for s, st in self._states.items() if s not in services_plan.services}
        states.update({s: st for s, st in services_plan.services.items() if st})
        plan = Plan(full=True, errors=services_plan.errors, services=services_plan.services)
        desired = {v.key: v for st in states.values() for v in st.virtual_servers}
        kernel = self.kernel
        current_addrs = kernel.addresses()
        ours = current_addrs | set(self.ctx.node_port_addresses) | {vk[1] for vk in desired}
        # ours: on our device, on a NodePort address, wanted, or programmed by us earlier (an old node address)
        actual = {vk: v for vk, v in kernel.ipvs_dump().items() if vk[1] in ours or vk in self._vs_owner}
        diff_virtual_servers(plan, actual, desired)
        plan.owners = {vk: s for s, st in states.items() for vk in (v.key for v in st.virtual_servers)}
        want_addrs = {a for st in states.values() for a in st.addresses}
        plan.addr_add = sorted(want_addrs - current_addrs)
        plan.addr_delete = sorted(current_addrs - want_addrs)
        plan.nft_full = self._render_nft(st.nft for st in states.values())
        plan.health = {h.port: h for st in states.values() if (h := st.health_check)}
        return plan

    def _render_nft(self, element_sets: Iterable[Iterable[NftElement]]) -> str:
        return render_full({e for els in element_sets for e in els}, cluster_cidrs=self.ctx.cluster_cidrs,
                           node_addresses=self.ctx.node_addresses, masquerade_all=self.ctx.masquerade_all)

    def resync(self) -> Plan:
        """One IPVS dump + address dump, diffed against every service's cached desired state."""
        return self._full_plan(Plan())

    # -- applying -----------------------------------------------------------------------------

    def apply(self, plan: Plan) -> ApplyResult:
        res = ApplyResult(errors={s: [why] for s, why in plan.errors.items()})
        kernel = self.kernel
        if not self._synced:
            for e in kernel.apply_sysctls():
                res.errors.setdefault(self.ERROR_NODE, []).append(e)
        failed: set[str] = set()

        def blame(svc: str, msg: str) -> None:
            res.errors.setdefault(svc, []).append(msg)
            failed.add(svc)

        addr_owner = {a: s for s, st in plan.services.items() if st for a in st.addresses}
        for a, msg in (kernel.address_change(plan.addr_add, []) if plan.addr_add else []):
            blame(addr_owner.get(a, self.ERROR_NODE), msg)
        ops: list[k.Op] = ([k.op_del_vs(x) for x in plan.vs_delete] + [k.op_del_real(v, r) for v, r in plan.real_delete]
                           + [k.op_add_vs(v) for v in plan.vs_add] + [k.op_set_vs(v) for v in plan.vs_update]
                           + [k.op_add_real(v, r) for v, r in plan.real_add]
                           + [k.op_set_real(v, r) for v, r in plan.real_update])
        for err in kernel.ipvs_run(ops):
            blame(plan.owners.get(err.op.vs) or self._vs_owner.get(err.op.vs) or self.ERROR_NODE, str(err))
        for a, msg in (kernel.address_change([], plan.addr_delete) if plan.addr_delete else []):
            blame(self._addr_owner(a) or self.ERROR_NODE, msg)
        res.kernel_ops = plan.kernel_ops()

        self._commit(plan)
        nft_missing = kernel.nft_available()
        if nft_missing:
            if not self._synced:
                res.warnings.append(f"nftables unusable here ({nft_missing}): no masquerade, hairpin or "
                                    "loadBalancerSourceRanges; IPVS is programmed")
        elif plan.nft_full is not None:
            nft_err = kernel.nft(plan.nft_full)
        else:
            delta = render_delta(plan.nft_add, plan.nft_delete)
            nft_err = kernel.nft(delta) if delta else None
            if nft_err:  # the table drifted or is missing: rewrite it whole from what we now want
                nft_err = kernel.nft(self._render_nft(st.nft for st in self._states.values()))
        if not nft_missing and nft_err:
            blame(self.ERROR_NODE, f"nft: {nft_err}")
        for _entry, e in (kernel.conntrack_flush_udp(plan.conntrack_flush) if plan.conntrack_flush else []):
            res.errors.setdefault(self.ERROR_NODE, []).append(e)
        if plan.health is not None:
            if self._health is None:
                self._health = kernel.health_servers(self._health_bind)
            for e in self._health.update(plan.health):
                res.errors.setdefault(e.split(":")[0], []).append(e)
        self._synced = self._synced or plan.full
        if failed:
            self._synced = False  # next plan() compares with a fresh dump and repairs what failed
        return res

    def _addr_owner(self, addr: str) -> str | None:
        refs = self._addr_refs.get(addr)
        return sorted(refs)[0] if refs else None

    def _commit(self, plan: Plan) -> None:
        """Record the plan's desired states as the current ones (the kernel now matches them)."""
        old = {s: self._states[s] for s in plan.services if s in self._states}
        new = {s: st for s, st in plan.services.items() if st}
        _apply_refs(self._addr_refs, _refs_change(self._addr_refs, {s: st.addresses for s, st in old.items()},
                                                  {s: st.addresses for s, st in new.items()})[0])
        _apply_refs(self._nft_refs, _refs_change(self._nft_refs, {s: st.nft for s, st in old.items()},
                                                 {s: st.nft for s, st in new.items()})[0])
        for s, st in old.items():
            for v in st.virtual_servers:
                if self._vs_owner.get(v.key) == s:
                    del self._vs_owner[v.key]
        for s in plan.services:
            self._states.pop(s, None)
            self._errors.pop(s, None)
            self._conflicted.discard(s)
        for s, st in new.items():
            self._states[s] = st
            self._vs_owner.update({v.key: s for v in st.virtual_servers})
        for s, why in plan.errors.items():
            self._errors[s] = why
            if why.startswith("virtual server ") and "already belongs" in why:
                self._conflicted.add(s)

    def set_node_addresses(self, node_addresses: Sequence[str]) -> None:
        """The node's addresses changed (NodePort addresses follow): the next plan() is a full one."""
        ctx = node_context(self.settings, self.ctx.node_name, node_addresses)
        if ctx != self.ctx:
            self.ctx = ctx
            self._synced = False

    # -- introspection ------------------------------------------------------------------------

    def desired(self) -> dict[VSKey, VirtualServer]:
        return {v.key: v for st in self._states.values() for v in st.virtual_servers}

    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    def warnings(self) -> dict[str, tuple[str, ...]]:
        """Programmed services with malformed slice entries that were skipped."""
        return {s: st.warnings for s, st in self._states.items() if st.warnings}

    def slice_errors(self) -> dict[str, str]:
        """EndpointSlices that belong to no service because their metadata is malformed."""
        return {k: f"EndpointSlice {k}: {why}" for k, why in self._slice_errors.items()}

    def health_checks(self) -> dict[int, HealthCheck]:
        return {h.port: h for st in self._states.values() if (h := st.health_check)}

    def explain(self, what: str) -> str:
        """Why a service, a VIP, or VIP:port is programmed the way it is (or why it is not)."""
        if what in self._errors:
            return f"service {what}: skipped: {self._errors[what]}"
        if what in self._states:
            st = self._states[what]
            lines = [f"service {what}:", *[f"  {w}" for w in st.why]]
            lines += [f"  vs {v}" for v in st.virtual_servers]
            if st.addresses:
                lines.append(f"  addresses on {self.settings.device}: {', '.join(sorted(st.addresses))}")
            return "\n".join(lines)
        ip, _, port = what.partition(":")
        hits = [(vk, s) for vk, s in sorted(self._vs_owner.items()) if vk[1] == ip and (not port or str(vk[2]) == port)]
        if not hits:
            return f"{what}: no virtual server and no service by that name"
        out = []
        for vk, s in hits:
            v = self._states[s].virtual_servers
            vs = next(x for x in v if x.key == vk)
            kind = "NodePort" if vk[1] in self.ctx.node_port_addresses else "service IP"
            out.append(f"{vs}\n  {kind} of service {s}\n" + "\n".join(f"  {w}" for w in self._states[s].why))
        return "\n".join(out)
