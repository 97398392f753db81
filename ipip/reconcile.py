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
"""

from __future__ import annotations

import errno
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
    def set_dataplane(self, owned: Mapping[RouteKey, Route], foreign: Mapping[RouteKey, str]) -> None:
        """What a dump found: our routes and other owners' keys. Re-compares every key."""
        keys = self.dataplane.keys() | owned.keys() | self.desired.keys()
        self.dataplane, self.foreign = dict(owned), dict(foreign)
        self.synced = True
        for k in keys:
            self._check(k)

    # -- planning and recording ---------------------------------------------------------------------
    def pending(self) -> set[RouteKey]:
        return set(self._pending)

    def plan(self, now: float) -> RouteOps:
        """The operations due now: every pending key whose failure (if any) is due for a retry."""
        ops = RouteOps()
        for k in self._pending:  # no sort: 10k IPv4Network comparisons cost more than the writes
            if self.failures.waiting(k, now):
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
            e = bad.get(("delete", r.id))
            if e is None:
                self.dataplane.pop(r.id, None)
                self._check(r.id)
            else:
                self.failures.fail(r.id, f"delete {r.text()}: {os.strerror(e)}", now)
        for op, r in ops.write:
            e = bad.get((op, r.id))
            if e is None:
                self.dataplane[r.id] = r
                self.foreign.pop(r.id, None)
                self._check(r.id)
            elif op == "create" and e == errno.EEXIST:
                why = self.foreign.get(r.id) or "the kernel says a route exists at this key"
                self.failures.fail(r.id, f"not written: another owner's route holds {r.dst} metric {r.metric} "
                                         f"({why})", now, conflict=True)
            else:
                self.failures.fail(r.id, f"{op} {r.text()}: {os.strerror(e)}", now)

    def next_deadline(self) -> float | None:
        return self.failures.next_deadline()

    def problems(self) -> dict[str, dict]:
        """Per failed route (by `dst metric N`): error, attempts, next retry, conflict or not."""
        return {f"{k[0]}" + (f" metric {k[1]}" if k[1] else ""): {
            "error": f.error, "attempts": f.attempts, "retryAt": f.retry_at, "since": f.since, "conflict": f.conflict}
            for k, f in sorted(self.failures.items.items(), key=lambda kv: (kv[0][0].network_address, kv[0][1]))}
