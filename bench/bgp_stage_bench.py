"""The BGP stage's run for one EndpointSlice change, at N Services (the cost per endpoint change).

    .venv/bin/python bench/bgp_stage_bench.py --services 1000 10000 [--nodes 50] [--runs 21]

The stage (fabric.stages.bgp.BgpStage) runs with the real Speaker (bgp.speaker.Speaker, not started: the
diff it computes is real, nothing is sent), a real Store and RIB, a node with one external ToR and
`--nodes` mesh neighbors, N Services of type LoadBalancer with externalTrafficPolicy Local, each with one
EndpointSlice, half of them with a ready endpoint on this node (so half the /32s are announced).
Timed: one slice's endpoint flips between this node and another (its /32 comes or goes), then the
stage's run for that change; the median of --runs such changes. Pure Python, no kernel.

The bench imports the code from PYTHONPATH first, so the same bench measures an older tree:
    git archive REV fabric bgp loadbalancer ipip | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base .venv/bin/python bench/bgp_stage_bench.py --services 1000 10000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: an older tree can be measured

from bgp.rib import Rib  # noqa: E402
from bgp.speaker import Speaker  # noqa: E402
from fabric import config as cfgmod  # noqa: E402
from fabric.inputs import NodeInfo  # noqa: E402
from fabric.stage import StageInput  # noqa: E402
from fabric.stages.bgp import BgpStage  # noqa: E402
from fabric.tracker import Store  # noqa: E402


def service(i: int) -> dict:
    return {"metadata": {"name": f"svc-{i}", "namespace": "bench"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30000 + i % 2000}]},
            "status": {"loadBalancer": {"ingress": [{"ip": f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"}]}}}


def endpoint_slice(i: int, node: str) -> dict:
    return {"metadata": {"name": f"svc-{i}-x", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.244.{i // 250 % 250}.{i % 250 + 1}"],
                           "conditions": {"ready": True}, "nodeName": node}]}


class Agent:
    """What the stage reads of the agent."""

    def __init__(self, cfg: Any, speaker: Speaker) -> None:
        self.cfg, self.speaker = cfg, speaker
        self.store = Store(default_consumer=False)
        self.store.subscribe("bgp", BgpStage.kinds)
        self.rib = Rib()
        self.desired_known = True
        self.neighbors: list = []

    def neighbors_changed(self, neighbors: list) -> None:
        self.neighbors = list(neighbors)


async def bench(n: int, nodes: int, runs: int) -> tuple[float, float, int]:
    cfg = cfgmod.parse({"node": {"name": "n0", "address": "10.0.0.10/16"}, "pools": [{"cidr": "10.244.0.0/16"}],
                        "source": {"kind": "file", "path": "c.yaml"},
                        "peers": [{"name": "tor", "address": "10.0.0.1", "asn": 65000}],
                        "advertise": {"serviceLoadBalancerIPs": ["10.100.0.0/14"]}})
    with tempfile.TemporaryDirectory() as tmp:
        sp = Speaker(Path(tmp), lambda ev: None)
        a = Agent(cfg, sp)
        for k in range(nodes + 1):
            a.store.upsert("Node", f"n{k}", NodeInfo(name=f"n{k}", address=f"10.0.{1 + k // 250}.{k % 250 + 10}"
                                                     if k else "10.0.0.10", podCIDRs=[f"10.245.{k}.0/24"]))
        for i in range(n):
            a.store.upsert("Service", f"bench/svc-{i}", service(i))
            a.store.upsert("EndpointSlice", f"bench/svc-{i}-x", endpoint_slice(i, "n0" if i % 2 else "n1"))
        stage = BgpStage(a)
        t = time.perf_counter()
        await stage.run(StageInput(a.store.take("bgp"), True, 0.0, True), None)
        first = time.perf_counter() - t
        times = []
        for r in range(runs):
            i = (r * 7919) % n  # spread over the services; even ones move here, odd ones away
            a.store.upsert("EndpointSlice", f"bench/svc-{i}-x", endpoint_slice(i, "n1" if i % 2 else "n0"))
            t = time.perf_counter()
            await stage.run(StageInput(a.store.take("bgp"), False, 0.0, True), None)
            times.append(time.perf_counter() - t)
        return first, statistics.median(times), len(sp._announced)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    import fabric.stages.bgp as mod
    print(f"stage from {mod.__file__}")
    print(f"{'services':>9} {'first full run':>15} {'one endpoint change':>20} {'announced':>10}")
    for n in args.services:
        first, one, announced = asyncio.run(bench(n, args.nodes, args.runs))
        print(f"{n:>9} {first * 1e3:>12.1f} ms {one * 1e3:>17.3f} ms {announced:>10}")


if __name__ == "__main__":
    main()
