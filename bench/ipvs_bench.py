"""IPVS benchmark: bulk load vs `ipvsadm -R`, and the cost of one endpoint change vs number of services.

Run in a kernel with IPVS (the lab kernel here):

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/ipvs_bench.py [--services 10000] [--sizes 100,1000,10000]

Everything happens in a throwaway network namespace that is removed at the end. Absolute times in
the lab kernel are 6-10x the host's; compare the ratios printed, which are measured in the same kernel.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabric.config import ServiceSettings  # noqa: E402
from fabric.tracker import Store  # noqa: E402
from loadbalancer import ipvs_kernel as k  # noqa: E402
from loadbalancer.proxy import ServiceProxy  # noqa: E402
from loadbalancer.types import RealServer, VirtualServer  # noqa: E402


def vip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.0") + i + 1)


def ep(i: int, j: int) -> str:
    return str(ipaddress.IPv4Address("10.244.0.0") + 3 * i + j + 1)


def virtual_servers(n: int) -> list[VirtualServer]:
    return [VirtualServer("TCP", vip(i), 80, "rr", 0, tuple(RealServer(ep(i, j), 8080, 1) for j in range(3)))
            for i in range(n)]


class Netns:
    def __init__(self) -> None:
        self.name = f"ipvsbench-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)  # masq dests need lo up

    def ex(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=True, capture_output=True, **kw)

    def count(self) -> tuple[int, int]:
        out = self.ex("ipvsadm", "-Ln", text=True).stdout.splitlines()
        return (sum(1 for l in out if l.startswith("TCP")), sum(1 for l in out if l.strip().startswith("->") and
                                                                 "RemoteAddress" not in l))

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def bulk(n: int) -> None:
    vss = virtual_servers(n)
    ns = Netns()
    try:
        adapter = k.KernelAdapter(ns.name, "fabric-svc")
        ops = [k.op_add_vs(v) for v in vss] + [k.op_add_real(v.key, r) for v in vss for r in v.reals]
        t = time.perf_counter()
        errors = adapter.ipvs_run(ops)
        ours = time.perf_counter() - t
        assert not errors, errors[:3]
        assert ns.count() == (n, 3 * n), ns.count()
        t = time.perf_counter()
        dump = adapter.ipvs_dump()
        dump_t = time.perf_counter() - t
        assert len(dump) == n
        adapter.close()
        ns.ex("ipvsadm", "-C")
        rules = "".join(f"-A -t {v.addr}:{v.port} -s rr\n" + "".join(
            f"-a -t {v.addr}:{v.port} -r {r.addr}:{r.port} -m -w 1\n" for r in v.reals) for v in vss)
        with tempfile.TemporaryFile("w+") as f:
            f.write(rules)
            f.seek(0)
            t = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", ns.name, "ipvsadm", "-R"], stdin=f, check=True)
            theirs = time.perf_counter() - t
        assert ns.count() == (n, 3 * n)
        print(f"bulk load {n} services x 3 dests: pipelined netlink {ours:.2f}s, ipvsadm -R {theirs:.2f}s, "
              f"ratio ours/ipvsadm {ours / theirs:.2f}; full dump {dump_t:.2f}s")
    finally:
        ns.delete()


def endpoint_change(n: int, changes: int) -> float:
    """Median seconds for plan+apply of one endpoint change with n services present."""
    ns = Netns()
    store = Store()
    proxy = ServiceProxy(ServiceSettings(), "node-a", ["192.168.100.1"], netns=ns.name)
    try:
        for i in range(n):
            store.upsert("Service", f"d/s{i}", {"metadata": {"name": f"s{i}", "namespace": "d"}, "spec": {
                "clusterIP": vip(i), "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}})
            store.upsert("EndpointSlice", f"d/s{i}-1", slice_for(i, 3))
        t = time.perf_counter()
        res = proxy.apply(proxy.plan(store, store.take()))
        full = time.perf_counter() - t
        assert not [e for s, e in res.errors.items() if s != "(node)"], str(res)
        times = []
        counts = {}
        for c in range(changes):
            i = (c * 7919) % n
            counts[i] = 2 if counts.get(i, 3) == 3 else 3  # remove or add back one endpoint
            store.upsert("EndpointSlice", f"d/s{i}-1", slice_for(i, counts[i]))
            t = time.perf_counter()
            plan = proxy.plan(store, store.take())
            r = proxy.apply(plan)
            times.append(time.perf_counter() - t)
            assert plan.kernel_ops() == 1 and r.ok, (str(plan), str(r))
        med = statistics.median(times)
        print(f"{n} services: full sync {full:.2f}s; one endpoint change (plan+apply) median {med * 1000:.2f} ms "
              f"over {changes}")
        return med
    finally:
        proxy.close()
        ns.delete()


def slice_for(i: int, count: int) -> dict:
    return {"metadata": {"name": f"s{i}-1", "namespace": "d", "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ep(i, j)], "conditions": {"ready": True}} for j in range(count)]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--changes", type=int, default=20)
    a = p.parse_args()
    bulk(a.services)
    sizes = [int(s) for s in a.sizes.split(",")]
    meds = {n: endpoint_change(n, a.changes) for n in sizes}
    base = meds[sizes[0]]
    print("endpoint change cost relative to", sizes[0], "services:",
          ", ".join(f"{n}: {m / base:.2f}x" for n, m in meds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
