"""The stage runner: BoundedFrequencyRunner semantics, failures restored and retried with backoff,
stages independent of each other (a hung one never stops another), stall detection for /healthz."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from fabric.runner import Runner
from fabric.stage import Stage, StageInput, StageResult
from fabric.tracker import Store
from ipip.reconcile import Backoff


class Recorder(Stage):
    def __init__(self, name: str, kinds: set[str], *, on_worker: bool = True, needs_source: bool = False) -> None:
        self.name, self.kinds, self.on_worker, self.needs_source = name, frozenset(kinds), on_worker, needs_source
        self.runs: list[tuple[float, dict, bool]] = []
        self.raise_next = 0
        self.hang = threading.Event()
        self.deadline: float | None = None

    def run(self, inp: StageInput, prepared: Any) -> StageResult:
        while self.hang.is_set():
            time.sleep(0.01)
        if self.raise_next:
            self.raise_next -= 1
            raise OSError("injected")
        self.runs.append((time.monotonic(), {k: set(v) for k, v in inp.changes.keys.items()}, inp.full))
        d, self.deadline = self.deadline, None
        return StageResult(next_deadline=d)


class AsyncRecorder(Recorder):
    async def run(self, inp: StageInput, prepared: Any) -> StageResult:  # type: ignore[override]
        return Recorder.run(self, inp, prepared)


async def until(what: str, fn, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s")
        await asyncio.sleep(0.01)


def run_with(stages: list[Stage], body, complete=lambda: True, **kw) -> None:
    async def main() -> None:
        store = Store(default_consumer=False)
        runner = Runner(store, stages, complete=complete, **kw)
        store.set_on_change(runner.kind_changed)
        stop = asyncio.Event()
        task = asyncio.ensure_future(runner.run(stop))
        try:
            await body(store, runner)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            for s in stages:
                if isinstance(s, Recorder):
                    s.hang.clear()
            await runner.stop(timeout=2)

    asyncio.run(main())


def test_changes_are_merged_and_runs_are_min_interval_apart() -> None:
    s = Recorder("a", {"Service"})

    async def body(store: Store, runner: Runner) -> None:
        await until("first run", lambda: len(s.runs) == 1)
        assert s.runs[0][2] is True  # the first run is a full one
        for i in range(5):
            store.upsert("Service", f"ns/s{i}", {"i": i})
            await asyncio.sleep(0.01)
        await until("merged run", lambda: len(s.runs) >= 2 and s.runs[-1][1].get("Service") and
                    sum(len(r[1].get("Service", ())) for r in s.runs) == 5)
        gaps = [b[0] - a[0] for a, b in zip(s.runs, s.runs[1:])]
        assert all(g >= 0.29 for g in gaps), gaps
        assert len(s.runs) <= 3  # 5 changes, at most 2 runs after the first

    run_with([s], body, min_interval=0.3)


def test_a_failed_run_gets_its_changes_back_and_is_retried_with_backoff() -> None:
    s = Recorder("a", {"Node"})

    async def body(store: Store, runner: Runner) -> None:
        await until("first run", lambda: len(s.runs) == 1)
        s.raise_next = 2
        t0 = time.monotonic()
        store.upsert("Node", "n1", {"x": 1})
        await until("retried run", lambda: len(s.runs) == 2, timeout=5)
        took = time.monotonic() - t0
        assert s.runs[1][1] == {"Node": {"n1"}}  # nothing lost across two failures
        assert took >= 0.2 + 0.4 - 0.05, took  # backoff 0.2 then 0.4
        st = runner.status()["a"]
        assert st["failedRuns"] == 2 and st["error"] is None

    run_with([s], body, backoff=Backoff(0.2, 1.0))


def test_a_hung_stage_stalls_alone_and_health_says_so() -> None:
    hung, other = Recorder("hung", {"Service"}), Recorder("other", {"Node"})

    async def body(store: Store, runner: Runner) -> None:
        await until("first runs", lambda: hung.runs and other.runs)
        hung.hang.set()
        store.upsert("Service", "ns/a", 1)
        await asyncio.sleep(0.05)
        for i in range(3):  # the other stage keeps converging meanwhile
            store.upsert("Node", f"n{i}", i)
            await until(f"other sees n{i}", lambda i=i: any(f"n{i}" in r[1].get("Node", ()) for r in other.runs))
        assert not runner.stalled()  # within the stage timeout
        await until("stalled", lambda: runner.stalled(), timeout=2)
        assert runner.stalled()[0].startswith("stage hung: a run has been going for")
        assert runner.status()["hung"]["stalled"] is True
        hung.hang.clear()
        await until("recovered", lambda: not runner.stalled() and any("ns/a" in r[1].get("Service", ())
                                                                      for r in hung.runs))

    run_with([hung, other], body, stage_timeout=0.5)


def test_stages_that_need_the_source_wait_for_it() -> None:
    waits, free = Recorder("waits", {"Service"}, needs_source=True), AsyncRecorder("free", {"Node"}, on_worker=False)
    complete = threading.Event()

    async def body(store: Store, runner: Runner) -> None:
        await until("free stage runs", lambda: free.runs)
        store.upsert("Service", "ns/a", 1)
        await asyncio.sleep(0.2)
        assert not waits.runs
        complete.set()
        store.mark_synced("Service")  # the source's on_change wakes the runner
        await until("waiting stage runs", lambda: waits.runs)
        assert waits.runs[0][1] == {"Service": {"ns/a"}} and waits.runs[0][2] is True

    run_with([waits, free], body, complete=complete.is_set)


def test_periodic_full_resync_and_result_deadlines() -> None:
    s = Recorder("a", {"Node"})

    async def body(store: Store, runner: Runner) -> None:
        await until("three full runs", lambda: sum(1 for r in s.runs if r[2]) >= 3, timeout=3)
        n = len(s.runs)
        s.deadline = time.monotonic() + 0.05  # the stage asks to run again soon (a key's retry)
        store.upsert("Node", "x", 1)
        await until("deadline run", lambda: len(s.runs) >= n + 2, timeout=1)

    run_with([s], body, resync_interval=0.3)



def test_every_stage_runs_again_when_the_source_completes_through_a_kind_it_does_not_read() -> None:
    """The last kind of the first complete list may be one a stage does not read (it had no objects):
    that stage must still see `complete` at once, not at its periodic resync."""
    s = Recorder("config", {"Node"})
    seen: list[bool] = []
    orig = s.run

    def run(inp: StageInput, prepared: Any) -> StageResult:
        seen.append(inp.complete)
        return orig(inp, prepared)

    s.run = run  # type: ignore[method-assign]
    done = {"v": False}

    async def body(store: Store, runner: Runner) -> None:
        store.replace("Node", {"n1": 1})
        await until("a run while incomplete", lambda: seen and not seen[-1])
        done["v"] = True
        store.replace("Pod", {})  # the source is complete now; Pod changed nothing and config reads no Pod
        await until("a run that sees the complete source", lambda: seen[-1] is True, timeout=2)

    run_with([s], body, complete=lambda: done["v"], resync_interval=600)
