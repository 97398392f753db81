"""A loss probe for faults: `ping -D` at a fixed rate from a lab node; which sequence numbers came back, when.

`summarize` is pure (replies in, loss / longest outage / when traffic came back out); `PingProbe` is the
thin adapter around one ping process.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from fabric.lab import netns

REPLY_RE = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")
STATS_RE = re.compile(r"(\d+) packets transmitted")
IN_FLIGHT = 0.5  # seconds: packets sent this close to the stop are neither counted sent nor lost


@dataclass(frozen=True)
class ProbeResult:
    sent: int
    received: int
    outage: float  # the longest time without a reply across a loss (seconds)
    back_after: float | None  # seconds from the fault until the reply that ended the last loss; None: no loss
    pace: float = 0.0  # packets per second ping really sent (under load it falls behind the asked rate)

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def describe(self) -> str:
        if not self.sent:
            return "no probe packets"
        pct = 100.0 * self.lost / self.sent
        out = f"{self.lost}/{self.sent} lost ({pct:.1f}%)" + (f" at {self.pace:.0f}/s" if self.pace else "")
        return out + (f", longest outage {self.outage * 1000:.0f} ms" if self.lost else "")


def summarize(replies: dict[int, float], transmitted: int, rate: float, fault_at: float, started_at: float,
              stopped_at: float) -> ProbeResult:
    """`replies`: icmp_seq -> receive time (time.time()); `transmitted`: ping's own count at the stop.
    The last IN_FLIGHT seconds of packets are left out (their replies may still be on the way). An
    outage is timed between the replies around it (ping's real pace under load is not its nominal rate)."""
    last = transmitted - math.ceil(IN_FLIGHT * rate)
    if last <= 0:
        return ProbeResult(0, 0, 0.0, None)
    received = sum(1 for s in replies if 1 <= s <= last)
    longest, back = 0.0, None
    seq = 1
    while seq <= last:
        if seq in replies:
            seq += 1
            continue
        end = seq
        while end + 1 <= last and end + 1 not in replies:
            end += 1
        before = replies.get(seq - 1, started_at)
        after = replies.get(end + 1)
        longest = max(longest, (after if after is not None else stopped_at) - before)
        back = None if after is None else max(after - fault_at, 0.0)
        seq = end + 1
    pace = transmitted / (stopped_at - started_at) if stopped_at > started_at else 0.0
    return ProbeResult(last, received, longest, back, pace)


class PingProbe:
    def __init__(self, ns: str, to: str, rate: float) -> None:
        self.rate = rate
        self.replies: dict[int, float] = {}
        self._transmitted = 0
        self._lock = threading.Lock()
        self.started_at = time.time()
        self._proc = subprocess.Popen(
            netns.exec_cmd(ns, ["ping", "-n", "-D", "-W", "1", "-i", f"{1.0 / rate:.3f}", to]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            m = REPLY_RE.match(line)
            if m:
                with self._lock:
                    self.replies.setdefault(int(m.group(2)), float(m.group(1)))
                continue
            m = STATS_RE.search(line)
            if m:
                self._transmitted = int(m.group(1))

    def last_reply(self) -> float | None:
        with self._lock:
            return max(self.replies.values(), default=None)

    def answered_since(self, t: float) -> bool:
        last = self.last_reply()
        return last is not None and last >= t

    def stop(self, fault_at: float) -> ProbeResult:
        stopped_at = time.time()
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # ping prints its statistics on SIGINT
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)
        with self._lock:
            replies = dict(self.replies)
        return summarize(replies, self._transmitted, self.rate, fault_at, self.started_at, stopped_at)


def wait_first_reply(probe: PingProbe, timeout: float) -> bool:
    """Lab harness wait (not on any route's path): has the probe been answered at all?"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe.last_reply() is not None:
            return True
        time.sleep(0.1)
    return False
