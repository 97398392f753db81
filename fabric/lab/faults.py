"""Faults of a checks file, injected into a running lab: kill -9 an agent or its ExaBGP, SIGTERM and restart
an agent, restart an FRR router, take a link down and up. Each runs with a loss probe; afterwards the lab
is watched until it has converged again — every BGP session Established, every route expectation met,
the probe answered — and each of those moments is reported relative to the fault.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fabric.lab import agent, frr
from fabric.lab import routes as lab_routes
from fabric.lab.checks import Fault
from fabric.lab.probe import PingProbe, ProbeResult, wait_first_reply

if TYPE_CHECKING:
    from fabric.lab.runner import Lab

WATCH = 0.1  # seconds between convergence looks (the lab's own measurement loop; no route's path)
STOP_GRACE = 30.0  # an agent or FRR daemon given SIGTERM has this long before SIGKILL
BASELINE = 1.0  # seconds of probe traffic before the fault
TAIL = 1.0  # seconds of probe traffic after convergence


class FaultError(RuntimeError):
    """The fault could not be injected (e.g. no such process): reported, the lab goes on."""


@dataclass(frozen=True)
class FaultResult:
    label: str
    probe: str  # "from -> to @ rate/s"
    ok: bool
    result: ProbeResult | None
    sessions_at: float | None  # seconds after the fault: every session Established again
    routes_at: float | None  # every route expectation met again
    converged_at: float | None  # the latest of sessions, routes and traffic back; None: not in time
    detail: str = ""


def run_fault(lab: "Lab", f: Fault) -> FaultResult:
    p = f.probe
    probe_label = f"{p.src} -> {p.to} @ {p.rate}/s"
    probe = PingProbe(lab.plan.netns(p.src), lab.address_of(p.to), p.rate)  # a pod's name: its CNI address
    fault_at = time.time()
    try:
        if not wait_first_reply(probe, 10.0):
            return FaultResult(f.label(), probe_label, False, None, None, None, None,
                               "the probe got no answer before the fault: not injected")
        time.sleep(BASELINE)
        fault_at = time.time()
        try:
            ready = _inject(lab, f)
        except (FaultError, OSError, subprocess.SubprocessError, frr.FrrError) as e:
            return FaultResult(f.label(), probe_label, False, None, None, None, None, f"injection failed: {e}")
        sessions_at, routes_at, why = _watch(lab, f, ready, probe, fault_at)
        time.sleep(TAIL)
    finally:
        result = probe.stop(fault_at)
    back = result.back_after or 0.0
    converged = None if sessions_at is None or routes_at is None or (result.lost and result.back_after is None) \
        else max(sessions_at, routes_at, back)
    problems = [why] if why else []
    if f.max_loss is not None and result.lost > f.max_loss:
        problems.append(f"lost {result.lost} probe packets, at most {f.max_loss} allowed")
    return FaultResult(f.label(), probe_label, not problems, result, sessions_at, routes_at, converged,
                       "; ".join(problems))


def _watch(lab: "Lab", f: Fault, ready: Callable[[], bool], probe: PingProbe, fault_at: float
           ) -> tuple[float | None, float | None, str]:
    """Seconds after the fault until every session is up and every route expectation holds (and the
    probe answers again), or the fault's timeout; the last reason it was not there yet."""
    deadline = time.monotonic() + f.timeout
    recent = max(3.0 / f.probe.rate, 0.5)  # a reply this fresh means traffic flows now
    reader = lab_routes.TableReader()
    sessions_at = routes_at = None
    why = ""
    while True:
        now = time.time() - fault_at
        if sessions_at is None:
            ok, why_s = _sessions_up(lab) if ready() else (False, "the faulted process is not back yet")
            if ok:
                sessions_at = now
            else:
                why = f"sessions: {why_s}"
        if routes_at is None:
            reader.refresh()
            bad = [(e, shown) for e in lab.checks.routes
                   for ok, shown in [lab_routes.check(e, lab.plan.netns(e.node), reader)] if not ok]
            if not bad:
                routes_at = now
            else:
                why = f"routes: {bad[0][0].label()} (have: {bad[0][1]})"
        if sessions_at is not None and routes_at is not None and probe.answered_since(time.time() - recent):
            return sessions_at, routes_at, ""
        if time.monotonic() > deadline:
            if sessions_at is not None and routes_at is not None:
                why = "the probe is not answered"
            return sessions_at, routes_at, f"not converged in {f.timeout:g}s ({why})"
        time.sleep(WATCH)


def _sessions_up(lab: "Lab") -> tuple[bool, str]:
    for n in lab.plan.nodes:
        if not n.speaks_bgp:
            continue
        dead = lab.dead_daemons(n)
        if dead:
            return False, f"{', '.join(dead)} exited"
        ok, why = lab.read_sessions(n)
        if not ok:
            return False, f"{n.name}: {why}"
    return True, ""


# -- injecting -------------------------------------------------------------------------------------

def _inject(lab: "Lab", f: Fault) -> Callable[[], bool]:
    """Do the fault; returns when it is done (a link back up, a process started again) with a test
    for "the faulted part is back" that must hold before its sessions count."""
    node = lab.plan.by_name(f.node)
    ns = node.netns
    if f.link is not None:
        _ip(ns, "link", "set", f.link.interface, "down")
        time.sleep(f.link.down)
        _ip(ns, "link", "set", f.link.interface, "up")
        return lambda: True
    if f.kill is not None and f.kill.process == "exabgp":
        assert node.agent is not None
        status = _agent_status(node.agent.status)
        speaker = status.get("speaker") or {}
        pid, starts = speaker.get("exabgp_pid"), int(speaker.get("exabgp_starts") or 0)
        if not isinstance(pid, int):
            raise FaultError(f"{node.name}: the agent's status names no ExaBGP pid")
        _check_owned(pid, ns, "exabgp")
        os.kill(pid, signal.SIGKILL)
        return lambda: int((_agent_status(node.agent.status).get("speaker") or {}).get("exabgp_starts") or 0) > starts
    if node.agent is not None:  # kill -9 or SIGTERM the agent, then start it again
        label = f"{node.name}/agent"
        proc = lab.procs.find(label)
        if proc is None or not proc.running:
            raise FaultError(f"{label} is not running")
        if f.kill is not None:
            proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(timeout=STOP_GRACE)
            pause = f.kill.restart_after
        else:
            assert f.restart is not None
            _stop(proc.popen, STOP_GRACE)
            pause = f.restart.down
        lab.procs.forget(proc)
        time.sleep(pause)
        agent.start(lab.procs, node.name, ns, node.agent, lab.workdir, lab.env_for(node))
        return lambda: True  # agent.start removed the old status.json: sessions count only from the new one
    assert f.restart is not None and node.frr is not None
    daemons = [p for p in lab.procs.procs if p.label.startswith(f"{node.name}/") and "/exec[" not in p.label]
    for p in daemons:
        p.popen.send_signal(signal.SIGTERM)
    for p in daemons:
        _stop(p.popen, STOP_GRACE)
        lab.procs.forget(p)
    for stale in frr.state_dir(ns).glob("*.vty"):  # sockets of the stopped daemons; wait_ready looks for new ones
        stale.unlink(missing_ok=True)
    time.sleep(f.restart.down)
    names = frr.start(lab.procs, node.name, ns, node.frr, lab.workdir, lab.env_for(node))
    frr.wait_ready(ns, names, time.monotonic() + 60, alive=lambda: not lab.dead_daemons(node))
    frr.load_config(node.name, ns, node.frr.config, lab.workdir / f"{node.name}.vtysh.log")
    return lambda: True


def _ip(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise FaultError(f"ip -n {ns} {' '.join(args)}: {r.stderr.strip()}")


def _stop(p: subprocess.Popen, grace: float) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


def _agent_status(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_owned(pid: int, ns: str, name: str) -> None:
    """Never signal a process that is not the lab node's own: it must run in the node's namespace."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        raise FaultError(f"process {pid} is gone") from None
    r = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=10)
    if r.stdout.strip() != ns or name not in cmdline:
        raise FaultError(f"process {pid} ({cmdline[:60]!r}) is not {name} in namespace {ns}")
