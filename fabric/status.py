"""The agent's status file (`<runDir>/status.json`), written atomically, and its human rendering."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

FILE = "status.json"


def write(run_dir: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".status-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            # one dumps call, no indent: json's C encoder (json.dump and indent use the pure-Python one,
            # 40x slower in the lab kernel; the agent writes this after every change)
            f.write(json.dumps(data, sort_keys=True, default=str))
        os.replace(tmp, run_dir / FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / FILE).read_text())


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


MAX_ROUTES = 50  # route lines in the text view (all of them: --json)
MAX_SERVICES = 50


def render(s: dict[str, Any]) -> str:
    """The text view of status.json: summaries (counts, a few examples); `--json` has every item."""
    now = s.get("updated") or 0.0
    lines = [f"node {s['node']} ({s['address']}, AS {s['asn']}) ready={s['ready']} phase={s.get('phase', '?')} "
             f"ipipMode={','.join(s['ipipModes'])}"]
    for w in s.get("waitingFor", []):
        lines.append(f"  waiting for {w}")
    lines += _source(s.get("source"), now)
    lines.append(f"{'PEER':<16} {'ADDRESS':<16} {'AS':<11} {'KIND':<9} {'STATE':<12} {'FOR':>5} {'ROUTES':>6} "
                 f"{'USED':>6} {'STALE':>5}")
    for p in s["peers"]:
        since = p.get("since")
        lines.append(f"{p['name']:<16} {p['address']:<16} {p['asn']:<11} {p['kind']:<9} {p['state']:<12} "
                     f"{_ago(now - since) if since else '-':>5} {p.get('routes', 0):>6} "
                     f"{p.get('accepted', p.get('routes', 0)):>6} {p.get('stale', 0):>5}")
        cause = p.get("cause")
        if cause:
            lines.append(f"  down: {cause['text']}")
        for code, g in sorted((p.get("rejected") or {}).items()):
            more = g["count"] - len(g["examples"])
            lines.append(f"  not used: {g['count']} ({code}) {g['reason']}; e.g. {', '.join(g['examples'])}"
                         + (f" and {more} more" if more > 0 else ""))
    routes = s["routes"]
    prog = ((s.get("stages") or {}).get("routes") or {}).get("programmed") or {}
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(prog.items()) if n)
    lines.append(f"routes programmed: {len(routes)}" + (f" ({kinds})" if kinds else ""))
    for dst, r in sorted(routes.items())[:MAX_ROUTES]:
        hops = ", ".join(f"via {g} dev {d}{' onlink' if o else ''}" for g, d, o in r["nexthops"]) or r["kind"]
        lines.append(f"  {dst:<18} {hops}{' mtu ' + str(r['mtu']) if r.get('mtu') else ''}")
    if len(routes) > MAX_ROUTES:
        lines.append(f"  ... {len(routes) - MAX_ROUTES} more (fabric status --json)")
    for name, st in sorted((s.get("stages") or {}).items()):
        state = "STALLED" if st.get("stalled") else ("running" if st.get("running") else "idle")
        err = f" error: {st['error']} (retry in {st.get('retryIn')}s)" if st.get("error") else ""
        lines.append(f"stage {name:<9} {state:<8} runs={st.get('runs', 0)} failed={st.get('failedRuns', 0)} "
                     f"last={st.get('lastDuration')}s{err}")
        if st.get("summary"):  # a stage's own one-line account of what it holds
            lines.append(f"  {st['summary']}")
        for key, p in sorted((st.get("problems") or {}).items()):
            kind = "CONFLICT" if p.get("conflict") else "FAILED"
            lines.append(f"  {kind} {key}: {p['error']} (attempt {p['attempts']})")
        if not st.get("problems") and name != "services":
            for key, why in sorted((st.get("failures") or {}).items()):
                lines.append(f"  FAILED {key}: {why}")
    lines += _services(s.get("services"))
    for p in ((s.get("stages") or {}).get("cni") or {}).get("pods", []):  # this node's pods (CNI)
        ports = ", ".join(f"{m.get('hostIP', '*')}:{m['hostPort']}/{m['protocol']}->{m['containerPort']}"
                          for m in p.get("hostPorts", []))
        lines.append(f"pod {p['address']:<16} {p['hostIfname']:<16} {p.get('pod') or p['containerID'][:24]}"
                     + (f"  hostPorts {ports}" if ports else ""))
    for w in s.get("warnings", []):
        lines.append(f"WARNING: {w}")
    for e in s.get("errors", []):
        lines.append(f"ERROR: {e}")
    return "\n".join(lines)


def _source(src: dict[str, Any] | None, now: float) -> list[str]:
    if not src:
        return []
    if src.get("kind") == "file":
        head = f"source file {src.get('path')}: " + ("synced" if src.get("synced") else "NOT LOADED")
        if src.get("loadedAt"):
            head += f", last loaded {_ago(now - src['loadedAt'])} ago"
        out = [head]
        if src.get("error"):
            out.append(f"  REFUSED {_ago(now - (src.get('refusedAt') or now))} ago (the last good state stays): "
                       + "; ".join(src["error"]))
        return out
    kinds = src.get("kinds") or {}
    unsynced = sorted(k for k, v in kinds.items() if not v.get("synced"))
    head = "source kubernetes: " + ("synced" if src.get("synced") else f"NOT SYNCED (waiting for {', '.join(unsynced)})")
    if src.get("unreachableSince"):
        head += f"; API server UNREACHABLE for {_ago(now - src['unreachableSince'])}"
    out = [head]
    for kind, v in sorted(kinds.items()):
        if v.get("lastError"):
            out.append(f"  {kind}: failing for {_ago(now - (v.get('failingSince') or now))}: {v['lastError']} "
                       f"({v.get('errors', 0)} errors, {max(0, v.get('lists', 0) - 1)} relists)")
    return out


def _services(svc: dict[str, Any] | None) -> list[str]:
    """The services stage as a table: one row per virtual server, then skipped and failing services."""
    if not svc or "virtualServers" not in svc:
        return []
    out = [f"services: {svc['virtualServers']} virtual server(s), {svc.get('realServers', 0)} destination(s); "
           f"{len(svc.get('skipped') or {})} skipped, {len(svc.get('failing') or {})} failing"]
    rows = svc.get("table") or []
    if rows:
        out.append(f"  {'VIRTUAL SERVER':<28} {'SERVICE':<28} {'SCHEDULER':<16} {'DEST':>5}  STATE")
        for r in rows[:MAX_SERVICES]:
            out.append(f"  {r['vs']:<28} {r['service']:<28} {r['scheduler']:<16} "
                       f"{str(r['ready']) + '/' + str(r['destinations']):>5}  {r['state']}")
        hidden = len(rows) - MAX_SERVICES + int(svc.get("tableTruncated", 0))
        if hidden > 0:
            out.append(f"  ... {hidden} more (fabric status --json; fabric explain SERVICE)")
    for name, why in sorted((svc.get("skipped") or {}).items()):
        out.append(f"  SKIPPED {name}: {why}")
    for name, f in sorted((svc.get("failing") or {}).items()):
        out.append(f"  FAILING {name}: {'; '.join(f.get('errors', []))} (attempt {f.get('attempts')}, "
                   f"retry in {f.get('retryIn')}s)")
    for name, ws in sorted((svc.get("skippedSliceEntries") or {}).items()):
        out.append(f"  {name}: {len(ws)} slice entr{'y' if len(ws) == 1 else 'ies'} skipped: {ws[0]}"
                   + (f" (+{len(ws) - 1} more)" if len(ws) > 1 else ""))
    for name, why in sorted((svc.get("skippedSlices") or {}).items()):
        out.append(f"  SKIPPED {why}")
    return out
