"""ServiceProxy: the service proxy the agent drives (replaces kube-proxy, IPVS mode).

    proxy = ServiceProxy(settings, node_name, ["10.0.1.11"], netns=None, state_path=run_dir / "ipvs-owned")
    result = proxy.sync(store, store.take())  # plan + apply; never raises (errors per service / node)
    proxy.next_deadline(now)                  # when a failed service / concern is due for its retry
    plan = proxy.plan(store, changes); result = proxy.apply(plan)   # the same in two steps
    plan = proxy.resync()                     # one dump + full diff repairs drift
    print(proxy.explain("10.96.0.10"))

Incremental by construction: a changed Service, or a changed EndpointSlice (mapped to its Service
through an index kept here), recomputes only that Service; its previous desired state (cached per
service) is diffed against the new one, so one endpoint change costs the same with 10 or 10,000
services. Shared things (an address on the dummy device used by two services, an nft element two
services need) are reference-counted per service.

Failures are per key (loadbalancer/failures.py): a service whose kernel writes failed is retried
alone after a backoff, and its virtual servers are re-read from the kernel (a get each) before the
retry, since what a failed batch left is not known. The nft table, conntrack flushes and health
listeners are node-level keys with their own backoff. Changes taken from the store are kept as
pending services until applied, whatever fails. A full resync happens only when asked (start,
periodic, node addresses changed), never because something failed.

IPVS ownership (finding 13): only virtual servers whose keys this proxy created (persisted, see
loadbalancer/owned.py) are changed or deleted; one that exists and is not ours is a conflict,
reported and retried, never touched.
"""

from __future__ import annotations

import errno
import ipaddress
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadbalancer import ipvs_kernel as k
from loadbalancer.failures import Failure, next_deadline as failures_deadline, record
from loadbalancer.health import HealthServers
from loadbalancer.model import build_service, slice_service_key
from loadbalancer.nft import SET_TYPES, render_delta, render_full, rule_count
from loadbalancer.owned import OwnedVirtualServers
from loadbalancer.plan import Plan, diff_virtual_servers
from loadbalancer.types import (ChangeSet as Changes, HealthCheck, NftElement, NodeContext, ObjectStore as Store,
                               ProxySettings as ServiceSettings, ServiceError, ServiceState, VirtualServer, VSKey)

STALE = "(stale)"  # pseudo-service owning our virtual servers that no service wants any more


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


def describe(e: BaseException) -> str:
    """One line for a failure (no traceback: the adapters' messages say what and where)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e) or e.__class__.__name__


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


def _keys(st: object) -> set[VSKey]:
    return {v.key for v in st.virtual_servers} if isinstance(st, ServiceState) else set()


def conflict_text(key: VSKey) -> str:
    proto, ip, port = key
    flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[proto]
    return (f"virtual server {ip}:{port}/{proto} exists and was not made by this agent: left alone "
            f"(`ipvsadm -D {flag} {ip}:{port}` gives it to this service)")


class ServiceProxy:
    ERROR_NODE = "(node)"

    def __init__(self, settings: ServiceSettings, node_name: str, node_addresses: Sequence[str],
                 netns: str | None = None, *, health_bind: str = "0.0.0.0", state_path: Path | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 kernel_factory: Callable[[], k.KernelAdapter] | None = None) -> None:
        self.settings = settings
        self.ctx = node_context(settings, node_name, node_addresses)
        self.netns = netns
        self._clock = clock
        self._kernel_factory = kernel_factory or (lambda: k.KernelAdapter(
            self.netns, self.settings.device, nft_timeout=settings.command_timeout,
            conntrack_timeout=settings.command_timeout))
        self._kernel: k.KernelAdapter | None = None
        self._health: HealthServers | None = None
        self._health_bind = health_bind
        self._states: dict[str, ServiceState] = {}
        self._errors: dict[str, str] = {}
        self._vs_owner: dict[VSKey, str] = {}
        self._addr_refs: dict[str, set[str]] = {}
        self._nft_refs: dict[NftElement, set[str]] = {}
        self.nft_counts: dict[str, int] = {name: 0 for name in SET_TYPES}  # elements per set, kept per change
        self._slice_svc: dict[str, str] = {}
        self._svc_slices: dict[str, set[str]] = {}
        self._slice_errors: dict[str, str] = {}  # slice -> why it belongs to no service
        self._conflicted: set[str] = set()  # services refused because another service owns one of their VSs
        self._pending: set[str] = set()  # services changed since they were last applied
        self._failed: dict[str, Failure] = {}  # service -> its failure (retried alone after a backoff)
        self._node_failed: dict[str, Failure] = {}  # "kernel" / "nft" / "conntrack" / "health" -> failure
        self._need_full = True  # compare everything with one kernel dump (start, periodic, node addresses)
        self._owned = OwnedVirtualServers(state_path)
        self._owned_loaded = False
        self._adopted_note: str | None = None  # how ownership was established at start (status, logs)
        self._sysctls_done = False
        self._nft_unusable: str | None = None
        self._ct_pending: set[tuple[str, int, str]] = set()
        self._hc: dict[str, HealthCheck] = {}  # services with a health check (so a change is not O(services))

    # -- kernel access (lazy: planning alone never opens anything) -----------------------------

    @property
    def kernel(self) -> k.KernelAdapter:
        if self._kernel is None:
            self._kernel = self._kernel_factory()
        return self._kernel

    def close(self) -> None:
        if self._health is not None:
            self._health.close()
        if self._kernel is not None:
            self._kernel.close()

    # -- the one call of a sync: never raises ---------------------------------------------------

    def sync(self, store: Store, changes: Changes) -> ApplyResult:
        """Take the changes, plan and apply what is due. A failure is recorded per key with its retry
        time (next_deadline); while the kernel itself fails, changes are only taken."""
        now = self._clock()
        down = self._node_failed.get("kernel")
        if down is not None and not down.due(now):
            self._take(store, changes)
            return ApplyResult(errors={self.ERROR_NODE: list(down.errors)})
        try:
            plan = self.plan(store, changes)
            res = self.apply(plan)
        except Exception as e:  # the kernel adapter can't be opened or read; nothing taken is lost
            why = describe(e)
            record(self._node_failed, "kernel", now, [why])
            return ApplyResult(errors={self.ERROR_NODE: [why]})
        self._node_failed.pop("kernel", None)
        return res

    def request_full(self) -> None:
        self._need_full = True

    def next_deadline(self, now: float) -> float | None:
        """The earliest retry due (monotonic seconds), None when nothing waits. Pending changes of a
        kernel in backoff wait for its retry; otherwise nothing pending outlives a sync."""
        return failures_deadline(self._failed, self._node_failed)

    # -- planning -----------------------------------------------------------------------------

    def _take(self, store: Store, changes: Changes) -> None:
        """Changes become pending services here, first, so nothing that fails later loses them."""
        if changes.full:
            self._need_full = True
        self._pending |= set(changes.of("Service"))
        for sk in changes.of("EndpointSlice"):
            self._pending |= self._index_slice(store, sk)

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
        """What to change: the pending services and the failed ones due for a retry; everything against
        one kernel dump when a full sync is due. Reads the kernel for failed services (and full plans)."""
        self._take(store, changes)
        if self._need_full:
            self._slice_svc.clear()
            self._svc_slices.clear()
            self._slice_errors.clear()
            for sk in store.snapshot("EndpointSlice"):
                self._index_slice(store, sk)
            affected = set(store.snapshot("Service")) | set(self._states) | set(self._errors) | set(self._failed)
            results = {key: self._compute(store, key) for key in sorted(affected)}
            return self._full_plan(self._plan_services(results, {}, set()))
        now = self._clock()
        affected = self._pending | self._conflicted | {s for s, f in self._failed.items() if f.due(now)}
        results = {key: self._compute(store, key) for key in sorted(affected)}
        # A failed service's batch left the kernel in a state not known: read its virtual servers (a get
        # each) instead of trusting the cache. If that read fails too, it waits for its next retry.
        failed = {s for s in results if s in self._failed}
        read: set[VSKey] = set()
        for s in failed:
            read |= self._failed[s].keys | _keys(self._states.get(s)) | _keys(results[s])
        actual: dict[VSKey, VirtualServer] = {}
        if read:
            try:
                actual = self.kernel.ipvs_get(read)
            except OSError as e:
                for s in failed:
                    record(self._failed, s, now, [f"reading its virtual servers: {describe(e)}"])
                    del results[s]
                failed = set()
        return self._plan_services(results, actual, failed)

    def _plan_services(self, results: dict[str, ServiceState | ServiceError | None],
                       actual: dict[VSKey, VirtualServer], failed: set[str]) -> Plan:
        """Diff the services in `results` from their cached state (healthy ones) or from `actual`, the
        kernel's virtual servers read for the failed ones."""
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
        owned = self._owned.keys
        plan.old_vs = {v.key: v for s in results if s not in failed and s in self._states
                       for v in self._states[s].virtual_servers if v.key in owned}
        for vk, v in actual.items():
            if vk not in owned:
                plan.foreign.add(vk)  # someone else's: never diffed, never touched
            elif self._vs_owner.get(vk) in (None, *results):  # not another (healthy, unplanned) service's
                plan.old_vs[vk] = v
        for s, st in new_states.items():
            hit = sorted(v.key for v in (st.virtual_servers if st else ()) if v.key in plan.foreign)
            if hit:
                plan.conflicts[s] = hit
        plan.new_vs = {v.key: v for s in new_states.values() if s for v in s.virtual_servers
                       if v.key not in plan.foreign}
        diff_virtual_servers(plan, plan.old_vs, plan.new_vs)
        plan.owners = {vk: claimed.get(vk) or self._vs_owner.get(vk) or STALE for vk in plan.old_vs.keys() | plan.new_vs.keys()}
        upd, add, rem = _refs_change(self._addr_refs, {s: self._states[s].addresses for s in results if s in self._states},
                                     {s: st.addresses for s, st in new_states.items() if st})
        # addresses a failed batch may have left half done: add/delete them again (both are idempotent)
        retry_addrs = {a for s in failed for a in self._failed[s].addrs}
        wanted = lambda a: bool(upd[a] if a in upd else self._addr_refs.get(a))  # noqa: E731
        add |= {a for a in retry_addrs if wanted(a)}
        rem |= {a for a in retry_addrs if not wanted(a)}
        plan.addr_add, plan.addr_delete = sorted(add), sorted(rem)
        _, plan.nft_add, plan.nft_delete = _refs_change(
            self._nft_refs, {s: self._states[s].nft for s in results if s in self._states},
            {s: st.nft for s, st in new_states.items() if st})
        old_hc = {s: self._states[s].health_check for s in results if s in self._states}
        new_hc = {s: (st.health_check if st else None) for s, st in new_states.items()}
        if any(old_hc.get(s) != new_hc.get(s) for s in results):
            hcs = {h.port: h for s, h in self._hc.items() if s not in results}
            hcs.update({h.port: h for h in new_hc.values() if h})
            plan.health = hcs
        return plan

    def _full_plan(self, services_plan: Plan) -> Plan:
        """Desired (the committed states updated by `services_plan`) against one kernel dump."""
        states = {s: st for s, st in self._states.items() if s not in services_plan.services}
        states.update({s: st for s, st in services_plan.services.items() if st})
        plan = Plan(full=True, errors=services_plan.errors, services=services_plan.services)
        kernel = self.kernel
        current_addrs = kernel.addresses()
        dump = kernel.ipvs_dump()
        if not self._owned_loaded:
            if self._owned.load():
                self._adopted_note = f"owning the {len(self._owned.keys)} virtual server(s) listed in {self._owned.path}"
            else:
                # No record (first start, or a version without one): adopt only what is on our device.
                self._owned.add(vk for vk in dump if vk[1] in current_addrs)
                self._adopted_note = (f"no ownership record: adopted the {len(self._owned.keys)} virtual server(s) on "
                                      f"{self.settings.device}'s addresses; others (e.g. NodePorts left by an older "
                                      "version) are not touched")
            self._owned_loaded = True
        owned = self._owned.keys
        plan.foreign = {vk for vk in dump if vk not in owned}
        plan.old_vs = {vk: v for vk, v in dump.items() if vk in owned}
        plan.new_vs = {v.key: v for st in states.values() for v in st.virtual_servers if v.key not in plan.foreign}
        for s, st in states.items():
            hit = sorted(v.key for v in st.virtual_servers if v.key in plan.foreign)
            if hit:
                plan.conflicts[s] = hit
        diff_virtual_servers(plan, plan.old_vs, plan.new_vs)
        plan.owners = {vk: s for s, st in states.items() for vk in (v.key for v in st.virtual_servers)}
        plan.owners.update({vk: STALE for vk in plan.old_vs if vk not in plan.owners})
        plan.forget = owned - dump.keys() - plan.new_vs.keys()  # recorded, gone, not wanted
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
        """Apply a plan. Kernel refusals and timeouts become per-service failures (retried alone after a
        backoff) or node-level ones (nft, conntrack, health); only a kernel that can't be opened raises."""
        now = self._clock()
        res = ApplyResult(errors={s: [why] for s, why in plan.errors.items()})
        kernel = self.kernel
        node = res.errors.setdefault(self.ERROR_NODE, [])
        failed: dict[str, list[str]] = {s: [conflict_text(vk) for vk in keys] for s, keys in plan.conflicts.items()}
        bad_keys: dict[str, set[VSKey]] = {s: set(keys) for s, keys in plan.conflicts.items()}
        bad_addrs: dict[str, set[str]] = {}

        def blame(svc: str, msg: str, key: VSKey | None = None, addr: str | None = None) -> None:
            failed.setdefault(svc, []).append(msg)
            if key is not None:
                bad_keys.setdefault(svc, set()).add(key)
            if addr is not None:
                bad_addrs.setdefault(svc, set()).add(addr)

        try:
            self._write(kernel, plan, node, blame)
        except Exception as e:  # an adapter call raised midway (a timeout outside a batch): nothing known
            why = describe(e)
            node.append(why)
            addrs = set(plan.addr_add) | set(plan.addr_delete)
            for s in set(plan.services) | set(plan.owners.values()):
                blame(s, f"not applied: {why}")
                bad_keys.setdefault(s, set()).update(vk for vk, o in plan.owners.items() if o == s)
                bad_addrs.setdefault(s, set()).update(addrs)
        res.kernel_ops = plan.kernel_ops()

        self._commit(plan)
        covered = set(plan.services) | ({STALE, *self._states} if plan.full else set())
        for s in covered | set(failed):
            if s in failed:
                record(self._failed, s, now, failed[s], bad_keys.get(s, set()), bad_addrs.get(s, set()))
                res.errors.setdefault(s, []).extend(m for m in failed[s] if m not in res.errors.get(s, []))
            else:
                self._failed.pop(s, None)
        self._pending -= set(plan.services)
        if plan.full:
            self._need_full = False

        self._apply_nft(kernel, plan, now, res)
        self._apply_conntrack(kernel, plan, now, node)
        self._apply_health(kernel, plan, now, res)
        if not node:
            del res.errors[self.ERROR_NODE]
        return res

    def _write(self, kernel, plan: Plan, node: list[str], blame: Callable[..., None]) -> None:
        """Sysctls, addresses, IPVS: the plan's kernel writes, each failure blamed on its service."""
        if plan.full or not self._sysctls_done:
            node += kernel.apply_sysctls()
            self._sysctls_done = True
        addr_owner = {a: s for s, st in plan.services.items() if st for a in st.addresses}
        # Write-ahead: a key is ours from before its creation (a crash in between must not orphan it).
        creating = {v.key for v in plan.vs_add} - self._owned.keys
        self._owned.add(creating)
        if (err := self._owned.save()) is not None:
            node.append(err)
        for a, msg in (kernel.address_change(plan.addr_add, []) if plan.addr_add else []):
            blame(addr_owner.get(a) or self._addr_owner(a) or STALE, msg, addr=a)

        # IPVS in two pipelined batches: virtual servers first, so no real server is added to one that
        # turned out to exist already (someone else's: NLM_F_EXCL said so) or failed.
        first = ([k.op_del_vs(x) for x in plan.vs_delete] + [k.op_del_real(v, r) for v, r in plan.real_delete]
                 + [k.op_add_vs(v) for v in plan.vs_add] + [k.op_set_vs(v) for v in plan.vs_update])
        broken: set[VSKey] = set()
        deleted: set[VSKey] = set(plan.vs_delete)
        for err in kernel.ipvs_run(first) if first else []:
            vk, svc = err.op.vs, plan.owners.get(err.op.vs) or self._vs_owner.get(err.op.vs) or STALE
            if err.op.cmd in (k.CMD_DEL_SERVICE, k.CMD_DEL_DEST) and err.errno in (errno.ESRCH, errno.ENOENT):
                continue  # already gone
            broken.add(vk)
            if err.op.cmd == k.CMD_DEL_SERVICE:
                deleted.discard(vk)
            if err.op.cmd == k.CMD_NEW_SERVICE and err.errno == errno.EEXIST and vk in creating:
                self._owned.discard([vk])  # it was there before us: someone else's
                blame(svc, conflict_text(vk), key=vk)
            else:
                blame(svc, str(err), key=vk)
        second = ([k.op_add_real(v, r) for v, r in plan.real_add if v not in broken]
                  + [k.op_set_real(v, r) for v, r in plan.real_update if v not in broken])
        for err in kernel.ipvs_run(second) if second else []:
            blame(plan.owners.get(err.op.vs) or self._vs_owner.get(err.op.vs) or STALE, str(err), key=err.op.vs)
        for a, msg in (kernel.address_change([], plan.addr_delete) if plan.addr_delete else []):
            blame(self._addr_owner(a) or STALE, msg, addr=a)
        self._owned.discard(deleted | plan.forget)
        if (err := self._owned.save()) is not None and err not in node:
            node.append(err)

    def _apply_nft(self, kernel, plan: Plan, now: float, res: ApplyResult) -> None:
        f = self._node_failed.get("nft")
        if f is not None and not f.due(now) and not plan.full:
            return  # in backoff: these changes are in the committed states, the retry rewrites the table
        try:
            unusable = self._nft_unusable or kernel.nft_available()
        except OSError as e:  # the probe hung or could not run: a failure to retry, not a verdict
            err = f"nft: {describe(e)}"
        else:
            if unusable:
                if self._nft_unusable is None:
                    res.warnings.append(f"nftables unusable here ({unusable}): no masquerade, hairpin or "
                                        "loadBalancerSourceRanges; IPVS is programmed")
                self._nft_unusable = unusable
                self._node_failed.pop("nft", None)
                return
            if plan.full or f is not None:
                out = kernel.nft(self._render_nft(st.nft for st in self._states.values()))
            else:
                delta = render_delta(plan.nft_add, plan.nft_delete)
                out = kernel.nft(delta) if delta else None
            err = f"nft: {out}" if out else None
        if err:
            record(self._node_failed, "nft", now, [err])
            res.errors.setdefault(self.ERROR_NODE, []).append(err)
        else:
            self._node_failed.pop("nft", None)

    def _apply_conntrack(self, kernel, plan: Plan, now: float, node: list[str]) -> None:
        self._ct_pending |= set(plan.conntrack_flush)
        f = self._node_failed.get("conntrack")
        if not self._ct_pending or (f is not None and not f.due(now) and not plan.conntrack_flush):
            return
        # an endpoint that came back (a retry later than its return) keeps its flows
        self._ct_pending = {e for e in self._ct_pending
                            if e[2] not in {r.addr for r in getattr(self._desired_vs(("UDP", e[0], e[1])), "reals", ())}}
        errs = kernel.conntrack_flush_udp(sorted(self._ct_pending)) if self._ct_pending else []
        self._ct_pending = {e for e, _ in errs}
        if errs:
            record(self._node_failed, "conntrack", now, [m for _, m in errs])
            node += [m for _, m in errs]
        else:
            self._node_failed.pop("conntrack", None)

    def _apply_health(self, kernel, plan: Plan, now: float, res: ApplyResult) -> None:
        f = self._node_failed.get("health")
        if plan.health is None and (f is None or not f.due(now)):
            return
        if self._health is None:
            self._health = kernel.health_servers(self._health_bind)
        errs = self._health.update(self.health_checks())
        for e in errs:
            res.errors.setdefault(e.split(":")[0], []).append(e)
        if errs:
            record(self._node_failed, "health", now, errs)
        else:
            self._node_failed.pop("health", None)

    def _desired_vs(self, key: VSKey) -> VirtualServer | None:
        st = self._states.get(self._vs_owner.get(key, ""))
        return next((v for v in st.virtual_servers if v.key == key), None) if st else None

    def _addr_owner(self, addr: str) -> str | None:
        refs = self._addr_refs.get(addr)
        return sorted(refs)[0] if refs else None

    def _commit(self, plan: Plan) -> None:
        """Record the plan's desired states as the current ones (failures are tracked beside them)."""
        old = {s: self._states[s] for s in plan.services if s in self._states}
        new = {s: st for s, st in plan.services.items() if st}
        _apply_refs(self._addr_refs, _refs_change(self._addr_refs, {s: st.addresses for s, st in old.items()},
                                                  {s: st.addresses for s, st in new.items()})[0])
        upd, added, removed = _refs_change(self._nft_refs, {s: st.nft for s, st in old.items()},
                                           {s: st.nft for s, st in new.items()})
        _apply_refs(self._nft_refs, upd)
        for el in added:
            self.nft_counts[el[0]] = self.nft_counts.get(el[0], 0) + 1
        for el in removed:
            self.nft_counts[el[0]] -= 1
        for s, st in old.items():
            for v in st.virtual_servers:
                if self._vs_owner.get(v.key) == s:
                    del self._vs_owner[v.key]
        for s in plan.services:
            self._states.pop(s, None)
            self._errors.pop(s, None)
            self._conflicted.discard(s)
            self._hc.pop(s, None)
        for s, st in new.items():
            self._states[s] = st
            self._vs_owner.update({v.key: s for v in st.virtual_servers})
            if st.health_check is not None:
                self._hc[s] = st.health_check
        for s, why in plan.errors.items():
            self._errors[s] = why
            if why.startswith("virtual server ") and "already belongs" in why:
                self._conflicted.add(s)

    def set_node_addresses(self, node_addresses: Sequence[str]) -> None:
        """The node's addresses changed (NodePort addresses follow): the next plan() is a full one."""
        ctx = node_context(self.settings, self.ctx.node_name, node_addresses)
        if ctx != self.ctx:
            self.ctx = ctx
            self._need_full = True

    # -- introspection ------------------------------------------------------------------------

    def desired(self) -> dict[VSKey, VirtualServer]:
        return {v.key: v for st in self._states.values() for v in st.virtual_servers}

    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    def owner(self, key: VSKey) -> str:
        """The service a desired virtual server belongs to ("" if none)."""
        return self._vs_owner.get(key, "")

    def warnings(self) -> dict[str, tuple[str, ...]]:
        """Programmed services with malformed slice entries that were skipped."""
        return {s: st.warnings for s, st in self._states.items() if st.warnings}

    def slice_errors(self) -> dict[str, str]:
        """EndpointSlices that belong to no service because their metadata is malformed."""
        return {k: f"EndpointSlice {k}: {why}" for k, why in self._slice_errors.items()}

    def failing(self, now: float) -> dict[str, dict]:
        """Services and node-level concerns whose last try failed: errors, failures in a row, next retry."""
        out = {}
        for name, f in [*sorted(self._failed.items()), *((f"({n})", f) for n, f in sorted(self._node_failed.items()))]:
            out[name] = {"errors": list(f.errors), "attempts": f.attempts, "retryIn": round(max(0.0, f.at - now), 3)}
        return out

    def node_warnings(self) -> list[str]:
        out = []
        if self._nft_unusable:
            out.append(f"nftables unusable here ({self._nft_unusable}): no masquerade, hairpin or "
                       "loadBalancerSourceRanges; IPVS is programmed")
        if self._owned.problem:
            out.append(self._owned.problem)
        return out

    def nft_rules(self) -> int:
        """Rules in the service table as rendered for this node (they do not depend on the services)."""
        return 0 if self._nft_unusable else rule_count(self._render_nft(()))

    def ownership_note(self) -> str | None:
        return self._adopted_note

    def health_checks(self) -> dict[int, HealthCheck]:
        return {h.port: h for h in self._hc.values()}

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
            f = self._failed.get(what)
            if f is not None:
                lines += [f"  failing ({f.attempts} in a row, next try in {max(0.0, f.at - self._clock()):.1f}s): {e}"
                          for e in f.errors]
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
