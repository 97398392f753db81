"""What a stage of the agent's sync runner is: one concern of the node (routes, BGP, services, ...).

A stage declares which Store kinds wake it, whether it runs on its own worker thread (blocking kernel
or subprocess work) or on the event loop (quick asyncio work such as talking to the speaker), and
whether it must wait until the source has listed every kind once (an empty Store then means "not
known yet", not "no objects"). The runner (fabric.runner) decides when it runs; the stage decides
what to do with what changed.

Adding a stage: subclass `Stage`, set `name`, `kinds`, `on_worker`, `needs_source`, implement `run()`,
and add it to the list in fabric.stages.build(). Its status, health, backoff and retry come for free, and
so do its metrics: run duration histogram, runs and failed runs, failing keys, last success, stalled
(fabric.metrics); gauges of its own go in `StageResult.metrics`.

    class CniStage(Stage):
        name = "cni"
        kinds = frozenset({"Node", "IPPool"})
        def run(self, inp: StageInput, prepared: object) -> StageResult:
            ...                                   # write the conflist if it changed
            return StageResult(failures={}, next_deadline=None, status={"conflist": path})

Per-key failures (`StageResult.failures`) are the stage's own business: it keeps them, retries each
key alone with backoff and says when via `next_deadline`. A run that fails as a whole (it raised, or
returned `error`) is retried by the runner with exponential backoff, and the Store changes it took
are put back first (nothing is lost); it never escalates to more work than the run it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fabric.tracker import Changes


@dataclass(frozen=True)
class StageInput:
    changes: Changes  # Store keys of this stage's kinds changed since its last successful take
    full: bool  # a full resync: re-read the dataplane, recompute everything (periodic, first run, requested)
    now: float  # monotonic clock of the runner
    complete: bool  # the source has listed every kind at least once


@dataclass(frozen=True)
class Gauge:
    """One sample a stage exports on /metrics (fabric.metrics names it `bgp_fabric_<name>`). Samples of
    one name form one family: give them the same label names and help text."""

    name: str  # e.g. "ipvs_services": lower case, digits and underscores
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass
class StageResult:
    failures: dict[str, str] = field(default_factory=dict)  # key -> why; the stage retries each alone
    error: str | None = None  # the run failed as a whole: changes restored, retried by the runner
    next_deadline: float | None = None  # when the stage wants to run again (a key's retry, a timer)
    status: dict[str, Any] = field(default_factory=dict)  # shown under `stages.<name>` in status.json
    metrics: list[Gauge] = field(default_factory=list)  # this stage's own gauges, as of this run
    # objects skipped for bad input, (kind, Store key) -> why: each reported once as a Warning Event on the
    # object (Kubernetes source), as Felix and kube-proxy leave the operator an Event, not just a log line
    bad_objects: dict[tuple[str, str], str] = field(default_factory=dict)


class Stage:
    name: str = "stage"
    kinds: frozenset[str] = frozenset()
    on_worker: bool = True  # run() on the stage's own thread; False: `async def run` on the event loop
    needs_source: bool = False  # don't run before the source's first complete list

    def prepare(self, inp: StageInput) -> Any:
        """On the event loop, just before run(): snapshot loop-owned state the run needs (cheap)."""
        return None

    def run(self, inp: StageInput, prepared: Any) -> StageResult:  # or `async def` when not on_worker
        raise NotImplementedError

    def restore(self, inp: StageInput, prepared: Any) -> None:
        """On the event loop, after a failed run: put back what prepare() took (Store changes are the
        runner's job)."""

    def next_deadline(self, now: float) -> float | None:
        """On the event loop: a time this stage must run at, besides its last result's deadline."""
        return None

    def close(self) -> None:
        """On the stage's worker at shutdown (close sockets); must not touch the dataplane."""
