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


def render(s: dict[str, Any]) -> str:
    lines = [f"node {s['node']} ({s['address']}, AS {s['asn']}) ready={s['ready']} phase={s.get('phase', '?')} "
             f"ipipMode={','.join(s['ipipModes'])}"]
    for w in s.get("waitingFor", []):
        lines.append(f"  waiting for {w}")
    lines.append(f"{'PEER':<16} {'ADDRESS':<16} {'AS':<11} {'KIND':<9} {'STATE':<12} {'ROUTES':>6} {'STALE':>5}")
    for p in s["peers"]:
        lines.append(f"{p['name']:<16} {p['address']:<16} {p['asn']:<11} {p['kind']:<9} {p['state']:<12} "
                     f"{p.get('routes', 0):>6} {p.get('stale', 0):>5}")
    lines.append(f"routes programmed: {len(s['routes'])}")
    for dst, r in sorted(s["routes"].items()):
        hops = ", ".join(f"via {g} dev {d}{' onlink' if o else ''}" for g, d, o in r["nexthops"]) or r["kind"]
        lines.append(f"  {dst:<18} {hops}{' mtu ' + str(r['mtu']) if r.get('mtu') else ''}")
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
        if not st.get("problems"):
            for key, why in sorted((st.get("failures") or {}).items()):
                lines.append(f"  FAILED {key}: {why}")
    for w in s.get("warnings", []):
        lines.append(f"WARNING: {w}")
    for e in s.get("errors", []):
        lines.append(f"ERROR: {e}")
    return "\n".join(lines)
