"""Agents as route reflectors (mesh off), as operators run it: labs/route-reflectors.clab.yml through `fabric lab
run`'s runner, in this kernel-test boot. 2 reflector nodes of one cluster, 6 clients in two racks, a tor (FRR)
peering with every node, one pod per node made through the node's CNI plugin.

What its checks file holds and this test insists on: every session Established (clients with the two reflectors
and the tor only, by /metrics), every pod pings every other pod (direct in a rack, IPIP across, next hops kept:
the reflectors are not in the data path), each reflector's status (6 clients, 1 non-client, 7 prefixes
reflected, the other reflector's reflections dropped as loops), the tor's FRR RIB with exactly one path per pod
CIDR from its owner node (and 8 routes in all), and kill -9 of one reflector (its agent; its ExaBGP dies with
it) while pod-a1 pings pod-b3 at 200/s: no packet lost although the killed reflector's routes leave the clients
(graceful-restart time 3 s, back after 8 s): the other reflector carries them.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from fabric.lab import runner

pytestmark = pytest.mark.kernel

LAB = Path(__file__).resolve().parents[2] / "labs" / "route-reflectors.clab.yml"
# node, its address, its pod CIDR (labs/route-reflectors/cluster.yaml)
NODES = [(n, f"10.0.{r}.1{i}", f"10.244.{r}{i}.0/24") for r, rack in ((1, "a"), (2, "b"))
         for i, n in enumerate((f"rr-{rack}", f"node-{rack}1", f"node-{rack}2", f"node-{rack}3"))]


def test_route_reflector_lab_passes(tmp_path: Path) -> None:
    out = io.StringIO()
    rc = runner.run(LAB, timeout=300, out=out, report_dir=tmp_path / "report")
    text = out.getvalue()
    assert rc == 0, text
    assert "verdict: PASS" in text
    for node in ("tor", *(n for n, _, _ in NODES)):
        assert re.search(rf"bgp {node}: every session Established +pass", text), (node, text)
    pods = [f"pod-{n.removeprefix('node-')}" for n, _, _ in NODES]
    for s in pods:
        for d in pods:
            if s != d:
                assert re.search(rf"ping {s} -> {d} +pass", text), (s, d)
    for node, addr, cidr in NODES:
        assert re.search(rf"route tor: {re.escape(cidr)} via {re.escape(addr)} kind direct +pass", text), (node, text)
        assert re.search(rf"command tor: vtysh -c 'show bgp ipv4 unicast {re.escape(cidr)}' +pass", text), cidr
    assert re.search(r"command rr-a: fabric status --json +pass .* matched 4 pattern", text)
    assert re.search(r"metric node-b3: bgp_fabric_bgp_peer_up == 3 +pass", text)
    # the reflector kill: a real cut of rr-a, traffic between two clients at (up to) 200/s, none lost
    row = next(ln for ln in text.split("faults (")[1].splitlines() if ln.startswith("  kill -9 reflector rr-a"))
    m = re.search(r"pod-a1 -> pod-b3 @ 200/s +0/(\d+) ", row)
    assert m and int(m.group(1)) > 1000 and row.endswith("pass"), row
