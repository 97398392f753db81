"""Pod ADD latency: bgp-fabric's CNI plugin vs the Debian reference plugins (ptp + host-local).

Run in the lab kernel (both plugins in the same kernel, one after the other):

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/cni_bench.py [--pods 50] [--rounds 3]

Everything lives in throwaway namespaces: a node namespace (10.0.1.11/24 on a veth) running the real
agent (`fabric agent`, file source, one node, cni enabled, IPAM state on tmpfs), and one namespace
per pod. Each plugin is run exactly as libcni runs it (CNI_* environment, the plugin configuration on
stdin, in the node's network namespace), timed from before the exec to its exit:

- alone: N ADDs one after the other (each pod the only one being added), then N DELs;
- at once: N ADDs started together (as kubelet starting N pods), then N DELs together.

Rows: `bgp-fabric` (the C plugin + the agent over its unix socket) and `ptp+host-local` (Debian's
containernetworking-plugins 1.1.1: ptp execs host-local for IPAM, file-locked store on tmpfs; the
configuration a kube-router-like setup would use, minus portmap). Also printed: the cost of starting
an interpreter (`python3 -I -S -c pass`), the floor a plugin written in Python would pay per call.
Results are checked: every ADD exits 0 and every pod has its address; DELs leave nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REF = Path("/usr/lib/cni")
NODE_IP = "10.0.1.11"


def sh(cmd: str) -> str:
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd!r}: {r.stderr.strip()}")
    return r.stdout


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Setup:
    def __init__(self, pods: int) -> None:
        from cni.build import plugin

        self.tag = uuid.uuid4().hex[:4]
        self.node = f"cb-node-{self.tag}"
        self.dir = Path(tempfile.mkdtemp(prefix="cni-bench-", dir="/run"))
        self.pods = [f"cb-p{i}-{self.tag}" for i in range(pods)]
        self.plugin = str(plugin())
        self.agent: subprocess.Popen | None = None
        sh(f"ip netns add {self.node}; ip -n {self.node} link set lo up;"
           f"ip -n {self.node} link add eth1 type veth peer name peer1;"
           f"ip -n {self.node} link set eth1 up; ip -n {self.node} link set peer1 up;"
           f"ip -n {self.node} addr add {NODE_IP}/24 dev eth1")
        for p in self.pods:
            sh(f"ip netns add {p}")

    def start_agent(self) -> dict:
        import yaml

        (self.dir / "cluster.yaml").write_text(yaml.safe_dump(
            {"nodes": [{"name": "n1", "address": NODE_IP, "podCIDRs": ["10.244.1.0/24"]}]}))
        (self.dir / "node.yaml").write_text(yaml.safe_dump({
            "node": {"name": "n1", "address": f"{NODE_IP}/24", "podCIDRs": ["10.244.1.0/24"]},
            "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}],
            "services": {"enabled": False}, "health": {"listen": None},
            "source": {"kind": "file", "path": "cluster.yaml"}, "paths": {"runDir": "run"},
            "cni": {"enabled": True, "confDir": str(self.dir / "net.d"), "stateDir": str(self.dir / "state"),
                    "socket": str(self.dir / "cni.sock")}}))
        log = open(self.dir / "agent.log", "ab")
        self.agent = subprocess.Popen(["ip", "netns", "exec", self.node, str(Path(sys.executable).parent / "fabric"),
                                       "agent", "-c", str(self.dir / "node.yaml")], stdout=log, stderr=log,
                                      start_new_session=True)
        conf = self.dir / "net.d" / "10-bgp-fabric.conflist"
        deadline = time.monotonic() + 120
        while not conf.exists():
            if time.monotonic() > deadline or self.agent.poll() is not None:
                raise RuntimeError("agent did not write its conflist:\n" + (self.dir / "agent.log").read_text()[-2000:])
            time.sleep(0.2)  # bench setup only
        return json.loads(conf.read_text())

    def close(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            os.killpg(self.agent.pid, 9)
            self.agent.wait()
        for ns in [*self.pods, self.node]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def plugin_conf(conflist: dict) -> dict:
    p = dict(conflist["plugins"][0])
    p.pop("capabilities", None)
    return {**p, "name": conflist["name"], "cniVersion": conflist["cniVersion"]}


def run_plugin(node: str, exe: str, command: str, conf: dict, cid: str, netns: str, cni_path: str) -> tuple[float, int, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{netns}", "CNI_IFNAME": "eth0",
           "CNI_PATH": cni_path, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    data = json.dumps(conf).encode()
    # In the node's network namespace, as the node's runtime runs it (setns happens before the clock starts).
    t0 = time.perf_counter()
    r = subprocess.run(["nsenter", f"--net=/run/netns/{node}", exe], env=env, input=data, capture_output=True)
    return time.perf_counter() - t0, r.returncode, r.stdout.decode(errors="replace")


def measure(s: Setup, name: str, exe: str, conf: dict, cni_path: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"alone": [], "alone-del": [], "at once": [], "at once-del": []}
    cid = lambda i: f"{name.replace('+', '-')}-{i}"  # noqa: E731 - container IDs: letters, digits, _.-

    def one(kind: str, command: str, i: int) -> None:
        dt, rc, text = run_plugin(s.node, exe, command, conf, cid(i), s.pods[i], cni_path)
        if rc != 0:
            raise RuntimeError(f"{name} {command} {i}: exit {rc}: {text[:300]}")
        out[kind].append(dt)

    for i in range(len(s.pods)):
        one("alone", "ADD", i)
    check(s, True)
    for i in range(len(s.pods)):
        one("alone-del", "DEL", i)
    check(s, False)
    for kind, command in (("at once", "ADD"), ("at once-del", "DEL")):
        errors: list[BaseException] = []

        def run(i: int, kind: str = kind, command: str = command) -> None:
            try:
                one(kind, command, i)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(s.pods))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[f"{kind} wall"] = [time.perf_counter() - t0]
        if errors:
            raise errors[0]
        check(s, command == "ADD")
    return out


def check(s: Setup, added: bool) -> None:
    for p in s.pods:
        has = "inet 10.244.1." in sh(f"ip -n {p} -4 addr show")
        if has != added:
            raise RuntimeError(f"{p}: address {'missing' if added else 'left behind'}")


def python_start(n: int = 10) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows: dict[str, dict[str, list[float]]] = {}
    s = Setup(args.pods)
    try:
        ours = plugin_conf(s.start_agent())
        ref = {"cniVersion": "1.0.0", "name": "ref", "type": "ptp", "mtu": 1480,
               "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]], "dataDir": str(s.dir / "hl"),
                        "routes": [{"dst": "0.0.0.0/0"}]}}
        for r in range(args.rounds):
            for name, exe, conf, path in (("bgp-fabric", s.plugin, ours, str(s.dir)),
                                          ("ptp+host-local", str(REF / "ptp"), ref, str(REF))):
                res = measure(s, name, exe, conf, path)
                row = rows.setdefault(name, {})
                for k, v in res.items():
                    row.setdefault(k, []).extend(v)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        rows["python3 -I -S -c pass"] = {"alone": python_start()}
    finally:
        s.close()
    print(f"\npods: {args.pods}, rounds: {args.rounds} (latency per plugin run, milliseconds)")
    print(f"{'plugin':24} {'ADD alone p50/p99':>18} {'DEL alone p50/p99':>18} {'ADD 50 at once p50/p99':>23}"
          f" {'wall':>6} {'DEL at once p50/p99':>20}")
    for name, row in rows.items():
        def f(k: str) -> str:
            xs = row.get(k)
            return f"{pct(xs, 50) * 1000:.0f} / {pct(xs, 99) * 1000:.0f}" if xs else "-"
        wall = f"{statistics.median(row['at once wall']) * 1000:.0f}" if "at once wall" in row else "-"
        print(f"{name:24} {f('alone'):>18} {f('alone-del'):>18} {f('at once'):>23} {wall:>6} {f('at once-del'):>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
