"""Two Speakers (each a cli_probe in its own namespace, real ExaBGP) peering over a veth, iBGP AS 64512.

One test walks the whole life of a session so the lab kernel pays for the start-up only once:
announce -> peer's events, withdraw, per-prefix updates, kill -9 of ExaBGP -> respawn, re-announce and End-of-RIB,
adding a neighbor through set_neighbors (config reload) without resetting the existing session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from bgp.cli_probe import ProbeClient

pytestmark = pytest.mark.kernel

A_IP, B_IP = "10.99.0.1", "10.99.0.2"
WAIT = 90.0  # generous: the lab kernel is ~10x slower than the host


def ev(name: str, **fields: Any):
    return lambda o: o.get("event") == name and all(o.get(k) == v for k, v in fields.items())


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    a, b = f"bgpa-{tag}", f"bgpb-{tag}"
    va, vb = f"va{tag}", f"vb{tag}"
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b],
                       check=True)
        for ns, dev, ip in ((a, va, A_IP), (b, vb, B_IP)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def neighbor(name: str, me: str, peer: str, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(name=name, peer_address=peer, peer_as=64512, local_as=64512, local_address=me,
                             router_id=me, hold_time=9, graceful_restart_time=60)
    d.update(kw)
    return d


def test_speaker_pair_lifecycle(pair: tuple[str, str]) -> None:
    ns_a, ns_b = pair
    dirs = [tempfile.mkdtemp(prefix="bgp-speaker-") for _ in range(2)]
    a = ProbeClient(ns_a, dirs[0])
    b = ProbeClient(ns_b, dirs[1])
    try:
        assert "ok" in a.request({"op": "neighbors", "neighbors": [neighbor("node-b", A_IP, B_IP)]}, WAIT)
        assert "ok" in b.request({"op": "neighbors", "neighbors": [neighbor("node-a", B_IP, A_IP)]}, WAIT)
        a.request({"op": "announce", "routes": [{"prefix": "10.244.1.0/24", "next_hop": "self"},
                                                {"prefix": "10.244.2.0/24", "next_hop": "self"}]}, WAIT)
        up = b.wait_for(ev("PeerUp", peer="node-a"), WAIT)
        assert up["gr_time"] == 60 and up["address"] == A_IP

        # announce reaches the other speaker, then End-of-RIB
        got: set[str] = set()
        at = 0
        while got != {"10.244.1.0/24", "10.244.2.0/24"}:
            o = b.wait_for(ev("RoutesAnnounced", peer="node-a"), WAIT, after=at)
            at = b.lines.index(o) + 1
            assert o["next_hop"] == A_IP
            got |= set(o["prefixes"])
        b.wait_for(ev("EndOfRib", peer="node-a"), WAIT)

        # withdraw one
        m = b.mark()
        a.request({"op": "announce", "routes": [{"prefix": "10.244.1.0/24", "next_hop": "self"}]}, WAIT)
        assert b.wait_for(ev("RoutesWithdrawn", peer="node-a"), WAIT, after=m)["prefixes"] == ["10.244.2.0/24"]

        # per-prefix changes (Speaker.update_announcements, what the agent's BGP stage sends for one
        # service change): one withdrawn, one announced, then back; the speaker's whole set stays right
        # (the replay after the kill below must be exactly 10.244.1.0/24)
        for gone, new in (("10.244.1.0/24", "10.244.5.0/24"), ("10.244.5.0/24", "10.244.1.0/24")):
            m = b.mark()
            a.request({"op": "update", "withdraw": [gone], "routes": [{"prefix": new, "next_hop": "self"}]}, WAIT)
            assert b.wait_for(ev("RoutesWithdrawn", peer="node-a"), WAIT, after=m)["prefixes"] == [gone]
            assert b.wait_for(ev("RoutesAnnounced", peer="node-a"), WAIT, after=m)["prefixes"] == [new]
        assert a.status(WAIT)["announced"] == 1

        # kill -9 A's ExaBGP: it is respawned, the session comes back gracefully, routes and EOR again
        st = a.status(WAIT)
        first_pid = st["exabgp_pid"]
        assert isinstance(first_pid, int)
        ma, mb = a.mark(), b.mark()
        os.kill(first_pid, signal.SIGKILL)
        a.wait_for(ev("SpeakerRestarted"), WAIT, after=ma)
        down = b.wait_for(ev("PeerDown", peer="node-a"), WAIT, after=mb)
        assert down["graceful"] is True, down
        b.wait_for(ev("PeerUp", peer="node-a"), WAIT, after=mb)
        again = b.wait_for(ev("RoutesAnnounced", peer="node-a"), WAIT, after=mb)
        assert again["prefixes"] == ["10.244.1.0/24"]
        b.wait_for(ev("EndOfRib", peer="node-a"), WAIT, after=mb)
        st = a.status(WAIT)
        assert st["exabgp_starts"] == 2 and st["exabgp_pid"] not in (None, first_pid)

        # adding a neighbor (reload) leaves the existing session alone
        b_before = b.status(WAIT)["neighbors"]["node-a"]
        a_before = a.status(WAIT)["neighbors"]["node-b"]
        assert b_before["state"] == "established"
        mb = b.mark()
        assert "ok" in a.request({"op": "neighbors", "neighbors": [
            neighbor("node-b", A_IP, B_IP), neighbor("node-c", A_IP, "10.99.0.3")]}, WAIT)
        # a change after the reload must still flow over the same session
        a.request({"op": "announce", "routes": [{"prefix": "10.244.1.0/24", "next_hop": "self"},
                                                {"prefix": "10.244.3.0/24", "next_hop": "self"}]}, WAIT)
        b.wait_for(ev("RoutesAnnounced", peer="node-a"), WAIT, after=mb)
        st_a = a.status(WAIT)
        assert "node-c" in st_a["neighbors"]  # the reload really happened
        assert st_a["exabgp_starts"] == 2
        b_after = b.status(WAIT)["neighbors"]["node-a"]
        a_after = st_a["neighbors"]["node-b"]
        assert b.events("PeerDown", after=mb) == []
        assert b_after["established_count"] == b_before["established_count"]
        assert b_after["since"] == b_before["since"] and a_after["since"] == a_before["since"]
    finally:
        a.close()
        b.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_hold_timer_expiry_is_a_hard_drop(pair: tuple[str, str]) -> None:
    """A peer that goes silent (its ExaBGP frozen) is dropped at hold time with a NOTIFICATION: not graceful,
    so its routes must go at once rather than be kept for its restart time."""
    ns_a, ns_b = pair
    dirs = [tempfile.mkdtemp(prefix="bgp-speaker-") for _ in range(2)]
    a = ProbeClient(ns_a, dirs[0])
    b = ProbeClient(ns_b, dirs[1])
    frozen: int | None = None
    try:
        a.request({"op": "neighbors", "neighbors": [neighbor("node-b", A_IP, B_IP, hold_time=3)]}, WAIT)
        b.request({"op": "neighbors", "neighbors": [neighbor("node-a", B_IP, A_IP, hold_time=3)]}, WAIT)
        b.wait_for(ev("PeerUp", peer="node-a"), WAIT)
        pid = a.status(WAIT)["exabgp_pid"]
        assert isinstance(pid, int)
        m = b.mark()
        os.kill(pid, signal.SIGSTOP)
        frozen = pid
        down = b.wait_for(ev("PeerDown", peer="node-a"), WAIT, after=m)
        assert down["graceful"] is False, down
        assert down["reason"].startswith("notification sent (4,"), down  # hold timer expired
        os.kill(pid, signal.SIGCONT)
        frozen = None
        b.wait_for(ev("PeerUp", peer="node-a"), WAIT, after=m)
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        a.close()
        b.close()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
