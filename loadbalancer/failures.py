"""Per-key failure state of the service proxy: what failed, how often, when to try it again.

A failed key (one service, or a node-level concern: the nft table, conntrack flushes, health
listeners, the kernel adapter itself) is retried alone after an exponential backoff; a success
forgets it. Nothing here escalates a failure into a full resync. Time is an argument (monotonic
seconds), never read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loadbalancer.types import VSKey

BACKOFF_FIRST = 1.0  # seconds before the first retry
BACKOFF_MAX = 60.0  # the retry interval stops doubling here


def backoff(attempts: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> float:
    """1, 2, 4, ... seconds after the 1st, 2nd, 3rd failure in a row, at most `cap`."""
    return min(cap, first * 2 ** min(max(attempts - 1, 0), 32))


@dataclass
class Failure:
    attempts: int  # failures in a row
    at: float  # next try (monotonic)
    errors: list[str]
    keys: set[VSKey] = field(default_factory=set)  # virtual servers whose kernel state is not known
    addrs: set[str] = field(default_factory=set)  # addresses whose add/delete did not happen

    def due(self, now: float) -> bool:
        return self.at <= now


def record(failures: dict, key: str, now: float, errors: list[str], keys: set[VSKey] = frozenset(),
           addrs: set[str] = frozenset()) -> Failure:
    """One more failure of `key`: the next try moves one backoff step further."""
    prev = failures.get(key)
    attempts = prev.attempts + 1 if prev else 1
    f = Failure(attempts, now + backoff(attempts), list(errors), set(keys) | (prev.keys if prev else set()),
                set(addrs) | (prev.addrs if prev else set()))
    failures[key] = f
    return f


def next_deadline(*failure_maps: dict) -> float | None:
    ats = [f.at for m in failure_maps for f in m.values()]
    return min(ats) if ats else None
