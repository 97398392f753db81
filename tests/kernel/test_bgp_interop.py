"""Our Speaker against real BGP daemons (FRR, BIRD 2, GoBGP), each in its own namespace: routes both ways.

The peer is set up like a Calico node: iBGP AS 64512, advertising a 10.244.x.0/24 pod block. The
FRR session also uses a TCP MD5 password on both sides (a mismatch would keep it from establishing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bgp.cli_probe import ProbeClient

pytestmark = pytest.mark.kernel

PEER_IP, OUR_IP = "10.99.0.1", "10.99.0.2"
WAIT = 120.0
OURS, THEIRS = "10.244.6.0/24", "10.244.5.0/24"


@pytest.fixture
def pair() -> Iterator[tuple[str, str, str]]:
    """(peer namespace, our namespace, scratch dir)"""
    tag = uuid.uuid4().hex[:6]
    peer, ours = f"bgpp-{tag}", f"bgpo-{tag}"
    vp, vo = f"vp{tag}", f"vo{tag}"
    scratch = tempfile.mkdtemp(prefix="bgp-interop-")
    try:
        for ns in (peer, ours):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", vp, "netns", peer, "type", "veth", "peer", "name", vo, "netns", ours],
                       check=True)
        for ns, dev, ip in ((peer, vp, PEER_IP), (ours, vo, OUR_IP)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        yield peer, ours, scratch
    finally:
        for ns in (peer, ours):
            # anything still running in the namespace (a daemon whose stop failed) goes with it
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


def poll(what: str, fn: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll a condition with a deadline (convergence of a third-party daemon), return its truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not reached in {timeout}s (last: {last!r})")


def run_speaker_against(ns: str, scratch: str, peer_name: str, **kw: Any) -> ProbeClient:
    probe = ProbeClient(ns, Path(scratch) / "speaker")
    nb = dict(name=peer_name, peer_address=PEER_IP, peer_as=64512, local_as=64512, local_address=OUR_IP,
              router_id=OUR_IP, hold_time=9, graceful_restart_time=60)
    nb.update(kw)
    assert "ok" in probe.request({"op": "neighbors", "neighbors": [nb]}, WAIT)
    assert "ok" in probe.request({"op": "announce", "routes": [{"prefix": OURS, "next_hop": "self"}]}, WAIT)
    return probe


def expect_their_route(probe: ProbeClient, peer_name: str) -> None:
    up = probe.wait_for(lambda o: o.get("event") == "PeerUp" and o.get("peer") == peer_name, WAIT)
    assert up["address"] == PEER_IP
    got = probe.wait_for(lambda o: o.get("event") == "RoutesAnnounced" and THEIRS in o.get("prefixes", []), WAIT)
    assert got["next_hop"] == PEER_IP and got["peer"] == peer_name
    probe.wait_for(lambda o: o.get("event") == "EndOfRib" and o.get("peer") == peer_name, WAIT)


def test_frr_with_md5(pair: tuple[str, str, str]) -> None:
    peer_ns, our_ns, scratch = pair
    name = f"frr{uuid.uuid4().hex[:6]}"
    state = Path("/run/frr") / name
    state.mkdir(parents=True, exist_ok=True)
    conf = Path(scratch) / "bgpd.conf"
    conf.write_text(f"""hostname {name}
router bgp 64512
 bgp router-id {PEER_IP}
 no bgp network import-check
 neighbor {OUR_IP} remote-as 64512
 neighbor {OUR_IP} password s3cr3t-pw
 neighbor {OUR_IP} timers 3 9
 neighbor {OUR_IP} timers connect 1
 address-family ipv4 unicast
  network {THEIRS}
 exit-address-family
""")
    # bgpd alone (-Z: no zebra; nothing to install in a kernel here), as root (-S), no TCP vty (-P 0)
    bgpd = subprocess.Popen(["ip", "netns", "exec", peer_ns, "/usr/lib/frr/bgpd", "-N", name, "-Z", "-S", "-P", "0",
                             "-f", str(conf), "-i", str(Path(scratch) / "bgpd.pid"), "--vty_socket", str(state)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = run_speaker_against(our_ns, scratch, "frr", md5_password="s3cr3t-pw")
    try:
        expect_their_route(probe, "frr")

        def frr_has_ours() -> Any:
            r = subprocess.run(["vtysh", "-N", name, "-c", "show bgp ipv4 unicast json"], capture_output=True,
                               text=True)
            try:
                routes = json.loads(r.stdout).get("routes", {})
            except ValueError:
                return None
            paths = routes.get(OURS, [])
            return paths if any(h.get("ip") == OUR_IP for p in paths for h in p.get("nexthops", [])) else None

        poll("FRR learned our route", frr_has_ours)
        r = subprocess.run(["vtysh", "-N", name, "-c", f"show bgp neighbor {OUR_IP} json"], capture_output=True,
                           text=True)
        info = json.loads(r.stdout)[OUR_IP]
        assert info["bgpState"] == "Established"
        assert info["neighborCapabilities"]["gracefulRestart"] == "advertisedAndReceived"
        assert info["gracefulRestartInfo"]["endOfRibRecv"]["ipv4Unicast"] is True  # our manual EOR arrived
    finally:
        probe.close()
        bgpd.terminate()
        try:
            bgpd.wait(20)
        except subprocess.TimeoutExpired:
            bgpd.kill()
            bgpd.wait()
        shutil.rmtree(state, ignore_errors=True)


def test_bird(pair: tuple[str, str, str]) -> None:
    peer_ns, our_ns, scratch = pair
    conf, sock = Path(scratch) / "bird.conf", Path(scratch) / "bird.ctl"
    conf.write_text(f"""router id {PEER_IP};
protocol device {{ }}
protocol static pods {{
  ipv4;
  route {THEIRS} blackhole;
}}
protocol bgp node_b {{
  local {PEER_IP} as 64512;
  neighbor {OUR_IP} as 64512;
  hold time 9;
  connect retry time 1;
  graceful restart on;
  direct;  # the neighbor is on the link: resolve next hops directly (iBGP is multihop by default in BIRD)
  ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};
}}
""")
    bird = subprocess.Popen(["ip", "netns", "exec", peer_ns, "bird", "-f", "-c", str(conf), "-s", str(sock),
                             "-P", str(Path(scratch) / "bird.pid")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    poll("bird control socket", lambda: bird.poll() is not None or subprocess.run(
        ["birdc", "-s", str(sock), "show", "status"], capture_output=True).returncode == 0)
    assert bird.poll() is None, f"bird exited: {bird.communicate()[0]}"
    probe = run_speaker_against(our_ns, scratch, "bird")
    try:
        expect_their_route(probe, "bird")

        def bird_has_ours() -> str | None:
            out = subprocess.run(["birdc", "-s", str(sock), "show", "route", "protocol", "node_b", "all"],
                                 capture_output=True, text=True).stdout
            return out if OURS in out and f"BGP.next_hop: {OUR_IP}" in out else None

        out = poll("BIRD learned our route", bird_has_ours)
        assert "unreachable" not in out.split(OURS, 1)[1].splitlines()[0], out
    finally:
        probe.close()
        bird.terminate()
        try:
            bird.wait(20)
        except subprocess.TimeoutExpired:
            bird.kill()
            bird.wait()


def test_gobgp(pair: tuple[str, str, str]) -> None:
    if shutil.which("gobgpd") is None or shutil.which("gobgp") is None:
        pytest.skip("gobgpd/gobgp not installed")
    peer_ns, our_ns, scratch = pair
    conf = Path(scratch) / "gobgpd.toml"
    conf.write_text(f"""[global.config]
  as = 64512
  router-id = "{PEER_IP}"
  local-address-list = ["{PEER_IP}"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{OUR_IP}"
    peer-as = 64512
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = 9
    keepalive-interval = 3
  [neighbors.graceful-restart.config]
    enabled = true
    restart-time = 60
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
    [neighbors.afi-safis.mp-graceful-restart.config]
      enabled = true
""")
    api = "127.0.0.1:50051"  # the namespace's own loopback
    gobgpd = subprocess.Popen(["ip", "netns", "exec", peer_ns, "gobgpd", "-f", str(conf), "--api-hosts", api,
                               "--pprof-disable", "-l", "warn"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def gobgp(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", peer_ns, "gobgp", "-u", "127.0.0.1", "-p", "50051", *args],
                              capture_output=True, text=True)

    try:
        poll("gobgpd API up", lambda: gobgp("global").returncode == 0)
        r = gobgp("global", "rib", "add", THEIRS, "nexthop", PEER_IP, "-a", "ipv4")
        assert r.returncode == 0, r.stderr
        probe = run_speaker_against(our_ns, scratch, "gobgp")
        try:
            expect_their_route(probe, "gobgp")

            def gobgp_has_ours() -> Any:
                r = gobgp("neighbor", OUR_IP, "adj-in", "-a", "ipv4", "-j")
                try:
                    data = json.loads(r.stdout or "{}")
                except ValueError:
                    return None
                return data.get(OURS)

            paths = poll("GoBGP learned our route", gobgp_has_ours)
            assert any(a.get("nexthop") == OUR_IP for p in paths for a in p.get("attrs", []) if a.get("type") == 3), \
                paths
        finally:
            probe.close()
    finally:
        gobgpd.terminate()
        try:
            gobgpd.wait(20)
        except subprocess.TimeoutExpired:
            gobgpd.kill()
            gobgpd.wait()
