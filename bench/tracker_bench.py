"""Change tracker cost: a relist of N Services + N EndpointSlices into the Store, typed compare vs `==`.

    .venv/bin/python bench/tracker_bench.py [--services 10000] [--endpoints 10] [--runs 5]

The Store drops no-op changes by comparing each incoming object with the one it holds. Python's `==`
says `0 == False`, so the tracker compares with types (fabric.tracker.same: `==`, then a walk of the
leaves' types only when `==` said equal). Printed per case (median of --runs, pure Python, no kernel):
`replace()` of the whole kind when nothing changed (every object compared equal: the walk's worst case),
when one object changed, and the `==` the tracker used before, for the ratio.
"""

from __future__ import annotations

import argparse
import copy
import operator
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabric import tracker  # noqa: E402


def service(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": "bench", "labels": {"app": f"a{i}"},
                         "resourceVersion": str(1000 + i)},
            "spec": {"type": "LoadBalancer", "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30000 + i % 2000}],
                     "selector": {"app": f"a{i}"}, "externalTrafficPolicy": "Local", "sessionAffinity": "None",
                     "publishNotReadyAddresses": False},
            "status": {"loadBalancer": {"ingress": [{"ip": f"10.97.{i // 250}.{i % 250 + 1}"}]}}}


def endpoint_slice(i: int, endpoints: int) -> dict:
    return {"metadata": {"name": f"svc-{i}-x", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.{128 + i // 65536}.{i // 256 % 256}.{(i + e) % 250 + 1}"],
                           "conditions": {"ready": True, "serving": True, "terminating": False},
                           "nodeName": f"node-{e}"} for e in range(endpoints)]}


def timed(fn, runs: int) -> float:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    kinds = {"Service": {f"bench/svc-{i}": service(i) for i in range(a.services)},
             "EndpointSlice": {f"bench/svc-{i}-x": endpoint_slice(i, a.endpoints) for i in range(a.services)}}
    typed = tracker.same
    print(f"{a.services} Services + {a.services} EndpointSlices ({a.endpoints} endpoints each), median of {a.runs}")
    print(f"{'case':44} {'== (before)':>12} {'typed (now)':>12} {'ratio':>6}")
    for kind, objs in kinds.items():
        rows = []
        for label, mutate in (("relist, nothing changed", None), ("relist, one object changed", 0)):
            times = []
            for compare in (operator.eq, typed):
                tracker.same = compare  # the Store looks `same` up at call time
                store = tracker.Store(default_consumer=False)
                store.replace(kind, objs)
                again = copy.deepcopy(objs)  # new objects, as a relist decodes them
                if mutate is not None:
                    k = next(iter(again))
                    again[k] = copy.deepcopy(again[k])
                    again[k]["metadata"]["labels"]["changed"] = "yes"
                times.append(timed(lambda: store.replace(kind, again) if mutate is None
                                   else (store.replace(kind, again), store.replace(kind, objs)), a.runs))
            rows.append((f"{kind}: {label}", *times))
        for label, before, now in rows:
            print(f"{label:44} {before * 1000:10.1f}ms {now * 1000:10.1f}ms {now / before:6.2f}")
    tracker.same = typed


if __name__ == "__main__":
    main()
