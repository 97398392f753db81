"""Start-up with peers up: a node's BGP speaker starts -> every session up and every route in its kernel.

Run in the lab kernel (nothing can leave it):

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/start_bench.py [--runs 3] [--nodes node-a1,node-b2]

Builds the default lab (labs/two-racks.clab.yml: FRR tor, four agents in two racks) with the lab
runner and waits until every session is up. Then, per run and per chosen node, with every peer up:

- **agent**: SIGTERM the node's agent (as an upgrade does), delete every route it owns (proto 80) so
  nothing is adopted (as a node that boots), start `fabric agent` again;
- **BIRD**: the same node as BIRD 2 instead: the same neighbors (iBGP mesh to the three other nodes,
  eBGP to the tor with TCP-MD5), kernel protocol exporting BGP routes; then the agent again.

t0 = the process start. Timed with `ip monitor route` in the node's namespace (event-driven) until
every expected route is in its kernel: the three other nodes' pod CIDRs and the tor's 10.0.9.0/24.
Each comes from a different session (3 mesh peers, tor), so all routes in = all sessions up and
routes installed. For the agent the log also gives the split: ExaBGP spawned, first and last
session Established (wall-clock timestamps of its log lines). Prints p50/max per speaker and the
ratio agent/BIRD.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabric.lab import agent as lab_agent  # noqa: E402
from fabric.lab import clab  # noqa: E402
from fabric.lab.checks import Checks  # noqa: E402
from fabric.lab.kinds import plan  # noqa: E402
from fabric.lab.runner import Lab  # noqa: E402

TOPOLOGY = Path(__file__).resolve().parent.parent / "labs" / "two-racks.clab.yml"
NODES = {"node-a1": ("10.0.1.11", "10.0.1.1", "10.244.1.0/24"), "node-a2": ("10.0.1.12", "10.0.1.1", "10.244.2.0/24"),
         "node-b1": ("10.0.2.11", "10.0.2.1", "10.244.3.0/24"), "node-b2": ("10.0.2.12", "10.0.2.1", "10.244.4.0/24")}
CLIENT_NET = "10.0.9.0/24"  # the tor announces it
TOR_PASSWORD = "lab-secret"

BIRD_CONF = """router id {me};
protocol device {{ }}
protocol direct {{ ipv4; interface "eth1"; }}
protocol kernel {{
  learn;  # the default route: next hops in the other rack resolve through it (gateway recursive)
  ipv4 {{ import all; export where source = RTS_BGP; }};
}}
protocol static pods {{ ipv4; route {pod} blackhole; }}
template bgp mesh {{
  local {me} as 64512;
  graceful restart on;
  ipv4 {{ gateway recursive; import all; export where source = RTS_STATIC; next hop self; }};
}}
{mesh}
protocol bgp tor {{
  local {me} as 64512;
  neighbor {tor} as 65000;
  password "{password}";
  hold time 9;
  graceful restart on;
  ipv4 {{ import all; export where source = RTS_STATIC; }};
}}
"""


class RouteWatch:
    """`ip monitor route` in one namespace: first time each (proto, prefix) was added."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE, text=True)
        self.added: dict[tuple[str, str], float] = {}
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.5)  # let it subscribe

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            words = raw.split()
            if not words or words[0] == "Deleted":
                continue
            m = re.search(r" proto (\S+)", raw)
            dst = words[1] if words[0] in ("blackhole", "unicast", "unreachable") else words[0]
            with self.cond:
                self.added.setdefault((m.group(1) if m else "?", dst), now)
                self.cond.notify_all()

    def wait_all(self, proto: str, prefixes: set[str], timeout: float, alive=lambda: True) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all((proto, p) in self.added for p in prefixes):
                left = min(deadline - time.monotonic(), 1.0)
                if deadline - time.monotonic() <= 0 or not alive():
                    got = sorted(p for (pr, p) in self.added if pr == proto)
                    raise AssertionError(f"timed out: {proto} routes {got}, wanted {sorted(prefixes)}")
                self.cond.wait(left)
            return max(self.added[(proto, p)] for p in prefixes)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def stop_group(popen: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        return
    try:
        popen.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()


def log_times(log: Path, since_wall: float) -> dict[str, float]:
    """Wall-clock seconds after `since_wall` of the agent's start-up milestones (its log lines)."""
    out: dict[str, float] = {}
    established: list[float] = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
        if not m:
            continue
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - since_wall
        if t < 0:
            continue
        if "exabgp started" in line:
            out.setdefault("exabgp spawned", t)
        elif " established, graceful restart" in line:
            established.append(t)
    if established:
        out["first session"] = min(established)
        out["last session"] = max(established)
    return out


class StartBench:
    def __init__(self, nodes: list[str]) -> None:
        topology = clab.load(TOPOLOGY)
        self.plan = plan(topology, os.urandom(2).hex())
        self.lab = Lab(self.plan, Checks(timeout=120), sys.stderr)
        self.nodes = nodes
        self.tmp = Path(tempfile.mkdtemp(prefix="start-bench-"))

    def agent_proc(self, name: str):
        return next(p for p in reversed(self.lab.procs.procs) if p.label == f"{name}/agent" and p.running)

    def expected(self, name: str) -> set[str]:
        return {pod for other, (_, _, pod) in NODES.items() if other != name} | {CLIENT_NET}

    def stop_agent(self, name: str) -> None:
        ns = self.plan.netns(name)
        stop_group(self.agent_proc(name).popen)
        sh("ip", "-n", ns, "route", "flush", "proto", "80")  # a booting node has none to adopt
        time.sleep(2.0)  # peers notice the closed sessions

    def start_agent(self, name: str) -> tuple[float, float]:
        n = self.plan.by_name(name)
        assert n.agent is not None
        watch = RouteWatch(n.netns)
        try:
            wall, t0 = time.time(), time.monotonic()
            lab_agent.start(self.lab.procs, name, n.netns, n.agent, self.lab.workdir, self.lab.env_for(n))
            t1 = watch.wait_all("80", self.expected(name), 120)
            self.last_routes = {p: watch.added[("80", p)] - t0 for p in sorted(self.expected(name))}
            return wall, t1 - t0
        finally:
            watch.close()

    def run_bird(self, name: str) -> float:
        me, tor, pod = NODES[name]
        ns = self.plan.netns(name)
        mesh = "".join(f"protocol bgp {o.replace('-', '_')} from mesh {{ neighbor {addr} as 64512; }}\n"
                       for o, (addr, _, _) in NODES.items() if o != name)
        conf = self.tmp / f"{name}.bird.conf"
        conf.write_text(BIRD_CONF.format(me=me, tor=tor, pod=pod, mesh=mesh, password=TOR_PASSWORD))
        sock = self.tmp / f"{name}.bird.ctl"
        watch = RouteWatch(ns)
        bird = None
        try:
            t0 = time.monotonic()
            bird = subprocess.Popen(["ip", "netns", "exec", ns, "bird", "-f", "-c", str(conf), "-s", str(sock),
                                     "-P", str(self.tmp / f"{name}.bird.pid")], stdout=subprocess.DEVNULL,
                                    stderr=open(self.tmp / f"{name}.bird.log", "ab"), start_new_session=True)
            try:
                t1 = watch.wait_all("bird", self.expected(name), 120, alive=lambda: bird.poll() is None)
            except AssertionError:
                print((self.tmp / f"{name}.bird.log").read_text()[-2000:], file=sys.stderr)
                print(sh("birdc", "-s", str(sock), "show", "protocols", "all").stdout[-3000:], file=sys.stderr)
                raise
            self.last_routes = {p: watch.added[("bird", p)] - t0 for p in sorted(self.expected(name))}
            return t1 - t0
        finally:
            watch.close()
            if bird is not None:
                stop_group(bird, signal.SIGKILL)  # no NOTIFICATION: peers keep its routes (graceful restart)
            sh("ip", "-n", ns, "route", "flush", "proto", "bird")
            time.sleep(2.0)

    def close(self) -> None:
        self.lab.teardown()
        subprocess.run(["rm", "-rf", str(self.tmp)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nodes", default="node-a1,node-b2")
    ap.add_argument("--only", default="bird,agent")
    ap.add_argument("--verbose", action="store_true", help="when each expected route arrived, per run")
    a = ap.parse_args()
    bench = StartBench(a.nodes.split(","))
    res: dict[str, list[float]] = {"agent": [], "bird": []}
    splits: list[dict[str, float]] = []
    try:
        bench.lab.build()
        if not bench.lab.converge(time.monotonic() + 300):
            print("the lab did not converge", file=sys.stderr)
            return 1
        time.sleep(3)
        for run in range(a.runs):
            for name in bench.nodes:
                bench.stop_agent(name)
                if "bird" in a.only:
                    res["bird"].append(bench.run_bird(name))
                    if a.verbose:
                        print(f"    bird  routes at {bench.last_routes}")
                wall, took = bench.start_agent(name)
                if a.verbose:
                    print(f"    agent routes at {bench.last_routes}")
                if "agent" in a.only:
                    res["agent"].append(took)
                    split = log_times(bench.lab.workdir / f"{name}.agent.log", wall)
                    split["all routes in the kernel"] = took
                    splits.append(split)
                print(f"  run {run + 1} {name}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in res.items() if v),
                      flush=True)
                time.sleep(2.0)
    finally:
        bench.close()
    print(f"start with peers up, default lab, nodes {a.nodes}, {a.runs} run(s): until every route is in the kernel")
    for kind, v in res.items():
        if v:
            print(f"  {kind:6s} p50 {statistics.median(v):.2f} s  max {max(v):.2f} s  ({', '.join(f'{x:.2f}' for x in v)})")
    if res["agent"] and res["bird"]:
        print(f"  ratio agent/BIRD p50 {statistics.median(res['agent']) / statistics.median(res['bird']):.2f}x")
    if splits:
        keys = ["exabgp spawned", "first session", "last session", "all routes in the kernel"]
        print("  agent split, p50 s after start: " + ", ".join(
            f"{k} {statistics.median([s[k] for s in splits if k in s]):.2f}" for k in keys
            if any(k in s for s in splits)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
