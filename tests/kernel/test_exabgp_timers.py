"""BGP timers through our event-driven ExaBGP (bgp.exabgp_reactor), against FRR and BIRD.

ExaBGP's own loop polls every 10 ms and so notices every timer; ours sleeps until the next deadline.
These tests prove the deadlines are the right ones, seen from the real peers: connection attempts
follow connectRetry (ExaBGP alone retries a refused connect on every loop turn), keepalives leave
at the configured (or hold / 3) interval, counted on the wire, and a peer that goes silent is
dropped with a hold-timer NOTIFICATION at hold time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from bgp.cli_probe import ProbeClient
from tests.kernel.test_bgp_interop import OUR_IP, OURS, PEER_IP, THEIRS, WAIT, pair, poll  # noqa: F401

pytestmark = pytest.mark.kernel

HOLD = 9


def active_opens(ns: str) -> int:
    """Connections this namespace started (TCP ActiveOpens: one per connect attempt)."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], capture_output=True, text=True,
                          check=True).stdout
    tcp = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("ActiveOpens")])


class KeepaliveCapture:
    """Timestamps of the BGP KEEPALIVEs our address sends, read by tcpdump in our namespace."""

    def __init__(self, ns: str) -> None:
        bgp_type = "tcp[((tcp[12] & 0xf0) >> 2) + 18] = 4"  # byte 18 of the BGP message: type 4 = KEEPALIVE
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-l", "-n", "-tt", "-i", "any",
                                      f"src host {OUR_IP} and tcp port 179 and {bgp_type}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.times: list[float] = []
        self.started = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._wait_listening, daemon=True).start()
        assert self.started.wait(30), "tcpdump did not start"

    def _wait_listening(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "listening on" in line:
                self.started.set()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.times.append(float(line.split()[0]))
            except (ValueError, IndexError):
                pass

    def stop(self) -> list[float]:
        self.proc.terminate()
        self.proc.wait(10)
        return list(self.times)


def neighbor(name: str, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(name=name, peer_address=PEER_IP, peer_as=64512, local_as=64512, local_address=OUR_IP,
                             router_id=OUR_IP, hold_time=HOLD, graceful_restart_time=60)
    d.update(kw)
    return d


def start_probe(ns: str, scratch: str, nb: dict[str, Any]) -> ProbeClient:
    probe = ProbeClient(ns, Path(scratch) / "speaker")
    assert "ok" in probe.request({"op": "neighbors", "neighbors": [nb]}, WAIT)
    assert "ok" in probe.request({"op": "announce", "routes": [{"prefix": OURS, "next_hop": "self"}]}, WAIT)
    return probe


def check_connect_retry(our_ns: str, retry: int, down_for: float) -> None:
    """While the peer is not listening, one attempt per `retry` seconds (not one per loop turn)."""
    before = active_opens(our_ns)
    time.sleep(down_for)
    attempts = active_opens(our_ns) - before
    expected = down_for / retry
    assert expected - 1 <= attempts <= expected + 1, f"{attempts} connect attempts in {down_for}s, retry {retry}s"


def check_keepalives(our_ns: str, interval: int, window: float) -> None:
    cap = KeepaliveCapture(our_ns)
    time.sleep(window)
    times = cap.stop()
    gaps = [b - a for a, b in zip(times, times[1:])]
    # ExaBGP counts whole seconds: a keepalive leaves `interval` seconds after the last, +-1 s
    assert len(times) >= window / interval - 1, f"{len(times)} keepalives in {window}s, interval {interval}s"
    assert gaps and max(gaps) <= interval + 1.1 and min(gaps) >= interval - 1.1, gaps


def check_hold_expiry(probe: ProbeClient, peer: str, pid: int, peer_keepalive: int) -> None:
    """Freeze the peer: we drop it with a hold-timer NOTIFICATION at hold time after its last message."""
    m = probe.mark()
    os.kill(pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        down = probe.wait_for(lambda o: o.get("event") == "PeerDown" and o.get("peer") == peer, WAIT, after=m)
        waited = time.monotonic() - frozen
    finally:
        os.kill(pid, signal.SIGCONT)
    assert down["reason"].startswith("notification sent (4,"), down  # hold timer expired
    assert down["graceful"] is False
    # its last keepalive came at most peer_keepalive s before the freeze; expiry counts whole seconds
    assert HOLD - peer_keepalive - 1 <= waited <= HOLD + 2, f"dropped {waited:.1f}s after the peer went silent"


def test_frr_connect_retry_keepalive_and_hold(pair: tuple[str, str, str]) -> None:
    peer_ns, our_ns, scratch = pair
    probe = start_probe(our_ns, scratch, neighbor("frr", keepalive=1, connect_retry=2))
    name = f"frr{uuid.uuid4().hex[:6]}"
    state = Path("/run/frr") / name
    bgpd = None
    try:
        check_connect_retry(our_ns, retry=2, down_for=6)
        state.mkdir(parents=True, exist_ok=True)
        conf = Path(scratch) / "bgpd.conf"
        conf.write_text(f"""hostname {name}
router bgp 64512
 bgp router-id {PEER_IP}
 no bgp network import-check
 neighbor {OUR_IP} remote-as 64512
 neighbor {OUR_IP} passive
 neighbor {OUR_IP} timers 3 {HOLD}
 address-family ipv4 unicast
  network {THEIRS}
 exit-address-family
""")
        bgpd = subprocess.Popen(["ip", "netns", "exec", peer_ns, "/usr/lib/frr/bgpd", "-N", name, "-Z", "-S", "-P",
                                 "0", "-f", str(conf), "-i", str(Path(scratch) / "bgpd.pid"), "--vty_socket",
                                 str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # FRR is passive: only our next attempt (connectRetry) brings the session up
        probe.wait_for(lambda o: o.get("event") == "PeerUp" and o.get("peer") == "frr", WAIT)
        before = active_opens(our_ns)
        check_keepalives(our_ns, interval=1, window=6)  # configured keepalive 1 s (hold 9 alone: 3 s)
        assert active_opens(our_ns) == before  # established: no more attempts
        check_hold_expiry(probe, "frr", bgpd.pid, peer_keepalive=3)
    finally:
        probe.close()
        if bgpd is not None:
            bgpd.terminate()
            try:
                bgpd.wait(20)
            except subprocess.TimeoutExpired:
                bgpd.kill()
                bgpd.wait()
        shutil.rmtree(state, ignore_errors=True)


def test_bird_connect_retry_keepalive_and_hold(pair: tuple[str, str, str]) -> None:
    peer_ns, our_ns, scratch = pair
    probe = start_probe(our_ns, scratch, neighbor("bird", connect_retry=3))
    conf, sock = Path(scratch) / "bird.conf", Path(scratch) / "bird.ctl"
    bird = None
    try:
        check_connect_retry(our_ns, retry=3, down_for=6)
        conf.write_text(f"""router id {PEER_IP};
protocol device {{ }}
protocol static pods {{ ipv4; route {THEIRS} blackhole; }}
protocol bgp node_b {{
  local {PEER_IP} as 64512;
  neighbor {OUR_IP} as 64512;
  passive on;
  hold time {HOLD};
  keepalive time 3;
  direct;
  ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};
}}
""")
        bird = subprocess.Popen(["ip", "netns", "exec", peer_ns, "bird", "-f", "-c", str(conf), "-s", str(sock),
                                 "-P", str(Path(scratch) / "bird.pid")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        up = probe.wait_for(lambda o: o.get("event") == "PeerUp" and o.get("peer") == "bird", WAIT)
        assert up["address"] == PEER_IP
        check_keepalives(our_ns, interval=HOLD // 3, window=10)  # no keepalive configured: hold / 3
        poll("BIRD established", lambda: "Established" in subprocess.run(
            ["birdc", "-s", str(sock), "show", "protocols", "node_b"], capture_output=True, text=True).stdout)
        check_hold_expiry(probe, "bird", bird.pid, peer_keepalive=3)
    finally:
        probe.close()
        if bird is not None:
            bird.terminate()
            try:
                bird.wait(20)
            except subprocess.TimeoutExpired:
                bird.kill()
                bird.wait()
