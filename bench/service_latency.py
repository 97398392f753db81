"""Endpoint change -> IPVS, through the whole agent (file source -> tracker -> sync -> IPVS), in the lab kernel.

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/service_latency.py

One node runs a real `fabric agent` with N services in its cluster file. We add / remove one endpoint
of one service by rewriting the file atomically (as a ConfigMap update would) and time until the
kernel's IPVS table shows it (read from /proc/net/ip_vs inside the node's namespace). Baseline: the
same change made directly with `ipvsadm` (process start + one netlink request), timed the same way.
Prints p50/p90 for N = 10 and N = 1000 services and the ratio agent / ipvsadm.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from tests.kernel.meshlab import MeshLab, Node, wait_for  # noqa: E402

REPS = 10

# Runs inside the node's namespace: rewrites the cluster file, times until /proc/net/ip_vs agrees.
PROBE = textwrap.dedent('''
    import sys, time, yaml, json, subprocess
    path, n, reps, fmt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    doc = yaml.safe_load(open(path))  # JSON is YAML
    def ipvs_has(dest_hex):
        return dest_hex in open("/proc/net/ip_vs").read()
    def hexaddr(ip, port):
        return "".join(f"{int(o):02X}" for o in ip.split(".")) + f":{port:04X}"
    def write(d):
        tmp = path + ".tmp"
        open(tmp, "w").write(json.dumps(d) if fmt == "json" else yaml.safe_dump(d, sort_keys=False))
        import os; os.replace(tmp, path)
    agent, direct = [], []
    eps = doc["endpointSlices"][0]["endpoints"]
    for i in range(reps):
        ip = f"10.244.1.{100 + i}"
        dest = hexaddr(ip, 8080)
        eps.append({"addresses": [ip], "conditions": {"ready": True}, "nodeName": "a1"})
        t0 = time.perf_counter(); write(doc)
        while not ipvs_has(dest): time.sleep(0.002)
        agent.append(time.perf_counter() - t0)
        eps.pop()
        t0 = time.perf_counter(); write(doc)
        while ipvs_has(dest): time.sleep(0.002)
        agent.append(time.perf_counter() - t0)
        # baseline: the same destination change made directly
        t0 = time.perf_counter()
        subprocess.run(["ipvsadm", "-a", "-t", "10.96.9.9:80", "-r", f"{ip}:8080", "-m"], check=True)
        while not ipvs_has(dest): time.sleep(0.002)
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(["ipvsadm", "-d", "-t", "10.96.9.9:80", "-r", f"{ip}:8080"], check=True)
        while ipvs_has(dest): time.sleep(0.002)
        direct.append(time.perf_counter() - t0)
    print(json.dumps({"agent": agent, "direct": direct}))
''')


def cluster(n: int) -> dict:
    services, slices = [], []
    for i in range(n):
        name = f"svc{i}"
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        services.append({"metadata": {"name": name, "namespace": "default"},
                         "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
        slices.append({"metadata": {"name": f"{name}-1", "namespace": "default",
                                    "labels": {"kubernetes.io/service-name": name}},
                       "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                       "endpoints": [{"addresses": ["10.244.1.10"], "conditions": {"ready": True}, "nodeName": "a1"}]})
    return {"nodes": [{"name": "a1", "address": "10.0.1.11", "podCIDRs": ["10.244.1.0/24"]}],
            "services": services, "endpointSlices": slices}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(n: int, fmt: str) -> tuple[list[float], list[float]]:
    lab = MeshLab([Node("a1", "a", 1, "10.0.1.11")],
                  agent_overrides=lambda _n: {"services": {"enabled": True}}).build()
    try:
        doc = cluster(n)
        (lab.workdir / "cluster.yaml").write_text(json.dumps(doc) if fmt == "json" else yaml.safe_dump(doc))
        subprocess.run(["ip", "netns", "exec", lab.nodes[0].ns, "ipvsadm", "-A", "-t", "10.96.9.9:80", "-s", "rr"],
                       check=True)
        lab.start()
        ns = lab.nodes[0].ns
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", "grep -c '^TCP' /proc/net/ip_vs"],
                                        capture_output=True, text=True).stdout.strip() == str(n + 1),
                 300, f"{n} services in IPVS", step=0.5)
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, str(lab.workdir / "cluster.yaml"),
                            str(n), str(REPS), fmt], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        d = json.loads(r.stdout)
        return d["agent"], d["direct"]
    finally:
        lab.close()


def main() -> None:
    print(f"endpoint add/remove -> visible in IPVS; {REPS} adds + {REPS} removes per row (seconds)")
    print(f"{'services':>8} {'file':>5} {'agent p50':>10} {'agent p90':>10} {'ipvsadm p50':>12} {'ratio p50':>10}")
    for n, fmt in ((10, "yaml"), (1000, "yaml"), (1000, "json")):
        agent, direct = run(n, fmt)
        a50, a90, d50 = statistics.median(agent), pct(agent, 0.9), statistics.median(direct)
        print(f"{n:>8} {fmt:>5} {a50:>10.3f} {a90:>10.3f} {d50:>12.3f} {a50 / d50:>10.1f}")


if __name__ == "__main__":
    main()
