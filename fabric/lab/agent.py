"""The bgp-fabric agent as a lab node: `fabric agent -c CONFIG` in the node's namespace, status from status.json.

The agent runs in the foreground and logs to stderr (captured into the lab's folder); it writes
`<paths.runDir>/status.json` atomically on every change, which is all the lab reads.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from fabric.lab import netns
from fabric.lab.kinds import AgentSpec
from fabric.lab.procs import Processes
from fabric.lab.sessions import AgentStatus, from_agent_status


def command(spec: AgentSpec) -> list[str]:
    # Same interpreter as the runner: the venv's, with the project importable.
    return [sys.executable, "-m", "fabric.cli", "agent", "-c", str(spec.config)]


def start(procs: Processes, node: str, ns: str, spec: AgentSpec, logdir: Path, env: dict[str, str]) -> bool:
    """Start the agent; returns whether its runDir is new (then teardown removes it all)."""
    fresh = not spec.run_dir.exists()
    # A status.json left by an earlier run would report that run's sessions.
    spec.status.unlink(missing_ok=True)
    procs.start(f"{node}/agent", netns.exec_cmd(ns, command(spec)), logdir / f"{node}.agent.log", env)
    return fresh


def read_status(node: str, spec: AgentSpec) -> AgentStatus | None:
    """The agent's current status, or None while it has written none (or a half-readable one)."""
    try:
        data = json.loads(spec.status.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None
    return from_agent_status(node, data)


def cleanup(spec: AgentSpec, remove_run_dir: bool) -> None:
    if remove_run_dir:
        shutil.rmtree(spec.run_dir, ignore_errors=True)
    else:
        spec.status.unlink(missing_ok=True)
