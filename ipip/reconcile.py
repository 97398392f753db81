"""Per-key reconciliation of kernel state (pure): desired vs dataplane, pending keys, per-key backoff.

Felix's DeltaTracker idea: the desired side is updated per key as inputs change; the dataplane side is
what we believe the kernel holds (rewritten from a dump on a resync, updated from our own successful
writes otherwise); the pending keys are exactly those where the two differ. A write the kernel refuses
marks its key failed with a retry time (exponential backoff per key); the key alone is retried when
that time comes, never the whole table, and a new desired value for it is tried at once.

`RouteReconciler` adds ownership: a route is never written where another owner's route sits at the
same (table, dst, tos, metric) key — the kernel's replace would overwrite it whatever its protocol.
Such a key is reported as a conflict and re-tried (a create with NLM_F_EXCL, which the kernel refuses
while the other route is there) on the same backoff, so it converges once the other route goes.
Deletes match our protocol, so they never remove another owner's route.

Between dumps the dataplane side follows the kernel's own route events (the routes stage feeds them):
one of our routes deleted or changed by someone else, another owner's route appearing at or leaving
one of our keys, and a device going down — the kernel then drops every IPv4 route through it without
telling anyone (no RTM_DELROUTE), so the reconciler drops those keys itself. Each such key is pending
at once and repaired alone: no dump, no full resync. When an obstacle goes (the other owner's route is
deleted, the device comes back up) the keys it held back are retried at once instead of at their
backoff time.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ipip.model import ROUTE_KINDS, Route, RouteKey

K = TypeVar("K")


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    maximum: float = 60.0

    def delay(self, attempts: int) -> float:
        return min(self.maximum, self.initial * 2 ** max(0, attempts - 1))


@dataclass
class Failure:
    attempts: int
    retry_at: float
    error: str
    since: float
    conflict: bool = False


class Failures(Generic[K]):
    """Failed keys with their retry time (pure; time is an argument)."""

    def __init__(self, backoff: Backoff = Backoff()) -> None:
        self.backoff = backoff
        self.items: dict[K, Failure] = {}

    def fail(self, key: K, error: str, now: float, conflict: bool = False) -> Failure:
        old = self.items.get(key)
        attempts = old.attempts + 1 if old else 1
        f = Failure(attempts, now + self.backoff.delay(attempts), error, old.since if old else now, conflict)
        self.items[key] = f
        return f

    def clear(self, key: K) -> None:
        self.items.pop(key, None)

    def waiting(self, key: K, now: float) -> bool:
        f = self.items.get(key)
        return f is not None and f.retry_at > now

    def next_deadline(self) -> float | None:
        return min((f.retry_at for f in self.items.values()), default=None)

    def __contains__(self, key: object) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class RouteOps:
    """What to do now, in order: deletes, then creates/replaces."""

    delete: list[Route] = field(default_factory=list)
    write: list[tuple[str, Route]] = field(default_factory=list)  # ("create" | "replace", route)
    conflicts: dict[RouteKey, str] = field(default_factory=dict)  # refused without a write: reason

    def __bool__(self) -> bool:
        return bool(self.delete or self.write)

    def ops(self) -> list[tuple[str, Route]]:
        return [("delete", r) for r in self.delete] + self.write


def _order(name: str) -> tuple[int, int, int]:
    dst, _, metric = name.partition(" metric ")
    net = ipaddress.IPv4Network(dst)
    return int(net.network_address), net.prefixlen, int(metric or 0)


class RouteReconciler:
    def __init__(self, backoff: Backoff = Backoff()) -> None:
        self.desired: dict[RouteKey, Route] = {}
        self.dataplane: dict[RouteKey, Route] = {}
        self.foreign: dict[RouteKey, str] = {}
        self.failures: Failures[RouteKey] = Failures(backoff)
        self._pending: set[RouteKey] = set()
        self.synced = False  # the dataplane side came from a dump at least once
        # routes in the kernel as desired, by kind (Route.kind_name), kept per key change: O(change).
        # Every kind is there from the start, so a reader on another thread never sees the dict grow.
        self.programmed: dict[str, int] = {k: 0 for k in ROUTE_KINDS}
        self._programmed_kind: dict[RouteKey, str] = {}
        # another owner's route next to ours at one of our keys (`ip route append`): reported, never fought
        self.shared: dict[RouteKey, str] = {}
        self._by_device: dict[str, set[RouteKey]] = {}  # dataplane keys by next-hop device (device_down)

    # -- the desired side ---------------------------------------------------------------------------
    def _check(self, k: RouteKey) -> None:
        d, a = self.desired.get(k), self.dataplane.get(k)
        was = self._programmed_kind.pop(k, None)
        if was is not None:
            self.programmed[was] -= 1
        if (d is None and a is None) or (d is not None and a is not None and d.key() == a.key()):
            self._pending.discard(k)
            self.failures.clear(k)
            if d is not None:
                kind = d.kind_name()
                self._programmed_kind[k] = kind
                self.programmed[kind] = self.programmed.get(kind, 0) + 1
        else:
            self._pending.add(k)

    def set_desired(self, routes: Mapping[RouteKey, Route]) -> None:
        """Replace the whole desired side (a full recompute): O(routes)."""
        old = self.desired
        self.desired = dict(routes)
        for k in old.keys() | self.desired.keys():
            o, n = old.get(k), self.desired.get(k)
            if o is None or n is None or o.key() != n.key():
                self.failures.clear(k)  # a new desired value gets a fresh attempt
            self._check(k)

    def update_desired(self, changes: Mapping[RouteKey, Route | None]) -> None:
        """Per-key changes (None: not desired any more): O(changes)."""
        for k, r in changes.items():
            o = self.desired.get(k)
            if r is None:
                self.desired.pop(k, None)
            else:
                self.desired[k] = r
            if o is None or r is None or o.key() != r.key():
                self.failures.clear(k)
            self._check(k)

    # -- the dataplane side ---------------------------------------------------------------------------
    def _dp_set(self, k: RouteKey, r: Route) -> None:
        old = self.dataplane.get(k)
        if old is not None:
            self._dp_unindex(k, old)
        self.dataplane[k] = r
        for h in r.nexthops:
            self._by_device.setdefault(h.device, set()).add(k)

    def _dp_pop(self, k: RouteKey) -> Route | None:
        old = self.dataplane.pop(k, None)
        if old is not None:
            self._dp_unindex(k, old)
        return old

    def _dp_unindex(self, k: RouteKey, r: Route) -> None:
        for h in r.nexthops:
            keys = self._by_device.get(h.device)
            if keys is not None:
                keys.discard(k)
                if not keys:
                    del self._by_device[h.device]

    def set_dataplane(self, owned: Mapping[RouteKey, Route], foreign: Mapping[RouteKey, str]) -> None:
        """What a dump found: our routes and other owners' keys. Re-compares every key."""
        keys = self.dataplane.keys() | owned.keys() | self.desired.keys()
        self.dataplane, self.foreign = dict(owned), dict(foreign)
        self._by_device = {}
        for k, r in self.dataplane.items():
            for h in r.nexthops:
                self._by_device.setdefault(h.device, set()).add(k)
        self.shared = {k: self.foreign[k] for k in self.dataplane if k in self.foreign}
        self.synced = True
        for k in keys:
            self._check(k)

    # -- the kernel's own events between dumps (O(1) each, O(routes through it) for a device) ---------
    def kernel_route(self, route: Route, deleted: bool) -> bool:
        """A route of our protocol changed by someone else (not by our writes). Returns whether the
        dataplane side changed (the key is then pending if it differs from what we want)."""
        k = route.id
        if deleted:
            held = self.dataplane.get(k)
            if held is None or held.key() != route.key():
                return False  # not what we hold there (already replaced since): stale news
            self._dp_pop(k)
            self.shared.pop(k, None)
        else:
            held = self.dataplane.get(k)
            if held is not None and held.key() == route.key():
                return False
            self._dp_set(k, route)
            if k in self.foreign:
                self.shared[k] = self.foreign[k]
        self._check(k)
        return True

    def kernel_foreign(self, k: RouteKey, text: str | None, *, replaced: bool = False, now: float = 0.0) -> bool:
        """Another owner's route appeared at key `k` (`text`; `replaced`: it replaced the route there, so
        ours is gone) or left it (`text` None). Returns whether it concerns one of our keys."""
        ours = k in self.desired or k in self.dataplane or k in self.failures
        if text is None:
            gone = self.foreign.pop(k, None) is not None
            self.shared.pop(k, None)
            f = self.failures.items.get(k)
            if f is not None and f.conflict:
                f.retry_at = now  # the obstacle is gone: retry now, not at the backoff time
            return ours and gone
        self.foreign[k] = text
        if not ours:
            return False
        if replaced and k in self.dataplane:
            self._dp_pop(k)  # theirs took our route's place: ours is gone (never written over theirs again)
            self.shared.pop(k, None)
        elif k in self.dataplane:
            self.shared[k] = text  # next to ours: reported, left alone
        self._check(k)
        return True

    def device_down(self, device: str) -> list[Route]:
        """`device` went down: the kernel dropped (silently) every IPv4 route whose next hops all go
        through it. Drops them from the dataplane side (pending again); returns them."""
        gone = []
        for k in list(self._by_device.get(device, ())):
            r = self.dataplane[k]
            if all(h.device == device for h in r.nexthops):
                self._dp_pop(k)
                self.shared.pop(k, None)
                self._check(k)
                gone.append(r)
        return gone

    def device_up(self, device: str, now: float) -> int:
        """`device` is up again: failed writes through it are retried now. Returns how many."""
        n = 0
        for k, f in self.failures.items.items():
            d = self.desired.get(k)
            if f.retry_at > now and d is not None and any(h.device == device for h in d.nexthops):
                f.retry_at = now
                n += 1
        return n

    # -- planning and recording ---------------------------------------------------------------------
    def pending(self) -> set[RouteKey]:
        return set(self._pending)

    def is_pending(self, k: RouteKey) -> bool:
        return k in self._pending

    def plan(self, now: float) -> RouteOps:
        """The operations due now: every pending key whose failure (if any) is due for a retry."""
        ops = RouteOps()
        waiting = self.failures.items
        for k in self._pending:  # no sort: 10k IPv4Network comparisons cost more than the writes
            f = waiting.get(k)
            if f is not None and f.retry_at > now:  # Failures.waiting, inline: once per pending key
                continue
            d, a = self.desired.get(k), self.dataplane.get(k)
            if d is None:
                if a is not None:
                    ops.delete.append(a)
                continue
            if a is None:
                ops.write.append(("create", d))  # EXCL: the kernel refuses if any route sits at this key
            elif k in self.foreign:
                # Ours and another owner's at one key: a replace could hit theirs. Leave both; report.
                ops.conflicts[k] = f"another owner's route at the same key: {self.foreign[k]}"
            else:
                ops.write.append(("replace", d))
        return ops

    def record(self, ops: RouteOps, refused: Iterable[tuple[str, Route, int]], now: float) -> None:
        """Fold the outcome of applying `ops` in: (op, route, errno) for each refusal."""
        bad = {(op, r.id): e for op, r, e in refused}
        for k, why in ops.conflicts.items():
            self.failures.fail(k, why, now, conflict=True)
        for r in ops.delete:
            k = r.id
            e = bad.get(("delete", k)) if bad else None
            if e is None:
                self._dp_pop(k)
                self.shared.pop(k, None)
                self._check(k)
            else:
                self.failures.fail(k, f"delete {r.text()}: {os.strerror(e)}", now)
        for op, r in ops.write:
            k = r.id
            e = bad.get((op, k)) if bad else None
            if e is None:
                self._dp_set(k, r)
                self.foreign.pop(k, None)
                self._check(k)
            elif op == "create" and e == errno.EEXIST:
                why = self.foreign.get(r.id) or "the kernel says a route exists at this key"
                self.failures.fail(r.id, f"not written: another owner's route holds {r.dst} metric {r.metric} "
                                         f"({why})", now, conflict=True)
            else:
                self.failures.fail(r.id, f"{op} {r.text()}: {os.strerror(e)}", now)

    def next_deadline(self) -> float | None:
        return self.failures.next_deadline()

    def problems(self) -> dict[str, dict]:
        """Per failed route (by `dst metric N`): error, attempts, next retry, conflict or not; and our
        routes another owner put a route next to (a conflict with nothing to retry: both are left)."""
        def name(k: RouteKey) -> str:
            return f"{k[0]}" + (f" metric {k[1]}" if k[1] else "")

        out = {name(k): {"error": f"another owner's route next to ours at the same key: {why} (both left as "
                                  "they are)", "attempts": 0, "retryAt": None, "since": None, "conflict": True}
               for k, why in self.shared.items() if k not in self.failures}
        out.update({name(k): {"error": f.error, "attempts": f.attempts, "retryAt": f.retry_at, "since": f.since,
                              "conflict": f.conflict} for k, f in self.failures.items.items()})
        return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))
