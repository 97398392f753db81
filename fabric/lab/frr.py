"""FRR as a lab node: one set of daemons per namespace (`-N <netns>` pathspace), configured through vtysh.

Daemons run in the foreground (logs to the lab's folder) as FRR's own user, state under
/run/frr/<netns>. The node's frr.conf is applied with `vtysh -N <netns> -f frr.conf` once every
daemon's vty socket exists, as FRR's integrated-config boot does. State is read as FRR's JSON.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fabric.lab import netns
from fabric.lab.kinds import FrrSpec
from fabric.lab.procs import Processes

FRR_SBIN = Path(os.environ.get("FABRIC_FRR_SBIN", "/usr/lib/frr"))
RUN_ROOT = Path("/run/frr")


class FrrError(RuntimeError):
    pass


def daemons(spec: FrrSpec) -> list[str]:
    """Start order: mgmtd (FRR >= 9 has it; it must come first), zebra, then the rest."""
    first = ["mgmtd"] if (FRR_SBIN / "mgmtd").exists() else []
    return first + ["zebra"] + [d for d in spec.daemons if d not in ("zebra", "mgmtd")]


def state_dir(ns: str) -> Path:
    return RUN_ROOT / ns


def start(procs: Processes, node: str, ns: str, spec: FrrSpec, logdir: Path, env: dict[str, str]) -> list[str]:
    """Start the node's daemons; returns their names. Missing binaries are a clear error."""
    run = state_dir(ns)
    run.mkdir(parents=True, exist_ok=True)
    try:
        os.chown(RUN_ROOT, pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid)
        os.chown(run, pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid)
    except KeyError:
        raise FrrError("there is no 'frr' user: install FRR (apt-get install frr)") from None
    names = daemons(spec)
    for d in names:
        binary = FRR_SBIN / d
        if not binary.exists():
            raise FrrError(f"{node}: FRR daemon {binary} is not installed")
        cmd = [str(binary), "-N", ns, "-P", "0", "--log", "stdout", "-f", "/dev/null"]
        if spec.profile:
            cmd += ["-F", spec.profile]
        procs.start(f"{node}/{d}", netns.exec_cmd(ns, cmd), logdir / f"{node}.{d}.log", env)
    return names


def wait_ready(ns: str, names: list[str], deadline: float, alive: Callable[[], bool]) -> None:
    """Wait until every daemon's vty socket exists (startup only; polled with a deadline)."""
    run = state_dir(ns)
    while True:
        missing = [d for d in names if not (run / f"{d}.vty").exists()]
        if not missing:
            return
        if not alive():
            raise FrrError(f"an FRR daemon exited before its vty socket appeared ({', '.join(missing)})")
        if time.monotonic() > deadline:
            raise FrrError(f"no vty socket from {', '.join(missing)} in {run}")
        time.sleep(0.1)


def load_config(node: str, ns: str, conf: Path, log: Path) -> None:
    """Apply frr.conf through vtysh; a rejected line is an error quoting FRR's message."""
    r = subprocess.run(["vtysh", "-N", ns, "-f", str(conf)], capture_output=True, text=True, timeout=60)
    with open(log, "a") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip() and "vtysh.conf" not in ln]
        raise FrrError(f"{node}: FRR rejected {conf} (vtysh exit {r.returncode}): " + " | ".join(lines[-6:]))


def show_json(ns: str, command: str) -> str:
    r = subprocess.run(["vtysh", "-N", ns, "-c", command], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise FrrError(f"vtysh -N {ns} -c '{command}' failed: {(r.stderr or r.stdout).strip()[:200]}")
    return r.stdout


def cleanup(ns: str) -> None:
    shutil.rmtree(state_dir(ns), ignore_errors=True)
