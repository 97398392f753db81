"""The lab report: nodes and their BGP sessions, checks with pass/fail and timing, the verdict (pure text)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fabric.lab.kinds import LabPlan
from fabric.lab.sessions import Session

if TYPE_CHECKING:
    from fabric.lab.faults import FaultResult


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    seconds: float  # time until it passed (or until it gave up)
    detail: str = ""


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))
    def line(cells: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}s"


def fault_rows(faults: Sequence[FaultResult]) -> list[list[str]]:
    rows = []
    for f in faults:
        r = f.result
        lost = "-" if r is None else f"{r.lost}/{r.sent}"
        outage = "-" if r is None else (f"{r.outage * 1000:.0f} ms" if r.lost else "0")
        rows.append([f.label, f.probe, lost, outage, _secs(f.sessions_at), _secs(f.routes_at),
                     _secs(None if r is None else (r.back_after if r.lost else 0.0)),
                     _secs(f.converged_at), "pass" if f.ok else "FAIL"])
    return rows


def render(plan: LabPlan, sessions: dict[str, list[Session]], results: list[CheckResult],
           build_error: str | None = None, faults: Sequence[FaultResult] = (), picture: str | None = None) -> str:
    out: list[str] = ["", f"=== lab {plan.topology.name} (run {plan.run_id}) ==="]
    node_rows = []
    for n in plan.nodes:
        ss = sessions.get(n.name)
        if not n.speaks_bgp:
            summary = "-"
        elif ss is None:
            summary = "unknown"
        else:
            summary = f"{sum(s.established for s in ss)}/{len(ss)} established"
        node_rows.append([n.name, n.role.value, n.netns, summary])
    out += ["", "nodes:", *table(["NODE", "ROLE", "NAMESPACE", "BGP SESSIONS"], node_rows)]
    sess_rows = []
    for n in plan.nodes:
        for s in sessions.get(n.name) or []:
            sess_rows.append([s.node, s.peer, s.name or "-", s.remote_as or "-", s.state,
                              "-" if s.prefixes is None else str(s.prefixes)])
    if sess_rows:
        out += ["", "sessions:", *table(["NODE", "PEER", "PEER NAME", "REMOTE AS", "STATE", "PFX RCVD"], sess_rows)]
    if results:
        rows = [[r.name, "pass" if r.ok else "FAIL", f"{r.seconds:.1f}s", r.detail] for r in results]
        out += ["", "checks:", *table(["CHECK", "RESULT", "TIME", "DETAIL"], rows)]
    if faults:
        out += ["", "faults (seconds after the fault; traffic: the reply that ended the last loss):",
                *table(["FAULT", "PROBE", "LOST", "OUTAGE", "SESSIONS", "ROUTES", "TRAFFIC", "CONVERGED", "RESULT"],
                       fault_rows(faults))]
    if picture:
        out += ["", f"picture: {picture}"]
    passed = sum(r.ok for r in results)
    out.append("")
    if build_error:
        out.append(f"build failed: {build_error}")
    ok = verdict(results, build_error)
    out.append(f"verdict: {'PASS' if ok else 'FAIL'} ({passed}/{len(results)} checks passed)")
    return "\n".join(out) + "\n"


def verdict(results: list[CheckResult], build_error: str | None = None) -> bool:
    return build_error is None and bool(results) and all(r.ok for r in results)
