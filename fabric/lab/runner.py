"""`fabric lab run TOPOLOGY`: build a containerlab topology as namespaces, wait, check, report, tear down.

In a kernel without ipip/IPVS/dummy the command re-runs itself inside the lab kernel (one UML
boot) and returns that run's exit status. Inside a capable kernel it builds the lab step by step
(one progress line per step), waits for every BGP session with a deadline, runs the checks of the
optional `<name>.checks.yml`, prints the report and always tears everything down — also on
Ctrl-C/SIGTERM and on any failure. Exit: 0 all checks passed, 1 a check or the build failed,
2 bad topology/checks file, 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from fabric.lab import kernel as labkernel
from fabric.lab import agent, clab, faults, frr, netns, picture, pods, relay
from fabric.lab import checks as checks_mod
from fabric.lab import routes as lab_routes
from fabric.lab.checks import Command, Http, Checks, Metric, Ping, Tcp
from fabric.lab.kinds import LabPlan, NodePlan, Role, plan
from fabric.lab.procs import Processes
from fabric.lab.report import CheckResult, render, verdict
from fabric.lab.sessions import Session, from_frr_summary

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
EXEC_TIMEOUT = 60.0
COMMAND_TIMEOUT = 30.0  # one attempt of a checks-file command
EXEC_LABEL = "*lab/execd"  # not a node's label ("*" is no valid node name): never counted as a node's daemon
DAEMON_START_TIMEOUT = 60.0
CONSOLE_ENV = "FABRIC_LAB_CONSOLE"  # set inside the lab kernel: the serial line the host relays `lab exec` on
REPORTS = Path("/tmp/bgp-fabric-reports")  # the host's /tmp also inside the lab kernel (hostfs): reports outlive it
POLL = 0.5  # seconds between convergence polls (the lab's own wait, not any route's path)


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived; unwinds to the teardown like KeyboardInterrupt."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class BuildError(RuntimeError):
    pass


def main(args: argparse.Namespace) -> int:
    """Entry point of `fabric lab run` (args: topology, keep, timeout, checks, report_dir)."""
    checks_path = Path(args.checks).resolve() if getattr(args, "checks", None) else None
    report_dir = Path(args.report_dir).resolve() if getattr(args, "report_dir", None) else None
    try:
        topology = clab.load(args.topology)
        checks_mod.load_for(topology, checks_path)
        plan(topology, "0000")  # validate node kinds/binds before booting anything
    except clab.TopologyError as e:
        for line in e.problems:
            print(f"{e.source}: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not labkernel.in_lab_kernel() and not labkernel.capable()[0]:
        return _in_lab_kernel(topology.path, keep=args.keep, timeout=args.timeout, checks_path=checks_path,
                              report_dir=report_dir, name=topology.name)
    return run(topology.path, keep=args.keep, timeout=args.timeout, checks_path=checks_path, report_dir=report_dir)


def _in_lab_kernel(topology: Path, *, keep: bool, timeout: float, checks_path: Path | None = None,
                   report_dir: Path | None = None, name: str = "lab") -> int:
    cmd = [sys.executable, "-m", "fabric.cli", "lab", "run", str(topology), "--timeout", str(timeout)]
    if keep:
        cmd.append("--keep")
    if checks_path is not None:
        cmd += ["--checks", str(checks_path)]
    if report_dir is not None:
        cmd += ["--report-dir", str(report_dir)]
    print("lab: this kernel lacks ipip/IPVS/dummy; running the lab inside the lab kernel (one boot)", flush=True)
    # labkernel.run kills the UML kernel (and so the whole lab) on KeyboardInterrupt; make SIGTERM do the same.
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # `fabric lab exec` from the host: a socket pair is the lab kernel's serial line; we relay it to a unix socket.
    ours, theirs = socket.socketpair()
    line = relay.Relay(ours, relay.socket_path(name, str(os.getpid())))
    try:
        line.start()
    except OSError as e:
        print(f"lab: no `fabric lab exec` for this run ({e})", file=sys.stderr)
    said: list[str] = []
    try:
        r = labkernel.run(cmd, timeout=timeout + 120, cwd=str(labkernel.REPO_ROOT), stream=True,
                          console_fd=theirs.fileno(), tee=said)
    except labkernel.LabKernelError as e:
        print(f"lab kernel: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        # Ctrl-C/SIGTERM killed the lab kernel (and so the whole lab). After the report (--keep) the verdict stands.
        verdict_line = next((ln for ln in reversed("".join(said).splitlines()) if ln.startswith("verdict: ")), None)
        if keep and verdict_line is not None:
            print("lab: interrupted; the lab kernel and the lab in it are gone", flush=True)
            return EXIT_OK if verdict_line.startswith("verdict: PASS") else EXIT_FAIL
        raise
    finally:
        theirs.close()
        line.stop()
        ours.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if r.timed_out:
        print(f"lab: the lab kernel run timed out after {timeout + 120:.0f}s and was killed", file=sys.stderr)
    return r.returncode


def run(topology_path: str | Path, *, keep: bool = False, timeout: float = 900, out: TextIO | None = None,
        checks_path: Path | None = None, report_dir: Path | None = None) -> int:
    """Build, check, report and tear down one lab in this (capable) kernel. Returns the exit status.

    The Python API behind `fabric lab run` once inside a capable kernel; tests call it directly.
    The report (report.txt, topology.svg) is also written to `report_dir`
    (default /tmp/bgp-fabric-reports/<lab>-<run>).
    """
    out = out or sys.stdout
    try:
        topology = clab.load(topology_path)
        lab_checks, checks_file = checks_mod.load_for(topology, checks_path)
        lab_plan = plan(topology, uuid.uuid4().hex[:4])
    except clab.TopologyError as e:
        for line in e.problems:
            print(f"{e.source}: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    lab = Lab(lab_plan, lab_checks, out, report_dir or REPORTS / f"{topology.name}-{lab_plan.run_id}")
    restore = _install_signal_handlers()
    result: int | None = None  # set once the report is out (then --keep's Ctrl-C keeps the verdict)
    try:
        lab.say(f"lab {topology.name}: {len(topology.nodes)} nodes, {len(topology.links)} links"
                f" (run {lab_plan.run_id}, checks: {checks_file or 'sessions only'})")
        for note in lab_plan.notes:
            lab.say(f"note: {note}")
        result = EXIT_OK if lab.run(deadline=time.monotonic() + timeout) else EXIT_FAIL
        if keep:
            lab.say(f"--keep: lab is up (namespaces {lab_plan.topology.name}-{lab_plan.run_id}-*, logs in "
                    f"{lab.workdir}); enter a node with `fabric lab exec NODE`; Ctrl-C or SIGTERM tears it down")
            while True:
                signal.pause()
        return result
    except Interrupted as e:
        lab.say(f"interrupted ({e}); tearing down")
        return result if result is not None else 128 + e.signum
    except KeyboardInterrupt:
        lab.say("interrupted; tearing down")
        return result if result is not None else 130
    finally:
        with _signals_ignored():
            lab.teardown()
        restore()


class Lab:
    """One lab run: what was created (so teardown removes exactly that), sessions and check results."""

    def __init__(self, lab_plan: LabPlan, lab_checks: Checks, out: TextIO, report_dir: Path | None = None):
        self.plan = lab_plan
        self.checks = lab_checks
        self.out = out
        self.report_dir = report_dir
        self.procs = Processes()
        self.created_ns: list[str] = []
        self.frr_nodes: list[NodePlan] = []
        self.agent_nodes: list[tuple[NodePlan, bool]] = []  # (node, its runDir is ours to remove)
        self.pods: dict[str, tuple[NodePlan, dict, pods.Attached]] = {}  # pod name -> (pod, conflist, ADD result)
        self.sessions: dict[str, list[Session]] = {}
        self.results: list[CheckResult] = []
        self.fault_results: list[faults.FaultResult] = []
        self.t0 = time.monotonic()
        self.exec_socket: Path | None = None
        self.workdir = _make_workdir()
        self.shims = _make_shims(self.workdir)
        self.torn_down = False

    # -- progress ------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=self.out, flush=True)

    def env_for(self, n: NodePlan) -> dict[str, str]:
        """The node's environment (topology `env`), plus what makes its tools work in its namespace:
        FRR nodes get a `vtysh` that talks to their own daemons, agent nodes FABRIC_CONFIG (`fabric status`
        needs no -c), every node the venv's `fabric` on PATH."""
        env = {**os.environ, **n.node.env, "FABRIC_LAB": self.plan.topology.name, "FABRIC_LAB_NODE": n.name,
               "FABRIC_NETNS": n.netns}
        path = [str(Path(sys.executable).parent)]
        if n.frr is not None:
            path.insert(0, str(self.shims))
        if n.agent is not None:
            env["FABRIC_CONFIG"] = str(n.agent.config)
        env["PATH"] = ":".join(path + [env.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin"])
        return env

    # -- the whole run -------------------------------------------------------------------------

    def run(self, deadline: float) -> bool:
        build_error = None
        try:
            self.build()
        except (BuildError, netns.NetnsError, frr.FrrError, OSError, subprocess.TimeoutExpired) as e:
            build_error = str(e)
            self.say(f"build failed: {e}")
        picture_note = None
        if build_error is None:
            converged = self.converge(deadline)
            self.run_checks(converged, deadline)
            self.run_faults(converged)
            for n in self.plan.nodes:  # the report shows the sessions as they are at the end
                if n.speaks_bgp and not self.dead_daemons(n):
                    self.read_sessions(n)
            picture_note = self.draw()
        text = render(self.plan, self.sessions, self.results, build_error, faults=self.fault_results,
                      picture=picture_note)
        self.out.write(text)
        self.out.flush()
        if self.report_dir is not None:
            try:
                self.report_dir.mkdir(parents=True, exist_ok=True)
                (self.report_dir / "report.txt").write_text(text)
            except OSError as e:
                self.say(f"report: could not write {self.report_dir}: {e}")
        return verdict(self.results, build_error)

    # -- the picture ---------------------------------------------------------------------------

    def draw(self) -> str:
        """Write topology.svg into the report folder; returns the report's `picture:` line."""
        if self.report_dir is None:
            return "not written (no report folder)"
        addresses: dict[str, list[str]] = {}
        owner: dict[str, str] = {}
        reader = lab_routes.TableReader()
        switches = frozenset(n.name for n in self.plan.nodes if "bridge" in reader.table(n.netns)[1].values())
        for n in self.plan.nodes:
            lab_ifs = {own.interface for own, _ in self.plan.topology.links_of(n.name)} | {"br0"}
            if n.name in self.pods:
                lab_ifs.add(pods.IFNAME)  # a pod's address is on the interface its CNI plugin made
            for dev, addr in _addresses(n.netns):
                owner.setdefault(addr, n.name)
                if dev in lab_ifs:
                    addresses.setdefault(n.name, []).append(addr)
        paths: dict[tuple[str, str], str] = {}
        for n in self.plan.nodes:
            if n.agent is None:
                continue
            routes, kinds = reader.table(n.netns)
            for r in routes:
                if r.protocol != "80" or r.type != "unicast":
                    continue
                for h in r.hops:
                    other = owner.get(h.gateway or "")
                    if other and other != n.name and self.plan.by_name(other).agent is not None:
                        paths.setdefault((n.name, other), r.kind(kinds) if len(r.hops) == 1 else
                                         ("ipip" if kinds.get(h.dev or "") == "ipip" else "direct"))
        svg = self.report_dir / "topology.svg"
        why = picture.render(picture.dot_source(self.plan, self.sessions, owner, paths, addresses, switches), svg)
        return str(svg) if why is None else f"none ({why})"

    def build(self) -> None:
        topo = self.plan.topology
        for n in self.plan.nodes:
            netns.add(n.netns)  # fails if the name exists: never adopt (and later delete) someone else's
            self.created_ns.append(n.netns)
        self.say(f"namespaces: {len(self.plan.nodes)} created ({topo.name}-{self.plan.run_id}-*)")
        for link in topo.links:
            netns.veth(self.plan.netns(link.a.node), link.a.interface, self.plan.netns(link.b.node),
                       link.b.interface, link.mtu)
        self.say(f"links: {len(topo.links)} veth pairs up")
        for n in self.plan.nodes:
            if n.role is Role.BRIDGE:
                ports = [own.interface for own, _ in topo.links_of(n.name)]
                netns.bridge(n.netns, "br0", ports)
                self.say(f"{n.name}: bridge br0 over {', '.join(ports) or 'no ports'}")
        for n in self.plan.nodes:
            for key, value in n.node.sysctls.items():
                netns.sysctl(n.netns, key, value)
            if n.role is not Role.POD:  # a pod's commands run once it has its network
                self.run_exec(n)
            if n.node.exec or n.node.sysctls:
                self.say(f"{n.name}: {len(n.node.sysctls)} sysctl(s), {len(n.node.exec)} exec command(s)"
                         + (" (after its CNI ADD)" if n.role is Role.POD else " done"))
        self.start_daemons()
        self.attach_pods()
        self.start_exec_server()

    def start_exec_server(self) -> None:
        """`fabric lab exec` into this lab: the exec server on the lab kernel's serial line (the host relays
        it), else on a unix socket here. Optional: a failure is reported and the lab goes on."""
        info = {"lab": self.plan.topology.name, "run": self.plan.run_id,
                "nodes": {n.name: {"netns": n.netns, "env": self.env_for(n)} for n in self.plan.nodes}}
        nodes_file = self.workdir / "exec-nodes.json"
        nodes_file.write_text(json.dumps(info))
        nodes_file.chmod(0o600)
        cmd = [sys.executable, "-m", "fabric.lab.execd", "--nodes", str(nodes_file)]
        line = os.environ.get(CONSOLE_ENV) if labkernel.in_lab_kernel() else None
        if line:
            cmd += ["--tty", line]
            where = "through the host's relay"
        else:
            self.exec_socket = relay.socket_path(self.plan.topology.name, self.plan.run_id)
            cmd += ["--listen", str(self.exec_socket)]
            where = str(self.exec_socket)
        self.procs.start(EXEC_LABEL, cmd, self.workdir / "execd.log", dict(os.environ))
        self.say(f"exec: `fabric lab exec NODE [-- CMD]` enters a node ({where})")

    def run_exec(self, n: NodePlan) -> None:
        for i, cmd in enumerate(n.node.exec):
            log = self.workdir / f"{n.name}.exec.log"
            rc = self.procs.run(f"{n.name}/exec[{i}]", netns.exec_cmd(n.netns, ["sh", "-c", cmd]), log,
                                self.env_for(n), timeout=EXEC_TIMEOUT)
            if rc != 0:
                tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:])
                raise BuildError(f"{n.name}: exec[{i}] {cmd!r} exited {rc}: {tail}")

    # -- pods: CNI ADD as the node's runtime would -----------------------------------------------

    def attach_pods(self) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        lab = self.plan.topology.name
        for n in self.plan.nodes:
            if n.pod_of is None:
                continue
            host = self.plan.by_name(n.pod_of)
            assert host.agent is not None and host.agent.conflist is not None
            try:
                conf = pods.wait_for_conflist(host.agent.conflist, deadline, alive=lambda h=host: not self.dead_daemons(h))
                attached = pods.add(host.netns, conf, container_id=f"{lab}-{self.plan.run_id}-{n.name}", pod_ns=n.netns,
                                    pod=n.name, lab=lab)
            except (pods.PodError, OSError, subprocess.TimeoutExpired) as e:
                raise BuildError(f"{n.name} (pod on {host.name}): {e}") from None
            self.pods[n.name] = (n, conf, attached)
            self.say(f"{n.name}: {attached.address} from {host.name}'s CNI plugin ({attached.seconds:.2f}s)")
            self.run_exec(n)

    def detach_pods(self) -> None:
        lab = self.plan.topology.name
        for name, (n, conf, attached) in reversed(list(self.pods.items())):
            assert n.pod_of is not None
            err = pods.delete(self.plan.netns(n.pod_of), conf, attached, pod_ns=n.netns, pod=name, lab=lab)
            if err:
                self.say(f"{name}: CNI DEL failed: {err}")
        self.pods.clear()

    def address_of(self, to: str) -> str:
        """A check's destination: an address as written, or a pod's CNI address by its node name."""
        return self.pods[to][2].address if to in self.pods else to

    def start_daemons(self) -> None:
        started: list[tuple[NodePlan, list[str]]] = []
        for n in self.plan.nodes:
            if n.frr is not None:
                (self.workdir / "vtysh" / n.netns).mkdir(parents=True)
                (self.workdir / "vtysh" / n.netns / "vtysh.conf").touch()
                self.frr_nodes.append(n)
                started.append((n, frr.start(self.procs, n.name, n.netns, n.frr, self.workdir, self.env_for(n))))
        if started:
            self.say(f"frr: daemons started on {', '.join(n.name for n, _ in started)}")
        start_deadline = time.monotonic() + DAEMON_START_TIMEOUT
        for n, names in started:
            assert n.frr is not None
            frr.wait_ready(n.netns, names, start_deadline, alive=lambda n=n: not self.dead_daemons(n))
            frr.load_config(n.name, n.netns, n.frr.config, self.workdir / f"{n.name}.vtysh.log")
        if started:
            self.say(f"frr: configuration loaded on {len(started)} node(s)")
        for n in self.plan.nodes:
            if n.agent is not None:
                self.agent_nodes.append((n, agent.start(self.procs, n.name, n.netns, n.agent, self.workdir,
                                                        self.env_for(n))))
        if self.agent_nodes:
            self.say(f"agent: started on {', '.join(n.name for n, _ in self.agent_nodes)}")

    def dead_daemons(self, n: NodePlan) -> list[str]:
        return [p.label for p in self.procs.dead((f"{n.name}/",)) if "/exec[" not in p.label]

    # -- convergence ---------------------------------------------------------------------------

    def read_sessions(self, n: NodePlan) -> tuple[bool, str]:
        """Refresh `self.sessions[n]`; returns (this node's BGP is all up, why not)."""
        if n.frr is not None:
            try:
                ss = from_frr_summary(n.name, frr.show_json(n.netns, "show bgp summary json"))
            except (frr.FrrError, ValueError, subprocess.TimeoutExpired) as e:
                return False, str(e)
            self.sessions[n.name] = ss
            if not ss:
                return False, "no BGP sessions configured"
        else:
            assert n.agent is not None
            try:
                status = agent.read_status(n.name, n.agent)
            except ValueError as e:
                return False, str(e)
            if status is None:
                return False, f"no status in {n.agent.status} yet"
            ss = list(status.sessions)
            self.sessions[n.name] = ss
            if not status.ready:
                return False, "agent not ready" + (f" ({'; '.join(status.warnings)})" if status.warnings else "")
        down = [f"{s.peer} {s.state}" for s in ss if not s.established]
        return (not down), ", ".join(down)

    def converge(self, deadline: float) -> bool:
        bgp = [n for n in self.plan.nodes if n.speaks_bgp]
        if not bgp:
            return True
        limit = min(deadline, time.monotonic() + self.checks.timeout)
        start = time.monotonic()
        passed: dict[str, float] = {}
        why: dict[str, str] = {}
        self.say(f"waiting up to {limit - start:.0f}s for the BGP sessions of {len(bgp)} node(s)")
        while True:
            for n in bgp:
                if n.name in passed:
                    continue
                dead = self.dead_daemons(n)
                if dead:
                    why[n.name] = f"{', '.join(dead)} exited: " + self._tail_of(dead[0])
                    continue
                ok, reason = self.read_sessions(n)
                if ok:
                    passed[n.name] = time.monotonic() - start
                else:
                    why[n.name] = reason
            all_dead_or_passed = all(n.name in passed or self.dead_daemons(n) for n in bgp)
            if len(passed) == len(bgp) or all_dead_or_passed or time.monotonic() > limit:
                break
            time.sleep(POLL)
        waited = time.monotonic() - start
        for n in bgp:
            ss = self.sessions.get(n.name, [])
            up = sum(s.established for s in ss)
            name = f"bgp {n.name}: every session Established"
            if n.name in passed:
                self.results.append(CheckResult(name, True, passed[n.name], f"{up}/{len(ss)} established"))
            else:
                self.results.append(CheckResult(name, False, waited, why.get(n.name, "not converged")))
        ok = len(passed) == len(bgp)
        self.say(f"bgp: {'all sessions Established' if ok else 'NOT converged'} after {waited:.1f}s")
        return ok

    def _tail_of(self, label: str) -> str:
        p = next((p for p in self.procs.procs if p.label == label), None)
        return p.log_tail(5).replace("\n", " | ") if p else ""

    # -- checks --------------------------------------------------------------------------------

    def run_checks(self, converged: bool, deadline: float) -> None:
        if self.checks.sessions is not None:
            total = sum(s.established for ss in self.sessions.values() for s in ss)
            want = self.checks.sessions.min
            self.results.append(CheckResult(f"sessions: at least {want} Established", total >= want, 0.0,
                                            f"{total} Established (counted on every speaker)"))
        for p in self.checks.pings:
            self.results.append(self._retry(p.label(), lambda p=p: self._ping(p), p.timeout, converged, deadline))
        servers = {(c.serve, c.port) for c in self.checks.tcp if c.serve}
        for node, port in sorted(servers):
            self._serve_tcp(node, port)
        for c in self.checks.tcp:
            self.results.append(self._retry(c.label(), lambda c=c: self._tcp(c), c.timeout, converged, deadline))
        backends = {(node, h.backend_port) for h in self.checks.http for node in h.serve}
        for node, port in sorted(backends):
            self._serve_http(node, port)
        for h in self.checks.http:
            self.results.append(self._retry(h.label(), lambda h=h: self._http(h), h.timeout, converged, deadline))
        reader = lab_routes.TableReader()

        def route_attempt(r: checks_mod.Route) -> tuple[bool, str]:
            reader.refresh()
            return lab_routes.check(r, self.plan.netns(r.node), reader)

        for r in self.checks.routes:
            self.results.append(self._retry(r.label(), lambda r=r: route_attempt(r), r.timeout, converged, deadline))
        for c in self.checks.commands:
            self.results.append(self._retry(c.label(), lambda c=c: self._command(c), c.timeout, converged, deadline))
        for m in self.checks.metrics:
            self.results.append(self._retry(m.label(), lambda m=m: self._metric(m), m.timeout, converged, deadline))

    def run_faults(self, converged: bool) -> None:
        for f in self.checks.faults:
            name = f"fault: {f.label()}"
            if not converged:
                self.results.append(CheckResult(name, False, 0.0, "not injected: BGP never converged"))
                continue
            self.say(f"fault {f.label()}: probe {f.probe.src} -> {f.probe.to} at {f.probe.rate}/s")
            r = faults.run_fault(self, f)
            self.fault_results.append(r)
            summary = r.result.describe() if r.result else ""
            if r.converged_at is not None:
                summary += f"; converged after {r.converged_at:.1f}s"
            if r.detail:
                summary += f"; {r.detail}" if summary else r.detail
            self.results.append(CheckResult(name, r.ok, r.converged_at or 0.0, summary))
            self.say(f"fault {f.label()}: {'pass' if r.ok else 'FAIL'} ({summary})")

    def _command(self, c: Command) -> tuple[bool, str]:
        n = self.plan.by_name(c.node)
        try:
            r = subprocess.run(netns.exec_cmd(n.netns, ["sh", "-c", c.run]), capture_output=True, text=True,
                               env=self.env_for(n), timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {COMMAND_TIMEOUT:.0f}s"
        output = r.stdout + r.stderr
        missing = [e for e in c.expect if not re.search(e, output, re.M)]
        last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "(no output)")
        if r.returncode != c.exit:
            return False, f"exit {r.returncode}, want {c.exit}: {last[:120]}"
        if missing:
            return False, f"no match for {missing[0]!r}: {last[:120]}"
        return True, f"exit {r.returncode}" + (f", matched {len(c.expect)} pattern(s)" if c.expect else "")

    def _metric(self, m: Metric) -> tuple[bool, str]:
        """Scrape the node agent's /metrics in its namespace; parse it here with Prometheus' parser."""
        from prometheus_client.parser import text_string_to_metric_families

        from fabric import config as cfgmod

        n = self.plan.by_name(m.node)
        assert n.agent is not None
        try:
            listen = cfgmod.load(n.agent.config).health.listen
        except cfgmod.ConfigError as e:
            return False, f"its config: {e.problems[0]}"
        if not listen:
            return False, "health.listen is off in its config: no /metrics"
        host, _, port = listen.rpartition(":")
        url = f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{port}/metrics"
        code = f"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
        try:
            r = subprocess.run(netns.exec_cmd(n.netns, [sys.executable, "-c", code]), capture_output=True, text=True,
                               timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"{url}: no answer within {COMMAND_TIMEOUT:.0f}s"
        if r.returncode != 0:
            return False, f"{url}: " + (r.stderr.strip().splitlines() or ["failed"])[-1][:120]
        total, found = 0.0, 0
        for fam in text_string_to_metric_families(r.stdout):
            for smp in fam.samples:
                if smp.name == m.metric and all(smp.labels.get(k) == v for k, v in m.labels.items()):
                    total += smp.value
                    found += 1
        if not found:
            return False, f"no sample of {m.metric} with those labels"
        ok = total == m.value if m.value is not None else total >= (m.min or 0.0)
        return ok, f"{total:g} ({found} sample{'s' if found != 1 else ''})"

    def _serve_http(self, node: str, port: int) -> None:
        code = ("import http.server\n"
                "class H(http.server.BaseHTTPRequestHandler):\n"
                "    def do_GET(self):\n"
                f"        body = {node!r}.encode() + b'\\n'\n"
                "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
                "        self.end_headers(); self.wfile.write(body)\n"
                "    def log_message(self, *a): pass\n"
                f"http.server.ThreadingHTTPServer(('0.0.0.0', {port}), H).serve_forever()\n")
        n = self.plan.by_name(node)
        self.procs.start(f"{node}/http-{port}", netns.exec_cmd(n.netns, [sys.executable, "-c", code]),
                         self.workdir / f"{node}.http.log", self.env_for(n))

    def _http(self, h: "Http") -> tuple[bool, str]:
        code = ("import collections, sys, urllib.request\n"
                "seen = collections.Counter()\n"
                f"for i in range({h.requests}):\n"
                "    try:\n"
                f"        with urllib.request.urlopen('http://{self.address_of(h.to)}:{h.port}/', timeout=3) as r:\n"
                "            seen[r.read().decode().strip()] += 1\n"
                "    except OSError as e:\n"
                "        seen['error: ' + str(e)[:60]] += 1\n"
                "print(' '.join(f'{k}={v}' for k, v in sorted(seen.items())))\n")
        r = subprocess.run(netns.exec_cmd(self.plan.netns(h.src), [sys.executable, "-c", code]),
                           capture_output=True, text=True)
        answers = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv and not kv.startswith("error"))
        expect = set(h.expect or h.serve)
        got = set(answers)
        ok = r.returncode == 0 and "error" not in r.stdout and bool(got) and (
            got == expect if h.spread else got <= expect)
        return ok, (r.stdout.strip() or r.stderr.strip())[-160:]

    def _retry(self, name: str, attempt: Callable[[], tuple[bool, str]], timeout: float, converged: bool,
               deadline: float) -> CheckResult:
        # Routes can land a moment after the sessions come up: retry until the check's deadline.
        # Without convergence one attempt is enough to show what fails.
        start = time.monotonic()
        limit = min(deadline, start + timeout)
        while True:
            ok, detail = attempt()
            if ok or not converged or time.monotonic() > limit:
                break
            time.sleep(POLL)
        result = CheckResult(name, ok, time.monotonic() - start, detail)
        self.say(f"check {name}: {'pass' if ok else 'FAIL'} ({result.seconds:.1f}s)")
        return result

    def _ping(self, p: Ping) -> tuple[bool, str]:
        ns = self.plan.netns(p.src)
        r = subprocess.run(netns.exec_cmd(ns, ["ping", "-n", "-q", "-c", str(p.count), "-i", "0.2",
                                               "-w", str(max(2, p.count)), self.address_of(p.to)]),
                           capture_output=True, text=True)
        summary = next((ln for ln in r.stdout.splitlines() if "received" in ln), r.stderr.strip())
        return r.returncode == 0, summary.strip()

    def _serve_tcp(self, node: str, port: int) -> None:
        code = ("import socket\n"
                "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('0.0.0.0', {port})); s.listen(16)\n"
                "while True:\n    c, _ = s.accept(); c.close()\n")
        n = self.plan.by_name(node)
        self.procs.start(f"{node}/tcp-serve-{port}", netns.exec_cmd(n.netns, [sys.executable, "-c", code]),
                         self.workdir / f"{node}.tcp-serve.log", self.env_for(n))

    def _tcp(self, c: Tcp) -> tuple[bool, str]:
        code = ("import socket, sys\n"
                "try:\n"
                f"    socket.create_connection(({self.address_of(c.to)!r}, {c.port}), timeout=2).close()\n"
                "except OSError as e:\n    print(e); sys.exit(1)\n")
        r = subprocess.run(netns.exec_cmd(self.plan.netns(c.src), [sys.executable, "-c", code]),
                           capture_output=True, text=True)
        return r.returncode == 0, "connected" if r.returncode == 0 else (r.stdout + r.stderr).strip()[-120:]

    # -- teardown ------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Stop every process we started, remove every namespace (their veths go too) and our files."""
        if self.torn_down:
            return
        self.torn_down = True
        self.detach_pods()  # while the agents still run: DEL as a runtime does when a pod goes
        self.procs.stop_all()
        if self.exec_socket is not None:
            self.exec_socket.unlink(missing_ok=True)
        for ns in self.created_ns:
            netns.delete(ns)
        for n in self.frr_nodes:
            frr.cleanup(n.netns)
        for n, fresh_run_dir in self.agent_nodes:
            assert n.agent is not None
            agent.cleanup(n.agent, remove_run_dir=fresh_run_dir)
        left = [ns for ns in self.created_ns if netns.exists(ns)]
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.say("teardown: done" if not left else f"teardown: could not remove {', '.join(left)}")


def _make_shims(workdir: Path) -> Path:
    """`vtysh` for FRR nodes: FRR's vtysh talking to the node's own daemons (pathspace = its namespace),
    its config folder in the lab's folder (an empty vtysh.conf per node: no warning, and `write` stays in the lab)."""
    shims = workdir / "bin"
    shims.mkdir()
    real = shutil.which("vtysh") or "/usr/bin/vtysh"
    (shims / "vtysh").write_text(f'#!/bin/sh\nexec {real} --config_dir {workdir / "vtysh"} -N "$FABRIC_NETNS" "$@"\n')
    (shims / "vtysh").chmod(0o755)
    return shims


def _addresses(ns: str) -> list[tuple[str, str]]:
    """(device, IPv4 address) of every address in the namespace."""
    try:
        r = subprocess.run(["ip", "-n", ns, "-j", "addr", "show"], capture_output=True, text=True, timeout=10)
        data = json.loads(r.stdout or "[]")
    except (subprocess.TimeoutExpired, ValueError):
        return []
    return [(str(link.get("ifname")), a["local"]) for link in data if isinstance(link, dict)
            for a in link.get("addr_info", []) if isinstance(a, dict) and a.get("family") == "inet" and "local" in a]


def _make_workdir() -> Path:
    # Inside the lab kernel /tmp is the host's own /tmp (hostfs); /run is the lab kernel's tmpfs.
    base = "/run" if labkernel.in_lab_kernel() else None
    return Path(tempfile.mkdtemp(prefix="fabric-lab-", dir=base))


def _raise_keyboard_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _install_signal_handlers() -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


class _signals_ignored:
    """Teardown must finish even if Ctrl-C is pressed again."""

    def __enter__(self) -> None:
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc: object) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
