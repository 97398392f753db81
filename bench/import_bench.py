"""Taking 10,000 prefixes from one peer into the kernel: bgp-fabric agent vs BIRD vs FRR (bgpd+zebra).

Run in the lab kernel (nothing can leave it):

    .venv/bin/fabric lab-kernel run -- .venv/bin/python bench/import_bench.py [--prefixes 10000] [--only agent,bird,frr]

For each receiver: two fresh namespaces joined by a veth (sender 10.0.1.1, receiver 10.0.1.11).
The sender is BIRD 2 (AS 64513) with N static /24s in a protocol that starts disabled; the receiver
(AS 64512) is (a) a real `fabric agent` with the sender as an external peer, (b) BIRD with a kernel
protocol exporting everything, (c) FRR bgpd + zebra; and, to split the agent's time, (d) "speaker":
the agent's BGP side alone (ExaBGP + relay + bgp.speaker via bgp.cli_probe, timed until its events
reported all N; no kernel writes, but cli_probe prints every event as JSON). Once the sender sees the session Established,
we enable the static protocol (t0) and watch the receiver's kernel with `ip monitor route`: the time of
the first and of the last of the N routes (marked with the receiver's protocol: 80, bird, bgp) to
arrive. Completion is confirmed by `ip route show proto X` once the monitor has gone quiet (not
while routes flow, so the check does not steal the one CPU). Ratios are vs BIRD.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabric.lab import frr as lab_frr  # noqa: E402
from fabric.lab.kinds import FrrSpec  # noqa: E402
from fabric.lab.procs import Processes  # noqa: E402

SND_IP, RCV_IP = "10.0.1.1", "10.0.1.11"
FABRIC = str(Path(sys.executable).parent / "fabric")
PROTO = {"agent": "80", "bird": "bird", "frr": "bgp", "speaker": ""}


def prefixes(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("10.128.0.0"))
    return [f"{ipaddress.IPv4Address(base + (i << 8))}/24" for i in range(n)]


def sh(cmd: str) -> str:
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed: {r.stderr.strip()}")
    return r.stdout


def wait(cond, timeout: float, what: str, step: float = 0.2) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class Monitor:
    """`ip monitor route` in the receiver's namespace: when each wanted prefix first showed up."""

    def __init__(self, ns: str, proto: str, wanted: set[str]) -> None:
        self.wanted, self.proto = wanted, proto
        self.seen: dict[str, float] = {}
        self.last_event = time.monotonic()
        self.proc = subprocess.Popen(["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE, text=True,
                                     bufsize=1 << 16)
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        proto = f" proto {self.proto} "
        for raw in self.proc.stdout:
            now = time.monotonic()
            line = raw.strip() + " "
            self.last_event = now
            if line.startswith("Deleted") or proto not in line:
                continue
            words = line.split()
            dst = words[1] if words[0] in ("blackhole", "unicast") else words[0]
            if dst in self.wanted and dst not in self.seen:
                self.seen[dst] = now

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Pair:
    """Sender and receiver namespaces, the sender's BIRD, and whatever the receiver runs."""

    def __init__(self, n: int) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.snd, self.rcv = f"isnd-{self.tag}", f"ircv-{self.tag}"
        self.dir = Path(tempfile.mkdtemp(prefix="fabric-import-"))
        self.procs = Processes()
        self.n = n
        self.frr = False
        for ns in (self.snd, self.rcv):
            sh(f"ip netns add {ns}; ip -n {ns} link set lo up")
        sh(f"ip link add eth1 netns {self.snd} type veth peer name eth1 netns {self.rcv};"
           f"ip -n {self.snd} addr add {SND_IP}/24 dev eth1; ip -n {self.snd} link set eth1 up;"
           f"ip -n {self.rcv} addr add {RCV_IP}/24 dev eth1; ip -n {self.rcv} link set eth1 up")
        routes = "".join(f"  route {p} blackhole;\n" for p in prefixes(n))
        conf = self.dir / "sender.conf"
        conf.write_text(f"router id {SND_IP};\nprotocol device {{ }}\n"
                        f"protocol static feed {{\n  disabled;\n  ipv4;\n{routes}}}\n"
                        f"protocol bgp rcv {{\n  local {SND_IP} as 64513;\n  neighbor {RCV_IP} as 64512;\n"
                        "  ipv4 { import none; export all; };\n}\n")
        self.snd_sock = self.dir / "sender.ctl"
        self.procs.start("sender", ["ip", "netns", "exec", self.snd, "bird", "-f", "-c", str(conf), "-s",
                                    str(self.snd_sock)], self.dir / "sender.log")

    def birdc(self, sock: Path, *args: str) -> str:
        return subprocess.run(["birdc", "-s", str(sock), *args], capture_output=True, text=True).stdout

    def established(self) -> bool:
        return "Established" in self.birdc(self.snd_sock, "show", "protocols", "rcv")

    # -- receivers ---------------------------------------------------------------------------------
    def start_agent(self) -> None:
        (self.dir / "cluster.yaml").write_text(yaml.safe_dump(
            {"nodes": [{"name": "rcv", "address": RCV_IP, "podCIDRs": ["10.244.1.0/24"]}]}))
        (self.dir / "agent.yaml").write_text(yaml.safe_dump({
            "node": {"name": "rcv", "address": f"{RCV_IP}/24", "podCIDRs": ["10.244.1.0/24"]},
            "pools": [{"cidr": "10.244.0.0/16", "ipipMode": "CrossSubnet"}],
            "peers": [{"name": "feed", "address": SND_IP, "asn": 64513}],
            "services": {"enabled": False},
            "health": {"listen": None},
            "source": {"kind": "file", "path": "cluster.yaml"},
            "paths": {"runDir": "run"},
        }))
        self.procs.start("agent", ["ip", "netns", "exec", self.rcv, FABRIC, "agent", "-c",
                                   str(self.dir / "agent.yaml")], self.dir / "agent.log")

    def start_speaker(self) -> None:
        """The agent's BGP side alone: ExaBGP + relay + bgp.speaker events (bgp.cli_probe), no kernel."""
        from bgp.cli_probe import ProbeClient
        self.probe = ProbeClient(self.rcv, self.dir / "probe")
        self.probe.request({"op": "neighbors", "neighbors": [dict(
            name="feed", peer_address=SND_IP, peer_as=64513, local_as=64512, local_address=RCV_IP,
            router_id=RCV_IP, hold_time=90, graceful_restart_time=120, kind="external")]}, 120)

    def start_bird(self) -> None:
        conf = self.dir / "rcv.conf"
        conf.write_text(f"router id {RCV_IP};\nprotocol device {{ }}\n"
                        "protocol kernel { ipv4 { import none; export all; }; }\n"
                        f"protocol bgp feed {{\n  local {RCV_IP} as 64512;\n  neighbor {SND_IP} as 64513;\n"
                        "  ipv4 { import all; export none; };\n}\n")
        self.procs.start("bird", ["ip", "netns", "exec", self.rcv, "bird", "-f", "-c", str(conf), "-s",
                                  str(self.dir / "rcv.ctl")], self.dir / "rcv.log")

    def start_frr(self) -> None:
        conf = self.dir / "frr.conf"
        conf.write_text(f"frr defaults traditional\nhostname rcv\nrouter bgp 64512\n bgp router-id {RCV_IP}\n"
                        f" no bgp ebgp-requires-policy\n neighbor {SND_IP} remote-as 64513\n")
        self.frr = True
        spec = FrrSpec(config=conf, daemons=("bgpd",), profile="traditional")
        names = lab_frr.start(self.procs, "rcv", self.rcv, spec, self.dir, None)
        lab_frr.wait_ready(self.rcv, names, time.monotonic() + 60, lambda: not self.procs.dead())
        lab_frr.load_config("rcv", self.rcv, conf, self.dir / "vtysh.log")

    def count(self, proto: str, wanted: set[str]) -> int:
        out = sh(f"ip -n {self.rcv} route show proto {proto}")
        return sum(1 for line in out.splitlines() if (line.split() or [""])[0] in wanted)

    def close(self) -> None:
        if getattr(self, "probe", None) is not None:
            self.probe.close()
        self.procs.stop_all()
        for ns in (self.rcv, self.snd):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self.frr:
            lab_frr.cleanup(self.rcv)
        shutil.rmtree(self.dir, ignore_errors=True)


def speaker_times(pair: Pair, n: int) -> tuple[float, float]:
    """Seconds from enabling the feed until the speaker reported the first / all n routes announced."""
    probe = pair.probe
    m = probe.mark()
    t0 = time.monotonic()
    pair.birdc(pair.snd_sock, "enable", "feed")
    probe.wait_for(lambda o: o.get("event") == "RoutesAnnounced", 120, after=m)
    first = time.monotonic() - t0
    got = 0

    def all_in(o: dict) -> bool:
        nonlocal got
        if o.get("event") == "RoutesAnnounced":
            got += len(o.get("prefixes", []))
        return got >= n
    probe.wait_for(all_in, 600, after=m)
    return first, time.monotonic() - t0


def one(kind: str, n: int, profile: Path | None = None) -> tuple[float, float]:
    """(seconds from enabling the feed to the first route in the kernel, ... to the last). `profile`: a
    folder where py-spy (when installed) records the agent's stacks while it takes the routes."""
    pair = Pair(n)
    spy = None
    wanted = set(prefixes(n))
    try:
        getattr(pair, f"start_{kind}")()
        wait(pair.established, 120, f"{kind}: session Established")
        time.sleep(2)  # let start-up work (config, first syncs) finish; not part of what we time
        if kind == "speaker":
            return speaker_times(pair, n)
        mon = Monitor(pair.rcv, PROTO[kind], wanted)
        if profile is not None and kind == "agent":
            profile.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                    str(pair.procs.find("agent").popen.pid), "--threads", "--nonblocking", "--rate", "100",
                                    "--format", "raw", "-o", str(profile / f"agent-{pair.tag}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
        time.sleep(0.3)  # the monitor subscribed
        t0, t0_wall = time.monotonic(), time.time()
        pair.birdc(pair.snd_sock, "enable", "feed")
        deadline = t0 + 600
        while True:
            time.sleep(0.25)
            if len(mon.seen) < n and time.monotonic() - mon.last_event < 1.0:
                continue  # routes still flowing: don't steal the CPU with a dump
            if len(mon.seen) >= n or pair.count(PROTO[kind], wanted) >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: only {pair.count(PROTO[kind], wanted)} of {n} routes after 600 s")
        mon.close()
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        if kind == "agent":
            # The agent's syncs: when each logged (after its write), how many routes, and its split
            # (run seconds: desired state = RIB -> import filter -> route model -> reconciler; kernel = the sends).
            def syncs() -> list[tuple[float, int, str]]:
                log = (pair.dir / "agent.log").read_text(errors="replace")
                found = [(datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0_wall, int(k), split)
                         for ts, k, split in re.findall(r"^(\S+ \S+) .*routes: \d+ deleted, (\d+) written.*?"
                                                        r"(?:in ([\d.]+ s \(desired state [\d.]+ s, kernel [\d.]+) s\))?$",
                                                        log, re.M)]
                return [x for x in found if x[0] > 0]
            # the last sync logs after its write returns, i.e. just after the monitor saw its routes
            wait(lambda: sum(k for _, k, _ in syncs()) >= n, 10, "the agent to log its last sync")
            print("  (agent: route syncs after the feed started, (seconds when logged, routes written[, run split]): "
                  + ", ".join(f"({t:.2f}, {k}" + (f", {sp} s" if sp else "") + ")" for t, k, sp in syncs()) + ")")
        if len(mon.seen) < n:
            print(f"  ({kind}: ip monitor saw {len(mon.seen)} of {n}; the kernel has all: last event time used)")
        times = sorted(mon.seen.values())
        return times[0] - t0, (times[-1] if len(mon.seen) >= n else mon.last_event) - t0
    finally:
        pair.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefixes", type=int, default=10000)
    ap.add_argument("--only", default="bird,frr,agent,speaker")
    ap.add_argument("--runs", type=int, default=1, help="rounds; each runs every receiver once, in --only's order")
    ap.add_argument("--profile", type=Path, help="py-spy the agent (raw stacks per run into this folder)")
    a = ap.parse_args()
    if a.profile is not None and not (Path(sys.executable).parent / "py-spy").exists():
        ap.error("--profile needs py-spy in this venv (.venv/bin/pip install py-spy); it is not a project dependency")
    kinds = a.only.split(",")
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(a.runs):
        for k in kinds:
            res[k].append(one(k, a.prefixes, a.profile))
            print(f"  {k}: first route {res[k][-1][0]:.2f}s, all {a.prefixes} {res[k][-1][1]:.2f}s", flush=True)
    print(f"{a.prefixes} prefixes from one BGP peer into the kernel (seconds from the sender enabling them;"
          f" best of {a.runs})")
    best = {k: min(v, key=lambda t: t[1]) for k, v in res.items()}
    base = best.get("bird")
    for k, (first, last) in best.items():
        ratio = f"  ratio vs BIRD {last / base[1]:.2f}x (first->last {(last - first) / (base[1] - base[0]):.2f}x)" \
            if base else ""
        print(f"  {k:7s} first {first:6.2f}  all {last:6.2f}  first->last {last - first:6.2f}{ratio}")
    if "bird" in res:
        # Each round runs the receivers back to back: the ratio within a round shares the machine's load of
        # that moment (other work on the host swings absolute times 2-3x between rounds).
        for k in kinds:
            if k == "bird":
                continue
            rounds = [last / b[1] for (_, last), b in zip(res[k], res["bird"])]
            print(f"  {k} / BIRD per round: " + ", ".join(f"{r:.2f}x" for r in rounds)
                  + f"; median {statistics.median(rounds):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
