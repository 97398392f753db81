"""The route adapter against a real kernel: apply, read back equal, idempotent, foreign routes untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import pytest

pytestmark = pytest.mark.kernel

SCRIPT = textwrap.dedent('''
    import json, ipaddress as ip
    from ipip.kernel import RouteKernel
    from ipip.model import NextHop, Route, diff_routes, desired_routes, NodeFacts
    from fabric.config import Pool, IPIPMode
    N, A = ip.IPv4Network, ip.IPv4Address
    k = RouteKernel(proto=80, table=254, tunnel_device="tunl0")
    view = k.read(A("10.0.1.11"))
    out = {"facts": [str(view.facts.network), view.facts.device, view.facts.mtu, str(view.kernel_prefix)],
           "underlay": sorted(str(r.dst) for r in view.facts.routes)}
    plan = desired_routes(facts=view.facts, pools=[Pool(cidr=N("10.244.0.0/16"), ipip_mode=IPIPMode.CROSS_SUBNET)],
                          local_pod_cidrs=[N("10.244.1.0/24")],
                          learned={N("10.244.2.0/24"): {("a2", A("10.0.1.12"))},
                                   N("10.244.3.0/24"): {("b1", A("10.0.2.21"))},
                                   N("10.244.9.0/24"): {("a2", A("10.0.1.12")), ("b1", A("10.0.2.21"))}})
    view = k.ensure_tunnel(plan.tunnel_mtu, view)
    errs = k.apply(diff_routes(plan.routes, view.owned), view.ifindex)
    out["errors"] = [e.error for e in errs]
    view2 = k.read(A("10.0.1.11"))
    out["readback_equal"] = {str(d): view2.owned.get(d) is not None and view2.owned[d].key() == r.key()
                             for d, r in plan.routes.items()}
    out["second_diff_empty"] = not diff_routes(plan.routes, view2.owned)
    out["tunnel"] = view2.tunnel
    # drop everything learned: only the blackhole stays; the foreign route is untouched
    plan3 = desired_routes(facts=view2.facts, pools=[], local_pod_cidrs=[N("10.244.1.0/24")], learned={})
    errs = k.apply(diff_routes(plan3.routes, view2.owned), view2.ifindex)
    out["errors3"] = [e.error for e in errs]
    out["owned_after"] = sorted(str(d) for d in k.read(A("10.0.1.11")).owned)
    print(json.dumps(out))
''')


@pytest.fixture
def ns():
    name = f"rk-{uuid.uuid4().hex[:6]}"
    sh = lambda c: subprocess.run(["ip", "netns", "exec", name, "sh", "-c", c], check=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        sh("ip link set lo up; ip link add eth1 type veth peer name peer1; ip link set eth1 up; ip link set peer1 up;"
           "ip addr add 10.0.1.11/24 dev eth1; ip route add default via 10.0.1.1;"
           "ip route add 192.168.77.0/24 via 10.0.1.1 proto static")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_apply_readback_idempotent_and_owned_only(ns: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["facts"] == ["10.0.1.0/24", "eth1", 1500, "10.0.1.11/24"]
    assert "0.0.0.0/0" in out["underlay"] and "192.168.77.0/24" in out["underlay"]
    assert out["errors"] == []
    assert out["readback_equal"] == {"10.244.1.0/24": True, "10.244.2.0/24": True, "10.244.3.0/24": True,
                                     "10.244.9.0/24": True}
    assert out["second_diff_empty"] is True
    assert out["tunnel"] == {"up": True, "mtu": 1480}
    assert out["errors3"] == []
    assert out["owned_after"] == ["10.244.1.0/24"]
    shown = subprocess.run(["ip", "-n", ns, "route", "show"], capture_output=True, text=True).stdout
    assert "192.168.77.0/24 via 10.0.1.1" in shown  # not ours: untouched
    assert "blackhole 10.244.1.0/24 proto 80" in shown
