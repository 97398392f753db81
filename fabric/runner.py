"""The sync runner: runs every stage when its inputs change, with BoundedFrequencyRunner semantics.

Per stage (kube-proxy's BoundedFrequencyRunner, one per concern):
- a run starts when the Store changed one of its kinds, when something woke it (a BGP event, a
  facts change), at its own deadline (a key's retry, a timer), or at its periodic full resync
  (`timers.resyncInterval`);
- runs of one stage are at least `timers.minSyncInterval` apart: changes arriving meanwhile are
  merged into the next run;
- a run that fails as a whole is retried after an exponential backoff (1 s doubling to 30 s), the Store
  changes it took put back first; a failure never turns into a bigger sync;
- each stage runs on its own worker (or on the event loop for quick asyncio work), so a failing or
  hung stage never delays another: routes keep converging while a service stage hangs.

Health: a stage is stalled when one of its runs has gone on for more than `stageTimeout`; it stays
stalled until a run of it succeeds. /healthz fails while any stage is stalled.

Nothing polls: the loop sleeps until woken or until the earliest deadline of a stage.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fabric.stage import Stage, StageInput, StageResult
from fabric.tracker import Changes, Store
from fabric.worker import Worker
from ipip.reconcile import Backoff

log = logging.getLogger("fabric.runner")

EXPECTED_ERRORS = (OSError, TimeoutError, RuntimeError, ValueError)  # logged as one line, no traceback


@dataclass
class StageState:
    stage: Stage
    worker: Worker | None
    future: asyncio.Future | None = None
    run_started: float | None = None
    inp: StageInput | None = None
    prepared: Any = None
    first: bool = True
    woken: bool = False
    full_requested: bool = True
    next_full: float = 0.0
    last_start: float | None = None
    last_end: float | None = None
    last_ok: float | None = None
    last_duration: float | None = None
    deadline: float | None = None  # from the last result
    attempts: int = 0  # consecutive failed runs
    retry_at: float | None = None
    error: str | None = None
    error_since: float | None = None
    stalled: bool = False  # a run exceeded the stage timeout and none succeeded since
    runs: int = 0
    failed_runs: int = 0
    result: StageResult = field(default_factory=StageResult)


class Runner:
    def __init__(self, store: Store, stages: Sequence[Stage], *, complete: Callable[[], bool],
                 min_interval: float = 0.0, resync_interval: float = 90.0, stage_timeout: float = 20.0,
                 clock: Callable[[], float] = time.monotonic, backoff: Backoff = Backoff(1.0, 30.0),
                 on_result: Callable[[Stage, StageResult], None] | None = None,
                 on_run: Callable[[str, float, bool], None] | None = None) -> None:
        self.store = store
        self.complete = complete
        self.min_interval = min_interval
        self.resync_interval = resync_interval
        self.stage_timeout = stage_timeout
        self.clock = clock
        self.backoff = backoff
        self.on_result = on_result
        self.on_run = on_run  # (stage, seconds, ok) after every run: metrics for every stage, present and future
        self.states: dict[str, StageState] = {}
        for s in stages:
            if s.name in self.states:
                raise ValueError(f"two stages named {s.name!r}")
            store.subscribe(s.name, s.kinds)
            self.states[s.name] = StageState(s, Worker(f"stage-{s.name}") if s.on_worker else None)
        self._wake: asyncio.Event | None = None
        self._waiter: asyncio.Future | None = None  # what the loop awaits while idle (resolved by _notify)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._logged: dict[str, str] = {}
        self._complete_seen = False  # the source was complete at some change already

    # -- waking ------------------------------------------------------------------------------------
    def wake(self, name: str | None = None, *, full: bool = False) -> None:
        """On the event loop: run stage `name` (None: every stage) soon; `full`: as a full resync."""
        for st in ([self.states[name]] if name is not None else self.states.values()):
            st.woken = True
            if full:
                st.full_requested = True
        self._notify()

    def wake_threadsafe(self, name: str | None = None, *, full: bool = False) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: self.wake(name, full=full))

    def kind_changed(self, kind: str) -> None:
        """The Store's on_change (any thread): wake the stages that read `kind` ("" = all of them)."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._kind_changed, kind)

    def _kind_changed(self, kind: str) -> None:
        # The source's first complete list can end with a kind some stage does not read (the last kind
        # listed had no objects): each stage must see `complete` flip all the same, not at its resync.
        became_complete = not self._complete_seen and self.complete()
        self._complete_seen = self._complete_seen or became_complete
        for st in self.states.values():
            if not kind or kind in st.stage.kinds or became_complete:
                st.woken = True
        self._notify()

    def _notify(self) -> None:
        """On the loop: something changed; the loop looks at every stage again."""
        if self._wake is not None:
            self._wake.set()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- the loop ----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda _: self._notify())
        try:
            while not stop.is_set():
                self._wake.clear()
                now = self.clock()
                earliest = math.inf
                for st in self.states.values():
                    if st.future is not None:
                        continue
                    t = self._due(st, now)
                    if t is None:
                        continue
                    if t <= now:
                        self._start(st, now)
                    else:
                        earliest = min(earliest, t)
                if self._wake.is_set():
                    continue
                # One bare future per wait (no task, no asyncio.wait): every wake-up costs this loop a few
                # event-loop turns less, on every node and every BGP update.
                waiter = self._waiter = self._loop.create_future()
                timer = None if earliest == math.inf else \
                    self._loop.call_later(max(0.0, earliest - self.clock()), _resolve, waiter)
                try:
                    await waiter
                finally:
                    self._waiter = None
                    if timer is not None:
                        timer.cancel()
        finally:
            stopper.cancel()

    def _due(self, st: StageState, now: float) -> float | None:
        stage = st.stage
        if stage.needs_source and not self.complete():
            return None
        t = st.next_full
        if st.first or st.woken or st.full_requested or self.store.pending(stage.name):
            t = now
        if st.deadline is not None:
            t = min(t, st.deadline)
        d = stage.next_deadline(now)
        if d is not None:
            t = min(t, d)
        if st.retry_at is not None:
            t = max(t, st.retry_at)
        if st.last_start is not None:
            t = max(t, st.last_start + self.min_interval)
        return t

    def _start(self, st: StageState, now: float) -> None:
        stage = st.stage
        full = st.first or st.full_requested or now >= st.next_full
        changes = self.store.take(stage.name)
        inp = StageInput(changes, full or changes.full, now, self.complete())
        st.woken = st.full_requested = st.first = False
        st.last_start = st.run_started = now
        st.inp = inp
        try:
            st.prepared = stage.prepare(inp)
        except Exception as e:  # noqa: BLE001 - a stage's bug must not stop the runner
            self._finish(st, None, e)
            return
        if st.worker is not None:
            fut = st.worker.submit(stage.run, inp, st.prepared)
        else:
            fut = asyncio.ensure_future(stage.run(inp, st.prepared))
        st.future = fut
        fut.add_done_callback(lambda f, st=st: self._finish(st, f, None))

    def _finish(self, st: StageState, fut: asyncio.Future | None, exc: BaseException | None) -> None:
        now = self.clock()
        stage, inp = st.stage, st.inp
        assert inp is not None
        st.future = None
        st.last_end = now
        st.last_duration = now - (st.run_started or now)
        st.runs += 1
        res: StageResult
        if exc is None and fut is not None:
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        if exc is not None:
            res = StageResult(error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            self._log_error(stage.name, res.error, exc)
        else:
            assert fut is not None
            res = fut.result()
            if not isinstance(res, StageResult):
                res = StageResult(error=f"run() returned {type(res).__name__}, not a StageResult")
            if res.error:
                self._log_error(stage.name, res.error, None)
        if st.last_duration > self.stage_timeout and res.error:
            st.stalled = True
        if res.error:
            self.store.restore(inp.changes, stage.name)
            if inp.full:
                st.full_requested = True
            try:
                stage.restore(inp, st.prepared)
            except Exception:  # noqa: BLE001
                log.exception("stage %s: restore failed", stage.name)
            st.attempts += 1
            st.failed_runs += 1
            st.retry_at = now + self.backoff.delay(st.attempts)
            if st.error_since is None:
                st.error_since = now
            st.error = res.error
        else:
            if st.error is not None:
                log.info("stage %s: recovered after %d failed run(s)", stage.name, st.attempts)
            self._logged.pop(stage.name, None)
            st.attempts, st.retry_at, st.error, st.error_since, st.stalled = 0, None, None, None, False
            st.last_ok = now
            if inp.full:
                st.next_full = (st.run_started or now) + self.resync_interval
        if st.next_full == 0.0:
            st.next_full = now + self.resync_interval
        st.deadline = res.next_deadline
        st.result = res
        st.prepared = None
        if self.on_run is not None:
            try:
                self.on_run(stage.name, st.last_duration, not res.error)
            except Exception:  # noqa: BLE001
                log.exception("on_run failed for stage %s", stage.name)
        if self.on_result is not None:
            try:
                self.on_result(stage, res)
            except Exception:  # noqa: BLE001
                log.exception("on_result failed for stage %s", stage.name)
        self._notify()

    def _log_error(self, name: str, text: str, exc: BaseException | None) -> None:
        if self._logged.get(name) == text:
            return  # the same failure again: once is enough (status keeps it)
        self._logged[name] = text
        if exc is not None and not isinstance(exc, EXPECTED_ERRORS):
            log.error("stage %s failed: %s", name, text, exc_info=exc)  # a bug: keep the traceback
        else:
            log.error("stage %s failed: %s (retrying with backoff)", name, text)

    # -- health and status -------------------------------------------------------------------------
    def stalled(self, now: float | None = None) -> list[str]:
        """Why the agent is not live: stages stuck in (or failing after) a run longer than the timeout."""
        now = self.clock() if now is None else now
        out = []
        for name, st in self.states.items():
            if st.future is not None and st.run_started is not None and now - st.run_started > self.stage_timeout:
                out.append(f"stage {name}: a run has been going for {now - st.run_started:.0f}s "
                           f"(stageTimeout {self.stage_timeout:g}s)")
            elif st.stalled:
                out.append(f"stage {name}: its last run took {st.last_duration:.0f}s and failed "
                           f"(stageTimeout {self.stage_timeout:g}s): {st.error}")
        return out

    def done_once(self, name: str) -> bool:
        st = self.states[name]
        return st.last_ok is not None

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        out = {}
        for name, st in self.states.items():
            out[name] = {
                "running": st.future is not None,
                "runningFor": round(now - st.run_started, 3) if st.future is not None and st.run_started else None,
                "lastOkAgo": round(now - st.last_ok, 3) if st.last_ok is not None else None,
                "lastDuration": round(st.last_duration, 4) if st.last_duration is not None else None,
                "runs": st.runs, "failedRuns": st.failed_runs,
                "error": st.error, "retryIn": round(st.retry_at - now, 3) if st.retry_at else None,
                "stalled": st.stalled or bool(st.future is not None and st.run_started is not None
                                              and now - st.run_started > self.stage_timeout),
                "failures": dict(st.result.failures),
                **st.result.status,
            }
        return out

    async def stop(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for runs in progress, then close each stage on its worker and end the workers."""
        pending = [st.future for st in self.states.values() if st.future is not None]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for st in self.states.values():
            if st.future is not None:
                log.warning("stage %s still running at stop; leaving its thread", st.stage.name)
                continue
            try:
                if st.worker is not None:
                    await asyncio.wait_for(st.worker.submit(st.stage.close), timeout)
                else:
                    st.stage.close()
            except Exception as e:  # noqa: BLE001
                log.warning("stage %s: close failed: %s", st.stage.name, e)
        for st in self.states.values():
            if st.worker is not None:
                st.worker.stop(0.5 if st.future is None else 0)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


__all__ = ["Runner", "StageState", "Changes"]
