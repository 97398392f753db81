"""Diff the desired policy table against what we applied, per key, and apply the difference.

`plan(state, applied, dirty)` is pure: only the keys a change touched (fabric.policy.state.Dirty) are
compared, so a pod event costs its own elements whatever the number of policies. `PolicyTable`
applies a plan in one transaction: element-only plans over nfnetlink (fabric.policy.nftnl), anything
with chains or sets through `nft -f` (fabric.policy.nft text); a full sync replaces the whole table in
one transaction. Our belief of the kernel (`Applied`) is updated only after a commit succeeded; any
failure forgets it, so the next attempt is a full replacement, which also repairs whatever drifted.
With no policy at all there is nothing to enforce: the table is removed if it exists (a previous run's)
and otherwise never created.
Every nft run has a timeout. Nothing outside table `inet bgp-fabric-policy` is ever touched.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fabric.policy import nft
from fabric.policy.delta import Plan
from fabric.policy.nftnl import MAX_BATCH, Batch, NetlinkError, NftSocket
from fabric.policy.state import MAPS, Dirty, PolicyState, Rule

log = logging.getLogger("fabric.policy")

_MAP_DIRECTION = {v: k for k, v in MAPS.items()}


class NftError(Exception):
    """nft is missing, hung past its timeout, or refused our transaction (nothing of it applied)."""


@dataclass
class Applied:
    """What the kernel holds in our table, as far as we know (from our own successful commits)."""

    sets: dict[str, set] = field(default_factory=dict)
    chains: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    maps: dict[str, dict[str, str]] = field(default_factory=lambda: {m: {} for m in MAPS.values()})

    @classmethod
    def of(cls, state: PolicyState) -> "Applied":
        return cls({k: set(v) for k, v in state.sets.items()}, dict(state.chains),
                   {MAPS[d]: dict(m) for d, m in state.maps.items()})

    def record(self, p: Plan) -> None:
        for name in p.del_sets:
            self.sets.pop(name, None)
        for name in p.new_sets:
            self.sets[name] = set()
        for name, elems in p.set_del.items():
            self.sets[name] -= elems
        for name, elems in p.set_add.items():
            self.sets[name] |= elems
        for name in p.del_chains:
            self.chains.pop(name, None)
        self.chains.update(p.chains)
        for m, ips in p.map_del.items():
            for ip in ips:
                self.maps[m].pop(ip, None)
        for m, entries in p.map_add.items():
            self.maps[m].update(entries)


def plan(state: PolicyState, applied: Applied, dirty: Dirty) -> Plan:
    p = Plan()
    for name in dirty.sets:
        want, have = state.sets.get(name), applied.sets.get(name)
        if want is None:
            if have is not None:
                p.del_sets.add(name)
            continue
        if have is None:
            p.new_sets.add(name)
            have = set()
        if want - have:
            p.set_add[name] = want - have
        if have - want:
            p.set_del[name] = have - want
    for name, keys in dirty.elems.items():
        if name in _MAP_DIRECTION:
            want_m, have_m = state.maps[_MAP_DIRECTION[name]], applied.maps[name]
            for ip in keys:
                w, h = want_m.get(ip), have_m.get(ip)
                if w != h:
                    if h is not None:
                        p.map_del.setdefault(name, set()).add(ip)
                    if w is not None:
                        p.map_add.setdefault(name, {})[ip] = w
            continue
        if name in dirty.sets or name not in state.sets:
            continue  # compared whole above, or gone
        want, have = state.sets[name], applied.sets.get(name)
        if have is None:  # not in the kernel yet: send it whole
            p.new_sets.add(name)
            if want:
                p.set_add[name] = set(want)
            continue
        for e in keys:
            if e in want and e not in have:
                p.set_add.setdefault(name, set()).add(e)
            elif e not in want and e in have:
                p.set_del.setdefault(name, set()).add(e)
    for name in dirty.chains:
        want_c, have_c = state.chains.get(name), applied.chains.get(name)
        if want_c is None:
            if have_c is not None:
                p.del_chains.add(name)
        elif have_c is None:
            p.new_chains.add(name)
            p.chains[name] = want_c
        elif want_c != have_c:
            p.chains[name] = want_c
    return p


def batch_of(p: Plan) -> Batch:
    b = Batch(nft.TABLE)
    for name, elems in sorted(p.set_del.items()):
        b.delete(name, sorted(elems, key=str))
    for name, elems in sorted(p.set_add.items()):
        b.add(name, sorted(elems, key=str))
    for name, ips in sorted(p.map_del.items()):
        b.map_delete(name, sorted(ips))
    for name, entries in sorted(p.map_add.items()):
        b.map_add(name, entries)
    return b


class NftRunner:
    """Runs `nft -f -` with a timeout, in the calling thread's network namespace."""

    def __init__(self, nft_path: str = "nft", timeout: float = 30.0) -> None:
        self.nft_path = nft_path
        self.timeout = timeout

    def table_exists(self) -> bool:
        return f"table {nft.FAMILY} {nft.TABLE}\n" in self.run("list tables") + "\n"

    def run(self, text: str) -> str:
        exe = shutil.which(self.nft_path)
        if exe is None:
            raise NftError(f"{self.nft_path}: not found (install nftables)")
        try:
            r = subprocess.run([exe, "-f", "-"], input=text, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise NftError(f"nft did not finish within {self.timeout:g}s (killed; nothing applied)") from None
        if r.returncode != 0:
            raise NftError(f"nft refused the transaction: {' '.join(r.stderr.split())[:500]}")
        return r.stdout


@dataclass
class Result:
    how: str  # "none", "elements" (netlink), "delta" (nft -f), "full" (table replaced), "removed"
    counts: dict[str, int]
    seconds: float
    kernel_seconds: float = 0.0  # of which in the kernel's commit (the netlink batch or the nft run)

    def __str__(self) -> str:
        return f"{self.how}: " + ", ".join(f"{v} {k}" for k, v in self.counts.items() if v) + f" in {self.seconds * 1e3:.1f} ms"


class PolicyTable:
    """Our table in one network namespace. Call from one thread (the netlink socket lives there)."""

    def __init__(self, runner: NftRunner | None = None, *, netlink: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner or NftRunner()
        self.netlink = netlink
        self.applied: Applied | None = None  # None: unknown, the next apply replaces the table
        self.present: bool | None = None  # does our table exist? None: not known
        self._sock: NftSocket | None = None
        self._clock = clock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def apply(self, state: PolicyState, dirty: Dirty, *, full: bool = False) -> Result:
        """Make the kernel hold `state`. Raises NftError/NetlinkError (then the next call is full)."""
        start = self._clock()
        try:
            if not state.chains:  # no policy: nothing to enforce, no table needed
                if full or self.present is None:
                    self.present = self.runner.table_exists()
                if not self.present:
                    self.applied = None
                    return Result("none", {}, self._clock() - start)
                full = True
            if full or self.applied is None:
                self.applied = None
                if not state.chains:
                    self.runner.run(f"table {nft.FAMILY} {nft.TABLE}\ndelete table {nft.FAMILY} {nft.TABLE}\n")
                    self.present = False
                    return Result("removed", {}, self._clock() - start)
                self.runner.run(nft.render_full(state))
                self.present = True
                self.applied = Applied.of(state)
                return Result("full", {"sets": len(state.sets), "chains": len(state.chains),
                                       "map entries": sum(map(len, state.maps.values()))}, self._clock() - start)
            p = plan(state, self.applied, dirty)
            kernel = 0.0
            if not p:
                return Result("none", {}, self._clock() - start)
            how = "delta"
            if p.elements_only and self.netlink:
                batch = batch_of(p)
                if batch.nbytes <= MAX_BATCH:
                    if self._sock is None:
                        self._sock = NftSocket()
                    k = self._clock()
                    self._sock.commit(batch)
                    kernel = self._clock() - k
                    how = "elements"
            if how == "delta":
                k = self._clock()
                self.runner.run(nft.render_delta(p))
                kernel = self._clock() - k
            self.applied.record(p)
            return Result(how, p.counts(), self._clock() - start, kernel)
        except (NftError, NetlinkError, OSError):
            self.applied, self.present = None, None
            raise
