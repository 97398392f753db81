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

`--reflectors R` (issue 12's scale run): the mesh off, R nodes (spread over both racks, never node 1)
are route reflectors of one cluster — agents by the Node label bgp-fabric.io/route-reflector-cluster-id,
BIRD by `rr client` / `rr cluster id` — and every other node peers with the reflectors only. It also
prints memory (RSS of each node's processes: agent + ExaBGP, or bird) and the CPU each node spent per
event, by role (reflector / client); `--bulk K` then has node 1 announce K more prefixes (/27s of
10.244.128.0/17) and reports each role's RSS and CPU per 1,000 routes. `--memory` prints the memory
table without reflectors too.

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
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kernel.meshlab import MeshLab, Node, sh, wait_for  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
RR_LABEL = "bgp-fabric.io/route-reflector-cluster-id"  # fabric.bgp_desired.RR_LABEL
RR_CLUSTER = "10.0.0.100"


def workdir() -> Path:
    """Where both meshes keep their files: on the lab kernel's tmpfs (/run), as a node keeps the agent's
    runDir (/run/bgp-fabric): the lab kernel's / is the host's file system (hostfs), where every status,
    log or last-good write is a host round trip that no node pays."""
    base = Path("/run") if Path("/run").is_dir() and os.access("/run", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="fabric-mesh-", dir=base))


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
            if node["name"] in getattr(self, "reflectors", ()):
                node["labels"] = {RR_LABEL: RR_CLUSTER}
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
        # The agent's own resync interval (MeshLab's tests use 30 s): a periodic full resync is idle work
        # (nft runs, a kernel dump), and all agents started together resync together, in one burst.
        doc["timers"].pop("resyncInterval", None)
        doc["health"] = {"listen": None}
        doc["source"]["path"] = str(self.cluster_path(n).relative_to(self.workdir))
        self.config_path(n).write_text(yaml.safe_dump(doc))


def reflector_names(nodes: list[Node], r: int) -> list[str]:
    """R reflectors, alternately the last nodes of rack b and rack a (node 1, the event source, is a client)."""
    racks = [[n.name for n in nodes if n.rack == rk][::-1] for rk in ("b", "a")]
    out: list[str] = []
    i = 0
    while len(out) < r:
        rack = racks[i % 2]
        if i // 2 < len(rack) and rack[i // 2] != nodes[0].name:
            out.append(rack[i // 2])
        i += 1
        if i > 2 * len(nodes):
            raise SystemExit(f"--reflectors {r}: not enough nodes")
    return out


def bulk_prefixes(k: int) -> list[str]:
    """K /27s of 10.244.128.0/17 (inside the pool; clear of the pod CIDRs and event prefixes)."""
    if k > 1024:
        raise SystemExit("--bulk: at most 1024")
    return [f"10.244.{128 + i // 8}.{(i % 8) * 32}/27" for i in range(k)]


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


def _role_name(cmd: list[bytes]) -> str:
    return next((Path(c.decode()).name for c in cmd if b"fabric" in c or b"exabgp" in c or b"bird" in c
                 or b"relay" in c), Path(cmd[0].decode()).name)


def rss_mib(ns: str) -> dict[str, float]:
    """Resident memory (VmRSS, MiB) of every process in a namespace, summed by command name."""
    out: dict[str, float] = {}
    for pid in sh(f"ip netns pids {ns}", check=False).stdout.split():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        kib = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")), 0)
        name = _role_name(cmd)
        if name == "ip":  # the bench's own `ip monitor`
            continue
        out[name] = out.get(name, 0.0) + kib / 1024
    return out


def node_cpu(nodes: list[Node]) -> dict[str, float]:
    """CPU seconds so far of each node (every process in its namespace but the bench's `ip monitor`)."""
    return {n.name: sum(v for k, v in cpu_seconds(n.ns).items() if k != "ip") for n in nodes}  # not `ip monitor`


def by_role(values: dict[str, float], reflectors: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"reflector": [], "client" if reflectors else "node": []}
    for name, v in values.items():
        out["reflector" if name in reflectors else ("client" if reflectors else "node")].append(v)
    return {k: v for k, v in out.items() if v}


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


def cpu_by_node(nodes: list[Node]) -> dict[str, dict[str, float]]:
    return {n.name: cpu_seconds(n.ns) for n in nodes}


def event_cpu(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], events: int,
              source: str) -> tuple[dict[str, float], dict[str, float]]:
    """CPU milliseconds per event (announce or withdraw), by process name: (node 1, mean of the others).
    On the lab kernel's one CPU every node's work is serialised, so this is what an event costs the mesh."""
    src: dict[str, float] = {}
    rest: dict[str, float] = {}
    others = [name for name in after if name != source]
    for name, a in after.items():
        b = before.get(name, {})
        into = src if name == source else rest
        for proc, v in a.items():
            into[proc] = into.get(proc, 0.0) + (v - b.get(proc, 0.0)) * 1e3 / events / (1 if name == source
                                                                                        else len(others))
    return src, rest


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

    def __init__(self, n: int, reps: int, trigger: str, reflectors: int = 0) -> None:
        nodes = make_nodes(n, "agent")
        self.reflectors = reflector_names(nodes, reflectors)
        self.lab = LatencyLab(nodes, hold_time=30, gr_time=60, workdir=workdir(),
                              agent_overrides=(lambda _n: {"cluster": {"mesh": False}}) if reflectors else None)
        self.lab.extra, self.lab.trigger = {}, trigger
        self.lab.reflectors = self.reflectors  # type: ignore[attr-defined]
        self.mon: Monitors | None = None
        self.proto = "80"

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

    def bulk(self, prefixes: list[str]) -> None:
        self.lab.extra = {self.lab.nodes[0].name: prefixes}
        self.lab.write_cluster(only=self.lab.nodes[0])

    def session_drops(self) -> int:
        """Sessions that went down while the bench ran (the agents' logs): none should, or numbers suffer."""
        return sum((self.lab.workdir / f"{n.name}.log").read_text(errors="replace").count(") down: ")
                   for n in self.lab.nodes if (self.lab.workdir / f"{n.name}.log").exists())

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

    def __init__(self, n: int, reps: int, reflectors: int = 0, bulk: int = 0) -> None:
        self.lab = MeshLab(make_nodes(n, "bird"), workdir=workdir())
        self.reps = reps
        self.mon: Monitors | None = None
        self.socks: dict[str, Path] = {}
        self.reflectors = reflector_names(self.lab.nodes, reflectors)
        self.bulk_n = bulk
        self.proto = "bird"

    def _neighbors(self, node: Node) -> str:
        """Full mesh; with reflectors: a reflector peers with every node (the others are its clients, other
        reflectors are not) and passes BGP routes on with their next hop; a client peers with the reflectors."""
        others = [m for m in self.lab.nodes if m is not node]
        if not self.reflectors:
            return "".join(f"protocol bgp {m.name} from mesh {{ neighbor {m.address} as 64512; }}\n" for m in others)
        if node.name not in self.reflectors:
            return "".join(f"protocol bgp {m.name} from mesh {{ neighbor {m.address} as 64512; }}\n"
                           for m in others if m.name in self.reflectors)
        template = (f"template bgp rrt {{\n  local {node.address} as 64512;\n  rr cluster id {RR_CLUSTER};\n"
                    "  ipv4 { import all; export filter { if source = RTS_STATIC || source = RTS_BGP then accept; "
                    "reject; }; };\n}\n")
        return template + "".join(
            f"protocol bgp {m.name} from rrt {{ neighbor {m.address} as 64512;"
            f"{'' if m.name in self.reflectors else ' rr client;'} }}\n" for m in others)

    def start(self) -> None:
        lab = self.lab
        lab.build()
        for i, node in enumerate(lab.nodes):
            events = "".join(f"protocol static ev{k} {{ disabled; ipv4; route {event_prefix(k)} blackhole; }}\n"
                             for k in range(self.reps)) if i == 0 else ""
            if i == 0 and self.bulk_n:
                events += ("protocol static bulk { disabled; ipv4; "
                           + "".join(f"route {p} blackhole; " for p in bulk_prefixes(self.bulk_n)) + "}\n")
            neighbors = self._neighbors(node)
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

    def bulk(self, prefixes: list[str]) -> None:
        self._birdc("enable", "bulk")

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
    ap.add_argument("--reflectors", type=int, default=0,
                    help="mesh off: this many route reflectors (one cluster), every other node their client")
    ap.add_argument("--bulk", type=int, default=0,
                    help="then node 1 announces this many more prefixes: RSS and CPU per 1,000 routes by role")
    ap.add_argument("--memory", action="store_true", help="print RSS by role (always with --reflectors)")
    a = ap.parse_args()
    kinds = a.only.split(",")
    meshes = [m for m in (BirdMesh(a.nodes, a.reps, a.reflectors, a.bulk) if "bird" in kinds else None,
                          AgentMesh(a.nodes, a.reps, a.trigger, a.reflectors) if "agents" in kinds else None)
              if m is not None]
    extra: dict[str, dict] = {m.name: {} for m in meshes}  # --reflectors/--memory/--bulk: by-role numbers
    results: dict[str, dict[str, list[float]]] = {m.name: {k: [] for k in ("add_all", "add_each", "del_all", "src",
                                                                            "src_to_all")} for m in meshes}
    cpu: dict[str, tuple[dict, float]] = {}
    per_event: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    try:
        for m in meshes:  # both meshes live in the lab kernel at once: events alternate, same load for both
            m.start()
        for m in meshes:
            wait_for(m.converged, max(300, 8 * a.nodes), f"the {m.name} mesh to converge", step=0.5)
        time.sleep(3)
        for m in meshes:
            m.watch()
        ev_cpu0 = {m.name: node_cpu(m.lab.nodes) for m in meshes}
        before = {m.name: cpu_by_node(m.lab.nodes) for m in meshes}
        for k in range(a.reps):
            for m in (meshes if k % 2 == 0 else meshes[::-1]):
                try:
                    measure_one(m.lab, m.mon, k, m.trigger, m.untrigger, results[m.name])
                except BaseException:
                    m.dump()
                    raise
        for m in meshes:  # includes each event's 1 s of settling and the other mesh's events (idle: ~0)
            per_event[m.name] = event_cpu(before[m.name], cpu_by_node(m.lab.nodes), 2 * a.reps, m.lab.nodes[0].name)
        for m in meshes:
            c1 = node_cpu(m.lab.nodes)
            extra[m.name]["event_cpu"] = {n: (c1[n] - c0) / a.reps for n, c0 in ev_cpu0[m.name].items()}
            if a.reflectors or a.memory:
                extra[m.name]["rss"] = {n.name: rss_mib(n.ns) for n in m.lab.nodes}
        for m in meshes:
            c0 = node_cpu(m.lab.nodes)
            t0 = time.monotonic()
            cpu[m.name] = idle_cpu(m.lab.nodes, a.idle)
            c1, dt = node_cpu(m.lab.nodes), time.monotonic() - t0
            extra[m.name]["idle_share"] = {n: (c1[n] - c0[n]) / dt for n in c0}
            if hasattr(m, "session_drops"):
                extra[m.name]["drops_before_bulk"] = m.session_drops()
        if a.bulk:
            for m in meshes:
                extra[m.name]["bulk"] = measure_bulk(m, bulk_prefixes(a.bulk))
                if hasattr(m, "session_drops"):
                    extra[m.name]["drops"] = m.session_drops()
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
    print("CPU per event (announce or withdraw), ms: node 1 | each other node (mean)")
    for kind, (src, rest) in per_event.items():
        def fmt(d: dict[str, float]) -> str:
            return f"{sum(d.values()):6.1f} (" + ", ".join(f"{k} {v:.1f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])
                                                       if v >= 0.05) + ")"
        print(f"  {kind:7s} {fmt(src)} | {fmt(rest)}")
    print(f"idle CPU over {a.idle:.0f} s, all {a.nodes} nodes together (CPU seconds by process)")
    for kind, (c, share) in cpu.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "none"
        print(f"  {kind:7s} total {sum(c.values()):.2f} s = {100 * share:.1f}% of one CPU, "
              f"{100 * share / a.nodes:.2f}% per node  ({parts})")
    if a.reflectors or a.memory or a.bulk:
        print_roles(meshes, extra, a)
    return 0


def measure_bulk(m, prefixes: list[str]) -> dict:
    """Node 1 announces len(prefixes) more: per node the RSS and CPU it took to have them all."""
    lab = m.lab
    others = lab.nodes[1:]
    rss0 = {n.name: rss_mib(n.ns) for n in lab.nodes}
    cpu0 = node_cpu(lab.nodes)
    t0 = time.monotonic()
    m.bulk(prefixes)

    def have_all() -> bool:
        return all(sh(f"ip -n {n.ns} route show proto {m.proto}").stdout.count("/27 ") >= len(prefixes)
                   for n in others)
    took = wait_for(have_all, 600, f"{len(prefixes)} prefixes at every {m.name} node", step=1.0)
    time.sleep(3)  # let the senders finish (acks, status writes) before reading CPU and memory
    cpu1 = node_cpu(lab.nodes)
    rss1 = {n.name: rss_mib(n.ns) for n in lab.nodes}
    by_proc = {n: {k: v - rss0[n].get(k, 0.0) for k, v in rss1[n].items()} for n in rss0}
    return {"seconds": took, "routes": len(prefixes), "rss": {n: sum(v.values()) for n, v in by_proc.items()},
            "rss_by_proc": by_proc,
            "cpu": {n: cpu1[n] - cpu0[n] for n in cpu0}, "source": lab.nodes[0].name}


NAMES = {"rss": "RSS", "event_cpu": "CPU/event", "idle_share": "idle CPU", "bulk_rss": "RSS/1k routes",
         "bulk_cpu": "CPU/1k routes"}


def print_roles(meshes: list, extra: dict[str, dict], a: argparse.Namespace) -> None:
    """Per node, by role: memory, CPU per event, idle CPU; with --bulk the cost per 1,000 routes."""
    mean = statistics.mean
    print(f"by role ({a.reflectors} reflector(s), {a.nodes - a.reflectors} {'clients' if a.reflectors else 'nodes'}"
          f"; node 1, the event source, is a client): mean per node [max]")
    table: dict[tuple[str, str, str], float] = {}
    for m in meshes:
        e = extra[m.name]
        refl = m.reflectors
        if "rss" in e:
            per_node = {n: sum(v.values()) for n, v in e["rss"].items()}
            for role, vals in by_role(per_node, refl).items():
                names = [n for n in e["rss"] if (n in refl) == (role == "reflector")]
                parts: dict[str, float] = {}
                for n in names:
                    for proc, v in e["rss"][n].items():
                        parts[proc] = parts.get(proc, 0.0) + v / len(names)
                split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
                table[(m.name, role, "rss")] = mean(vals)
                print(f"  {m.name:7s} {role:9s} RSS {mean(vals):7.1f} MiB [{max(vals):.1f}]  ({split})")
        for key, label, scale, unit in (("event_cpu", "CPU per event (announce + withdraw)", 1e3, "ms"),
                                        ("idle_share", "idle CPU", 100.0, "% of a CPU")):
            for role, vals in by_role(e[key], refl).items():
                table[(m.name, role, key)] = mean(vals)
                print(f"  {m.name:7s} {role:9s} {label}: {mean(vals) * scale:.2f} {unit} [{max(vals) * scale:.2f}]")
        if "bulk" in e:
            b = e["bulk"]
            k = b["routes"] / 1000
            print(f"  {m.name:7s} {b['routes']} more prefixes from node 1 at every node after {b['seconds']:.1f} s")
            for key, label, unit in (("rss", "RSS", "MiB"), ("cpu", "CPU", "CPU-s")):
                vals = {n: v for n, v in b[key].items() if n != b["source"]}
                for role, vs in by_role(vals, refl).items():
                    table[(m.name, role, "bulk_" + key)] = mean(vs) / k
                    split = ""
                    if key == "rss":
                        names = [n for n in vals if (n in refl) == (role == "reflector")]
                        procs = {p for n in names for p in b["rss_by_proc"][n]}
                        split = "  (" + ", ".join(f"{p} {mean(b['rss_by_proc'][n].get(p, 0.0) for n in names) / k:.2f}"
                                                 for p in sorted(procs)) + ")"
                    print(f"  {m.name:7s} {role:9s} {label} per 1,000 routes received: {mean(vs) / k:.2f} {unit} "
                          f"[{max(vs) / k:.2f}]{split}")
                print(f"  {m.name:7s} node 1    {label} per 1,000 routes announced: {b[key][b['source']] / k:.2f} {unit}")
    for m in meshes:
        if "drops_before_bulk" in extra[m.name]:
            print(f"  {m.name}: BGP sessions that went down (agents' logs): {extra[m.name]['drops_before_bulk']} "
                  f"before the bulk, {extra[m.name].get('drops', '-')} by its end")
    if len(meshes) == 2:
        print("  ratio agents/BIRD: " + "; ".join(
            f"{role} {NAMES[key]} {table[('agents', role, key)] / table[('bird', role, key)]:.1f}x"
            for (mesh, role, key) in table if mesh == "agents" and ("bird", role, key) in table
            and table[("bird", role, key)] > 0))


if __name__ == "__main__":
    sys.exit(main())
