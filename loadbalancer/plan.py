"""Diff desired against actual into a typed, printable Plan. Pure.

The proxy diffs a changed service's new desired state against its previous one (incremental), or
the whole desired state against one kernel dump (resync). Order when applied: add addresses, delete
virtual servers, delete real servers, add/update virtual servers, add/update real servers, delete
addresses, nftables, conntrack flush.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from loadbalancer.types import HealthCheck, NftElement, RealKey, RealServer, ServiceState, VirtualServer, VSKey


@dataclass
class Plan:
    full: bool = False
    vs_delete: list[VSKey] = field(default_factory=list)
    vs_add: list[VirtualServer] = field(default_factory=list)
    vs_update: list[VirtualServer] = field(default_factory=list)
    real_delete: list[tuple[VSKey, RealKey]] = field(default_factory=list)
    real_add: list[tuple[VSKey, RealServer]] = field(default_factory=list)
    real_update: list[tuple[VSKey, RealServer]] = field(default_factory=list)
    addr_add: list[str] = field(default_factory=list)
    addr_delete: list[str] = field(default_factory=list)
    nft_full: str | None = None  # whole-table transaction (full sync)
    nft_add: set[NftElement] = field(default_factory=set)
    nft_delete: set[NftElement] = field(default_factory=set)
    conntrack_flush: list[tuple[str, int, str]] = field(default_factory=list)  # (vip, port, endpoint) UDP
    health: dict[int, HealthCheck] | None = None  # the complete new set of health checks, when it changed
    errors: dict[str, str] = field(default_factory=dict)  # service -> why it is skipped
    owners: dict[VSKey, str] = field(default_factory=dict)  # VS -> service, to blame failures
    services: dict[str, ServiceState | None] = field(default_factory=dict)  # desired states this plan commits
    old_vs: dict[VSKey, VirtualServer] = field(default_factory=dict)  # what the diff started from (ours only)
    new_vs: dict[VSKey, VirtualServer] = field(default_factory=dict)  # what it goes to
    foreign: set[VSKey] = field(default_factory=set)  # virtual servers seen in the kernel that are not ours
    conflicts: dict[str, list[VSKey]] = field(default_factory=dict)  # service -> its VSs someone else has
    forget: set[VSKey] = field(default_factory=set)  # recorded as ours, gone from the kernel, not wanted

    def kernel_ops(self) -> int:
        return (len(self.vs_delete) + len(self.vs_add) + len(self.vs_update) + len(self.real_delete)
                + len(self.real_add) + len(self.real_update) + len(self.addr_add) + len(self.addr_delete))

    def __bool__(self) -> bool:
        """Something differs. A full plan always rewrites the nft table and health servers (idempotent
        refreshes), so those alone don't count as differences."""
        return bool(self.kernel_ops() or self.nft_add or self.nft_delete or self.conntrack_flush or self.conflicts
                    or (not self.full and (self.nft_full is not None or self.health is not None)))

    def __str__(self) -> str:
        out = [f"service plan ({'full' if self.full else 'incremental'}): {self.kernel_ops()} IPVS/address change(s)"]
        for k in self.vs_delete:
            out.append(f"  - vs   {k[0]} {k[1]}:{k[2]}")
        for k, r in self.real_delete:
            out.append(f"  - real {k[0]} {k[1]}:{k[2]} -> {r[0]}:{r[1]}")
        out += [f"  + vs   {v.proto} {v.addr}:{v.port} {v.options_text()}" for v in self.vs_add]
        out += [f"  ~ vs   {v.proto} {v.addr}:{v.port} {v.options_text()}" for v in self.vs_update]
        for k, r in self.real_add:
            out.append(f"  + real {k[0]} {k[1]}:{k[2]} -> {r.addr}:{r.port} weight {r.weight}")
        for k, r in self.real_update:
            out.append(f"  ~ real {k[0]} {k[1]}:{k[2]} -> {r.addr}:{r.port} weight {r.weight}")
        out += [f"  + addr {a}/32" for a in self.addr_add] + [f"  - addr {a}/32" for a in self.addr_delete]
        if self.nft_full is not None:
            out.append("  nft: replace table inet bgp-fabric")
        out += [f"  - nft {e[0]} {e[1]}" for e in sorted(self.nft_delete)]
        out += [f"  + nft {e[0]} {e[1]}" for e in sorted(self.nft_add)]
        out += [f"  conntrack flush udp {v}:{p} -> {ep}" for v, p, ep in self.conntrack_flush]
        if self.health is not None:
            out.append(f"  health checks: {', '.join(f'{p} ({h.service}: {h.local_endpoints})' for p, h in sorted(self.health.items())) or 'none'}")
        out += [f"  ! {svc}: {why}" for svc, why in sorted(self.errors.items())]
        out += [f"  ! {svc}: virtual server {vk[1]}:{vk[2]}/{vk[0]} exists and is not ours: left alone"
                for svc, vks in sorted(self.conflicts.items()) for vk in vks]
        return "\n".join(out)


def diff_virtual_servers(plan: Plan, old: Mapping[VSKey, VirtualServer], new: Mapping[VSKey, VirtualServer]) -> None:
    """Append to `plan` the IPVS operations that turn `old` into `new`."""
    for k, o in old.items():
        n = new.get(k)
        if n is None:
            plan.vs_delete.append(k)
            if k[0] == "UDP":
                plan.conntrack_flush += [(k[1], k[2], r.addr) for r in o.reals]
            continue
        if not n.same_options(o):
            plan.vs_update.append(n)
        om, nm = o.real_map(), n.real_map()
        for rk, r in om.items():
            nr = nm.get(rk)
            if nr is None:
                plan.real_delete.append((k, rk))
                if k[0] == "UDP":
                    plan.conntrack_flush.append((k[1], k[2], rk[0]))
            elif nr.weight != r.weight:
                plan.real_update.append((k, nr))
        plan.real_add += [(k, r) for rk, r in nm.items() if rk not in om]
    for k, n in new.items():
        if k not in old:
            plan.vs_add.append(n)
            plan.real_add += [(k, r) for r in n.reals]
    # Deterministic order (tests and plan printing).
    plan.vs_delete.sort()
    plan.vs_add.sort(key=lambda v: v.key)
    plan.vs_update.sort(key=lambda v: v.key)
    plan.real_delete.sort()
    plan.real_add.sort(key=lambda x: (x[0], x[1].key))
    plan.real_update.sort(key=lambda x: (x[0], x[1].key))
    plan.conntrack_flush = sorted(set(plan.conntrack_flush))
