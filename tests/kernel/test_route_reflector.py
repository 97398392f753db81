"""Our speaker as a route reflector (bgp.reflect through ExaBGP's API), against FRR and BIRD.

One LAN (10.98.0.0/24, a bridge in its own namespace); our speaker is `rr1` (10.98.0.1, cluster ID
10.98.0.100), driven by bgp.cli_probe's reflect mode. Checked on the real peers' RIBs:
- FRR and BIRD as clients: what one announces reaches the other with its next hop unchanged,
  ORIGINATOR_ID = the announcing client, CLUSTER_LIST = our cluster ID;
- BIRD or FRR as a second reflector of the same cluster: a client of both gets through either; a route
  that comes back to us with our cluster ID in its CLUSTER_LIST (reflected by the other reflector
  from its own client) is dropped — our client never sees it — and the other reflector drops ours.
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

WAIT = 120.0
CLUSTER = "10.98.0.100"
RR1, RR2 = "10.98.0.1", "10.98.0.4"
X, Y, Z = "10.98.0.2", "10.98.0.3", "10.98.0.5"  # clients: X of both reflectors, Y of ours, Z of the other
PX, PY, PZ = "10.244.2.0/24", "10.244.3.0/24", "10.244.5.0/24"


class Lan:
    """A bridge namespace and one namespace per member, each with one address on the LAN."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.sw = f"rrsw-{self.tag}"
        self.namespaces = [self.sw]
        self.scratch = Path(tempfile.mkdtemp(prefix="rr-test-"))
        self.procs: list[subprocess.Popen] = []
        self.frr_states: list[Path] = []
        sh("ip", "netns", "add", self.sw)
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")

    def member(self, name: str, addr: str) -> str:
        ns, port = f"rr{name}-{self.tag}", f"p{name}{self.tag}"[:15]
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.sw)
        sh("ip", "-n", self.sw, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return ns

    def frr(self, name: str, ns: str, conf: str) -> "Frr":
        inst = f"frr{name}{self.tag}"
        state = Path("/run/frr") / inst
        state.mkdir(parents=True, exist_ok=True)
        self.frr_states.append(state)
        path = self.scratch / f"{name}.bgpd.conf"
        path.write_text(f"hostname {inst}\n{conf}")
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "/usr/lib/frr/bgpd", "-N", inst, "-Z", "-S", "-P", "0", "-f", str(path),
             "-i", str(self.scratch / f"{name}.bgpd.pid"), "--vty_socket", str(state)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return Frr(inst)

    def bird(self, name: str, ns: str, conf: str) -> "Bird":
        path, sock = self.scratch / f"{name}.bird.conf", self.scratch / f"{name}.bird.ctl"
        path.write_text(conf)
        p = subprocess.Popen(["ip", "netns", "exec", ns, "bird", "-f", "-c", str(path), "-s", str(sock), "-P",
                              str(self.scratch / f"{name}.bird.pid")], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        poll("bird control socket", lambda: p.poll() is not None or subprocess.run(
            ["birdc", "-s", str(sock), "show", "status"], capture_output=True).returncode == 0)
        assert p.poll() is None, f"bird exited: {p.communicate()[0]}"
        return Bird(sock)

    def speaker(self, ns: str, neighbors: list[dict[str, Any]], clients: list[str], non_clients: list[str],
                routes: list[str]) -> ProbeClient:
        probe = ProbeClient(ns, self.scratch / "rr1")
        assert "ok" in probe.request({"op": "neighbors", "neighbors": neighbors}, WAIT)
        assert "ok" in probe.request({"op": "reflect", "cluster_id": CLUSTER, "router_id": RR1,
                                      "clients": clients, "non_clients": non_clients}, WAIT)
        assert "ok" in probe.request({"op": "announce", "routes": [{"prefix": p, "next_hop": "self"}
                                                                   for p in routes]}, WAIT)
        return probe

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in self.namespaces:
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for s in self.frr_states:
            shutil.rmtree(s, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


class Frr:
    def __init__(self, inst: str) -> None:
        self.inst = inst

    def route(self, prefix: str) -> dict[str, Any] | None:
        r = subprocess.run(["vtysh", "-N", self.inst, "-c", f"show bgp ipv4 unicast {prefix} json"],
                           capture_output=True, text=True)
        try:
            paths = json.loads(r.stdout).get("paths") or []
        except ValueError:
            return None
        return paths[0] if paths else None


class Bird:
    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def route(self, prefix: str) -> str | None:
        out = subprocess.run(["birdc", "-s", str(self.sock), "show", "route", prefix, "all"], capture_output=True,
                             text=True).stdout
        return out if f"{prefix}" in out and "BGP.next_hop" in out else None


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def poll(what: str, fn: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not reached in {timeout}s (last: {last!r})")


def nb(name: str, addr: str) -> dict[str, Any]:
    return dict(name=name, peer_address=addr, peer_as=64512, local_as=64512, local_address=RR1, router_id=RR1,
                hold_time=9, graceful_restart_time=60, connect_retry=1, cluster_id=CLUSTER)


def frr_client(me: str, prefix: str, reflectors: list[str]) -> str:
    lines = ["router bgp 64512", f" bgp router-id {me}", " no bgp network import-check"]
    for r in reflectors:
        lines += [f" neighbor {r} remote-as 64512", f" neighbor {r} timers 3 9", f" neighbor {r} timers connect 1"]
    lines += [" address-family ipv4 unicast", f"  network {prefix}", " exit-address-family", ""]
    return "\n".join(lines)


def bird_client(me: str, prefix: str, reflectors: list[str]) -> str:
    return f"""router id {me};
protocol device {{ }}
protocol static pods {{ ipv4; route {prefix} blackhole; }}
""" + "".join(f"""protocol bgp r{i} {{
  local {me} as 64512;
  neighbor {r} as 64512;
  hold time 9;
  connect retry time 1;
  direct;
  ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};
}}
""" for i, r in enumerate(reflectors))


@pytest.fixture
def lan() -> Iterator[Lan]:
    lab = Lan()
    try:
        yield lab
    finally:
        lab.close()


def bird_has(bird: Bird, prefix: str, next_hop: str, originator: str, clusters: str) -> Callable[[], str | None]:
    def check() -> str | None:
        out = bird.route(prefix)
        if not out:
            return None
        ok = (f"BGP.next_hop: {next_hop}" in out and f"BGP.originator_id: {originator}" in out
              and f"BGP.cluster_list: {clusters}" in out)
        return out if ok else None
    return check


def frr_has(frr: Frr, prefix: str, next_hop: str, originator: str, clusters: list[str]) -> Callable[[], Any]:
    def check() -> Any:
        p = frr.route(prefix)
        if not p:
            return None
        hops = [h.get("ip") for h in p.get("nexthops", [])]
        ok = (next_hop in hops and p.get("originatorId") == originator
              and (p.get("clusterList") or {}).get("list") == clusters)
        return p if ok else None
    return check


def test_reflects_between_frr_and_bird_clients(lan: Lan) -> None:
    ns_rr, ns_x, ns_y = lan.member("a", RR1), lan.member("x", X), lan.member("y", Y)
    frr = lan.frr("x", ns_x, frr_client(X, PX, [RR1]))
    bird = lan.bird("y", ns_y, bird_client(Y, PY, [RR1]))
    probe = lan.speaker(ns_rr, [nb("x", X), nb("y", Y)], clients=["x", "y"], non_clients=[],
                        routes=["10.244.1.0/24"])
    try:
        # FRR's route reaches BIRD through us, and BIRD's reaches FRR: next hop unchanged, originator and cluster
        poll("BIRD has FRR's route, reflected", bird_has(bird, PX, X, X, CLUSTER))
        poll("FRR has BIRD's route, reflected", frr_has(frr, PY, Y, Y, [CLUSTER]))
        # our own route goes to both, as always (not a reflection: no originator, no cluster list)
        own = poll("BIRD has our own route", lambda: bird.route("10.244.1.0/24"))
        assert "BGP.originator_id" not in own and "BGP.cluster_list" not in own
        # a client withdraws: the reflection is withdrawn
        subprocess.run(["vtysh", "-N", frr.inst, "-c", "configure terminal", "-c", "router bgp 64512", "-c",
                        "address-family ipv4 unicast", "-c", f"no network {PX}"], check=True, capture_output=True)
        poll("BIRD lost FRR's route", lambda: bird.route(PX) is None)
    finally:
        probe.close()


@pytest.mark.parametrize("second", ["bird", "frr"])
def test_second_reflector_of_the_same_cluster(lan: Lan, second: str) -> None:
    """X is a client of both reflectors, Y of ours only, Z of the other only."""
    ns_rr, ns_rr2 = lan.member("a", RR1), lan.member("r", RR2)
    ns_x, ns_y, ns_z = lan.member("x", X), lan.member("y", Y), lan.member("z", Z)
    x = lan.frr("x", ns_x, frr_client(X, PX, [RR1, RR2]))
    y = lan.bird("y", ns_y, bird_client(Y, PY, [RR1]))
    if second == "bird":
        lan.bird("r", ns_rr2, f"""router id {RR2};
protocol device {{ }}
template bgp rrpeer {{ local {RR2} as 64512; hold time 9; connect retry time 1; direct;
  ipv4 {{ import all; export all; }}; }}
protocol bgp rr1 from rrpeer {{ neighbor {RR1} as 64512; }}
protocol bgp x from rrpeer {{ neighbor {X} as 64512; rr client; rr cluster id {CLUSTER}; }}
protocol bgp z from rrpeer {{ neighbor {Z} as 64512; rr client; rr cluster id {CLUSTER}; }}
""")
        z_routes: Callable[[str], Any] = lan.frr("z", ns_z, frr_client(Z, PZ, [RR2])).route
    else:
        lan.frr("r", ns_rr2, "\n".join([
            "router bgp 64512", f" bgp router-id {RR2}", f" bgp cluster-id {CLUSTER}",
            *[line for peer in (RR1, X, Z) for line in (f" neighbor {peer} remote-as 64512",
                                                        f" neighbor {peer} timers 3 9",
                                                        f" neighbor {peer} timers connect 1")],
            " address-family ipv4 unicast", f"  neighbor {X} route-reflector-client",
            f"  neighbor {Z} route-reflector-client", " exit-address-family", ""]))
        z_routes = lan.bird("z", ns_z, bird_client(Z, PZ, [RR2])).route
    probe = lan.speaker(ns_rr, [nb("x", X), nb("y", Y), nb("rr2", RR2)], clients=["x", "y"],
                        non_clients=["rr2"], routes=[])
    try:
        # X (client of both) reaches Y through us, and Z through the other reflector
        poll("Y has X's route via us", bird_has(y, PX, X, X, CLUSTER))
        poll("Z has X's route via the other reflector", lambda: z_routes(PX))
        # the other reflector reflects its client Z's route (and X's) to us with our cluster ID: they came
        # back and are dropped at the door (counted), never used nor reflected
        poll("routes that came back from the other reflector", lambda: probe.status(WAIT)["neighbors"]["rr2"]
             ["looped"] >= 2)
        assert not [o for o in probe.events("RoutesAnnounced") if o.get("peer") == "rr2"]
        time.sleep(3)  # any reflection would have reached Y in milliseconds
        assert y.route(PZ) is None, "Y got Z's route: a route with our cluster ID was reflected"
        # the other reflector drops what we reflect to it likewise: Z never gets Y's route
        assert z_routes(PY) is None, "Z got Y's route through a reflector of the same cluster"
    finally:
        probe.close()
