"""Memory of the node agent (and its ExaBGP) as the DaemonSet runs it: the basis of its requests/limits.

Run in a kernel with ipip/IPVS (the lab kernel here):

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/agent_memory.py [--services 0,1000,5000]

One agent in a throwaway namespace (tests/kernel/meshlab.py, one node), services and CNI enabled, N
ClusterIP Services with one EndpointSlice each (the shape bench/service_latency.py uses), from the
cluster file (`--source file`) or from the fake API server process in the node's namespace through the
real `kubernetes` client (`--source kubernetes`, as in a cluster). Once the agent is ready and every
service is in IPVS, it reads VmRSS and VmHWM (peak) of the agent process and of its ExaBGP process
(plus its relay helper) from /proc. Prints one row per N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.service_latency import cluster  # noqa: E402
from tests.kernel.meshlab import MeshLab, Node, wait_for  # noqa: E402


def mem(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in children(k)]


def fake_api_state(doc: dict, path: Path) -> None:
    """The fake API server's state file holding `doc`'s objects in their Kubernetes shapes."""
    from tests.fakeapi.server import FakeApiServer

    fake = FakeApiServer()  # not started: only its object store
    for nd in doc["nodes"]:
        fake.apply("Node", {"metadata": {"name": nd["name"]}, "spec": {"podCIDRs": nd["podCIDRs"]},
                            "status": {"addresses": [{"type": "InternalIP", "address": nd["address"]}]}})
    for kind, key in (("Service", "services"), ("EndpointSlice", "endpointSlices")):
        for obj in doc[key]:
            fake.apply(kind, obj)
    fake.state_file = str(path)
    with fake._cond:
        fake._save_state()


def run(n: int, source: str) -> dict:
    overrides: dict = {"services": {"enabled": True},
                       "cni": {"enabled": True, "confDir": "net.d", "stateDir": "ipam", "socket": "run-a1/cni.sock"}}
    lab = MeshLab([Node("a1", "a", 1, "10.0.1.11")], agent_overrides=lambda _n: overrides).build()
    api = None
    try:
        doc = cluster(n)
        if source == "kubernetes":
            fake_api_state(doc, lab.workdir / "api.json")
            api = subprocess.Popen(["ip", "netns", "exec", lab.nodes[0].ns, sys.executable, "-m", "tests.fakeapi",
                                    "--listen", "127.0.0.1:6443", "--control", str(lab.workdir / "api.sock"),
                                    "--state", str(lab.workdir / "api.json"), "--kubeconfig",
                                    str(lab.workdir / "kubeconfig")], stdout=subprocess.PIPE, text=True,
                                   cwd=str(Path(__file__).resolve().parent.parent))
            assert api.stdout is not None and api.stdout.readline().startswith("ready")
            overrides["source"] = {"kind": "kubernetes", "kubeconfig": str(lab.workdir / "kubeconfig")}
            os.environ["NODE_NAME"] = "a1"
            lab.write_agent_config(lab.nodes[0])
        else:
            (lab.workdir / "cluster.yaml").write_text(json.dumps(doc))
        lab.start()
        ns = lab.nodes[0].ns
        want = str(n)
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", "grep -c '^TCP' /proc/net/ip_vs"],
                                        capture_output=True, text=True).stdout.strip() == want,
                 600, f"{n} services in IPVS", step=0.5)
        wait_for(lambda: lab.status(lab.nodes[0]).get("ready") is True and lab.established(lab.nodes[0]) == set()
                 and (lab.status(lab.nodes[0]).get("services") or {}).get("virtualServers") == n,
                 300, "the agent ready with every service", step=0.5)
        time.sleep(5)  # settle: one more sync and status write
        agent = lab.nodes[0].proc
        assert agent is not None
        a_rss, a_hwm = mem(agent.pid)
        e_rss = e_hwm = 0
        for c in children(agent.pid):
            try:
                r, h = mem(c)
            except (OSError, KeyError):
                continue
            e_rss, e_hwm = e_rss + r, e_hwm + h
        return {"services": n, "agent_rss": a_rss, "agent_peak": a_hwm, "exabgp_rss": e_rss, "exabgp_peak": e_hwm}
    finally:
        lab.close()
        if api is not None:
            api.terminate()
            api.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", default="0,1000,5000")
    ap.add_argument("--source", default="file,kubernetes")
    args = ap.parse_args()
    print(f"{'source':>10} {'services':>8} {'agent RSS':>10} {'agent peak':>11} {'ExaBGP+relay RSS':>17} {'peak':>6}"
          "   (MiB)")
    for source in args.source.split(","):
        for n in (int(x) for x in args.services.split(",")):
            r = run(n, source)
            print(f"{source:>10} {r['services']:>8} {r['agent_rss']:>10} {r['agent_peak']:>11} {r['exabgp_rss']:>17} "
                  f"{r['exabgp_peak']:>6}", flush=True)


if __name__ == "__main__":
    main()
