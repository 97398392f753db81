"""Export filters proven on a real ToR's RIB (FRR): what a peer's `export` filter denies is never announced
to it — not once (FRR logs every UPDATE it receives) — while an unfiltered node announces the same kind of
prefixes to the same ToR, and a filter changed at runtime (a BGPPeer object) withdraws and announces
without resetting the session.

The same lab also holds two misconfigured peers of a1, both real BIRD sessions in a namespace of their own
on rack A: one with another TCP-MD5 password, one whose AS is not the one configured. Each shows its cause
in `fabric status` and in /metrics (scraped and parsed with Prometheus' text parser, checked against the
lab's sessions and routes), and a1's password appears in no log, status, metrics, plan or explain.

a2 also announces the /32 of an externalTrafficPolicy Local LoadBalancer service whose one endpoint is on
a2: the endpoint going not ready withdraws just that /32 from the ToR and coming back announces it again
(the BGP stage's per-service path, on the same session)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import yaml

from fabric.lab import frr as lab_frr
from fabric.lab.kinds import FrrSpec
from fabric.lab.procs import Processes
from prometheus_client.parser import text_string_to_metric_families

from tests.kernel.meshlab import FABRIC, MeshLab, Node, sh, wait_for

pytestmark = pytest.mark.kernel

TOR_CONF = """hostname tor
debug bgp updates in
router bgp 65000
 bgp router-id 10.0.1.1
 no bgp ebgp-requires-policy
 neighbor 10.0.1.11 remote-as 64512
 neighbor 10.0.1.12 remote-as 64512
 neighbor 10.0.1.11 timers 3 9
 neighbor 10.0.1.12 timers 3 9
 neighbor 10.0.1.11 timers connect 1
 neighbor 10.0.1.12 timers connect 1
 neighbor 10.0.1.12 update-source 10.0.1.2
"""

A1, A2 = "10.0.1.11", "10.0.1.12"
SERVICES = ["10.96.0.0/24", "10.96.1.0/24"]
LB_RANGE, LB_IP = "10.96.100.0/24", "10.96.100.50"  # a2 advertises the range; the ETP=Local /32 follows the endpoint
OUR_PASSWORD = "a1-Wrong-md5-Secret"  # a1's password for the MD5 peer; BIRD has another
# strict bind: a listening socket per local address. With one shared socket, md5peer's TCP-MD5 key for
# 10.0.1.11 would apply to every connection from a1, aspeer's too (keys are per peer address).
BIRD_CONF = """router id 10.0.1.3;
log stderr all;
protocol device {}
protocol bgp md5peer {
  local 10.0.1.3 as 65000;
  strict bind yes;
  neighbor 10.0.1.11 as 64512;
  password "bird-other-password";
  connect retry time 1;
  ipv4 { import none; export none; };
}
protocol bgp aspeer {
  local 10.0.1.4 as 65001;
  strict bind yes;
  neighbor 10.0.1.11 port 1179 as 64512;  # BIRD locks (neighbor, port): another port, else it waits for md5peer
  connect retry time 1;
  ipv4 { import none; export none; };
}
"""
BAD_PEERS = [{"name": "md5peer", "address": "10.0.1.3", "asn": 65000, "password": OUR_PASSWORD},
             {"name": "aspeer", "address": "10.0.1.4", "asn": 65099}]  # BIRD says 65001


def overrides(n: Node) -> dict:
    doc: dict = {"advertise": {"serviceClusterIPs": SERVICES}, "health": {"listen": "127.0.0.1:9099"}}
    if n.name == "a2":
        doc["advertise"]["serviceLoadBalancerIPs"] = [LB_RANGE]
        # no periodic resync during the test: an endpoint change must reach the ToR by itself
        doc["timers"] = {"holdTime": 9, "gracefulRestartTime": 60, "resyncInterval": 600}
    if n.name == "a1":
        doc["peers"] = BAD_PEERS
        doc["timers"] = {"holdTime": 9, "gracefulRestartTime": 60, "resyncInterval": 30, "connectRetry": 2}
    return doc


def start_bird(lab: MeshLab) -> subprocess.Popen:
    """BIRD in its own namespace on rack A (10.0.1.3 and 10.0.1.4), for the two misconfigured peers."""
    ns = f"x-{lab.tag}"
    lab._ns(ns)
    port = f"x-{lab.tag}"[:15]
    sh(f"ip link add eth1 netns {ns} type veth peer name {port} netns {lab.router};"
       f"ip -n {lab.router} link set {port} master br-a up; ip -n {ns} link set eth1 up;"
       f"ip -n {ns} addr add 10.0.1.3/24 dev eth1; ip -n {ns} addr add 10.0.1.4/24 dev eth1")
    conf, sock = lab.workdir / "bird.conf", lab.workdir / "bird.ctl"
    conf.write_text(BIRD_CONF)
    log = open(lab.workdir / "bird.log", "ab")
    p = subprocess.Popen(["ip", "netns", "exec", ns, "bird", "-f", "-c", str(conf), "-s", str(sock),
                          "-P", str(lab.workdir / "bird.pid")], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    lab.extra_procs.append(p)
    wait_for(lambda: p.poll() is not None or subprocess.run(["birdc", "-s", str(sock), "show", "status"],
                                                            capture_output=True).returncode == 0, 20, "BIRD up")
    assert p.poll() is None, (lab.workdir / "bird.log").read_text()
    return p


def scrape(lab: MeshLab, n: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The agent's /metrics (inside its namespace), parsed by Prometheus' own text parser."""
    r = sh(f"ip netns exec {n.ns} python3 -c \"import urllib.request,sys;"
           f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9099/metrics', timeout=5).read().decode())\"")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.stdout) for s in fam.samples}


def kernel_kinds(lab: MeshLab, n: Node) -> dict[str, float]:
    """Our routes in the node's table by kind, as `ip route` shows them (no recursive route in this lab)."""
    out = dict.fromkeys(("direct", "ipip", "recursive", "blackhole", "ecmp"), 0.0)
    for line in sh(f"ip -n {n.ns} route show proto 80").stdout.splitlines():
        if not line.strip() or line.startswith((" ", "\t")):
            continue  # a nexthop line of an ECMP route
        kind = ("blackhole" if line.startswith("blackhole") else "ecmp" if " via " not in line  # nexthops below
                else "ipip" if "dev tunl0" in line else "direct")
        out[kind] += 1
    return out


def scrape_with_table(lab: MeshLab, n: Node) -> tuple[dict, dict[str, float]]:
    """/metrics and the kernel's routes with nothing changing in between (retried until a quiet moment)."""
    for _ in range(20):
        before = kernel_kinds(lab, n)
        m = scrape(lab, n)
        if kernel_kinds(lab, n) == before:
            return m, before
        time.sleep(0.5)
    raise AssertionError("a1's routes kept changing")


def metric(m: dict, name: str, **labels: str) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


class ExportLab(MeshLab):
    """a1 peers with the ToR through BGPPeer `tor-f` (an export filter), a2 through `tor-o` (none). The
    ToR has a second address for a2's session: two BGPPeer objects may not share a peerIP."""

    export: dict = {"allow": ["10.96.0.0/16"], "deny": ["10.96.1.0/24"]}
    lb_ready = True  # the LoadBalancer service's one endpoint (on a2)

    def cluster_doc(self) -> dict:
        doc = super().cluster_doc()
        doc["services"] = [{"metadata": {"name": "lb", "namespace": "default"},
                            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.50", "externalTrafficPolicy": "Local",
                                     "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]},
                            "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}}]
        doc["endpointSlices"] = [{"metadata": {"name": "lb-x", "namespace": "default",
                                               "labels": {"kubernetes.io/service-name": "lb"}},
                                  "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
                                  "endpoints": [{"addresses": ["10.244.2.5"], "nodeName": "a2",
                                                 "conditions": {"ready": self.lb_ready}}]}]
        for n in doc["nodes"]:
            n["labels"] = {"export": "filtered" if n["name"] == "a1" else "open"}
        doc["bgpPeers"] = [
            {"metadata": {"name": "tor-f"}, "spec": {"peerIP": "10.0.1.1", "asNumber": 65000,
                                                      "nodeSelector": "export == 'filtered'", "export": self.export}},
            {"metadata": {"name": "tor-o"}, "spec": {"peerIP": "10.0.1.2", "asNumber": 65000,
                                                      "nodeSelector": "export == 'open'"}},
        ]
        return doc


def tor_rib(lab: MeshLab) -> dict[str, set[str]]:
    """Prefixes in the ToR's BGP table, by the peer that sent them."""
    routes = json.loads(lab_frr.show_json(lab.router, "show bgp ipv4 unicast json")).get("routes", {})
    out: dict[str, set[str]] = {}
    for prefix, paths in routes.items():
        for p in paths:
            out.setdefault(p.get("peerId", "?"), set()).add(prefix)
    return out


def established_count(lab: MeshLab, peer: str) -> int:
    data = json.loads(lab_frr.show_json(lab.router, f"show bgp neighbors {peer} json"))
    return int(data[peer].get("connectionsEstablished", 0))


def received_from(log_text: str, peer: str) -> set[str]:
    """Every prefix FRR logged as received from `peer` (`debug bgp updates in`), over the whole run."""
    return set(re.findall(rf"{re.escape(peer)}\S* rcvd (\d+\.\d+\.\d+\.\d+/\d+)", log_text))


def test_export_filter_denied_prefixes_never_reach_the_tor() -> None:
    nodes = [Node("a1", "a", 1, A1), Node("a2", "a", 2, A2)]
    lab = ExportLab(nodes, agent_overrides=overrides).build()
    sh(f"ip -n {lab.router} addr add 10.0.1.2/24 dev br-a")
    procs = Processes()
    try:
        conf = lab.workdir / "tor.conf"
        conf.write_text(TOR_CONF)
        names = lab_frr.start(procs, "tor", lab.router, FrrSpec(config=conf, daemons=("bgpd", "staticd")),
                              lab.workdir, None)
        lab_frr.wait_ready(lab.router, names, time.monotonic() + 30, lambda: True)
        lab_frr.load_config("tor", lab.router, conf, lab.workdir / "vtysh.log")
        start_bird(lab)
        lab.start()
        a1, a2 = nodes
        # the unfiltered node announces its pod CIDR, the service ranges and the ETP=Local /32 of its
        # endpoint: the ToR takes them all
        open_set = {"10.244.2.0/24", *SERVICES, LB_RANGE, f"{LB_IP}/32"}
        try:
            wait_for(lambda: tor_rib(lab).get(A2, set()) == open_set and A1 in tor_rib(lab), 90,
                     f"the ToR's RIB to hold {open_set} from a2 and a route from a1")
        except AssertionError as e:
            summary = lab_frr.show_json(lab.router, "show bgp summary json")
            raise AssertionError(f"{e}\nrib: {tor_rib(lab)}\n{summary}\na1: {lab.status(a1)}\n{lab.log_tail(a1)}"
                                 f"\na2: {lab.status(a2)}") from None
        time.sleep(3)  # a1's session is up and announced: give a wrongly sent prefix time to show
        assert tor_rib(lab)[A1] == {"10.96.0.0/24"}, tor_rib(lab)
        # the mesh is not filtered: a2 still routes to a1's pods
        assert "10.244.1.0/24 via 10.0.1.11" in lab.routes(a2)
        log = lab.workdir / "tor.bgpd.log"
        assert received_from(log.read_text(errors="replace"), A2) >= open_set  # the log sees what arrives
        assert received_from(log.read_text(errors="replace"), A1) == {"10.96.0.0/24"}
        sessions = established_count(lab, A1)

        # a2's endpoint goes not ready: its /32 alone is withdrawn; ready again: announced again
        a2_sessions = established_count(lab, A2)
        for ready, want in ((False, open_set - {f"{LB_IP}/32"}), (True, open_set)):
            lab.lb_ready = ready
            lab.write_cluster()
            wait_for(lambda: tor_rib(lab).get(A2) == want, 20, f"a2's announcements with the endpoint ready={ready}")
        assert established_count(lab, A2) == a2_sessions, "an endpoint change must not reset the session"
        wait_for(lambda: lab.status(a2).get("stages", {}).get("bgp", {}).get("announced") == len(open_set), 10,
                 "a2's status to count its announcements")

        # runtime change: a1's filter now passes pod CIDRs only — 10.96.0.0/24 is withdrawn, the pod CIDR sent
        lab.export = {"allow": ["10.244.0.0/16"]}
        lab.write_cluster()
        wait_for(lambda: tor_rib(lab).get(A1) == {"10.244.1.0/24"}, 30, "a1's announcements to follow the new filter")
        assert established_count(lab, A1) == sessions, "a filter change must not reset the session"
        assert received_from(log.read_text(errors="replace"), A1) == {"10.96.0.0/24", "10.244.1.0/24"}
        assert not [w for w in lab.status(a1).get("warnings", []) if "export" in w]  # a filter is not a problem
        assert tor_rib(lab)[A2] == open_set
        misconfigured_peers_show_their_cause(lab, a1)
    finally:
        procs.stop_all()
        lab.close()
        lab_frr.cleanup(lab.router)


def misconfigured_peers_show_their_cause(lab: MeshLab, a1: Node) -> None:
    """The MD5 peer never answers; the other peer's OPEN has another AS. Status and /metrics say so."""
    def causes() -> dict[str, str]:
        return {p["name"]: (p.get("cause") or {}).get("code") for p in lab.status(a1).get("peers", [])}

    try:
        wait_for(lambda: causes().get("md5peer") == "no-answer" and causes().get("aspeer") == "asn-mismatch", 60,
                 "both causes in a1's status")
    except AssertionError as e:
        birdc = sh(f"birdc -s {lab.workdir / 'bird.ctl'} show protocols all", check=False).stdout
        bird_log = (lab.workdir / "bird.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{e}: {lab.status(a1).get('peers')}\n{lab.log_tail(a1)}\n{birdc}\n{bird_log}") from None
    text = sh(f"ip netns exec {a1.ns} {FABRIC} status -c {lab.config_path(a1)}").stdout
    assert "down: no answer to our connection attempts (a TCP-MD5 password mismatch looks like this" in text, text
    assert "down: ASN mismatch: " in text and "AS 65001" in text and "65099" in text, text
    m, table = scrape_with_table(lab, a1)
    assert metric(m, "bgp_fabric_bgp_peer_down_cause", peer="md5peer", cause="no-answer") == 1, m
    assert metric(m, "bgp_fabric_bgp_peer_down_cause", peer="aspeer", cause="asn-mismatch") == 1
    assert metric(m, "bgp_fabric_bgp_peer_up", peer="md5peer", address="10.0.1.3", asn="65000", kind="external") == 0
    # the rest against the lab's known state: a2 (mesh) and the ToR up, the two bad peers down
    assert metric(m, "bgp_fabric_bgp_peer_up", peer="a2", address=A2, asn="64512", kind="mesh") == 1
    assert metric(m, "bgp_fabric_bgp_peer_up", peer="tor-f", address="10.0.1.1", asn="65000", kind="external") == 1
    assert sum(v for (name, _), v in m.items() if name == "bgp_fabric_bgp_peer_up") == 2
    # routes by kind = what a1's kernel holds with our protocol, read at the same moment: a2's pod CIDR
    # direct, our own a blackhole, and whatever the ToR passes on from a2 (next hop a2: direct)
    kinds = {k: metric(m, "bgp_fabric_routes_programmed", kind=k) for k in ("direct", "ipip", "recursive",
                                                                            "blackhole", "ecmp")}
    assert kinds == table and table["blackhole"] == 1 and table["direct"] >= 1, (kinds, table)
    assert (metric(m, "bgp_fabric_bgp_prefixes_rejected", peer="tor-f", reason="pod-cidr-from-ebgp") or 0) >= 1
    assert metric(m, "bgp_fabric_bgp_prefixes_accepted", peer="a2") == 1
    assert metric(m, "bgp_fabric_bgp_announced_prefixes") == 3  # pod CIDR + two service ranges
    assert metric(m, "bgp_fabric_ready") == 1 and metric(m, "bgp_fabric_exabgp_up") == 1
    # the password: in exabgp.conf (0600 in a 0700 dir) and nowhere else
    plan = sh(f"ip netns exec {a1.ns} {FABRIC} plan -c {lab.config_path(a1)}", check=False)
    explain = sh(f"ip netns exec {a1.ns} {FABRIC} explain -c {lab.config_path(a1)} 10.0.1.3", check=False)
    metrics_text = sh(f"ip netns exec {a1.ns} python3 -c \"import urllib.request,sys;sys.stdout.write("
                      f"urllib.request.urlopen('http://127.0.0.1:9099/metrics', timeout=5).read().decode())\"").stdout
    seen = {"agent log": (lab.workdir / "a1.log").read_text(errors="replace"),
            "status.json": (lab.run_dir(a1) / "status.json").read_text(), "status": text, "metrics": metrics_text,
            "plan": plan.stdout + plan.stderr, "explain": explain.stdout + explain.stderr,
            "exabgp.log": (lab.run_dir(a1) / "exabgp.log").read_text(errors="replace")}
    assert "md5peer" in seen["plan"] and "md5peer" in seen["status"]
    leaked = [where for where, t in seen.items() if OUR_PASSWORD in t]
    assert leaked == [], f"the MD5 password appears in: {leaked}"
