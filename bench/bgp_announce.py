"""BGP announce benchmark: N prefixes from one Speaker to another, bulk commands vs one command per route.

Run in a kernel with network namespaces (the lab kernel here, where nothing leaves the machine):

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/bgp_announce.py [--prefixes 5000]

Two namespaces joined by a veth each run a Speaker (bgp.cli_probe, real ExaBGP). For each mode the
sender announces N /24s in one set_announcements call; we time until the receiver reported all N
(RoutesAnnounced events), then until it reported all N withdrawn. Absolute times in the lab kernel are
6-10x the host's; compare the ratios, measured in the same kernel.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bgp.cli_probe import ProbeClient  # noqa: E402

A_IP, B_IP = "10.99.0.1", "10.99.0.2"


def prefixes(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("10.128.0.0"))
    return [f"{ipaddress.IPv4Address(base + (i << 8))}/24" for i in range(n)]


def one_run(n: int, chunk: int) -> tuple[float, float]:
    tag = uuid.uuid4().hex[:6]
    a_ns, b_ns = f"bba-{tag}", f"bbb-{tag}"
    dirs = [tempfile.mkdtemp(prefix="bgp-bench-") for _ in range(2)]
    probes: list[ProbeClient] = []
    try:
        for ns in (a_ns, b_ns):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", f"va{tag}", "netns", a_ns, "type", "veth", "peer", "name", f"vb{tag}",
                        "netns", b_ns], check=True)
        for ns, dev, ip in ((a_ns, f"va{tag}", A_IP), (b_ns, f"vb{tag}", B_IP)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        os.environ["BGP_PROBE_CHUNK"] = str(chunk)
        a = ProbeClient(a_ns, dirs[0])
        probes.append(a)
        del os.environ["BGP_PROBE_CHUNK"]
        b = ProbeClient(b_ns, dirs[1])
        probes.append(b)

        def nb(name: str, me: str, peer: str) -> dict:
            return dict(name=name, peer_address=peer, peer_as=64512, local_as=64512, local_address=me,
                        router_id=me, hold_time=90, graceful_restart_time=120)

        a.request({"op": "neighbors", "neighbors": [nb("b", A_IP, B_IP)]}, 120)
        b.request({"op": "neighbors", "neighbors": [nb("a", B_IP, A_IP)]}, 120)
        b.wait_for(lambda o: o.get("event") == "EndOfRib", 120)
        routes = [{"prefix": p, "next_hop": "self"} for p in prefixes(n)]

        def count(kind: str, after: int) -> int:
            return sum(len(o.get("prefixes", [])) for o in b.events(kind, after=after))

        m = b.mark()
        t0 = time.monotonic()
        a.send({"op": "announce", "routes": routes})
        b.wait_for(lambda o: o.get("event") == "RoutesAnnounced" and count("RoutesAnnounced", m) >= n, 600, after=m)
        t_announce = time.monotonic() - t0
        m = b.mark()
        t0 = time.monotonic()
        a.send({"op": "announce", "routes": []})
        b.wait_for(lambda o: o.get("event") == "RoutesWithdrawn" and count("RoutesWithdrawn", m) >= n, 600, after=m)
        t_withdraw = time.monotonic() - t0
        return t_announce, t_withdraw
    finally:
        for p in probes:
            p.close()
        for ns in (a_ns, b_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefixes", type=int, default=5000)
    args = ap.parse_args()
    n = args.prefixes
    bulk = one_run(n, 500)
    single = one_run(n, 1)
    print(f"{n} prefixes, speaker -> speaker (seconds until the receiver reported them all)")
    print(f"  bulk (500 a command):  announce {bulk[0]:7.2f}  withdraw {bulk[1]:7.2f}")
    print(f"  one command a route:   announce {single[0]:7.2f}  withdraw {single[1]:7.2f}")
    print(f"  ratio one-a-route/bulk: announce {single[0] / bulk[0]:.1f}x  withdraw {single[1] / bulk[1]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
