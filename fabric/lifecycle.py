"""The agent's lifecycle (pure: time is an argument): starting -> holding -> running -> stopping.

- starting: nothing is known yet; the first read of the kernel adopts every route we own (whatever
  else is missing: a node address not on any interface yet, an API server that is down).
- holding: routes adopted from a previous run stay in the kernel. The agent waits until the desired
  state is known — the source listed every kind once, the effective configuration was computed from
  it, the node's address is on an interface — and then for every configured neighbor's End-of-RIB,
  at most `timers.gracefulRestartTime` counted from the moment the desired state became known (RFC
  4724's receiving side). Meanwhile routes are only added or replaced, never removed. While the
  desired state is not known the hold does not time out: a lost API server or a missing address
  never leads to a flush.
- running: desired state only; adopted routes that were not learned again go.
- stopping: SIGTERM; everything stays in the kernel (graceful restart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Phase(str, Enum):
    STARTING = "starting"
    HOLDING = "holding"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass
class Lifecycle:
    hold_time: float  # timers.gracefulRestartTime
    phase: Phase = Phase.STARTING
    adopted: int | None = None  # how many routes the first kernel read found (None: not read yet)
    known_since: float | None = None  # when the desired state became known
    eor_seen: set[str] = field(default_factory=set)
    waiting: list[str] = field(default_factory=list)  # what the agent waits for (status)

    def adopt(self, count: int) -> None:
        """The first kernel read found `count` routes we own."""
        if self.adopted is None:
            self.adopted = count

    def end_of_rib(self, peer: str) -> None:
        self.eor_seen.add(peer)

    def speaker_restarted(self) -> None:
        self.eor_seen.clear()

    def stop(self) -> None:
        self.phase = Phase.STOPPING

    @property
    def holding(self) -> bool:
        """Adopted routes are kept (not yet running)."""
        return self.phase in (Phase.STARTING, Phase.HOLDING)

    def update(self, now: float, *, source_complete: bool, config_known: bool, facts: str | None,
               neighbors: set[str]) -> bool:
        """Re-evaluate; returns True when the phase changed. `facts`: None when the node's facts are
        known, else what is missing."""
        if self.phase in (Phase.STOPPING, Phase.RUNNING):
            return False
        before = self.phase
        waiting: list[str] = []
        if self.adopted is None:
            waiting.append("the first read of the kernel")
        if not source_complete:
            waiting.append("the source's first complete list")
        elif not config_known:
            waiting.append("the effective configuration from the complete source")
        if facts is not None:
            waiting.append(facts)
        if waiting:
            self.known_since = None
            self.phase = Phase.STARTING if self.adopted is None else Phase.HOLDING
            self.waiting = waiting
            return self.phase != before
        if self.known_since is None:
            self.known_since = now
        missing = sorted(neighbors - self.eor_seen)
        if not self.adopted or not missing or now >= self.known_since + self.hold_time:
            self.phase, self.waiting = Phase.RUNNING, []
            return True
        self.phase = Phase.HOLDING
        self.waiting = [f"End-of-RIB from {', '.join(missing)} (at most {self.known_since + self.hold_time - now:.0f}s "
                        f"more) before removing the {self.adopted} adopted route(s) not learned again"]
        return self.phase != before

    def deadline(self) -> float | None:
        """When the hold ends at the latest (None: no timer running)."""
        if self.phase == Phase.HOLDING and self.known_since is not None and self.adopted:
            return self.known_since + self.hold_time
        return None
