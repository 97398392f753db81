"""NetworkPolicy benchmark: 1,000 policies over 5,000 pods, from scratch and per pod change, ours vs
the same policies as iptables + ipset (iptables-restore / ipset restore), in the same kernel.

Needs a kernel with nf_tables' inet family, ipset and iptables (this machine's own kernel has them; the
UML lab kernel has no inet nftables). Everything happens in a throwaway network namespace, which is
removed at the end; no packet is sent:

    .venv/bin/python bench/policy_bench.py [--pods 5000] [--policies 100,1000] [--changes 200]

Workload (seeded): 100 namespaces x 50 pods spread over 50 nodes (this node holds 100 of them); pods
carry app (20 values), tier (web/db/cache) and named ports http/metrics/pg. Policies come in groups of
20 per namespace (so 100 policies = namespaces 0-4, 1,000 = namespaces 0-49): default-deny ingress,
app-to-app on ports and port ranges, from a partner namespace (by name label) or from monitoring
namespaces (namespaceSelector), ipBlock with except, egress to databases on a named port, egress deny.
The pod that changes lives in namespace 0, so it is selected by the same policies at 100 and at 1,000:
the difference is 900 policies elsewhere, which a per-change cost must not feel.

Printed per policy count: from scratch (model build, text render, `nft -f` load; for the baseline
`ipset restore` + `iptables-restore`), and the median of --changes runs of one pod add, label change
and delete on this node: ours = model update + per-key plan + one nfnetlink batch (what the agent
does); baseline = `ipset -exist restore` of the same element changes + `iptables-restore --noflush`
of the per-pod dispatch rule (iptables has no verdict maps: one rule per isolated pod, as kube-router
has), for iptables-legacy and iptables-nft.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NODE = "node-0"
NAMESPACES, NODES, APPS = 100, 50, 20


def workload(n_pods: int, seed: int = 7) -> tuple[dict, dict]:
    from fabric.inputs import NamespaceInfo, PodInfo

    rnd = random.Random(seed)
    nss = {}
    for i in range(NAMESPACES):
        labels = {"kubernetes.io/metadata.name": f"ns-{i}", "team": f"t{i % 7}"}
        if i % 25 == 24:
            labels["monitoring"] = "true"
        nss[f"ns-{i}"] = NamespaceInfo(f"ns-{i}", labels)
    pods = {}
    for j in range(n_pods):
        ns = f"ns-{j % NAMESPACES}"
        ports = (("http", "TCP", 8080), ("metrics", "TCP", 9090)) + ((("pg", "TCP", 5432),) if j % 3 == 1 else ())
        p = PodInfo(ns, f"p{j}", {"app": f"a{rnd.randrange(APPS)}", "tier": ("web", "db", "cache")[j % 3]},
                    f"node-{j % NODES}", (f"10.{40 + j // 65000}.{(j // 250) % 256}.{j % 250 + 1}",), "Running",
                    False, ports)
        pods[p.key] = p
    return pods, nss


def policies(n: int) -> list[dict[str, Any]]:
    out = []
    for k in range(n):
        i, t = divmod(k, 20)
        ns, a, b = f"ns-{i}", f"a{t % APPS}", f"a{(t + 1) % APPS}"
        app = {"matchLabels": {"app": a}}
        spec: dict[str, Any]
        if t == 0:
            spec = {"podSelector": {}, "policyTypes": ["Ingress"]}
        elif t % 6 == 1:
            spec = {"podSelector": app, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": b}}}],
                                                     "ports": [{"port": 8080}, {"port": 8000, "endPort": 8100}]}]}
        elif t % 6 == 2:
            spec = {"podSelector": app, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": f"ns-{(i + 1) % NAMESPACES}"}}, "podSelector": {"matchLabels": {"app": a}}}]}]}
        elif t % 6 == 3:
            spec = {"podSelector": {"matchLabels": {"tier": "web"}}, "ingress": [{
                "from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{t}.0.0/16"]}}],
                "ports": [{"port": 80}, {"port": 443}]}]}
        elif t % 6 == 4:
            spec = {"podSelector": app, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"monitoring": "true"}}}],
                                                     "ports": [{"port": "metrics"}]}]}
        else:
            spec = {"podSelector": app, "policyTypes": ["Egress"], "egress": [
                {"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}], "ports": [{"port": "pg"}]},
                {"ports": [{"port": 53, "protocol": "UDP"}]}]}
        out.append({"metadata": {"name": f"np-{t}", "namespace": ns}, "spec": spec})
    return out


def build(n_pol: int, pods: dict, nss: dict):
    from fabric.policy.model import parse_policy
    from fabric.policy.state import PolicyState

    s = PolicyState(NODE)
    for name, ns in nss.items():
        s.set_namespace(name, ns)
    for p in policies(n_pol):
        pol = parse_policy(p)
        s.set_policy(pol.key, pol)
    for key, pod in pods.items():
        s.set_pod(key, pod)
    return s


def sh(*cmd: str, text: str | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, input=text, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {r.stderr.strip()[:500]}")
    return time.perf_counter() - t


# ---- the iptables + ipset rendering of the same desired state --------------------------------------

def ipt_name(name: str) -> str:
    """iptables chain / ipset names are limited to 28/31 characters."""
    return name[:28]


def ipset_restore(state) -> str:
    lines = []
    for name, elems in sorted(state.sets.items()):
        if name.startswith("port-"):
            lines.append(f"create {ipt_name(name)} hash:ip,port")
            lines += [f"add {ipt_name(name)} {ip},{proto.lower()}:{port}" for ip, proto, port in sorted(elems)]
        else:
            lines.append(f"create {ipt_name(name)} hash:ip")
            lines += [f"add {ipt_name(name)} {ip}" for ip in sorted(elems)]
    return "\n".join(lines) + "\n"


def ipt_rule(chain: str, r, direction: str) -> list[str]:
    from fabric.policy.state import JumpRule

    if isinstance(r, JumpRule):
        d = "dst" if direction == "ingress" else "src"
        return [f"-A {chain} -m set --match-set {ipt_name(r.target_set)} {d} -j {ipt_name(r.chain)}"]
    peer_flag, peer_set = ("-s", "src") if direction == "ingress" else ("-d", "dst")
    m = []
    if r.peer_set:
        m.append(f"-m set --match-set {ipt_name(r.peer_set)} {peer_set}")
    if r.protocol:
        m.append(f"-p {r.protocol.lower()}")
        if r.ranges:
            m.append("-m multiport --dports " + ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in r.ranges))
    if r.named:
        m.append(f"-m set --match-set {ipt_name(r.named)} dst,dst")
    out = []
    for e in r.excepts:  # except: leave this rule's match for those addresses (a sub-chain would be exact)
        out.append(f"-A {chain} {peer_flag} {e} {' '.join(m)} -j RETURN")
    cidr = [f"{peer_flag} {r.cidr}"] if r.cidr else []
    out.append(f"-A {chain} {' '.join(cidr + m)} -j ACCEPT")
    return out


def iptables_restore(state) -> str:
    from fabric.policy.nft import chain_direction
    from fabric.policy.state import MAPS

    chains = sorted(state.chains)
    lines = ["*filter", ":FORWARD ACCEPT [0:0]", ":pol-in-dispatch - [0:0]", ":pol-out-dispatch - [0:0]"]
    lines += [f":{ipt_name(c)} - [0:0]" for c in chains]
    lines += ["-A FORWARD -m conntrack --ctdir REPLY -j ACCEPT", "-A FORWARD -j pol-out-dispatch",
              "-A FORWARD -j pol-in-dispatch"]
    for c in chains:
        d = chain_direction(c)
        for r in state.chains[c]:
            lines += ipt_rule(ipt_name(c), r, d)
        if c.startswith("ns-"):
            lines.append(f"-A {ipt_name(c)} -j DROP")
    for d, m in MAPS.items():
        flag, disp = ("-d", "pol-in-dispatch") if d == "ingress" else ("-s", "pol-out-dispatch")
        lines += [f"-A {disp} {flag} {ip}/32 -j {ipt_name(chain)}" for ip, chain in sorted(state.maps[d].items())]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---- one run inside the namespace --------------------------------------------------------------------

def inner(args: argparse.Namespace) -> int:
    from fabric.inputs import PodInfo
    from fabric.policy import nft
    from fabric.policy.reconcile import NftRunner, PolicyTable
    from fabric.policy.state import MAPS

    pods, nss = workload(args.pods)
    rows: dict[str, dict[int, str]] = {}

    def row(name: str, n: int, value: str) -> None:
        rows.setdefault(name, {})[n] = value

    per_change: dict[str, dict[int, float]] = {}
    for n in [int(x) for x in args.policies.split(",")]:
        sh("nft", "flush", "ruleset")
        t0 = time.perf_counter()
        state = build(n, pods, nss)
        t1 = time.perf_counter()
        text = nft.render_full(state)
        t2 = time.perf_counter()
        load = sh("nft", "-f", "-", text=text)
        row(f"from scratch: model build ({args.pods:,} pods)", n, f"{t1 - t0:.2f} s")
        row("from scratch: nft text render", n, f"{t2 - t1:.2f} s")
        row("from scratch: `nft -f` load", n, f"{load:.2f} s")
        row("from scratch: total", n, f"**{t1 - t0 + t2 - t1 + load:.2f} s**")
        row("table size: sets / chains / isolated local pods", n,
            f"{len(state.sets)} / {len(state.chains)} / {len(state.maps['ingress'])}+{len(state.maps['egress'])}")
        row("set elements", n, f"{sum(map(len, state.sets.values())):,}")
        table = PolicyTable(NftRunner(timeout=120))
        table.apply(state, state.take_dirty(), full=True)

        # one pod on this node in namespace 0: add, relabel, delete (each median of --changes)
        def pod(i: int, app: str) -> PodInfo:
            return PodInfo("ns-0", f"bench-{i}", {"app": app, "tier": "web"}, NODE, (f"10.99.{i // 250}.{i % 250 + 1}",),
                           "Running", False, (("http", "TCP", 8080), ("metrics", "TCP", 9090)))

        times: dict[str, list[float]] = {"add": [], "label": [], "delete": []}
        ours: dict[str, list[float]] = {"add": [], "label": [], "delete": []}  # without the kernel's commit
        elems: dict[str, int] = {}
        for i in range(args.changes):
            for what, p in (("add", pod(i, "a0")), ("label", pod(i, "a1")), ("delete", None)):
                t = time.perf_counter()
                state.set_pod(f"ns-0/bench-{i}", p)
                r = table.apply(state, state.take_dirty())
                times[what].append(time.perf_counter() - t)
                ours[what].append(times[what][-1] - r.kernel_seconds)
                assert r.how in ("elements", "none"), r
                elems[what] = r.counts.get("elements", 0)
        for what, ts in times.items():
            med, mine = statistics.median(ts), statistics.median(ours[what])
            per_change.setdefault(f"ours: {what}", {})[n] = med
            per_change.setdefault(f"ours without the kernel's commit: {what}", {})[n] = mine
            row(f"one pod {what} ({elems[what]} elements): ours, model + plan + nfnetlink commit", n,
                f"{med * 1e3:.3f} ms")
            row(f"one pod {what}: of which ours without the kernel's commit (model + plan + encoding)", n,
                f"{mine * 1e3:.3f} ms")
        # the same change through nft -f text (what one `nft` run costs with this table loaded)
        ts = []
        for i in range(min(args.changes, 10)):
            state.set_pod(f"ns-0/bench-{i}", pod(i, "a0"))
            t = time.perf_counter()
            p = __import__("fabric.policy.reconcile", fromlist=["plan"]).plan(state, table.applied, state.take_dirty())
            sh("nft", "-f", "-", text=nft.render_delta(p))
            table.applied.record(p)
            ts.append(time.perf_counter() - t)
            state.set_pod(f"ns-0/bench-{i}", None)
            table.apply(state, state.take_dirty())
        per_change.setdefault("for comparison: pod add as `nft -f` text", {})[n] = statistics.median(ts)
        row("for comparison: pod add as `nft -f` text", n, f"{statistics.median(ts) * 1e3:.2f} ms")
        table.close()
        sh("nft", "flush", "ruleset")

        # ---- baseline: iptables + ipset, legacy and nft backends ----
        sets_text, rules_text = ipset_restore(state), iptables_restore(state)
        for backend in ("legacy", "nft"):
            restore = f"iptables-{backend}-restore"
            sh("ipset", "destroy") if backend == "nft" else None
            t_set = sh("ipset", "restore", text=sets_text)
            t_rules = sh(restore, text=rules_text)
            row(f"baseline iptables-{backend}: from scratch (ipset restore + iptables-restore)", n,
                f"{t_set + t_rules:.2f} s ({t_set:.2f} + {t_rules:.2f})")
            ts = []
            for i in range(min(args.changes, 10)):
                before = {name: set(v) for name, v in state.sets.items()}
                state.set_pod(f"ns-0/bench-{i}", pod(i, "a0"))
                state.take_dirty()
                added = {name: state.sets[name] - before.get(name, set()) for name in state.sets}
                ip = pod(i, "a0").ips[0]
                t = time.perf_counter()
                lines = [f"add {ipt_name(name)} " + (f"{e[0]},{e[1].lower()}:{e[2]}" if isinstance(e, tuple) else e)
                         for name, es in added.items() for e in es]
                sh("ipset", "-exist", "restore", text="\n".join(lines) + "\n")
                disp = [f"-A {'pol-in-dispatch -d' if d == 'ingress' else 'pol-out-dispatch -s'} {ip}/32 "
                        f"-j {ipt_name(state.maps[d][ip])}" for d in MAPS if ip in state.maps[d]]
                sh(restore, "--noflush", text="*filter\n" + "\n".join(disp) + "\nCOMMIT\n")
                ts.append(time.perf_counter() - t)
                state.set_pod(f"ns-0/bench-{i}", None)
                state.take_dirty()
            per_change.setdefault(f"baseline {backend}: add", {})[n] = statistics.median(ts)
            row(f"one pod add: baseline iptables-{backend} (ipset restore + iptables-restore --noflush)", n,
                f"{statistics.median(ts) * 1e3:.2f} ms")
            sh(f"iptables-{backend}", "-F")
            sh(f"iptables-{backend}", "-X")
        sh("ipset", "destroy")

    ns_ = sorted({n for r in rows.values() for n in r})
    print(f"\n{args.pods:,} pods, {NAMESPACES} namespaces, {NODES} nodes; medians of {args.changes} changes\n")
    print("| | " + " | ".join(f"{n:,} policies" for n in ns_) + " |")
    print("| --- |" + " --- |" * len(ns_))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(r.get(n, "") for n in ns_) + " |")
    if len(ns_) >= 2:
        lo, hi = ns_[0], ns_[-1]
        print(f"\nper-change cost, {hi:,} vs {lo:,} policies:")
        for name, r in per_change.items():
            print(f"  {name}: {r[hi] / r[lo]:.2f}x")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=5000)
    ap.add_argument("--policies", default="100,1000")
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        return inner(args)
    ns = f"polbench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--inner",
               "--pods", str(args.pods), "--policies", args.policies, "--changes", str(args.changes)]
        return subprocess.run(cmd).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
