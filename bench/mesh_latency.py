"""Mesh propagation latency: a new prefix on one node until it is in every other node's kernel.

Run in the lab kernel (nothing can leave it):

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/mesh_latency.py [--nodes 4] [--reps 10] [--idle 30]

Builds N nodes in two racks with tests/kernel/meshlab.py's MeshLab (router between two bridges;
node namespaces, IPIP across racks) twice, both living in the lab kernel at once; the events
alternate between them (BIRD first on even repetitions, agents first on odd ones), so both see the
same load from whatever else runs on the machine:

- **agents**: real `fabric agent` processes in a full iBGP mesh. The event: node 1's Node object in
  the cluster file (JSON) gains a pod CIDR 10.244.(100+k).0/24 (atomic file replace, like a ConfigMap
  update); node 1 announces the prefix; we time until every other node's kernel has it (proto 80),
  then remove it again and time the withdrawal. `--trigger local` (default): each agent has its own
  copy of the file and only node 1's changes (the others learn it by BGP alone, like BIRD's nodes);
  `--trigger shared`: one file, every agent re-reads it and runs its stages on each event.
- **BIRD**: one BIRD 2 per node namespace, the same full iBGP mesh, kernel protocol exporting BGP
  routes. The event: `birdc enable evK` on node 1 (a static protocol holding the same prefix).

Arrival is seen with one `ip monitor route` per node (event-driven, no polling). Reported: p50 / p90
over the repetitions of "last node has it" (and of each node's arrival), ratio agents/BIRD. Then the
idle CPU of each mesh: CPU seconds (utime+stime from /proc, all processes in the node namespaces)
used over --idle seconds with nothing changing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kernel.meshlab import MeshLab, Node, sh, wait_for  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def event_prefix(k: int) -> str:
    return f"10.244.{100 + k}.0/24"


def make_nodes(n: int, kind: str) -> list[Node]:
    half = (n + 1) // 2
    out = []
    for i in range(n):
        rack = "a" if i < half else "b"
        addr = f"10.0.1.{11 + i}" if rack == "a" else f"10.0.2.{21 + i - half}"
        out.append(Node(f"{rack}{i + 1}", rack, i + 1, addr, kind))
    return out


class LatencyLab(MeshLab):
    """MeshLab whose agents take their pod CIDRs from the cluster file (so an edit there announces one).

    trigger "local": each agent reads its own copy of the cluster file and an event edits node 1's
    copy only — the others learn the new CIDR by BGP alone, as BIRD's nodes do after `birdc enable` on
    node 1. "shared": one file for all; every agent re-reads it and runs its stages on each event (as
    every agent gets a Node update from the Kubernetes API), which in the lab kernel all share one CPU."""

    extra: dict[str, list[str]]
    trigger: str = "local"

    def cluster_doc(self) -> dict:
        doc = super().cluster_doc()
        for node in doc["nodes"]:
            node["podCIDRs"] += getattr(self, "extra", {}).get(node["name"], [])
        return doc

    def cluster_path(self, n: Node | None) -> Path:
        return self.workdir / ("cluster.yaml" if self.trigger == "shared" or n is None else f"c-{n.name}/cluster.yaml")

    def write_cluster(self, only: Node | None = None) -> None:
        # JSON (which is YAML): a Node update reaches agents as JSON from the Kubernetes API too
        text = json.dumps(self.cluster_doc())
        paths = {self.cluster_path(n) for n in ([only] if only is not None else [None, *self.nodes])}
        for path in paths:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(".cluster.yaml")
            tmp.write_text(text)
            tmp.replace(path)  # atomic, like a ConfigMap update

    def write_agent_config(self, n: Node) -> None:
        super().write_agent_config(n)
        doc = yaml.safe_load(self.config_path(n).read_text())
        del doc["node"]["podCIDRs"]
        doc["health"] = {"listen": None}
        doc["source"]["path"] = str(self.cluster_path(n).relative_to(self.workdir))
        self.config_path(n).write_text(yaml.safe_dump(doc))


class Monitors:
    """One `ip monitor route` per node: (node, prefix, added?) -> first time seen."""

    def __init__(self, nodes: list[Node], proto: str) -> None:
        self.proto = f" proto {proto} "
        self.events: dict[tuple[str, str, bool], float] = {}
        self.procs = []
        for n in nodes:
            p = subprocess.Popen(["ip", "-n", n.ns, "monitor", "route"], stdout=subprocess.PIPE, text=True)
            self.procs.append(p)
            threading.Thread(target=self._read, args=(n.name, p), daemon=True).start()
        time.sleep(1.0)  # let every `ip monitor` subscribe: BIRD propagates in ~20 ms, faster than ip starts

    def _read(self, name: str, p: subprocess.Popen) -> None:
        assert p.stdout is not None
        for raw in p.stdout:
            now = time.monotonic()
            line = raw.strip() + " "
            if self.proto not in line:
                continue
            added = not line.startswith("Deleted")
            words = line.split()[0 if added else 1:]
            dst = words[1] if words[0] in ("blackhole", "unicast") else words[0]
            self.events.setdefault((name, dst, added), now)

    def clear(self) -> None:
        self.events.clear()

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def cpu_seconds(ns: str) -> dict[str, float]:
    """CPU time so far of every process in a namespace, summed by command name."""
    out: dict[str, float] = {}
    for pid in sh(f"ip netns pids {ns}", check=False).stdout.split():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = next((Path(c.decode()).name for c in cmd if b"fabric" in c or b"exabgp" in c or b"bird" in c
                     or b"relay" in c), Path(cmd[0].decode()).name)
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def idle_cpu(nodes: list[Node], seconds: float) -> tuple[dict[str, float], float]:
    """CPU seconds by process name over about `seconds` of idle, and the share of one CPU they were.

    Each node's share is its CPU time over its own window (sampling N namespaces takes a while in
    the lab kernel, so windows are a bit longer than `seconds`)."""
    before = {}
    for n in nodes:
        before[n.name] = (time.monotonic(), cpu_seconds(n.ns))
    time.sleep(seconds)
    total: dict[str, float] = {}
    share = 0.0
    for n in nodes:
        t0, b = before[n.name]
        a = cpu_seconds(n.ns)
        window = time.monotonic() - t0
        for name, v in a.items():
            total[name] = total.get(name, 0.0) + v - b.get(name, 0.0)
        share += sum(v - b.get(name, 0.0) for name, v in a.items()) / window
    return total, share


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def measure_one(lab: MeshLab, mon: Monitors, k: int, trigger, untrigger, res: dict[str, list[float]]) -> None:
    """One repetition: seconds until the last other node has the prefix, and until it is gone again."""
    src = lab.nodes[0]
    others = [n.name for n in lab.nodes[1:]]
    p = event_prefix(k)
    mon.clear()
    t0 = time.monotonic()
    trigger(k)
    try:
        wait_for(lambda: all((o, p, True) in mon.events for o in others), 60, f"{p} at every node", step=0.02)
    except AssertionError:
        for node in lab.nodes[1:]:
            if (node.name, p, True) not in mon.events:
                print(f"{node.name} did not report {p}; its kernel has: "
                      f"{[ln for ln in sh(f'ip -n {node.ns} route').stdout.splitlines() if p in ln]}",
                      file=sys.stderr)
        raise
    arr = [mon.events[(o, p, True)] - t0 for o in others]
    res["add_all"].append(max(arr))
    res["add_each"] += arr
    if (src.name, p, True) in mon.events:  # agents: node 1's own blackhole for the new CIDR = its sync ran
        res["src"].append(mon.events[(src.name, p, True)] - t0)
        res["src_to_all"].append(max(arr) - res["src"][-1])
    time.sleep(0.5)
    t0 = time.monotonic()
    untrigger(k)
    wait_for(lambda: all((o, p, False) in mon.events for o in others), 60, f"{p} gone everywhere", step=0.02)
    res["del_all"].append(max(mon.events[(o, p, False)] - t0 for o in others))
    time.sleep(0.5)


class AgentMesh:
    name = "agents"

    def __init__(self, n: int, reps: int, trigger: str) -> None:
        self.lab = LatencyLab(make_nodes(n, "agent"), hold_time=30, gr_time=60)
        self.lab.extra, self.lab.trigger = {}, trigger
        self.mon: Monitors | None = None

    def start(self) -> None:
        self.lab.build().start()

    def converged(self) -> bool:
        return self.lab.converged()

    def watch(self) -> None:
        self.mon = Monitors(self.lab.nodes, "80")

    def trigger(self, k: int) -> None:
        self.lab.extra = {self.lab.nodes[0].name: [event_prefix(k)]}
        self.lab.write_cluster(only=self.lab.nodes[0])

    def untrigger(self, k: int) -> None:
        self.lab.extra = {}
        self.lab.write_cluster(only=self.lab.nodes[0])

    def dump(self) -> None:
        for node in self.lab.nodes:
            print(f"--- {node.name}\n{self.lab.routes(node)}\n{self.lab.log_tail(node, 20)}", file=sys.stderr)

    def close(self) -> None:
        if self.mon:
            self.mon.close()
        self.lab.close()


BIRD_CONF = """router id {me};
protocol device {{ }}
protocol direct {{ ipv4; interface "eth1"; }}
protocol kernel {{
  learn;
  ipv4 {{ import all; export filter {{ if source = RTS_BGP then accept; reject; }}; }};
}}
protocol static pod {{ ipv4; route {pod} blackhole; }}
{events}
template bgp mesh {{
  local {me} as 64512;
  ipv4 {{ import all; export filter {{ if source = RTS_STATIC then accept; reject; }}; next hop self; }};
}}
{neighbors}
"""


class BirdMesh:
    name = "bird"

    def __init__(self, n: int, reps: int) -> None:
        self.lab = MeshLab(make_nodes(n, "bird"))
        self.reps = reps
        self.mon: Monitors | None = None
        self.socks: dict[str, Path] = {}

    def start(self) -> None:
        lab = self.lab
        lab.build()
        for i, node in enumerate(lab.nodes):
            events = "".join(f"protocol static ev{k} {{ disabled; ipv4; route {event_prefix(k)} blackhole; }}\n"
                             for k in range(self.reps)) if i == 0 else ""
            neighbors = "".join(f"protocol bgp {m.name} from mesh {{ neighbor {m.address} as 64512; }}\n"
                                for m in lab.nodes if m is not node)
            conf = lab.workdir / f"{node.name}.bird.conf"
            conf.write_text(BIRD_CONF.format(me=node.address, pod=node.pod_cidr, events=events, neighbors=neighbors))
            self.socks[node.name] = lab.workdir / f"{node.name}.ctl"
            lab.extra_procs.append(subprocess.Popen(
                ["ip", "netns", "exec", node.ns, "bird", "-f", "-c", str(conf), "-s", str(self.socks[node.name])],
                stdout=subprocess.DEVNULL, stderr=open(lab.workdir / f"{node.name}.bird.log", "wb")))

    def converged(self) -> bool:
        for node in self.lab.nodes:
            text = sh(f"ip -n {node.ns} route show proto bird").stdout
            if any(m.pod_cidr not in text for m in self.lab.nodes if m is not node):
                return False
        return True

    def watch(self) -> None:
        self.mon = Monitors(self.lab.nodes, "bird")

    def _birdc(self, *args: str) -> None:
        subprocess.run(["birdc", "-s", str(self.socks[self.lab.nodes[0].name]), *args], check=True,
                       capture_output=True)

    def trigger(self, k: int) -> None:
        self._birdc("enable", f"ev{k}")

    def untrigger(self, k: int) -> None:
        self._birdc("disable", f"ev{k}")

    def dump(self) -> None:
        pass

    def close(self) -> None:
        if self.mon:
            self.mon.close()
        self.lab.close()


def summary(name: str, res: dict) -> str:
    a, e, d = res["add_all"], res["add_each"], res["del_all"]
    return (f"  {name:7s} announce->all: p50 {statistics.median(a) * 1e3:7.1f} ms  p90 {pct(a, 0.9) * 1e3:7.1f} ms"
            f"   (each node p50 {statistics.median(e) * 1e3:6.1f} ms)   withdraw->all: p50 "
            f"{statistics.median(d) * 1e3:7.1f} ms  p90 {pct(d, 0.9) * 1e3:7.1f} ms"
            + (f"\n          of which file edit -> node 1 synced (its own blackhole route): p50 "
               f"{statistics.median(res['src']) * 1e3:.1f} ms; node 1 synced -> all others: p50 "
               f"{statistics.median(res['src_to_all']) * 1e3:.1f} ms  p90 {pct(res['src_to_all'], 0.9) * 1e3:.1f} ms"
               if res["src"] else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--only", default="bird,agents")
    ap.add_argument("--trigger", choices=("local", "shared"), default="local",
                    help="agents: node 1's own cluster file changes (local), or one file all agents read (shared)")
    a = ap.parse_args()
    kinds = a.only.split(",")
    meshes = [m for m in (BirdMesh(a.nodes, a.reps) if "bird" in kinds else None,
                          AgentMesh(a.nodes, a.reps, a.trigger) if "agents" in kinds else None) if m is not None]
    results: dict[str, dict[str, list[float]]] = {m.name: {k: [] for k in ("add_all", "add_each", "del_all", "src",
                                                                            "src_to_all")} for m in meshes}
    cpu: dict[str, tuple[dict, float]] = {}
    try:
        for m in meshes:  # both meshes live in the lab kernel at once: events alternate, same load for both
            m.start()
        for m in meshes:
            wait_for(m.converged, 300, f"the {m.name} mesh to converge", step=0.5)
        time.sleep(3)
        for m in meshes:
            m.watch()
        for k in range(a.reps):
            for m in (meshes if k % 2 == 0 else meshes[::-1]):
                try:
                    measure_one(m.lab, m.mon, k, m.trigger, m.untrigger, results[m.name])
                except BaseException:
                    m.dump()
                    raise
        for m in meshes:
            cpu[m.name] = idle_cpu(m.lab.nodes, a.idle)
    finally:
        for m in meshes:
            m.close()
    print(f"{a.nodes}-node mesh, {a.reps} events from node 1 (time until every other node's kernel has it), "
          f"alternating; agents' trigger: {a.trigger}")
    for kind, res in results.items():
        print(summary(kind, res))
    if "bird" in results and "agents" in results:
        ra, rb = results["agents"], results["bird"]
        med = statistics.median
        print(f"  ratio agents/BIRD: announce p50 {med(ra['add_all']) / med(rb['add_all']):.2f}x"
              f", p90 {pct(ra['add_all'], 0.9) / pct(rb['add_all'], 0.9):.2f}x; withdraw p50 "
              f"{med(ra['del_all']) / med(rb['del_all']):.2f}x, p90 "
              f"{pct(ra['del_all'], 0.9) / pct(rb['del_all'], 0.9):.2f}x"
              + (f"; node 1 synced -> all vs BIRD p50 {med(ra['src_to_all']) / med(rb['add_all']):.2f}x"
                 if ra["src_to_all"] else ""))
    print(f"idle CPU over {a.idle:.0f} s, all {a.nodes} nodes together (CPU seconds by process)")
    for kind, (c, share) in cpu.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "none"
        print(f"  {kind:7s} total {sum(c.values()):.2f} s = {100 * share:.1f}% of one CPU, "
              f"{100 * share / a.nodes:.2f}% per node  ({parts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
