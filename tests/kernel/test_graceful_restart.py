"""Graceful restart on real agents: no packet lost when an agent or its ExaBGP dies and comes back;
a node that vanishes (no graceful restart possible) leaves every peer's kernel within the hold time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from tests.kernel.meshlab import MeshLab, Node, sh, wait_for

pytestmark = pytest.mark.kernel

HOLD = 6


@pytest.fixture
def lab():
    nodes = [Node("a1", "a", 1, "10.0.1.11"), Node("a2", "a", 2, "10.0.1.12"), Node("b1", "b", 3, "10.0.2.21")]
    m = MeshLab(nodes, hold_time=HOLD, gr_time=60).build().start()
    try:
        wait_for(m.converged, 90, "mesh convergence")
        for n in m.nodes:
            wait_for(lambda n=n: len(m.established(n)) == len(m.nodes) - 1, 30, f"{n.name} sessions")
        yield m
    finally:
        m.close()


class Ping:
    """A steady 200 pps ping between two pods; `stop()` returns (sent, received)."""

    def __init__(self, lab: MeshLab, src: Node, dst: Node) -> None:
        self.p = subprocess.Popen(["ip", "netns", "exec", src.pod_ns, "ping", "-i", "0.005", "-W", "1", "-q",
                                   dst.pod_ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, int]:
        self.p.send_signal(signal.SIGINT)
        out, _ = self.p.communicate(timeout=20)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        return int(m.group(1)), int(m.group(2))


def _fully_back(lab: MeshLab, n: Node, since: float = 0.0) -> bool:
    s = lab.status(n)
    if s.get("started", 0) < since:
        return False  # still the status file of the agent's previous life
    return (len(lab.established(n)) == len(lab.nodes) - 1 and not s.get("adoptedHold", True)
            and all(len(lab.established(m)) == len(lab.nodes) - 1 for m in lab.nodes))


def test_kill_9_agent_and_restart_loses_nothing(lab: MeshLab) -> None:
    a1, b1 = lab.node("a1"), lab.node("b1")
    ping = Ping(lab, a1, b1)
    try:
        time.sleep(1)  # let the ping run before the kill
        killed = time.time()
        lab.kill_agent(a1, signal.SIGKILL)
        lab.start_agent(a1)
        wait_for(lambda: _fully_back(lab, a1, since=killed), 60,
                 "the new a1 agent back with every session and its startup hold over")
        time.sleep(1)
    finally:
        sent, received = ping.stop()
    assert sent > 200
    assert sent - received == 0, f"{sent - received} of {sent} lost\n{lab.log_tail(a1)}"
    assert "10.244.3.0/24 via 10.0.2.21 dev tunl0" in lab.routes(a1)


def test_kill_exabgp_loses_nothing(lab: MeshLab) -> None:
    a1, b1 = lab.node("a1"), lab.node("b1")
    pid = lab.status(a1)["speaker"]["exabgp_pid"]
    starts = lab.status(a1)["speaker"]["exabgp_starts"]
    ping = Ping(lab, b1, a1)
    try:
        time.sleep(1)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: lab.status(a1).get("speaker", {}).get("exabgp_starts", 0) > starts, 30, "ExaBGP respawned")
        wait_for(lambda: _fully_back(lab, a1), 60, "sessions back after the ExaBGP restart")
        time.sleep(1)
    finally:
        sent, received = ping.stop()
    assert sent > 200
    assert sent - received == 0, f"{sent - received} of {sent} lost\n{lab.log_tail(a1)}"


def test_vanished_node_leaves_every_peer_within_hold_time(lab: MeshLab) -> None:
    a1, a2, b1 = lab.node("a1"), lab.node("a2"), lab.node("b1")
    sh(f"ip -n {b1.ns} link set eth1 down")  # the node is gone: no FIN, no NOTIFICATION reaches anyone
    t0 = time.monotonic()
    lab.kill_agent(b1, signal.SIGKILL)
    took = wait_for(lambda: all(b1.pod_cidr not in lab.routes(n) for n in (a1, a2)), HOLD + 10,
                    "b1's pod CIDR to leave every peer")
    assert time.monotonic() - t0 <= HOLD + 3, f"routes left after {took:.1f}s, hold time is {HOLD}s"
    assert lab.ping(a1, a2)
